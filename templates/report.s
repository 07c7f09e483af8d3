# The boot report on COM1: what the loader handed over, where the kernel lives, and proof that the recursive
# slot works. The harness and `kgen run` read these lines (kgen/bootreport.py); "kgen: boot ok" is the last.
# Then the kernel exits with success, or serves calls when its command line holds the serve token.

.section .text
kmain:
.if FAULT_AT_BOOT
    # Build variant: touch the image's physical load address, which is no longer mapped once the identity
    # entries are gone, so the exception report must name vector 14 with that address in CR2.
    mov dword ptr [BOOT_FAULT_ADDRESS], 0x0
.endif
    push offset str_banner
    call serial_puts
    add esp, 0x4
    call report_multiboot
    call report_kernel
    call report_recursive
    call pmm_init
    call report_pmm
    call vmm_init
    call heap_init
    push offset str_boot_ok
    call serial_puts
    add esp, 0x4
    push offset serve_token
    push offset boot_cmdline
    call str_contains
    add esp, 0x8
    test eax, eax
    jnz serve
    push DEBUG_EXIT_SUCCESS
    call debug_exit

# "multiboot: flags=... mem_lower=... mem_upper=..." then one "mmap:" line per memory-map entry.
report_multiboot:
    push ebx
    push esi
    push offset str_mb_flags
    call serial_puts
    push dword ptr [boot_mb_flags]
    call serial_puthex
    push offset str_mem_lower
    call serial_puts
    push dword ptr [boot_mem_lower]
    call serial_puthex
    push offset str_mem_upper
    call serial_puts
    push dword ptr [boot_mem_upper]
    call serial_puthex
    push offset str_newline
    call serial_puts
    add esp, 0x1c
    cmp byte ptr [boot_cmdline], 0x0
    je .Lno_cmdline_line
    push offset str_cmdline
    call serial_puts
    push offset boot_cmdline
    call serial_puts
    push offset str_newline
    call serial_puts
    add esp, 0xc
.Lno_cmdline_line:
    mov esi, offset boot_mmap
    mov ebx, [boot_mmap_count]
.Lmmap_line:
    test ebx, ebx
    jz .Lmmap_lines_done
    push offset str_mmap_base
    call serial_puts
    push dword ptr [esi + 0x4]
    call serial_puthex
    push dword ptr [esi]
    call serial_putdigits
    push offset str_mmap_length
    call serial_puts
    push dword ptr [esi + 0xc]
    call serial_puthex
    push dword ptr [esi + 0x8]
    call serial_putdigits
    push offset str_mmap_type
    call serial_puts
    push dword ptr [esi + 0x10]
    call serial_puthex
    push offset str_newline
    call serial_puts
    add esp, 0x24
    add esi, BOOT_MMAP_ENTRY_SIZE
    dec ebx
    jmp .Lmmap_line
.Lmmap_lines_done:
    cmp dword ptr [boot_mmap_truncated], 0x0
    je .Lmmap_complete
    push offset str_mmap_truncated
    call serial_puts
    add esp, 0x4
.Lmmap_complete:
    pop esi
    pop ebx
    ret

# "kernel: phys A-B virt C-D" then "cr3: X"
report_kernel:
    push offset str_kernel_phys
    call serial_puts
    push offset __kernel_start - KERNEL_VIRTUAL_BASE
    call serial_puthex
    push offset str_dash
    call serial_puts
    push offset __kernel_end - KERNEL_VIRTUAL_BASE
    call serial_puthex
    push offset str_kernel_virt
    call serial_puts
    push offset __kernel_start
    call serial_puthex
    push offset str_dash
    call serial_puts
    push offset __kernel_end
    call serial_puthex
    push offset str_cr3
    call serial_puts
    mov eax, cr3
    push eax
    call serial_puthex
    push offset str_newline
    call serial_puts
    add esp, 0x2c
    ret

# The recursive self-check: CR3 must be boot_pd's frame, PD[RECURSIVE_SLOT] read through the recursive window
# must point at that frame, and the 1024 entries seen at RECURSIVE_PD must equal those seen at boot_pd.
report_recursive:
    push esi
    push edi
    mov eax, cr3
    and eax, PTE_FRAME_MASK
    cmp eax, offset boot_pd - KERNEL_VIRTUAL_BASE
    jne .Lrecursive_bad
    mov edx, [RECURSIVE_PD + RECURSIVE_SLOT*4]
    and edx, PTE_FRAME_MASK
    cmp edx, eax
    jne .Lrecursive_bad
    mov esi, RECURSIVE_PD
    mov edi, offset boot_pd
    mov ecx, I386_ENTRIES
    repe cmpsd
    jne .Lrecursive_bad
    push offset str_recursive
    call serial_puts
    push RECURSIVE_SLOT
    call serial_puthex
    push offset str_recursive_at
    call serial_puts
    push RECURSIVE_PD
    call serial_puthex
    push offset str_recursive_ok
    call serial_puts
    add esp, 0x14
    pop edi
    pop esi
    ret
.Lrecursive_bad:
    push offset str_recursive_bad
    call serial_puts
    push DEBUG_EXIT_FAILURE
    call debug_exit

.section .rodata
str_banner:
    .asciz "kgen: boot report\n"
str_mb_flags:
    .asciz "multiboot: flags="
str_mem_lower:
    .asciz " mem_lower="
str_mem_upper:
    .asciz " mem_upper="
str_cmdline:
    .asciz "cmdline: "
str_mmap_base:
    .asciz "mmap: base="
str_mmap_length:
    .asciz " length="
str_mmap_type:
    .asciz " type="
str_mmap_truncated:
    .asciz "mmap: truncated (more entries than BOOT_MMAP_MAX_ENTRIES)\n"
str_kernel_phys:
    .asciz "kernel: phys "
str_kernel_virt:
    .asciz " virt "
str_dash:
    .asciz "-"
str_cr3:
    .asciz "\ncr3: "
str_recursive:
    .asciz "recursive: PD["
str_recursive_at:
    .asciz "] at "
str_recursive_ok:
    .asciz " maps the PD at CR3; all entries match\n"
str_recursive_bad:
    .asciz "recursive: self-check FAILED\n"
str_boot_ok:
    .asciz "kgen: boot ok\n"
