# Reaching any paging entry through the recursive slot, for both architectures.
#
# The top-level table's entry RECURSIVE_SLOT points at the top-level table itself. A virtual address whose top
# index is the slot therefore walks one level short, and the "page" it ends on is a page table: the PTEs of all
# memory appear, in address order, in the slot's window LEVEL<leaf>_ENTRIES. Each level up repeats the trick (the
# slot index twice, three times...), so the entries of level n are an array at LEVELn_ENTRIES, and the entry that
# maps v at level n is at
#
#     LEVELn_ENTRIES + (v[VA_BITS-1:0] >> LEVELn_SHIFT) * ENTRY_SIZE
#
# (i386: PD entries at 0xFFFFF000, PTEs at 0xFFC00000; x86_64 with slot 510: PML4 at 0xFFFFFF7FBFDFE000, PDPT
# entries at 0xFFFFFF7FBFC00000, PD entries at 0xFFFFFF7F80000000, PTEs at 0xFFFFFF0000000000). The layout computes
# these (kgen/arch: Arch.recursive_window); the ENTRY_OF macro (templates/macros.inc) applies the formula for one
# level, and the tables paging_level_shift / paging_level_entries (generated from the layout) let a loop visit
# every level (pt_entry).
#
# A PTE may only be touched once every level above it holds a present entry: otherwise the window address of the
# PTE is itself unmapped. pt_table_present checks exactly that, top level first.
#
# One set of routines serves every space the kernel edits. Each takes a *windows table* first: a word per level,
# where that level's entries appear (generated from the layout, kgen/build/pipeline.py). paging_level_entries is the
# running space's, through the recursive slot; paging_foreign_entries is the attached space's, through the foreign
# slot (templates/aspace.s). The same walk then edits either: vmm.s passes the first, aspace.s the second.
#
# Walking down, an entry is one of three things: absent, a table, or a large page (PS: 4 MiB on i386; 2 MiB or
# 1 GiB on x86_64), which maps memory itself and has no table below it. Every walk here checks PS at every level
# above the leaf, so no routine ever takes a large page's memory for a page table.

.section .text
# PT_ENTRY level: xax = pt_entry(windows, vaddr, level) for the windows and vaddr the calling routine was given (its
# ARG1 and ARG2); level is a register or a constant.
.macro PT_ENTRY level
    PUSHW \level
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xword ptr [xsp + ARG1]
    call pt_entry
    DROP 0x3
.endm

# pt_entry(windows, vaddr, level) -> the virtual address of the entry that maps vaddr at level (0 = the top table):
# windows[level] + (vaddr[VA_BITS-1:0] >> LEVELn_SHIFT) * ENTRY_SIZE
pt_entry:
    FRAME 0x0
    mov xax, [xsp + ARG2]
.if WORD_SIZE == 8
    shl rax, 0x40 - VA_BITS                         # drop the sign-extended top bits
    shr rax, 0x40 - VA_BITS
.endif
    mov xdx, [xsp + ARG3]
    movzx ecx, byte ptr [paging_level_shift + xdx]
    shr xax, cl
    mov xcx, [xsp + ARG1]
    mov xcx, [xcx + xdx*WORD_SIZE]
    lea xax, [xcx + xax*ENTRY_SIZE]
    ret

# pt_table_present(windows, vaddr) -> 1 when the page table holding vaddr's PTE exists (every level above the
# last has a present entry for vaddr, and none of them maps a large page), else 0
pt_table_present:
    push xbx
    FRAME 0x1
    xor ebx, ebx
.Lpresent_level:
    cmp ebx, LEAF_LEVEL
    jae .Lpresent_yes
    PT_ENTRY xbx
    mov xax, [xax]
    test eax, PTE_P
    jz .Lpresent_no
    test eax, PTE_PS
    jnz .Lpresent_no
    inc ebx
    jmp .Lpresent_level
.Lpresent_yes:
    mov eax, 0x1
    pop xbx
    ret
.Lpresent_no:
    xor eax, eax
    pop xbx
    ret

# paging_table_present(vaddr): pt_table_present in the running space
paging_table_present:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    PUSHW offset paging_level_entries
    call pt_table_present
    DROP 0x2
    ret

# pt_table_for(windows, vaddr, table_flags) -> 1 when the page table holding vaddr's PTE exists (made now, with any
# missing level above it, the entry pointing at each new table given table_flags), 0 when out of memory (the
# levels made for this call given back), -1 when a large page covers vaddr (nothing made).
#
# A missing table is allocated at its own window page: the entry for vaddr in the level-n table lies on that
# page, and the page's own PTE is the level n-1 entry, so pmm_map_top(page) writes the new frame there; the table
# is then cleared through the same page. Top-down, each level's page is reachable once the level above exists.
pt_table_for:
    push xbx
    push xdi
    FRAME 0x2
    mov ebx, 0x1                                    # the level whose table must exist
.Lfor_level:
    cmp ebx, LEAF_LEVEL
    ja .Lfor_done
    lea xax, [xbx - 1]
    PT_ENTRY xax                                    # the entry one level up
    mov xax, [xax]
    test eax, PTE_P
    jz .Lfor_make
    test eax, PTE_PS
    jnz .Lfor_large                                 # it maps a large page: there is no table below it
    jmp .Lfor_next
.Lfor_make:
    PT_ENTRY xbx                                    # the table's entry for vaddr: its page is the table
    mov xdi, xax
    and xdi, -PAGE_SIZE
    PUSHW xword ptr [xsp + ARG3]
    PUSHW xdi
    call pmm_map_top                                # writes the entry one level up
    DROP 0x2
    test xax, xax
    jz .Lfor_no_memory
.if VMM_SKIP_TABLE_CLEAR
    # Build variant: the new table keeps whatever its frame held, and stale words there read as entries.
.else
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
.endif
.if KERNEL_HALF_GENERATION
    # A kernel-half PDE changed: other spaces re-copy the kernel half (templates/vmm.s). Only the running space
    # has tables made in its kernel half; the attached one is edited in its user half alone.
    cmp dword ptr [esp + ARG2], KERNEL_HALF_START
    jb .Lfor_next
.if KERNEL_PDE_GENERATION_KEPT
    # Build variant: the new kernel-half PDE is not counted; a space made before keeps its copy of the kernel half
    # without it, and as_switch to that space loses the kernel's new table.
.else
    inc dword ptr [vmm_kernel_pde_generation]
.endif
.endif
.Lfor_next:
    inc ebx
    jmp .Lfor_level
.Lfor_done:
    mov eax, 0x1
    pop xdi
    pop xbx
    ret
.Lfor_large:
    mov xax, -1
    pop xdi
    pop xbx
    ret
.Lfor_no_memory:                                    # give back the levels made for this call
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xword ptr [xsp + ARG1]
    call pt_tables_put
    DROP 0x2
    xor eax, eax
    pop xdi
    pop xbx
    ret

# pt_tables_put(windows, vaddr): vaddr's page went away (or was never mapped: pt_table_for ran out of memory); give
# back every table on its path that is now empty, bottom up.
#
# A table is scanned whole (`repe scas` stops at the first entry still in use), and an empty one is pushed onto the
# free stack while still mapped (pmm_free_at at its window page), which also clears the entry above. No count is
# kept anywhere, so the structure cannot disagree with one. Never freed: the top table, tables inside the kernel
# image (the boot stub's), and on x86_64 the kernel half's PDPTs, which every space shares (templates/vmm.s).
pt_tables_put:
    push xbx
    push xdi
    FRAME 0x2
    # Start at the deepest table that exists on vaddr's path: after pt_table_for ran out of memory part way down,
    # the levels below it were never made, and their window pages are unmapped.
    xor ebx, ebx
.Lput_find:
    cmp ebx, LEAF_LEVEL
    jae .Lput_level
    PT_ENTRY xbx
    mov xax, [xax]
    test eax, PTE_P
    jz .Lput_level
    test eax, PTE_PS
    jnz .Lput_done                                  # a large page: no table below it to give back
    inc ebx
    jmp .Lput_find
.Lput_level:
    test ebx, ebx
    jz .Lput_done                                   # the top table stays
.if KERNEL_HALF_GENERATION == 0
    cmp ebx, 0x1
    jne .Lput_table
    mov rdx, KERNEL_HALF_START                      # the kernel half's PDPTs are shared: they stay
    cmp [rsp + ARG2], rdx
    jae .Lput_done
.Lput_table:
.endif
    PT_ENTRY xbx
    mov xdi, xax
    and xdi, -PAGE_SIZE                             # the table, through its window page
    push xdi
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    repe scasd
    pop xdi
    jne .Lput_done                                  # still in use: so are the tables above
    lea xax, [xbx - 1]
    PT_ENTRY xax
    mov xax, [xax]
    mov xdx, PTE_FRAME_MASK
    and xax, xdx
    cmp xax, KERNEL_LOAD_ADDRESS                    # a boot table, inside the image: it stays
    jb .Lput_free
    cmp xax, offset __kernel_end - KERNEL_VIRTUAL_BASE
    jb .Lput_done
.Lput_free:
    PUSHW xdi
    call pmm_free_at                                # pushes the table's frame while mapped; clears the entry above
    DROP 0x1
    mov xax, [xsp + ARG2]
    invlpg [xax]                                    # drop cached entries of the path (INVLPG flushes them)
.if KERNEL_HALF_GENERATION
    cmp ebx, 0x1
    jne .Lput_next
    cmp dword ptr [esp + ARG2], KERNEL_HALF_START
    jb .Lput_next
    inc dword ptr [vmm_kernel_pde_generation]
.Lput_next:
.endif
    dec ebx
    jmp .Lput_level
.Lput_done:
    pop xdi
    pop xbx
    ret

# pt_set_leaf(windows, vaddr, entry) -> 1 with vaddr's PTE set to entry, or 0 when it is already present. The
# table holding it must exist (pt_table_for). Flushes nothing: a page that was not mapped has no translation cached.
pt_set_leaf:
    FRAME 0x0
    PT_ENTRY LEAF_LEVEL
.if VMM_MAP_WRONG_INDEX
    # Build variant: off by one entry. The frame is mapped at vaddr + PAGE_SIZE (or, for a table's last entry, in
    # the next table's window page), vaddr stays unmapped, and an unmap of vaddr finds nothing to take back.
    add xax, ENTRY_SIZE
.endif
    test xword ptr [xax], PTE_P
    jnz .Lset_leaf_present
    mov xcx, [xsp + ARG3]
    mov [xax], xcx
    mov eax, 0x1
    ret
.Lset_leaf_present:
    xor eax, eax
    ret

# pt_unmap(windows, vaddr) -> the entry that mapped vaddr's page (frame and flags), now cleared, or 0 when none
# did; the tables this left empty are given back. INVLPG drops the translation: needed when the space is the
# running one, and harmless (one local page's TLB entry) when it is not.
pt_unmap:
    push xbx
    FRAME 0x1
    mov xbx, [xsp + ARG2]
    and xbx, -PAGE_SIZE
    PUSHW xbx
    PUSHW xword ptr [xsp + ARG1]
    call pt_table_present
    DROP 0x2
    test eax, eax
    jz .Lunmap_none
    PUSHW LEAF_LEVEL
    PUSHW xbx
    PUSHW xword ptr [xsp + ARG1]
    call pt_entry
    DROP 0x3
    mov xcx, xax
    mov xax, [xcx]
    test eax, PTE_P
    jz .Lunmap_none
    mov xword ptr [xcx], 0x0
.if VMM_UNMAP_SKIP_INVLPG
    # Build variant: no INVLPG. The TLB may keep the old translation, so the CPU still reaches the unmapped frame
    # through vaddr, and after a new map there it reads and writes the old frame instead of the new one (until
    # something else flushes vaddr: a table given back does).
.else
    invlpg [xbx]
.endif
    PUSHW xax
    PUSHW xbx
    PUSHW xword ptr [xsp + ARG1]
    call pt_tables_put
    DROP 0x2
    POPW xax
    pop xbx
    ret
.Lunmap_none:
    xor eax, eax
    pop xbx
    ret

# pt_translate(windows, vaddr) -> physical address, or VMM_NONE. Walks down from the top; an entry with PS maps a
# large page, whose offset bits come from vaddr.
pt_translate:
    push xbx
    FRAME 0x1
    xor ebx, ebx
.Ltranslate_level:
    PT_ENTRY xbx
    mov xax, [xax]
    test eax, PTE_P
    jz .Ltranslate_none
    mov ecx, PAGE_SHIFT
    cmp ebx, LEAF_LEVEL
    je .Ltranslate_page
    inc ebx
    test eax, PTE_PS
    jz .Ltranslate_level
    movzx ecx, byte ptr [paging_level_shift + xbx - 1]
.Ltranslate_page:                                   # xax: the entry, cl: log2 of the page size
    mov xdx, PTE_FRAME_MASK
    and xax, xdx
    shr xax, cl                                     # the frame, without PAT or the low bits of a large page
    shl xax, cl
.if TRANSLATE_LARGE_PAGE_SMALL_OFFSET
    # Build variant: the offset is taken as a 4 KiB page's, whatever the page's size; a large page translates right
    # only in its first 4 KiB.
    mov ecx, PAGE_SHIFT
.endif
    mov xdx, -1
    shl xdx, cl
    not xdx
.if TRANSLATE_OFFSET_LOW_BITS
    # Build variant: 9 offset bits kept instead of 12 (an index width taken for the offset's), right below 0x200.
    and xdx, 0x1FF
.endif
    and xdx, [xsp + ARG2]                           # the offset within the page
    or xax, xdx
    pop xbx
    ret
.Ltranslate_none:
    mov xax, VMM_NONE
    pop xbx
    ret
