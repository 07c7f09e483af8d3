# Multiboot v1 header. GRUB and QEMU's -kernel look for it in the first 8 KiB of the file; the linker puts this
# section first and the ELF writer puts the first segment at file offset 0x1000.
# Flags ask for page-aligned modules and for the memory fields and map in the Multiboot information.

.section .multiboot
.balign 4
multiboot_header:
    .long MULTIBOOT_HEADER_MAGIC
    .long MULTIBOOT_HEADER_FLAGS
    .long MULTIBOOT_HEADER_CHECKSUM
