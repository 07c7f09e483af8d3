# The i386 IDT: 8-byte gates to the shared stubs (templates/interrupts.s). Its 32 exception gates lead to one
# report on COM1 and a failure exit through isa-debug-exit (a page fault first asks the VMM whether it was the first
# touch of a lazy allocation: exception_common, templates/interrupts.s); its 16 PIC gates (IRQ_BASE..) only acknowledge the interrupt: the kernel uses IRQs
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

.section .rodata
.balign 4
exception_fields:                                   # the frame exception_common saves (templates/interrupts.s)
    .xword str_vector, EXC_VECTOR
    .xword str_error, EXC_ERROR
    .xword str_eip, EXC_IP
    .xword str_cr2, EXC_CR2
    .xword str_eax, 0x20
    .xword str_ebx, 0x14
    .xword str_ecx, 0x1c
    .xword str_edx, 0x18
    .xword str_esi, 0x8
    .xword str_edi, 0x4
    .xword str_ebp, 0xc
    .xword str_esp, 0x10
    .xword str_cs, EXC_CS
    .xword str_eflags, EXC_FLAGS
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
