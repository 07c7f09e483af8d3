# x86_64 boot stub: from the Multiboot handoff (32-bit protected mode, paging off, running at the physical load
# address) to 64-bit code in the higher half.
#
# The loader starts every Multiboot kernel in 32-bit mode, so the entry is `.code32` and is assembled at its
# physical address; it names other pieces' labels (virtual) minus KERNEL_VIRTUAL_BASE.
#
# 1. CPUID must report long mode and NX; a CPU without them is told so on COM1 and the kernel exits.
# 2. The tables are built by one walk (boot_table_for) that descends PML4 -> PDPT -> PD -> PT for any address,
#    taking a zeroed table from the .bss pool `boot_page_tables` wherever an entry is empty. The layout counts the
#    tables the same walk needs (Layout.boot_table_count). The image is mapped twice through it: at its
#    higher-half address with W^X flags (text R-X, rodata R + NX, data/bss/stack RW + NX, all global) and identity
#    (so the instructions right after paging is turned on still run); the temp-map window's page table is made
#    too. PML4[RECURSIVE_SLOT] points at the PML4 itself (with NX: tables are data, never code).
# 3. CR4.PAE, CR3, EFER.LME|NXE, then CR0.PG|WP: the CPU is in long mode's compatibility mode; a far jump through
#    the 64-bit code segment of kgen's GDT enters 64-bit mode, and an absolute jump reaches the higher half.
# 4. PML4[0 .. KERNEL_HALF_FIRST_SLOT) are cleared (the identity map goes with them) and CR3 reloaded; then
#    CR4.PGE, so the kernel's global entries survive later CR3 loads.

.section .text
.code32
boot_paging_on:                                     # from _start (templates/bootinfo.s), paging still off
    call boot_check_cpu
    call boot_build_page_tables
    mov eax, cr4
    or eax, CR4_PAE
    mov cr4, eax
    mov eax, offset boot_top_table - KERNEL_VIRTUAL_BASE
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME | EFER_NXE
    wrmsr
    mov eax, cr0
    or eax, CR0_PG | CR0_WP
    mov cr0, eax
    lgdt [gdt_descriptor_phys - KERNEL_VIRTUAL_BASE]
    ljmp KERNEL_CS, boot_long_mode - KERNEL_VIRTUAL_BASE

# Long mode and NX, or a one-line reason on COM1 and the failure exit.
boot_check_cpu:
    mov eax, CPUID_EXTENDED_MAX
    cpuid
    mov esi, offset str_no_long_mode - KERNEL_VIRTUAL_BASE
    cmp eax, CPUID_EXTENDED_FEATURES
    jb boot_fail
    mov eax, CPUID_EXTENDED_FEATURES
    cpuid
    test edx, CPUID_EDX_LONG_MODE
    jz boot_fail
    mov esi, offset str_no_nx - KERNEL_VIRTUAL_BASE
    test edx, CPUID_EDX_NX
    jz boot_fail
    ret

# boot_fail(esi = physical address of a message): print it on COM1 by polling, exit with failure.
boot_fail:
    lodsb
    test al, al
    jz .Lboot_fail_exit
    mov ah, al
    mov dx, COM1_PORT + 0x5
.Lboot_fail_wait:
    in al, dx
    test al, UART_LSR_TX_EMPTY
    jz .Lboot_fail_wait
    mov al, ah
    mov dx, COM1_PORT
    out dx, al
    jmp boot_fail
.Lboot_fail_exit:
    mov eax, DEBUG_EXIT_FAILURE
    mov dx, DEBUG_EXIT_PORT
    out dx, eax
.Lboot_fail_halt:
    cli
    hlt
    jmp .Lboot_fail_halt

# boot_table_for(edx:eax = virtual address) -> edi = physical address of the page table (last level) mapping it.
# One loop over the levels above the last: the index at each level is (v >> LEVELn_SHIFT) & INDEX_MASK, and an
# empty entry gets the next table of the pool. Intermediate entries are P|RW; the page's own entry decides the
# rest (the CPU combines RW and NX over all levels).
boot_table_for:
    push ebx
    push esi
    push ebp
    mov ebp, eax
    mov esi, edx
    mov edi, offset boot_top_table - KERNEL_VIRTUAL_BASE
    mov ebx, offset boot_level_shifts - KERNEL_VIRTUAL_BASE
.Ltable_level:
    cmp ebx, offset boot_level_shifts_end - KERNEL_VIRTUAL_BASE
    jae .Ltable_found
    movzx ecx, byte ptr [ebx]
    mov eax, ebp
    mov edx, esi
    cmp ecx, 0x20                                   # a 64-bit shift in 32-bit registers
    jb .Ltable_shift_low
    mov eax, edx
    sub ecx, 0x20
    shr eax, cl
    jmp .Ltable_index
.Ltable_shift_low:
    shrd eax, edx, cl
.Ltable_index:
    and eax, INDEX_MASK
    lea edx, [edi + eax*ENTRY_SIZE]
    mov eax, [edx]
    test eax, PTE_P
    jnz .Ltable_present
    mov eax, [boot_tables_used - KERNEL_VIRTUAL_BASE]
    cmp eax, BOOT_TABLE_COUNT
    jae .Ltable_pool_empty
    inc dword ptr [boot_tables_used - KERNEL_VIRTUAL_BASE]
    shl eax, PAGE_SHIFT
    add eax, offset boot_page_tables - KERNEL_VIRTUAL_BASE
    or eax, PTE_P | PTE_RW
    mov [edx], eax
.Ltable_present:
    and eax, PTE_FRAME_MASK & 0xffffffff            # boot tables lie below 4 GiB
    mov edi, eax
    inc ebx
    jmp .Ltable_level
.Ltable_found:
    pop ebp
    pop esi
    pop ebx
    ret
.Ltable_pool_empty:
    mov esi, offset str_pool_empty - KERNEL_VIRTUAL_BASE
    jmp boot_fail

# Map every page of the image twice (higher half with W^X flags, and identity), make the temp-map window's page
# table, and point PML4[RECURSIVE_SLOT] at the PML4.
boot_build_page_tables:
    mov esi, offset __kernel_start - KERNEL_VIRTUAL_BASE
.Lboot_page:
    mov eax, esi                                    # higher half: physical + KERNEL_VIRTUAL_BASE, 64-bit add
    add eax, KERNEL_VIRTUAL_BASE & 0xffffffff
    mov edx, KERNEL_VIRTUAL_BASE >> 0x20
    adc edx, 0x0
    push eax
    call boot_table_for
    pop eax
    shr eax, PAGE_SHIFT
    and eax, INDEX_MASK
    lea edi, [edi + eax*ENTRY_SIZE]
    mov eax, esi
    or eax, PTE_P | PTE_G
    xor edx, edx
    cmp esi, offset __rodata_start - KERNEL_VIRTUAL_BASE
    jb .Lboot_page_flags                            # text: read, execute
    mov edx, PTE_NX_HIGH
    cmp esi, offset __data_start - KERNEL_VIRTUAL_BASE
    jb .Lboot_page_flags                            # rodata: read only
    or eax, PTE_RW                                  # data, bss, stack: read, write
.Lboot_page_flags:
    mov [edi], eax
    mov [edi + 0x4], edx
    mov eax, esi                                    # identity: the same frame at its own address, for the
    xor edx, edx                                    # instructions between `mov cr0` and the jump up
    call boot_table_for
    mov eax, esi
    shr eax, PAGE_SHIFT
    and eax, INDEX_MASK
    mov edx, esi
    or edx, PTE_P | PTE_RW
    mov [edi + eax*ENTRY_SIZE], edx
    add esi, PAGE_SIZE
    cmp esi, offset __kernel_end - KERNEL_VIRTUAL_BASE
    jb .Lboot_page
    mov eax, TEMPMAP_BASE & 0xffffffff
    mov edx, TEMPMAP_BASE >> 0x20
    call boot_table_for
    mov edi, offset boot_top_table - KERNEL_VIRTUAL_BASE
    mov eax, edi
    or eax, PTE_P | PTE_RW
    mov [edi + RECURSIVE_SLOT*ENTRY_SIZE], eax
    mov dword ptr [edi + RECURSIVE_SLOT*ENTRY_SIZE + 0x4], PTE_NX_HIGH
    ret

.code64
boot_long_mode:                                     # 64-bit code, still at the identity address
    mov rax, offset boot_higher_half
    jmp rax

boot_higher_half:
    mov rsp, offset boot_stack_top
    mov rdi, offset boot_top_table                  # the user half goes, the identity map with it
    xor eax, eax
    mov ecx, KERNEL_HALF_FIRST_SLOT
    rep stosq
    mov rax, cr3
    mov cr3, rax
    mov rax, cr4
    or rax, CR4_PGE
    mov cr4, rax
    jmp kernel_start                                # templates/bootinfo.s

.section .rodata
boot_level_shifts:                                  # the levels above the page tables, top first
    .byte LEVEL0_SHIFT, LEVEL1_SHIFT, LEVEL2_SHIFT
boot_level_shifts_end:
str_no_long_mode:
    .asciz "kgen: this CPU has no long mode (CPUID 0x80000001 EDX bit 29): the x86_64 kernel cannot run\n"
str_no_nx:
    .asciz "kgen: this CPU has no NX (CPUID 0x80000001 EDX bit 20): the x86_64 kernel's W^X needs it\n"
str_pool_empty:
    .asciz "kgen: boot page-table pool exhausted (Layout.boot_table_count is wrong)\n"

.section .bss
.balign 0x1000, 0
boot_top_table:
    .skip PAGE_SIZE
boot_page_tables:
    .skip PAGE_SIZE * BOOT_TABLE_COUNT
boot_tables_used:
    .skip 0x4
