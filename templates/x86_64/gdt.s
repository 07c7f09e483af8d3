# kgen's 64-bit GDT: null, a 64-bit ring-0 code segment (L set), a data segment, the TSS, and ring 3's data and
# 64-bit code segments (in the order sysret expects). The TSS gives the double-fault handler a stack of its own
# (IST1), so a fault caused by an overflowed stack can still be reported, and gives an interrupt or `int 0x80` from
# ring 3 its ring-0 stack (rsp0, set by task_run). In long mode base and limit of code and data segments are ignored; the descriptors come from the
# layout (GDT_KERNEL_CODE/DATA) with the accessed bit preset so the CPU never writes the GDT.
#
# The 32-bit entry loads this GDT through gdt_descriptor_phys (paging is on but only the identity map reaches
# code it runs), far-jumps through KERNEL_CS into 64-bit code, and gdt_init loads it again by its virtual address.

.section .text
gdt_init:
    lgdt [gdt_descriptor]
    push KERNEL_CS                                  # a far return is how 64-bit code reloads CS
    mov rax, offset .Lreload_cs
    push rax
    retfq
.Lreload_cs:
    KERNEL_DATA_SEGMENTS                            # templates/macros.inc
    mov rax, offset double_fault_stack_top
    mov [tss + TSS64_IST1], rax
    mov ax, KERNEL_TSS
    ltr ax
    # `syscall` from ring 3 enters syscall_entry64 with CS = KERNEL_CS, SS = KERNEL_CS + 8, interrupts, direction
    # and trap flags cleared; sysret returns with CS = SYSRET_BASE + 16, SS = SYSRET_BASE + 8 (the user segments).
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_SCE
    wrmsr
    mov ecx, MSR_STAR
    xor eax, eax
    mov edx, KERNEL_CS | (SYSRET_BASE << 0x10)
    wrmsr
    mov ecx, MSR_LSTAR
    mov rax, offset syscall_entry64
    mov rdx, rax
    shr rdx, 0x20
    wrmsr
    mov ecx, MSR_FMASK
    mov eax, SYSCALL_FLAGS_MASK
    xor edx, edx
    wrmsr
    ret

.section .data
.balign 8
gdt:
    GDT_KERNEL_DESCRIPTORS                          # null, KERNEL_CS, KERNEL_DS (templates/macros.inc)
    # A 64-bit TSS descriptor takes two slots: base 31..0 spread over the first, base 63..32 in the second.
    .quad (TSS64_SIZE - 1) | ((tss & 0xffffff) << 0x10) | (SEG_ACCESS_TSS64 << 0x28) | (((tss >> 0x18) & 0xff) << 0x38)
    .quad tss >> 0x20
    .quad GDT_USER_DATA
    .quad GDT_USER_CODE
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .quad gdt
gdt_descriptor_phys:
    .word gdt_end - gdt - 1
    .long gdt - KERNEL_VIRTUAL_BASE

.section .bss
.balign 0x10, 0
tss:
    .skip TSS64_SIZE
.balign 0x10, 0
double_fault_stack:
    .skip PAGE_SIZE
double_fault_stack_top:
