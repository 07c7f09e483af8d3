# kgen's own GDT: flat 4 GiB code and data segments for ring 0. The loader's GDT is somewhere in low memory that
# the kernel no longer maps, so the kernel must load its own before the next segment load or interrupt.
# The descriptors are built in Python (layout: GDT_KERNEL_CODE/DATA) with the accessed bit preset.

.section .text
gdt_init:
    lgdt [gdt_descriptor]
    ljmp KERNEL_CS, .Lreload_cs                      # a far jump is the only way to reload CS
.Lreload_cs:
    mov eax, KERNEL_DS
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
    mov ss, eax
    ret

.section .data
.balign 8
gdt:
    .quad 0x0
    .quad GDT_KERNEL_CODE
    .quad GDT_KERNEL_DATA
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt
