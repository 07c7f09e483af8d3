# Multiboot v1 header. GRUB and QEMU's -kernel look for it in the first 8 KiB of the file; the linker puts this
# section first and the ELF writer puts the first segment at file offset 0x1000.
# Flags ask for page-aligned modules and for the memory fields and map in the Multiboot information.
#
# A 64-bit kernel also sets flag 16 and gives the load addresses itself (all physical): QEMU's -kernel refuses an
# ELF64 otherwise, and a loader that honours the fields needs no ELF32 program headers. The file holds the image
# exactly as memory will (the ELF writer keeps segments page-congruent and contiguous), so "load the file from the
# header's segment up to __data_end" is the same as loading the ELF segments.

.section .multiboot
.balign 4
multiboot_header:
    .long MULTIBOOT_HEADER_MAGIC
    .long MULTIBOOT_HEADER_FLAGS
    .long MULTIBOOT_HEADER_CHECKSUM
.if MULTIBOOT_HEADER_FLAGS & MULTIBOOT_FLAG_ADDRESSES
    .long multiboot_header - KERNEL_VIRTUAL_BASE    # header_addr
    .long __kernel_start - KERNEL_VIRTUAL_BASE      # load_addr
    .long __data_end - KERNEL_VIRTUAL_BASE          # load_end_addr
    .long __kernel_end - KERNEL_VIRTUAL_BASE        # bss_end_addr
    .long _start - KERNEL_VIRTUAL_BASE              # entry_addr
.endif
