# The Multiboot entry both architectures share, and what the loader hands over, kept before paging hides it: the
# Multiboot information (flags, memory sizes, command line, memory map) is copied into .bss while it is still
# reachable at its physical address. Then each architecture turns paging on its own way (boot_paging_on in
# templates/<arch>/boot.s), and both end in kernel_start, below.
#
# This is 32-bit code that runs before paging, so every address it names is a link-time (virtual) address minus
# KERNEL_VIRTUAL_BASE; relative jumps and calls need no adjustment (on x86_64 the `.code32` piece is assembled at
# its physical address: kgen/build/asm.py).

.section .text
.code32
_start:
    cli
    cld
    mov edx, eax                                    # Multiboot magic; rep stosd needs eax
    # The loader zero-fills .bss; clearing it again costs little and does not trust what cannot be checked.
    mov edi, offset __bss_start - KERNEL_VIRTUAL_BASE
    mov ecx, offset __kernel_end - __bss_start
    shr ecx, 0x2
    xor eax, eax
    rep stosd
    mov esp, offset boot_stack_top - KERNEL_VIRTUAL_BASE
    mov [boot_magic - KERNEL_VIRTUAL_BASE], edx
    mov [boot_mbi_phys - KERNEL_VIRTUAL_BASE], ebx
    cmp edx, MULTIBOOT_BOOTLOADER_MAGIC
    jne .Lno_multiboot_info
    call boot_copy_multiboot_info
.Lno_multiboot_info:
    jmp boot_paging_on

# Copy what the allocator will need out of the Multiboot information while it is reachable at its physical
# address. ebx = physical address of the information structure.
boot_copy_multiboot_info:
    mov [boot_mbi_start - KERNEL_VIRTUAL_BASE], ebx
    lea eax, [ebx + MULTIBOOT_INFO_SIZE]
    mov [boot_mbi_end - KERNEL_VIRTUAL_BASE], eax
    mov eax, [ebx]
    mov [boot_mb_flags - KERNEL_VIRTUAL_BASE], eax
    test eax, MULTIBOOT_INFO_MEM
    jz .Lno_mem
    mov ecx, [ebx + 0x4]
    mov [boot_mem_lower - KERNEL_VIRTUAL_BASE], ecx
    mov ecx, [ebx + 0x8]
    mov [boot_mem_upper - KERNEL_VIRTUAL_BASE], ecx
.Lno_mem:
    test eax, MULTIBOOT_INFO_CMDLINE
    jz .Lno_cmdline
    mov esi, [ebx + 0x10]
    mov edi, offset boot_cmdline - KERNEL_VIRTUAL_BASE
    mov ecx, BOOT_CMDLINE_MAX - 1                   # the last byte stays 0 from the .bss clear
.Lcmdline_byte:
    lodsb
    stosb
    test al, al
    jz .Lno_cmdline
    loop .Lcmdline_byte
.Lno_cmdline:
    test dword ptr [ebx], MULTIBOOT_INFO_MMAP
    jz .Lmmap_done
    mov esi, [ebx + 0x30]                           # mmap_addr
    mov edx, esi
    add edx, [ebx + 0x2c]                           # + mmap_length: end of the map
    cmp esi, [boot_mbi_start - KERNEL_VIRTUAL_BASE] # the PMM reserves one block spanning both
    jae .Lmmap_above_info
    mov [boot_mbi_start - KERNEL_VIRTUAL_BASE], esi
.Lmmap_above_info:
    cmp edx, [boot_mbi_end - KERNEL_VIRTUAL_BASE]
    jbe .Lmmap_below_info_end
    mov [boot_mbi_end - KERNEL_VIRTUAL_BASE], edx
.Lmmap_below_info_end:
    mov edi, offset boot_mmap - KERNEL_VIRTUAL_BASE
    xor ecx, ecx
.Lmmap_entry:
    cmp esi, edx
    jae .Lmmap_done
    cmp ecx, BOOT_MMAP_MAX_ENTRIES
    jae .Lmmap_truncated
    mov eax, [esi + 0x4]                            # entries are {size, base, length, type}; size excludes itself
    mov [edi], eax
    mov eax, [esi + 0x8]
    mov [edi + 0x4], eax
    mov eax, [esi + 0xc]
    mov [edi + 0x8], eax
    mov eax, [esi + 0x10]
    mov [edi + 0xc], eax
    mov eax, [esi + 0x14]
    mov [edi + 0x10], eax
    add edi, BOOT_MMAP_ENTRY_SIZE
    inc ecx
    mov eax, [esi]
    lea esi, [esi + eax + 0x4]
    jmp .Lmmap_entry
.Lmmap_truncated:
    mov dword ptr [boot_mmap_truncated - KERNEL_VIRTUAL_BASE], 0x1
.Lmmap_done:
    mov [boot_mmap_count - KERNEL_VIRTUAL_BASE], ecx
    ret

.section .bss
# The stack fills whole pages: what shares a page with its top (the call channel's live frames) is only stack, so a
# page-sized view of memory (a test reading every mapped page, a guard page below it) meets the same layout
# whatever kernel.stack_size is.
.balign PAGE_SIZE, 0
boot_stack:
    .skip KERNEL_STACK_SIZE
boot_stack_top:
boot_magic:
    .skip 0x4
boot_mbi_phys:
    .skip 0x4
boot_mbi_start:
    .skip 0x4
boot_mbi_end:
    .skip 0x4
boot_mb_flags:
    .skip 0x4
boot_mem_lower:
    .skip 0x4
boot_mem_upper:
    .skip 0x4
boot_mmap_count:
    .skip 0x4
boot_mmap_truncated:
    .skip 0x4
boot_mmap:
    .skip BOOT_MMAP_MAX_ENTRIES * BOOT_MMAP_ENTRY_SIZE
boot_cmdline:
    .skip BOOT_CMDLINE_MAX

.section .text
# kernel_start: where both boot stubs jump once they run in the higher half with the identity map gone: the
# descriptor tables, the interrupt controllers and COM1, then kmain, which does not return.
kernel_start:
    call gdt_init
    call idt_init
    call pic_init
    call serial_init
    call kmain
    push DEBUG_EXIT_FAILURE                         # kmain does not return
    call debug_exit
