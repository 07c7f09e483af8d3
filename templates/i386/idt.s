# The i386 IDT: 8-byte gates to the shared stubs (templates/interrupts.s). Its 32 exception gates lead to one
# report on COM1 and a failure exit through isa-debug-exit (a page fault first asks the VMM whether it was the first
# touch of a lazy allocation); its 16 PIC gates (IRQ_BASE..) only acknowledge the interrupt: the kernel uses IRQs
# just to wake from `hlt` (templates/calls.s).

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
    mov eax, offset syscall_entry                   # int 0x80: a gate ring 3 may use (templates/task.s)
    mov [idt + SYSCALL_VECTOR*8], ax
    mov word ptr [idt + SYSCALL_VECTOR*8 + 0x2], KERNEL_CS
    mov word ptr [idt + SYSCALL_VECTOR*8 + 0x4], IDT_GATE_USER
    shr eax, 0x10
    mov [idt + SYSCALL_VECTOR*8 + 0x6], ax
    lidt [idt_descriptor]
    ret

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
    call page_fault
    add esp, 0x8
    test eax, eax
    jz .Lexception_report
    add esp, 0x4                                    # cr2
    popad
    add esp, 0x8                                    # vector and error code
    iret
.Lexception_report:
    test dword ptr [ebp + 0x30], SELECTOR_RPL3      # from ring 3: the task stops, not the kernel
    jz exception_report
    push dword ptr [ebp + 0x28]
    push dword ptr [ebp + 0x2c]
    push dword ptr [ebp]
    push dword ptr [ebp + 0x24]
    call user_fault                                 # (vector, cr2, eip, error); does not return

.section .rodata
.balign 4
exception_fields:
    .xword str_vector, 0x24
    .xword str_error, 0x28
    .xword str_eip, 0x2c
    .xword str_cr2, 0x0
    .xword str_eax, 0x20
    .xword str_ebx, 0x14
    .xword str_ecx, 0x1c
    .xword str_edx, 0x18
    .xword str_esi, 0x8
    .xword str_edi, 0x4
    .xword str_ebp, 0xc
    .xword str_esp, 0x10
    .xword str_cs, 0x30
    .xword str_eflags, 0x34
    .xword 0x0
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
    .skip IDT_ENTRIES * 8

.section .data
.balign 4
idt_descriptor:
    .word IDT_ENTRIES * 8 - 1
    .long idt
