# Interrupts in long mode: an IDT of 16-byte gates whose 32 exception gates lead to one report on COM1 and a
# failure exit through isa-debug-exit, and whose 16 PIC gates (IRQ_BASE..) only acknowledge the interrupt: the
# kernel uses IRQs just to wake from `hlt` (templates/calls.s). The double fault runs on its own stack (IST1).
#
# Each stub is 16 bytes so the gate for vector v points at interrupt_stubs + 16*v. Stubs of vectors that push no
# error code push a 0 first, so every handler sees the same frame. Which vectors push one is a CPU fact, passed in
# as EXCEPTIONS_WITH_ERROR_CODE_MASK.
#
# The report is one line the harness parses (kgen/diagnose.py):
# "kgen: exception vector=0x... error=0x... rip=0x... cr2=0x... rax=... r15=... cs=... rflags=... rsp=..."

.section .text
idt_init:
    xor ecx, ecx
    mov rdi, offset idt
.Lidt_gate:
    mov rax, rcx
    shl rax, 0x4
    add rax, offset interrupt_stubs
    mov [rdi], ax                                   # offset 15..0
    mov word ptr [rdi + 0x2], KERNEL_CS
    mov word ptr [rdi + 0x4], IDT_GATE_INTERRUPT64
    cmp ecx, VECTOR_DOUBLE_FAULT
    jne .Lidt_no_ist
    mov byte ptr [rdi + 0x4], DOUBLE_FAULT_IST
.Lidt_no_ist:
    shr rax, 0x10
    mov [rdi + 0x6], ax                             # offset 31..16
    shr rax, 0x10
    mov [rdi + 0x8], eax                            # offset 63..32
    mov dword ptr [rdi + 0xc], 0x0
    add rdi, 0x10
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
    cmp qword ptr [rsp], IRQ_BASE
    jb exception_common
    # A PIC interrupt: acknowledge it (the slave too for IRQ 8-15) and return to whatever `hlt` it ended.
    push rax
    mov al, PIC_EOI
    cmp qword ptr [rsp + 0x8], IRQ_BASE + 0x8
    jb .Lirq_master_only
    out PIC2_COMMAND, al
.Lirq_master_only:
    out PIC1_COMMAND, al
    pop rax
    add rsp, 0x10
    iretq

# Frame after the pushes below, from rsp upwards: cr2, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8..r15, then vector,
# error code, rip, cs, rflags, rsp, ss (the CPU pushes the last five in long mode). exception_fields names them.
exception_common:
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rbp
    push rdi
    push rsi
    push rdx
    push rcx
    push rbx
    push rax
    mov rax, cr2
    push rax
    mov rbp, rsp
    push offset str_exception
    call serial_puts
    add rsp, 0x8
    mov rsi, offset exception_fields
.Lexception_field:
    mov rax, [rsi]
    test rax, rax
    jz .Lexception_done
    push rax
    mov rax, [rsi + 0x8]
    push qword ptr [rbp + rax]
    push qword ptr [rsp + 0x8]
    call serial_puts
    add rsp, 0x8
    call serial_puthex
    add rsp, 0x10
    add rsi, 0x10
    jmp .Lexception_field
.Lexception_done:
    push offset str_newline
    call serial_puts
    add rsp, 0x8
    push DEBUG_EXIT_FAILURE
    call debug_exit

.section .rodata
.balign 8
exception_fields:
    .quad str_vector, 0x80
    .quad str_error, 0x88
    .quad str_rip, 0x90
    .quad str_cr2, 0x0
    .quad str_rax, 0x8
    .quad str_rbx, 0x10
    .quad str_rcx, 0x18
    .quad str_rdx, 0x20
    .quad str_rsi, 0x28
    .quad str_rdi, 0x30
    .quad str_rbp, 0x38
    .quad str_rsp, 0xa8
    .quad str_r8, 0x40
    .quad str_r9, 0x48
    .quad str_r10, 0x50
    .quad str_r11, 0x58
    .quad str_r12, 0x60
    .quad str_r13, 0x68
    .quad str_r14, 0x70
    .quad str_r15, 0x78
    .quad str_cs, 0x98
    .quad str_rflags, 0xa0
    .quad 0x0
str_exception:
    .asciz "kgen: exception"
str_vector:
    .asciz " vector="
str_error:
    .asciz " error="
str_rip:
    .asciz " rip="
str_cr2:
    .asciz " cr2="
str_rax:
    .asciz " rax="
str_rbx:
    .asciz " rbx="
str_rcx:
    .asciz " rcx="
str_rdx:
    .asciz " rdx="
str_rsi:
    .asciz " rsi="
str_rdi:
    .asciz " rdi="
str_rbp:
    .asciz " rbp="
str_rsp:
    .asciz " rsp="
str_r8:
    .asciz " r8="
str_r9:
    .asciz " r9="
str_r10:
    .asciz " r10="
str_r11:
    .asciz " r11="
str_r12:
    .asciz " r12="
str_r13:
    .asciz " r13="
str_r14:
    .asciz " r14="
str_r15:
    .asciz " r15="
str_cs:
    .asciz " cs="
str_rflags:
    .asciz " rflags="

.section .bss
.balign 0x10, 0
idt:
    .skip IDT_VECTORS * 0x10

.section .data
.balign 8
idt_descriptor:
    .word IDT_VECTORS * 0x10 - 1
    .quad idt
