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
# paging_table_present(vaddr) -> 1 when the page table holding vaddr's PTE exists (every level above the last has
# a present entry for vaddr), else 0
paging_table_present:
    push xbx
    xor ebx, ebx
.Lpresent_level:
    cmp ebx, LEAF_LEVEL
    jae .Lpresent_yes
    mov xax, [xsp + 2*WORD_SIZE]
.if WORD_SIZE == 8
    shl rax, 0x40 - VA_BITS                         # drop the sign-extended top bits
    shr rax, 0x40 - VA_BITS
.endif
    movzx ecx, byte ptr [paging_level_shift + xbx]
    shr xax, cl
    mov xdx, [paging_level_entries + xbx*WORD_SIZE]
    test xword ptr [xdx + xax*ENTRY_SIZE], PTE_P
    jz .Lpresent_no
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
