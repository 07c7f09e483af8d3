# Boot stub: from the Multiboot handoff (paging off, running at the physical load address) to the higher half.
#
# Until paging is on, every address the code names is a link-time (virtual) address minus KERNEL_VIRTUAL_BASE.
# Relative jumps and calls need no adjustment, which is why the code below only subtracts on memory operands.
#
# The boot page directory maps the image window twice through the same page tables: at KERNEL_VIRTUAL_START and
# identity at KERNEL_LOAD_ADDRESS (possible because the virtual base is 4 MiB aligned), so the instruction after
# `mov cr0` still runs. Once in the higher half the identity entries are removed. PD[RECURSIVE_SLOT] points at the
# PD itself, which makes every page table visible at RECURSIVE_BASE + index*4K and the PD at RECURSIVE_PD.
#
# Text and rodata are mapped read-only and CR0.WP is set, so even the kernel cannot write its own code.
# Kernel PTEs carry G; CR4.PGE is switched on only after the identity entries are gone, because setting it
# flushes the whole TLB, global entries included, and no identity translation can survive as global.

.section .text
boot_paging_on:                                     # from _start (templates/bootinfo.s), paging still off
    call boot_build_page_tables
    mov eax, offset boot_top_table - KERNEL_VIRTUAL_BASE
    mov cr3, eax
    mov eax, cr0
    or eax, CR0_PG | CR0_WP
    mov cr0, eax
    mov eax, offset boot_higher_half
    jmp eax

# Fill the boot PD and page tables (zero from the .bss clear). boot_page_tables holds KERNEL_PDE_COUNT tables for
# the image window followed by one for the temp-map window, unless that window lies in one of the image's 4 MiB
# (TEMPMAP_OWN_TABLE = 0): its slots are then PTEs of the image's table, and a PDE of its own would replace the
# image's and unmap the running kernel.
boot_build_page_tables:
    mov edi, offset boot_top_table - KERNEL_VIRTUAL_BASE
    mov eax, offset boot_page_tables - KERNEL_VIRTUAL_BASE
    or eax, PTE_P | PTE_RW
    xor ecx, ecx
.Lkernel_pde:
    mov [edi + ecx*4 + KERNEL_PDE_FIRST*4], eax
    mov [edi + ecx*4 + IDENTITY_PDE_FIRST*4], eax
    add eax, PAGE_SIZE
    inc ecx
    cmp ecx, KERNEL_PDE_COUNT
    jb .Lkernel_pde
.if TEMPMAP_OWN_TABLE
    mov [edi + TEMPMAP_PDE_INDEX*4], eax            # the table right after the image window's
.endif
    mov eax, edi
    or eax, PTE_P | PTE_RW
    mov [edi + RECURSIVE_SLOT*4], eax
    mov esi, offset __kernel_start
.Lkernel_pte:
    mov eax, esi
    sub eax, KERNEL_VIRTUAL_BASE
    or eax, PTE_P | PTE_G
    cmp esi, offset __data_start                    # .data and .bss are the only writable pages
    jb .Lread_only
    or eax, PTE_RW
.Lread_only:
    mov edx, esi
    sub edx, KERNEL_PDE_FIRST << LEVEL0_SHIFT
    shr edx, PAGE_SHIFT
    mov [edx*4 + boot_page_tables - KERNEL_VIRTUAL_BASE], eax
    add esi, PAGE_SIZE
    cmp esi, offset __kernel_end
    jb .Lkernel_pte
    ret

boot_higher_half:
    mov esp, offset boot_stack_top
    xor eax, eax
    mov edi, offset boot_top_table + IDENTITY_PDE_FIRST*4
    mov ecx, KERNEL_PDE_COUNT
    rep stosd
    mov eax, cr3                                    # flush the identity translations
    mov cr3, eax
    mov eax, cr4
    or eax, CR4_PGE | CR4_PSE                       # PSE: a PDE with PS maps 4 MiB, as vmm_translate reads it
    mov cr4, eax
    jmp kernel_start                                # templates/bootinfo.s

.section .bss
.balign 0x1000
boot_top_table:
    .skip PAGE_SIZE
boot_page_tables:
    .skip PAGE_SIZE * BOOT_PAGE_TABLES
