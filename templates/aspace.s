# Address spaces, and how the kernel edits one it is not running in.
#
# An address space is a top-level table (PD on i386, PML4 on x86_64), named by its physical address. Its user half
# (below USER_HALF_END) is its own; its kernel half is the same entries in every space, so the kernel runs
# unchanged whichever space CR3 holds. as_create copies the current space's kernel-half entries into a cleared
# table, points the copy's recursive slot at the copy itself and leaves its foreign slot empty.
#
# Why not switch CR3 to edit another space? Because everything cached for the current space would go with it, and
# the caller (a page-fault handler, a loader filling a new process) is running in the current space. Why not
# temp-map each table? Because a walk down four levels would need four slots and four INVLPGs per access. Instead a
# second top-level entry, the foreign slot F, points at the other space's top table while it is *attached*:
#
#        current top table                    attached (foreign) top table
#        +----------------+                   +----------------+
#   R -> | self           |---+          +--> | R: self        |
#   F -> | foreign -------|---|----------+    | F: empty       |
#        | kernel half    |   |               | kernel half    |  (same entries as the current table)
#        | user half      |   |               | user half      |  <- what vmm_map_in & co. edit
#        +----------------+   |               +----------------+
#                             +-> the recursive window: the current space's tables
#
# With F pointing at the foreign top table T, an address whose top index is F walks one level short *into T*: the
# foreign space's leaf entries (PTEs) fill F's window in address order, just as the current space's fill R's. The
# levels above are reached by going through R first: the entries of level n of the foreign space sit at
# FOREIGN_LEVELn_ENTRIES (R, ..., R, F, indices...: kgen/arch Arch.recursive_window(R, n, foreign=F)), a windows
# table of their own (paging_foreign_entries). T itself appears at FOREIGN_TOP (indices R, ..., R, F).
#
# So the foreign space is edited exactly like the current one, by the same routines (templates/paging.s) given the
# foreign windows table: a missing table is allocated at its own window page with pmm_map_top (the *local* PTE of
# that window page is the foreign entry one level up, so the frame lands in the right place), cleared through that
# page, and given back with pmm_free_at while still mapped there. No temp slot, no CR3 switch.
#
# The TLB. Every translation whose walk passes through the foreign slot is cached under a fixed virtual address: the
# foreign window's pages (the attached space's page tables) and, through R, the pages that show its upper tables
# and its top table. When F starts pointing at another table, all of those are stale at once, and they are spread
# over a whole top-level slot (2^18 pages on i386, 2^27 on x86_64), too many to INVLPG one by one. So as_attach,
# as_detach and as_destroy reload CR3 whenever F changes: that drops every non-global translation and every
# paging-structure cache entry. Kernel-half pages carry G (vmm_pte_flags) and survive; the cost is the user half's
# and the recursive windows' entries, refilled on use. Attaching the space already attached changes nothing and
# flushes nothing. Edits made *through* an attachment keep the same rule as local ones: a table made or freed at
# its window page is INVLPG'd there by pmm_map_top / pmm_free_at, and a leaf change in a space that is not
# running needs no flush at all (nothing of it is cached: CR3 does not point at it). The build variant
# aspace_skip_foreign_flush drops the reload, and a read through the window then still shows the previous space.
#
# i386: sharing the kernel half. A kernel page table made later (vmm_table_for for a kernel address) lands in a PDE
# of the *current* space only. x86_64 has no such problem: vmm_init makes every kernel-half PDPT at boot, and the
# 256 PML4 entries copied by as_create never change. On i386 the choice was between preallocating all 256
# kernel-half page tables (1 MiB at every boot, whether or not a second space ever exists, and the VMM's "tables
# made on demand and given back" would stop holding for the kernel half) and the generation counter vmm.s already
# bumps whenever a kernel-half PDE changes. kgen takes the counter: each space records the generation its kernel
# half was copied at, and as_switch re-copies the 256 PDEs (1 KiB) into a space whose copy is older before loading
# CR3. The running space is always current (a change happens in it, or it was refreshed when switched to), so it is
# always the source of the copy. A space that is neither running nor refreshed may hold stale kernel PDEs; it is
# never used that way (only its user half is edited through the foreign slot), and the invariants check the
# kernel half of every space whose generation is the current one.
#
# Ownership: as_destroy gives back every frame its user half maps, tables of every level, and the top table. A frame
# passed to vmm_map_in therefore belongs to that space from then on (vmm_unmap_in hands it back to the caller).
# Large pages are never made in a user half; as_destroy clears an entry with PS without freeing what it maps.
#
# The live spaces are a table in .data (as_spaces: top-level table, generation; record 0 is the boot space), which
# the harness reads to check every space, not only the one in CR3 (kgen/guest/invariants.py).

.section .text
# as_find(top) -> the address of the space record holding top, or 0 (as_find(0) finds a free record)
as_find:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    mov xcx, offset as_spaces
    mov edx, AS_MAX_SPACES
.Lfind_next:
    cmp [xcx], xax
    je .Lfind_found
    add xcx, 2*WORD_SIZE
    dec edx
    jnz .Lfind_next
    xor eax, eax
    ret
.Lfind_found:
    mov xax, xcx
    ret

# as_current() -> the running space: CR3's top-level table
as_current:
    mov xax, cr3
    mov xdx, PTE_FRAME_MASK
    and xax, xdx
    ret

# as_set_foreign(top): point the foreign slot at top (0: empty it), flushing when that changes what it shows
as_set_foreign:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    cmp xax, [as_attached]
    je .Lset_unchanged
    mov [as_attached], xax
    test xax, xax
    jz .Lset_store
    or xax, PTE_P | PTE_RW
    SET_NX xax                                      # a window onto tables: never executable
.Lset_store:
    mov xdx, LEVEL0_ENTRIES
    mov [xdx + FOREIGN_SLOT*ENTRY_SIZE], xax
.if ASPACE_SKIP_FOREIGN_FLUSH
    # Build variant: no reload. A read through the foreign window may still show the space attached before.
.else
.if ASPACE_DETACH_SKIP_FLUSH
    # Build variant: no reload when the slot is emptied. The window still shows the space detached last.
    test xax, xax
    jz .Lset_unchanged
.endif
    mov xax, cr3                                    # every translation through the slot is stale (see above)
    mov cr3, xax
.endif
.Lset_unchanged:
    ret

# as_attach(space) -> 1, or 0 when space is not a live address space
as_attach:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    call as_find
    DROP 0x1
    test xax, xax
    jz .Lattach_refused
    PUSHW xword ptr [xsp + ARG1]
    call as_set_foreign
    DROP 0x1
    mov eax, 0x1
    ret
.Lattach_refused:
    PUSHW xword ptr [xsp + ARG1]
    PUSHW offset str_not_a_space
    call serial_putline
    DROP 0x2
    xor eax, eax
    ret

# as_detach(): empty the foreign slot
as_detach:
    push 0x0
    call as_set_foreign
    add xsp, WORD_SIZE
    ret

# as_create() -> a new address space (its top-level table's physical address), or 0 when out of frames or records
as_create:
    push xbx
    push xsi
    push xdi
    push 0x0
    call as_find                                    # a free record
    add xsp, WORD_SIZE
    test xax, xax
    jz .Lcreate_no_record
    mov xsi, xax
    call pmm_alloc
    test xax, xax
    jz .Lcreate_done
    mov xbx, xax
    push xword ptr [as_attached]                    # put back at the end
    push xbx
    call as_set_foreign
    add xsp, WORD_SIZE
    mov xdi, FOREIGN_TOP
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd                                       # the user half: empty
    mov ecx, KERNEL_HALF_FIRST_SLOT
.Lcreate_copy:                                      # the kernel half: the running space's entries
    mov xdx, LEVEL0_ENTRIES
    mov xax, [xdx + xcx*ENTRY_SIZE]
    mov xdx, FOREIGN_TOP
    mov [xdx + xcx*ENTRY_SIZE], xax
    inc ecx
    cmp ecx, TABLE_ENTRIES
    jb .Lcreate_copy
    mov xax, [xdx + RECURSIVE_SLOT*ENTRY_SIZE]      # the self-map: same flags, the new table's own frame
    mov xcx, PTE_FRAME_MASK
    not xcx
    and xax, xcx
    or xax, xbx
    mov [xdx + RECURSIVE_SLOT*ENTRY_SIZE], xax
    mov xword ptr [xdx + FOREIGN_SLOT*ENTRY_SIZE], 0x0
    mov [xsi], xbx
    mov eax, [vmm_kernel_pde_generation]
    mov [xsi + WORD_SIZE], xax
    call as_set_foreign                             # the previous attachment, still on the stack
    add xsp, WORD_SIZE
    mov xax, xbx
.Lcreate_done:
    pop xdi
    pop xsi
    pop xbx
    ret
.Lcreate_no_record:
    push offset str_no_record
    call serial_puts
    add xsp, WORD_SIZE
    xor eax, eax
    jmp .Lcreate_done

# as_free_tree(vaddr, level): give back every frame below the attached space's level-`level` table that holds
# vaddr's entry (the top table: its user half only), leaf frames by pmm_free, tables by pmm_free_at at their
# window page, which also clears the entry pointing at them
as_free_tree:
    push xbx
    push xsi
    push xdi
    push xbp
    FRAME 0x4
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xword ptr [xsp + ARG1]
    PUSHW offset paging_foreign_entries
    call pt_entry
    DROP 0x3
    and xax, -PAGE_SIZE
    mov xsi, xax                                    # the table, through its window page
    mov xbp, [xsp + ARG2]                           # its level
    mov edi, TABLE_ENTRIES
    test ebp, ebp
    jnz .Lfree_tree_scan
    mov edi, KERNEL_HALF_FIRST_SLOT
.Lfree_tree_scan:
    xor ebx, ebx
.Lfree_tree_entry:
    cmp ebx, edi
    jae .Lfree_tree_done
    mov xax, [xsi + xbx*ENTRY_SIZE]
    test eax, PTE_P
    jz .Lfree_tree_next
    cmp ebp, LEAF_LEVEL
    je .Lfree_tree_page
    test eax, PTE_PS
    jnz .Lfree_tree_clear
    movzx ecx, byte ptr [paging_level_shift + xbp]
    mov xax, xbx
    shl xax, cl
    add xax, [xsp + ARG1]                           # the first address the child table maps
    lea xcx, [xbp + 0x1]
    PUSHW xcx
    PUSHW xax
    call as_free_tree
    PUSHW offset paging_foreign_entries             # the same vaddr and level: the child's entry, on its window page
    call pt_entry
    DROP 0x3
    and xax, -PAGE_SIZE
    PUSHW xax
    call pmm_free_at
    DROP 0x1
    jmp .Lfree_tree_next
.Lfree_tree_page:
    mov xcx, PTE_FRAME_MASK
    and xax, xcx
    PUSHW xax
    call pmm_free
    DROP 0x1
.Lfree_tree_clear:
    mov xword ptr [xsi + xbx*ENTRY_SIZE], 0x0
.Lfree_tree_next:
    inc ebx
    jmp .Lfree_tree_entry
.Lfree_tree_done:
    pop xbp
    pop xdi
    pop xsi
    pop xbx
    ret

# as_destroy(space) -> 1, or 0 when refused (not a live space, the boot space, or the running one). Gives back
# every frame of its user half, its tables and its top table.
as_destroy:
    push xbx
    push xsi
    FRAME 0x2
    mov xbx, [xsp + ARG1]
    push xbx
    call as_find
    add xsp, WORD_SIZE
    test xax, xax
    jz .Ldestroy_refused
    cmp xax, offset as_spaces                       # record 0: the boot space stays
    je .Ldestroy_refused
    mov xsi, xax
    call as_current
    cmp xax, xbx
    je .Ldestroy_refused
    push xword ptr [as_attached]
    push xbx
    call as_set_foreign
    add xsp, WORD_SIZE
    push 0x0
    push 0x0
    call as_free_tree
    add xsp, 2*WORD_SIZE
    mov xax, FOREIGN_TOP
    push xax
    call pmm_free_at                                # the top table; its local PTE is the foreign slot: cleared
    add xsp, WORD_SIZE
    mov xword ptr [as_attached], 0x0
    mov xax, cr3                                    # nothing may stay cached of the freed tables
    mov cr3, xax
    mov xword ptr [xsi], 0x0
    mov xword ptr [xsi + WORD_SIZE], 0x0
    pop xax                                         # the previous attachment, unless it was this space
    cmp xax, xbx
    je .Ldestroy_done
    push xax
    call as_set_foreign
    add xsp, WORD_SIZE
.Ldestroy_done:
    mov eax, 0x1
    pop xsi
    pop xbx
    ret
.Ldestroy_refused:
    PUSHW xbx
    PUSHW offset str_destroy_refused
    call serial_putline
    DROP 0x2
    xor eax, eax
    pop xsi
    pop xbx
    ret

# as_switch(space) -> 1, or 0 when space is not a live address space. Loads CR3 (every non-global translation
# goes); an attachment stays attached: the foreign slot moves from the old top table to the new one. On i386 a
# space whose kernel half is older than vmm_kernel_pde_generation gets the running space's first.
as_switch:
    push xbx
    push xsi
    FRAME 0x2
    mov xbx, [xsp + ARG1]
    push xbx
    call as_find
    add xsp, WORD_SIZE
    test xax, xax
    jz .Lswitch_refused
    mov xsi, xax
    call as_current
    cmp xax, xbx
    je .Lswitch_done
    push xword ptr [as_attached]                    # carried over
    mov xax, xbx                                    # the target in the foreign slot, to reach its top table:
    or xax, PTE_P | PTE_RW                          # only FOREIGN_TOP is used before CR3 is loaded, so one
    mov xdx, LEVEL0_ENTRIES                         # INVLPG does (it drops the paging-structure caches too)
    mov [xdx + FOREIGN_SLOT*ENTRY_SIZE], xax
    mov xax, FOREIGN_TOP
    invlpg [xax]
.if KERNEL_HALF_GENERATION
    mov eax, [vmm_kernel_pde_generation]
    cmp [esi + WORD_SIZE], eax
    je .Lswitch_fresh
    mov [esi + WORD_SIZE], eax
    mov ecx, KERNEL_HALF_FIRST_SLOT
.Lswitch_copy:
    cmp ecx, RECURSIVE_SLOT
    je .Lswitch_copy_next
    cmp ecx, FOREIGN_SLOT
    je .Lswitch_copy_next
    mov eax, [LEVEL0_ENTRIES + ecx*ENTRY_SIZE]
    mov [FOREIGN_TOP + ecx*ENTRY_SIZE], eax
.Lswitch_copy_next:
    inc ecx
    cmp ecx, TABLE_ENTRIES
    jb .Lswitch_copy
.Lswitch_fresh:
.endif
    pop xax                                         # the attachment goes with the switch
    mov [as_attached], xax
    test xax, xax
    jz .Lswitch_store
    or xax, PTE_P | PTE_RW
    SET_NX xax
.Lswitch_store:
    mov xdx, FOREIGN_TOP
    mov [xdx + FOREIGN_SLOT*ENTRY_SIZE], xax        # the new space's foreign slot
    mov xdx, LEVEL0_ENTRIES
    mov xword ptr [xdx + FOREIGN_SLOT*ENTRY_SIZE], 0x0   # the old one's: empty
.if ASPACE_SWITCH_USER_WINDOW
    # Build variant: the space left behind gets a user-accessible recursive window, taken away again only when it
    # runs next. Seen only while it is not running: at the next switch, never by a kernel at rest.
    or xword ptr [xdx + RECURSIVE_SLOT*ENTRY_SIZE], PTE_US
.endif
    mov cr3, xbx
.if ASPACE_SWITCH_USER_WINDOW
    mov xdx, LEVEL0_ENTRIES
    and xword ptr [xdx + RECURSIVE_SLOT*ENTRY_SIZE], ~PTE_US
.endif
.Lswitch_done:
    mov eax, 0x1
    pop xsi
    pop xbx
    ret
.Lswitch_refused:
    PUSHW xbx
    PUSHW offset str_not_a_space
    call serial_putline
    DROP 0x2
    xor eax, eax
    pop xsi
    pop xbx
    ret

# as_target_ok(space, vaddr) -> 1 when space is the attached one and vaddr lies in the user half, else 0 (said on
# COM1)
as_target_ok:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    test xax, xax
    jz .Ltarget_not_attached
    cmp xax, [as_attached]
    jne .Ltarget_not_attached
    mov xax, [xsp + ARG2]
    mov xdx, USER_HALF_END
    cmp xax, xdx
.if ASPACE_MAP_IN_PAST_USER_HALF
    # Build variant: the first page past the user half is taken for a user page (on i386 the kernel base itself,
    # a page of the kernel half every space shares; on x86_64 a non-canonical address).
    ja .Ltarget_kernel_half
.else
    jae .Ltarget_kernel_half
.endif
    mov eax, 0x1
    ret
.Ltarget_not_attached:
    PUSHW xword ptr [xsp + ARG1]                    # the space
    PUSHW offset str_not_attached
    jmp .Ltarget_refused
.Ltarget_kernel_half:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG2]                    # the address
    PUSHW offset str_kernel_half
.Ltarget_refused:
    call serial_putline
    DROP 0x2
    xor eax, eax
    ret

# vmm_map_in(space, vaddr, phys, flags) -> 1, or 0 when refused (not attached, kernel half, already mapped, inside
# a large page) or out of memory for a table. Tables of a user half are made with U/S, so the leaf's flags alone
# decide ring 3 access. No INVLPG: nothing was mapped at vaddr, so nothing of it is cached.
vmm_map_in:
    push xbx
    FRAME 0x1
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xword ptr [xsp + ARG1]
    call as_target_ok
    DROP 0x2
    test eax, eax
    jz .Lmap_in_done
    mov xbx, [xsp + ARG2]
    and xbx, -PAGE_SIZE
    PUSHW PTE_P | PTE_RW | PTE_US
    PUSHW xbx
    PUSHW offset paging_foreign_entries
    call pt_table_for                               # the levels above the leaf; their local PTEs are foreign entries
    DROP 0x3
    test eax, eax
    jz .Lmap_in_done
    js .Lmap_in_refused
    mov xcx, [xsp + ARG4]                           # flags: the low 12 bits and NX, never G in a user half
    mov xdx, PTE_FLAGS_MASK
    and xcx, xdx
    and xcx, ~PTE_G
    or xcx, PTE_P
    mov xdx, [xsp + ARG3]
    and xdx, -PAGE_SIZE
    or xcx, xdx
    PUSHW xcx
    PUSHW xbx
    PUSHW offset paging_foreign_entries
    call pt_set_leaf
    DROP 0x3
    test eax, eax
    jz .Lmap_in_refused
.Lmap_in_done:
    pop xbx
    ret
.Lmap_in_refused:
    PUSHW xbx
    PUSHW offset str_map_in_refused
    call serial_putline
    DROP 0x2
    xor eax, eax
    pop xbx
    ret

# vmm_unmap_in(space, vaddr) -> the frame that was mapped there (now the caller's), or VMM_NONE
vmm_unmap_in:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xword ptr [xsp + ARG1]
    call as_target_ok
    DROP 0x2
    test eax, eax
    jz vmm_entry_frame                              # xax = 0: VMM_NONE
    PUSHW xword ptr [xsp + ARG2]
    PUSHW offset paging_foreign_entries
    call pt_unmap
    DROP 0x2
    jmp vmm_entry_frame                             # templates/vmm.s: the entry's frame, or VMM_NONE

# vmm_translate_in(space, vaddr) -> the physical address vaddr maps to in the attached space, or VMM_NONE
vmm_translate_in:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xword ptr [xsp + ARG1]
    call as_target_ok
    DROP 0x2
    test eax, eax
    jz .Ltranslate_in_none
    PUSHW xword ptr [xsp + ARG2]
    PUSHW offset paging_foreign_entries
    call pt_translate
    DROP 0x2
    ret
.Ltranslate_in_none:
    mov xax, VMM_NONE
    ret

.section .rodata
str_not_a_space:
    .asciz "kgen: not an address space: "
str_no_record:
    .asciz "kgen: as_create: all address-space records in use\n"
str_destroy_refused:
    .asciz "kgen: as_destroy: refused (not a space, the boot space, or the running one): "
str_not_attached:
    .asciz "kgen: foreign-slot operation on a space that is not attached: "
str_kernel_half:
    .asciz "kgen: foreign-slot operation in the shared kernel half: "
str_map_in_refused:
    .asciz "kgen: vmm_map_in: already mapped (or a large page) at "

.section .data
.balign 8, 0
as_attached:                                        # the space in the foreign slot, 0 when empty
    .xword 0x0
as_spaces:                                          # (top-level table, kernel-half generation) per live space
    .xword boot_top_table - KERNEL_VIRTUAL_BASE, 0x0
    .fill (AS_MAX_SPACES - 1) * 2 * WORD_SIZE, 0x1, 0x0
