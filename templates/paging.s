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
# every level.
#
# A PTE may only be touched once every level above it holds a present entry: otherwise the window address of the
# PTE is itself unmapped. paging_table_present checks exactly that, top level first.

.section .text
# paging_entry(vaddr, level) -> the virtual address of the entry that maps vaddr at level (0 = the top table)
paging_entry:
    LEVEL_ENTRY paging_level_entries                # templates/macros.inc
    ret

# paging_table_present(vaddr) -> 1 when the page table holding vaddr's PTE exists (every level above the last has
# a present entry for vaddr, and none of them maps a large page), else 0
paging_table_present:
    push xbx
    xor ebx, ebx
.Lpresent_level:
    cmp ebx, LEAF_LEVEL
    jae .Lpresent_yes
    push xbx
    push xword ptr [xsp + 3*WORD_SIZE]
    call paging_entry
    add xsp, 2*WORD_SIZE
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
