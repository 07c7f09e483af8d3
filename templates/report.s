# The boot report on COM1: what the loader handed over, where the kernel lives, and proof that the recursive
# slot works. The harness and `kgen run` read these lines (kgen/guest/bootreport.py); BOOT_OK_TEXT is the last.
# Then the kernel exits with success (exit_success prints "kgen: exit success" first), or serves calls when its
# command line holds the serve token.

.section .text
kmain:
.if FAULT_AT_BOOT
    # Build variant: touch the image's physical load address, which is no longer mapped once the identity
    # entries are gone, so the exception report must name vector 14 with that address in CR2.
    mov dword ptr [BOOT_FAULT_ADDRESS], 0x0
.endif
    push offset str_banner
    call serial_puts
    add xsp, WORD_SIZE
    call report_multiboot
    call report_kernel
    call report_recursive
    call pmm_init
    call vmm_init
    call heap_init
    call report_pmm                                 # free frames as the idle kernel has them
    push offset str_boot_ok
    call serial_puts
    add xsp, WORD_SIZE
    push offset serve_token
    push offset boot_cmdline
    call str_contains
    add xsp, 2*WORD_SIZE
    test eax, eax
    jnz serve
    call exit_success                               # "kgen: exit success", then the success status

# serial_putfield(label, value): the label string, then the value in hex
serial_putfield:
    push xword ptr [xsp + WORD_SIZE]
    call serial_puts
    add xsp, WORD_SIZE
    push xword ptr [xsp + 2*WORD_SIZE]
    call serial_puthex
    add xsp, WORD_SIZE
    ret

# "multiboot: flags=... mem_lower=... mem_upper=..." then one "mmap:" line per memory-map entry.
report_multiboot:
    push xbx
    push xsi
    mov eax, [boot_mb_flags]
    push xax
    push offset str_mb_flags
    call serial_putfield
    mov eax, [boot_mem_lower]
    push xax
    push offset str_mem_lower
    call serial_putfield
    mov eax, [boot_mem_upper]
    push xax
    push offset str_mem_upper
    call serial_putfield
    push offset str_newline
    call serial_puts
    add xsp, 7*WORD_SIZE
    cmp byte ptr [boot_cmdline], 0x0
    je .Lno_cmdline_line
    push offset str_cmdline
    call serial_puts
    push offset boot_cmdline
    call serial_puts
    push offset str_newline
    call serial_puts
    add xsp, 3*WORD_SIZE
.Lno_cmdline_line:
    mov xsi, offset boot_mmap
    mov ebx, [boot_mmap_count]
.Lmmap_line:
    test ebx, ebx
    jz .Lmmap_lines_done
    # base and length are 64-bit: one word on x86_64, high and low dword on i386
    push offset str_mmap_base
    call serial_puts
.if ARCH_I386
    push dword ptr [xsi + 0x4]
    call serial_puthex
    push dword ptr [xsi]
    call serial_putdigits
.else
    push qword ptr [xsi]
    call serial_puthex
    push 0x0                                        # keeps the count of pushed words the same as on i386
.endif
    push offset str_mmap_length
    call serial_puts
.if ARCH_I386
    push dword ptr [xsi + 0xc]
    call serial_puthex
    push dword ptr [xsi + 0x8]
    call serial_putdigits
.else
    push qword ptr [xsi + 0x8]
    call serial_puthex
    push 0x0
.endif
    mov eax, [xsi + 0x10]
    push xax
    push offset str_mmap_type
    call serial_putfield
    push offset str_newline
    call serial_puts
    add xsp, 9*WORD_SIZE
    add xsi, BOOT_MMAP_ENTRY_SIZE
    dec ebx
    jmp .Lmmap_line
.Lmmap_lines_done:
    cmp dword ptr [boot_mmap_truncated], 0x0
    je .Lmmap_complete
    push offset str_mmap_truncated
    call serial_puts
    add xsp, WORD_SIZE
.Lmmap_complete:
    pop xsi
    pop xbx
    ret

# "kernel: phys A-B virt C-D" then "cr3: X"
report_kernel:
    push offset __kernel_start - KERNEL_VIRTUAL_BASE
    push offset str_kernel_phys
    call serial_putfield
    push offset __kernel_end - KERNEL_VIRTUAL_BASE
    push offset str_dash
    call serial_putfield
    push offset __kernel_start
    push offset str_kernel_virt
    call serial_putfield
    push offset __kernel_end
    push offset str_dash
    call serial_putfield
    mov xax, cr3
    push xax
    push offset str_cr3
    call serial_putfield
    push offset str_newline
    call serial_puts
    add xsp, 11*WORD_SIZE
    ret

# The recursive self-check: CR3 must be boot_top_table's frame, the top table's entry RECURSIVE_SLOT read through
# the recursive window must point at that frame, and every entry seen at RECURSIVE_TOP must equal the one seen at
# boot_top_table.
report_recursive:
    push xsi
    push xdi
    mov xcx, PTE_FRAME_MASK                         # 64-bit on x86_64: too wide for an immediate operand
    mov xax, cr3
    and xax, xcx
    cmp xax, offset boot_top_table - KERNEL_VIRTUAL_BASE
    jne .Lrecursive_bad
    mov xdx, RECURSIVE_TOP
    mov xdx, [xdx + RECURSIVE_SLOT*ENTRY_SIZE]
    and xdx, xcx
    cmp xdx, xax
    jne .Lrecursive_bad
    mov xsi, RECURSIVE_TOP
    mov xdi, offset boot_top_table
    mov ecx, TABLE_ENTRIES * ENTRY_SIZE / 4
    repe cmpsd
    jne .Lrecursive_bad
    push offset str_recursive
    call serial_puts
    push offset top_table_name
    call serial_puts
    push RECURSIVE_SLOT
    push offset str_recursive_slot
    call serial_putfield
    mov xax, RECURSIVE_TOP
    push xax
    push offset str_recursive_at
    call serial_putfield
    push offset str_recursive_maps
    call serial_puts
    push offset top_table_name
    call serial_puts
    push offset str_recursive_ok
    call serial_puts
    add xsp, 9*WORD_SIZE
    pop xdi
    pop xsi
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
    .asciz "recursive: "
str_recursive_slot:
    .asciz "["
str_recursive_at:
    .asciz "] at "
str_recursive_maps:
    .asciz " maps the "
str_recursive_ok:
    .asciz " at CR3; all entries match\n"
str_recursive_bad:
    .asciz "recursive: self-check FAILED\n"
str_boot_ok:
    BOOT_OK_TEXT                                    # kgen/protocol.py's BOOT_OK, then the line's end
    .asciz "\n"
