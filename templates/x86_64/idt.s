# The long-mode IDT: 16-byte gates to the shared stubs (templates/interrupts.s). Its 32 exception gates lead to
# one report on COM1 (rip= and all sixteen general registers) and a failure exit through isa-debug-exit; its 16 PIC
# gates (IRQ_BASE..) only acknowledge the interrupt. The double fault runs on its own stack (IST1).

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
    mov rdi, offset idt + SYSCALL_VECTOR*0x10       # int 0x80: a gate ring 3 may use (templates/task.s)
    mov rax, offset syscall_entry
    mov [rdi], ax
    mov word ptr [rdi + 0x2], KERNEL_CS
    mov word ptr [rdi + 0x4], IDT_GATE_USER
    shr rax, 0x10
    mov [rdi + 0x6], ax
    shr rax, 0x10
    mov [rdi + 0x8], eax
    mov dword ptr [rdi + 0xc], 0x0
    lidt [idt_descriptor]
    ret

.section .rodata
.balign 8
exception_fields:                                   # the frame exception_common saves (templates/interrupts.s)
    .xword str_vector, EXC_VECTOR
    .xword str_error, EXC_ERROR
    .xword str_rip, EXC_IP
    .xword str_cr2, EXC_CR2
    .xword str_rax, 0x8
    .xword str_rbx, 0x10
    .xword str_rcx, 0x18
    .xword str_rdx, 0x20
    .xword str_rsi, 0x28
    .xword str_rdi, 0x30
    .xword str_rbp, 0x38
    .xword str_rsp, 0xa8
    .xword str_r8, 0x40
    .xword str_r9, 0x48
    .xword str_r10, 0x50
    .xword str_r11, 0x58
    .xword str_r12, 0x60
    .xword str_r13, 0x68
    .xword str_r14, 0x70
    .xword str_r15, 0x78
    .xword str_cs, EXC_CS
    .xword str_rflags, EXC_FLAGS
    .xword 0x0
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
    .skip IDT_ENTRIES * 0x10

.section .data
.balign 8
idt_descriptor:
    .word IDT_ENTRIES * 0x10 - 1
    .quad idt
