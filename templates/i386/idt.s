# Interrupts: an IDT whose 32 exception gates lead to one report on COM1 and a failure exit through
# isa-debug-exit, and whose 16 PIC gates (IRQ_BASE..) only acknowledge the interrupt: the kernel uses IRQs just to
# wake from `hlt` (templates/calls.s).
#
# Each stub is 16 bytes so the gate for vector v is interrupt_stubs + 16*v, computed by idt_init. Stubs of
# vectors that push no error code push a 0 first, so every handler sees the same frame. Which vectors push one is
# a CPU fact, passed in as EXCEPTIONS_WITH_ERROR_CODE_MASK.
#
# The report is one line the harness parses: "kgen: exception vector=0x... error=0x... eip=0x... cr2=0x... ...".

.section .text
idt_init:
    xor ecx, ecx
.Lidt_gate:
    mov eax, ecx
    shl eax, 0x4
    add eax, offset interrupt_stubs
    mov [idt + ecx*8], ax
    mov word ptr [idt + ecx*8 + 0x2], KERNEL_CS
    mov word ptr [idt + ecx*8 + 0x4], IDT_GATE_INTERRUPT32
    shr eax, 0x10
    mov [idt + ecx*8 + 0x6], ax
    inc ecx
    cmp ecx, IDT_VECTORS
    jb .Lidt_gate
    lidt [idt_descriptor]
    ret

.macro INTERRUPT_STUB vector
.balign 0x10, 0xcc
.if ((EXCEPTIONS_WITH_ERROR_CODE_MASK >> \vector) & 1) == 0
    push 0x0
.endif
    push \vector
    jmp interrupt_common
.endm

.balign 0x10, 0xcc
interrupt_stubs:
INTERRUPT_STUB 0x0
INTERRUPT_STUB 0x1
INTERRUPT_STUB 0x2
INTERRUPT_STUB 0x3
INTERRUPT_STUB 0x4
INTERRUPT_STUB 0x5
INTERRUPT_STUB 0x6
INTERRUPT_STUB 0x7
INTERRUPT_STUB 0x8
INTERRUPT_STUB 0x9
INTERRUPT_STUB 0xa
INTERRUPT_STUB 0xb
INTERRUPT_STUB 0xc
INTERRUPT_STUB 0xd
INTERRUPT_STUB 0xe
INTERRUPT_STUB 0xf
INTERRUPT_STUB 0x10
INTERRUPT_STUB 0x11
INTERRUPT_STUB 0x12
INTERRUPT_STUB 0x13
INTERRUPT_STUB 0x14
INTERRUPT_STUB 0x15
INTERRUPT_STUB 0x16
INTERRUPT_STUB 0x17
INTERRUPT_STUB 0x18
INTERRUPT_STUB 0x19
INTERRUPT_STUB 0x1a
INTERRUPT_STUB 0x1b
INTERRUPT_STUB 0x1c
INTERRUPT_STUB 0x1d
INTERRUPT_STUB 0x1e
INTERRUPT_STUB 0x1f
INTERRUPT_STUB 0x20
INTERRUPT_STUB 0x21
INTERRUPT_STUB 0x22
INTERRUPT_STUB 0x23
INTERRUPT_STUB 0x24
INTERRUPT_STUB 0x25
INTERRUPT_STUB 0x26
INTERRUPT_STUB 0x27
INTERRUPT_STUB 0x28
INTERRUPT_STUB 0x29
INTERRUPT_STUB 0x2a
INTERRUPT_STUB 0x2b
INTERRUPT_STUB 0x2c
INTERRUPT_STUB 0x2d
INTERRUPT_STUB 0x2e
INTERRUPT_STUB 0x2f

interrupt_common:
    cmp dword ptr [esp], IRQ_BASE
    jb exception_common
    # A PIC interrupt: acknowledge it (the slave too for IRQ 8-15) and return to whatever `hlt` it ended.
    push eax
    mov al, PIC_EOI
    cmp dword ptr [esp + 0x4], IRQ_BASE + 0x8
    jb .Lirq_master_only
    out PIC2_COMMAND, al
.Lirq_master_only:
    out PIC1_COMMAND, al
    pop eax
    add esp, 0x8
    iret

# Frame after the pushes below, from esp upwards: cr2, edi, esi, ebp, esp, ebx, edx, ecx, eax (pushad),
# vector, error code, eip, cs, eflags (the CPU's). exception_fields names the offsets.
exception_common:
    pushad
    mov eax, cr2
    push eax
    mov ebp, esp
    cmp dword ptr [ebp + 0x24], VECTOR_PAGE_FAULT
    jne .Lexception_report
    push dword ptr [ebp + 0x28]
    push dword ptr [ebp]
    call vmm_page_fault                             # a first touch of a lazy allocation is not an error
    add esp, 0x8
    test eax, eax
    jz .Lexception_page_fault
    add esp, 0x4
    popad
    add esp, 0x8
    iret
.Lexception_page_fault:
    push dword ptr [ebp + 0x28]
    call vmm_report_fault
    add esp, 0x4
.Lexception_report:
    push offset str_exception
    call serial_puts
    add esp, 0x4
    mov esi, offset exception_fields
.Lexception_field:
    mov eax, [esi]
    test eax, eax
    jz .Lexception_done
    push eax
    call serial_puts
    add esp, 0x4
    mov eax, [esi + 0x4]
    push dword ptr [ebp + eax]
    call serial_puthex
    add esp, 0x4
    add esi, 0x8
    jmp .Lexception_field
.Lexception_done:
    push offset str_newline
    call serial_puts
    add esp, 0x4
    push DEBUG_EXIT_FAILURE
    call debug_exit

.section .rodata
.balign 4
exception_fields:
    .long str_vector, 0x24
    .long str_error, 0x28
    .long str_eip, 0x2c
    .long str_cr2, 0x0
    .long str_eax, 0x20
    .long str_ebx, 0x14
    .long str_ecx, 0x1c
    .long str_edx, 0x18
    .long str_esi, 0x8
    .long str_edi, 0x4
    .long str_ebp, 0xc
    .long str_esp, 0x10
    .long str_cs, 0x30
    .long str_eflags, 0x34
    .long 0x0
str_exception:
    .asciz "kgen: exception"
str_vector:
    .asciz " vector="
str_error:
    .asciz " error="
str_eip:
    .asciz " eip="
str_cr2:
    .asciz " cr2="
str_eax:
    .asciz " eax="
str_ebx:
    .asciz " ebx="
str_ecx:
    .asciz " ecx="
str_edx:
    .asciz " edx="
str_esi:
    .asciz " esi="
str_edi:
    .asciz " edi="
str_ebp:
    .asciz " ebp="
str_esp:
    .asciz " esp="
str_cs:
    .asciz " cs="
str_eflags:
    .asciz " eflags="

.section .bss
.balign 8
idt:
    .skip IDT_VECTORS * 8

.section .data
.balign 4
idt_descriptor:
    .word IDT_VECTORS * 8 - 1
    .long idt
