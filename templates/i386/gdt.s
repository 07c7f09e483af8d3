# kgen's own GDT: flat 4 GiB code and data segments for ring 0 and for ring 3, and a TSS. The loader's GDT is
# somewhere in low memory that the kernel no longer maps, so the kernel must load its own before the next segment
# load or interrupt. The descriptors are built in Python (layout: GDT_KERNEL_CODE/DATA, GDT_USER_CODE/DATA) with the
# accessed bit preset.
#
# The TSS is there for one field: when an interrupt or `int 0x80` arrives in ring 3, the CPU takes the ring-0 stack
# from TSS.esp0/ss0 (task_run sets esp0 before it enters a task). Its I/O map base lies at the limit, so ring 3
# has no port access. Hardware task switching is never used.

.section .text
gdt_init:
    lgdt [gdt_descriptor]
    ljmp KERNEL_CS, .Lreload_cs                      # a far jump is the only way to reload CS
.Lreload_cs:
    KERNEL_DATA_SEGMENTS                            # templates/macros.inc
    mov dword ptr [tss + TSS32_SS0], KERNEL_DS
    mov word ptr [tss + TSS32_IOMAP], TSS32_SIZE
    mov ax, TASK_TSS
    ltr ax
    ret

.section .data
.balign 8
gdt:
    GDT_KERNEL_DESCRIPTORS                          # null, KERNEL_CS, KERNEL_DS (templates/macros.inc)
    .quad GDT_USER_CODE
    .quad GDT_USER_DATA
    .quad (TSS32_SIZE - 1) | ((tss & 0xffffff) << 0x10) | (SEG_ACCESS_TSS32 << 0x28) | (((tss >> 0x18) & 0xff) << 0x38)
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt

.section .bss
.balign 0x10, 0
tss:
    .skip TSS32_SIZE
