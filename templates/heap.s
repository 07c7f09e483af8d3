# The kernel heap: kmalloc, kmalloc_aligned, kfree.
#
# Design: size-class slabs for small blocks, whole pages for large ones. A request is rounded up to a power of
# two from 16 to 2048 bytes (or to its alignment, if larger); each class keeps slabs, one page each, cut into
# equal blocks. Blocks of size s sit at multiples of s inside their page, so alignment up to 2048 comes free and
# kmalloc/kfree cost a handful of instructions with no search. Anything larger, or aligned to more than 2048,
# gets whole pages of its own, aligned as asked. Boundary tags would waste less for odd sizes but need
# coalescing and in-band headers next to every block; the slabs keep all metadata in one header per page.
#
# Slabs live in a window of HEAP_SLAB_PAGES pages reserved from the range allocator at init; a page is backed
# (vmm_back_page) when a class needs a new slab and given back (vmm_release_page) as soon as its last block is
# freed. Large blocks reserve their own range and are listed in heap_large as (start, pages) words. Every heap page
# is mapped with heap_page_flags: present, writable and, on x86_64, never executable (NX).
#
# Slab header (HEAP_SLAB_HEADER bytes at the start of the page), one layout for both word sizes:
#   +0 magic (dword)  +4 block shift (byte)  +5 free blocks (byte)  +6 capacity (byte)
#   +8 first free block  +8+WORD_SIZE next slab  +8+2*WORD_SIZE previous slab (words)
#   +0x20 bitmap of live blocks (one bit per block)
# The counts fit a byte: a slab holds at most (PAGE_SIZE - HEAP_SLAB_HEADER) >> HEAP_MIN_SHIFT = 252 blocks, and
# their bitmap ends at the header's end (checked below, when the kernel is assembled).
# A free block's first word links to the next free block. kfree checks the header, that the pointer is the start
# of a block, and that the block is live (its bit): an overwritten header, a pointer the heap never returned and a
# double free all stop the kernel with a report instead of corrupting the heap.

.section .text
.if 0x20 + ((((PAGE_SIZE - HEAP_SLAB_HEADER) >> HEAP_MIN_SHIFT) + 0x7) / 0x8) > HEAP_SLAB_HEADER
    .long heap_slab_bitmap_does_not_fit_the_header
.endif
.if ((PAGE_SIZE - HEAP_SLAB_HEADER) >> HEAP_MIN_SHIFT) > 0xff
    .long heap_slab_capacity_does_not_fit_a_byte
.endif

heap_init:
    push HEAP_SLAB_PAGES
    call vrange_reserve
    add xsp, WORD_SIZE
    test xax, xax
    jz .Lheap_init_failed
    mov [heap_slab_base], xax
    mov eax, PTE_P | PTE_RW                         # kernel data: writable...
.if HEAP_PAGES_EXECUTABLE
    # Build variant: no NX, so a heap block the kernel is tricked into jumping to runs as code.
.else
    SET_NX xax                                      # ...and never executable
.endif
    mov [heap_page_flags], xax
    ret
.Lheap_init_failed:
    push offset str_heap_no_window
    call panic

# heap_class_shift(size, align) -> log2 of the block size serving the request (>= HEAP_MIN_SHIFT)
heap_class_shift:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    cmp xax, [xsp + ARG2]
    jae .Lshift_size
    mov xax, [xsp + ARG2]
.Lshift_size:
    cmp xax, 0x1 << HEAP_MIN_SHIFT
    jbe .Lshift_min
    dec xax
    bsr xax, xax
.if HEAP_SMALL_BLOCK
    # Build variant: one class too small. A request of 17..32 bytes gets a 16-byte block, so it runs into the next
    # block; an alignment of 4096 gets a 2048-byte slab block, aligned to 2048 only.
.else
    inc eax
.endif
    ret
.Lshift_min:
    mov eax, HEAP_MIN_SHIFT
    ret

# kmalloc(size) -> block, or 0 for size 0, a size beyond the heap, or no memory
kmalloc:
    FRAME 0x0
    PUSHW 0x1
    PUSHW xword ptr [xsp + ARG1]
    call kmalloc_aligned
    DROP 0x2
    ret

# kmalloc_aligned(size, align) -> block aligned to align (a power of two), or 0
kmalloc_aligned:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    test xax, xax
    jz .Lmalloc_zero
    mov xdx, HEAP_MAX_SIZE
    cmp xax, xdx
    ja .Lmalloc_zero
    mov xcx, [xsp + ARG2]
    test xcx, xcx
    jz .Lmalloc_zero
    cmp xcx, xdx
    ja .Lmalloc_zero
    lea xdx, [xcx - 0x1]
    test xcx, xdx
    jnz .Lmalloc_zero                               # not a power of two
    PUSHW xcx
    PUSHW xax
    call heap_class_shift
    DROP 0x2
    cmp eax, HEAP_MAX_SHIFT
    ja heap_alloc_large
    PUSHW xax
    call heap_alloc_small
    DROP 0x1
    ret
.Lmalloc_zero:
    xor eax, eax
    ret

# heap_alloc_small(shift) -> a block of 1 << shift bytes from the class's first slab with room, or 0
heap_alloc_small:
    push xbx
    push xsi
    FRAME 0x2
    mov ecx, [xsp + ARG1]
    mov xbx, [heap_partial + xcx*WORD_SIZE - HEAP_MIN_SHIFT*WORD_SIZE]
    test xbx, xbx
    jnz .Lsmall_have_slab
    PUSHW xcx
    call heap_new_slab
    DROP 0x1
    test xax, xax
    jz .Lsmall_done
    mov xbx, xax
.Lsmall_have_slab:
    PUSHW xbx
    call heap_check_slab
    DROP 0x1
    PUSHW xword ptr [xbx + 0x8]                     # the first free block
    PUSHW xbx
    call heap_block_index
    DROP 0x2
    bts [xbx + 0x20], eax
    jc .Lsmall_corrupt                              # a "free" block that is live: the free list is corrupt
    mov xsi, [xbx + 0x8]
    mov xax, [xsi]
    mov [xbx + 0x8], xax
    dec byte ptr [xbx + 0x5]
    jnz .Lsmall_taken
    PUSHW xbx                                       # full: no longer a slab with room
    call heap_unlink_slab
    DROP 0x1
.Lsmall_taken:
    mov xax, xsi
.Lsmall_done:
    pop xsi
    pop xbx
    ret
.Lsmall_corrupt:
    PUSHW offset str_heap_free_list
    call panic

# heap_new_slab(shift) -> a fresh slab page on the class's list, or 0 when no page or frame is left
heap_new_slab:
    push xbx
    push xsi
    push xdi
    FRAME 0x3
    xor ecx, ecx                                    # find an unused page of the slab window
.Lnew_slab_scan:
    cmp ecx, HEAP_SLAB_PAGES
    jae .Lnew_slab_none
    bt [heap_slab_pages_used], ecx
    jnc .Lnew_slab_found
    inc ecx
    jmp .Lnew_slab_scan
.Lnew_slab_found:
    mov xbx, xcx
    shl xbx, PAGE_SHIFT
    add xbx, [heap_slab_base]
    PUSHW xcx
    PUSHW xword ptr [heap_page_flags]
    PUSHW xbx
    call vmm_back_page                              # a cleared frame: bitmap and links start at zero
    DROP 0x2
    POPW xcx
    test xax, xax
    jz .Lnew_slab_none
    bts [heap_slab_pages_used], ecx
    mov ecx, [xsp + ARG1]                           # shift
    mov edx, 0x1
    shl edx, cl                                     # block size
    mov dword ptr [xbx], HEAP_SLAB_MAGIC
    mov [xbx + 0x4], cl
    mov esi, edx                                    # first block: the header rounded up to the block size
    cmp esi, HEAP_SLAB_HEADER
    jae .Lnew_slab_first
    mov esi, HEAP_SLAB_HEADER
.Lnew_slab_first:
    mov eax, PAGE_SIZE
    sub eax, esi
    shr eax, cl
    mov [xbx + 0x6], al
    mov [xbx + 0x5], al
    add xsi, xbx
    mov [xbx + 0x8], xsi
    lea xdi, [xbx + PAGE_SIZE]
.Lnew_slab_link:                                    # each free block links to the one after it
    lea xax, [xsi + xdx]
    cmp xax, xdi
    jae .Lnew_slab_linked
    mov [xsi], xax
    mov xsi, xax
    jmp .Lnew_slab_link
.Lnew_slab_linked:
    mov ecx, [xsp + ARG1]
    mov xax, [heap_partial + xcx*WORD_SIZE - HEAP_MIN_SHIFT*WORD_SIZE]
    mov [xbx + 0x8 + WORD_SIZE], xax
    test xax, xax
    jz .Lnew_slab_alone
    mov [xax + 0x8 + 2*WORD_SIZE], xbx
.Lnew_slab_alone:
    mov [heap_partial + xcx*WORD_SIZE - HEAP_MIN_SHIFT*WORD_SIZE], xbx
    inc dword ptr [heap_slabs]
    mov xax, xbx
    jmp .Lnew_slab_done
.Lnew_slab_none:
    xor eax, eax
.Lnew_slab_done:
    pop xdi
    pop xsi
    pop xbx
    ret

# heap_unlink_slab(slab): take a slab off its class's list of slabs with room
heap_unlink_slab:
    FRAME 0x0
    mov xdx, [xsp + ARG1]
    mov xax, [xdx + 0x8 + WORD_SIZE]                # next
    mov xcx, [xdx + 0x8 + 2*WORD_SIZE]              # previous
    test xcx, xcx
    jz .Lunlink_head
    mov [xcx + 0x8 + WORD_SIZE], xax
    jmp .Lunlink_next
.Lunlink_head:
    movzx ecx, byte ptr [xdx + 0x4]
    mov [heap_partial + xcx*WORD_SIZE - HEAP_MIN_SHIFT*WORD_SIZE], xax
.Lunlink_next:
    test xax, xax
    jz .Lunlink_done
    mov xcx, [xdx + 0x8 + 2*WORD_SIZE]
    mov [xax + 0x8 + 2*WORD_SIZE], xcx
.Lunlink_done:
    mov xword ptr [xdx + 0x8 + WORD_SIZE], 0x0
    mov xword ptr [xdx + 0x8 + 2*WORD_SIZE], 0x0
    ret

# heap_check_slab(slab): stop the kernel if the header was overwritten
heap_check_slab:
    FRAME 0x0
    mov xdx, [xsp + ARG1]
    cmp dword ptr [xdx], HEAP_SLAB_MAGIC
    jne .Lcheck_slab_bad
    mov al, [xdx + 0x4]                             # block shift: one of the classes
    cmp al, HEAP_MIN_SHIFT
    jb .Lcheck_slab_bad
    cmp al, HEAP_MAX_SHIFT
    ja .Lcheck_slab_bad
    mov al, [xdx + 0x5]                             # no more free blocks than blocks
    cmp al, [xdx + 0x6]
    ja .Lcheck_slab_bad
    ret
.Lcheck_slab_bad:
    PUSHW offset str_heap_header
    call panic

# heap_block_index(slab, block) -> index of the block in its slab; stops the kernel if block is not the start
# of one of the slab's blocks
heap_block_index:
    FRAME 0x0
    mov xdx, [xsp + ARG1]
    mov xax, [xsp + ARG2]
    sub xax, xdx
    movzx ecx, byte ptr [xdx + 0x4]
    mov edx, 0x1
    shl edx, cl                                     # block size
    cmp edx, HEAP_SLAB_HEADER
    jae .Lindex_first
    mov edx, HEAP_SLAB_HEADER
.Lindex_first:
    sub xax, xdx                                    # offset from the first block
    jb .Lindex_bad
    mov edx, 0x1
    shl edx, cl
    dec edx
    test eax, edx
    jnz .Lindex_bad
    shr xax, cl
    mov xdx, [xsp + ARG1]
    movzx edx, byte ptr [xdx + 0x6]
    cmp xax, xdx
    jae .Lindex_bad
    ret
.Lindex_bad:
    PUSHW offset str_heap_not_block
    call panic

# heap_alloc_large(...) is entered by a jump from kmalloc_aligned with its arguments in place:
# kmalloc_aligned(size, align) -> whole pages, aligned to max(align, PAGE_SIZE)
heap_alloc_large:
    push xbx
    push xsi
    push xdi
    FRAME 0x3
    mov xbx, offset heap_large                      # a free record
.Llarge_slot:
    cmp xbx, offset heap_large + HEAP_LARGE_SLOTS * 2 * WORD_SIZE
    jae .Llarge_no_slot
    cmp xword ptr [xbx], 0x0
    je .Llarge_slot_found
    add xbx, 2*WORD_SIZE
    jmp .Llarge_slot
.Llarge_slot_found:
    mov xsi, [xsp + ARG1]                           # pages = ceil(size / PAGE_SIZE)
    add xsi, PAGE_SIZE - 1
    shr xsi, PAGE_SHIFT
    mov xdi, [xsp + ARG2]                           # extra pages reserved so an aligned start fits
    shr xdi, PAGE_SHIFT
    jz .Llarge_reserve
    dec xdi
.Llarge_reserve:
    lea xax, [xsi + xdi]
    PUSHW xax
    call vrange_reserve
    DROP 0x1
    test xax, xax
    jz .Llarge_fail
    mov xcx, [xsp + ARG2]                           # aligned start
    cmp xcx, PAGE_SIZE
    jae .Llarge_align
    mov ecx, PAGE_SIZE
.Llarge_align:
    dec xcx
    lea xdx, [xax + xcx]
    not xcx
    and xdx, xcx
    mov [xbx], xdx
    mov [xbx + WORD_SIZE], xsi
    sub xdx, xax                                    # give back the pages before the aligned start...
    jz .Llarge_no_head
    shr xdx, PAGE_SHIFT
    sub xdi, xdx
    PUSHW xdx
    PUSHW xax
    call vrange_release
    DROP 0x2
.Llarge_no_head:
    test xdi, xdi                                   # ...and those after the block
    jz .Llarge_back
    PUSHW xdi
    mov xax, xsi
    shl xax, PAGE_SHIFT
    add xax, [xbx]
    PUSHW xax
    call vrange_release
    DROP 0x2
.Llarge_back:
    mov xdi, [xbx]
.Llarge_back_page:
    PUSHW xword ptr [heap_page_flags]
    PUSHW xdi
    call vmm_back_page
    DROP 0x2
    test xax, xax
    jz .Llarge_unwind
    add xdi, PAGE_SIZE
    dec xsi
    jnz .Llarge_back_page
    mov xax, [xbx]
    jmp .Llarge_done
.Llarge_unwind:                                     # out of frames part way: free what was backed
    PUSHW xword ptr [xbx]
    call heap_free_large
    DROP 0x1
    jmp .Llarge_fail
.Llarge_no_slot:
    PUSHW offset str_heap_large_full
    call serial_puts
    DROP 0x1
.Llarge_fail:
    xor eax, eax
.Llarge_done:
    pop xdi
    pop xsi
    pop xbx
    ret

# heap_free_large(block) -> 1 when block was a large block (its pages and range are given back), else 0
heap_free_large:
    push xbx
    push xsi
    push xdi
    FRAME 0x3
    mov xax, [xsp + ARG1]
    test xax, xax
    jz .Lfree_large_none
    mov xbx, offset heap_large
.Lfree_large_find:
    cmp xbx, offset heap_large + HEAP_LARGE_SLOTS * 2 * WORD_SIZE
    jae .Lfree_large_none
    cmp [xbx], xax
    je .Lfree_large_found
    add xbx, 2*WORD_SIZE
    jmp .Lfree_large_find
.Lfree_large_found:
    mov xsi, xax
    mov xdi, [xbx + WORD_SIZE]
.Lfree_large_page:
    PUSHW xsi
    call vrange_page_mapped
    DROP 0x1
    test eax, eax
    jz .Lfree_large_next
    PUSHW xsi
    call vmm_release_page
    DROP 0x1
.Lfree_large_next:
    add xsi, PAGE_SIZE
    dec xdi
    jnz .Lfree_large_page
    PUSHW xword ptr [xbx + WORD_SIZE]
    PUSHW xword ptr [xbx]
    call vrange_release
    DROP 0x2
    mov xword ptr [xbx], 0x0
    mov eax, 0x1
    jmp .Lfree_large_done
.Lfree_large_none:
    xor eax, eax
.Lfree_large_done:
    pop xdi
    pop xsi
    pop xbx
    ret

# kfree(block): give a block back; 0 is ignored. Anything else the heap did not hand out stops the kernel.
kfree:
    push xbx
    push xsi
    FRAME 0x2
    mov xsi, [xsp + ARG1]
    test xsi, xsi
    jz .Lkfree_done
    mov xax, xsi                                    # a slab block lies inside the slab window
    sub xax, [heap_slab_base]
    cmp xax, HEAP_SLAB_PAGES * PAGE_SIZE
    jae .Lkfree_large
    shr eax, PAGE_SHIFT
    bt [heap_slab_pages_used], eax
    jnc .Lkfree_foreign
    mov xbx, xsi
    and xbx, -PAGE_SIZE
    PUSHW xbx
    call heap_check_slab
    DROP 0x1
    PUSHW xsi
    PUSHW xbx
    call heap_block_index
    DROP 0x2
    btr [xbx + 0x20], eax
.if HEAP_DOUBLE_FREE_UNCHECKED
    # Build variant: a block freed twice goes on the free list twice, and two kmallocs then share it.
.else
    jnc .Lkfree_twice
.endif
    mov xax, [xbx + 0x8]
    mov [xsi], xax
    mov [xbx + 0x8], xsi
    inc byte ptr [xbx + 0x5]
    mov al, [xbx + 0x5]
    cmp al, [xbx + 0x6]
    je .Lkfree_slab_empty
    cmp al, 0x1
    jne .Lkfree_done
    movzx ecx, byte ptr [xbx + 0x4]                 # it was full: it has room again
    mov xax, [heap_partial + xcx*WORD_SIZE - HEAP_MIN_SHIFT*WORD_SIZE]
    mov [xbx + 0x8 + WORD_SIZE], xax
    mov xword ptr [xbx + 0x8 + 2*WORD_SIZE], 0x0
    test xax, xax
    jz .Lkfree_relisted
    mov [xax + 0x8 + 2*WORD_SIZE], xbx
.Lkfree_relisted:
    mov [heap_partial + xcx*WORD_SIZE - HEAP_MIN_SHIFT*WORD_SIZE], xbx
    jmp .Lkfree_done
.Lkfree_slab_empty:                                 # every block free: the page goes back
    cmp byte ptr [xbx + 0x6], 0x1                   # a one-block slab was never on the list once full
    je .Lkfree_release
    PUSHW xbx
    call heap_unlink_slab
    DROP 0x1
.Lkfree_release:
    mov xax, xbx
    sub xax, [heap_slab_base]
    shr xax, PAGE_SHIFT
    btr [heap_slab_pages_used], eax
    PUSHW xbx
    call vmm_release_page
    DROP 0x1
    dec dword ptr [heap_slabs]
    jmp .Lkfree_done
.Lkfree_large:
    PUSHW xsi
    call heap_free_large
    DROP 0x1
    test eax, eax
    jz .Lkfree_foreign
.Lkfree_done:
    pop xsi
    pop xbx
    ret
.Lkfree_twice:
    PUSHW offset str_heap_double_free
    call panic
.Lkfree_foreign:
    FRAME 0x2
    PUSHW offset str_heap_not_block
    call panic

.section .rodata
str_heap_no_window:
    .asciz "heap: no room in the vmm window for the slab pages"
str_heap_free_list:
    .asciz "heap: a slab's free list is corrupt"
str_heap_header:
    .asciz "heap: slab header overwritten"
str_heap_not_block:
    .asciz "kfree: not a block the heap handed out"
str_heap_double_free:
    .asciz "kfree: block freed twice"
str_heap_large_full:
    .asciz "kgen: kmalloc: large-block table full\n"

.section .bss
.balign 8, 0
heap_slab_base:
    .skip WORD_SIZE
heap_page_flags:
    .skip WORD_SIZE
heap_partial:
    .skip (HEAP_MAX_SHIFT - HEAP_MIN_SHIFT + 1) * WORD_SIZE
heap_large:
    .skip HEAP_LARGE_SLOTS * 2 * WORD_SIZE
heap_slabs:
    .skip 0x4
heap_slab_pages_used:
    .skip HEAP_SLAB_PAGES / 8
