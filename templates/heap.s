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
# freed. Large blocks reserve their own range and are listed in heap_large.
#
# Slab header (HEAP_SLAB_HEADER bytes at the start of the page):
#   +0 magic  +4 block size  +8 free blocks  +0xc first free block  +0x10 next slab  +0x14 previous slab
#   +0x18 capacity  +0x20 bitmap of live blocks (one bit per block)
# A free block's first dword links to the next free block. kfree checks the header, that the pointer is the start
# of a block, and that the block is live (its bit): an overwritten header, a pointer the heap never returned and a
# double free all stop the kernel with a report instead of corrupting the heap.

.section .text
heap_init:
    push HEAP_SLAB_PAGES
    call vrange_reserve
    add esp, 0x4
    test eax, eax
    jz .Lheap_init_failed
    mov [heap_slab_base], eax
    ret
.Lheap_init_failed:
    push offset str_heap_no_window
    call panic

# heap_class_shift(size, align) -> log2 of the block size serving the request (>= HEAP_MIN_SHIFT)
heap_class_shift:
    mov eax, [esp + 0x4]
    cmp eax, [esp + 0x8]
    jae .Lshift_size
    mov eax, [esp + 0x8]
.Lshift_size:
    cmp eax, 0x1 << HEAP_MIN_SHIFT
    jbe .Lshift_min
    dec eax
    bsr eax, eax
    inc eax
    ret
.Lshift_min:
    mov eax, HEAP_MIN_SHIFT
    ret

# kmalloc(size) -> block, or 0 for size 0, a size beyond the heap, or no memory
kmalloc:
    push 0x1
    push dword ptr [esp + 0x8]
    call kmalloc_aligned
    add esp, 0x8
    ret

# kmalloc_aligned(size, align) -> block aligned to align (a power of two), or 0
kmalloc_aligned:
    mov eax, [esp + 0x4]
    test eax, eax
    jz .Lmalloc_zero
    cmp eax, HEAP_MAX_SIZE
    ja .Lmalloc_zero
    mov ecx, [esp + 0x8]
    test ecx, ecx
    jz .Lmalloc_zero
    lea edx, [ecx - 0x1]
    test ecx, edx
    jnz .Lmalloc_zero                               # not a power of two
    cmp ecx, HEAP_MAX_SIZE
    ja .Lmalloc_zero
    push ecx
    push eax
    call heap_class_shift
    add esp, 0x8
    cmp eax, HEAP_MAX_SHIFT
    ja heap_alloc_large
    push eax
    call heap_alloc_small
    add esp, 0x4
    ret
.Lmalloc_zero:
    xor eax, eax
    ret

# heap_alloc_small(shift) -> a block of 1 << shift bytes from the class's first slab with room, or 0
heap_alloc_small:
    push ebx
    push esi
    mov ecx, [esp + 0xc]
    mov ebx, [heap_partial + ecx*4 - HEAP_MIN_SHIFT*4]
    test ebx, ebx
    jnz .Lsmall_have_slab
    push ecx
    call heap_new_slab
    add esp, 0x4
    test eax, eax
    jz .Lsmall_done
    mov ebx, eax
.Lsmall_have_slab:
    push ebx
    call heap_check_slab
    add esp, 0x4
    mov eax, [ebx + 0xc]                            # the first free block
    push eax
    push ebx
    call heap_block_index
    add esp, 0x8
    bts [ebx + 0x20], eax
    jc .Lsmall_corrupt                              # a "free" block that is live: the free list is corrupt
    mov esi, [ebx + 0xc]
    mov eax, [esi]
    mov [ebx + 0xc], eax
    dec dword ptr [ebx + 0x8]
    jnz .Lsmall_taken
    push ebx                                        # full: no longer a slab with room
    call heap_unlink_slab
    add esp, 0x4
.Lsmall_taken:
    mov eax, esi
.Lsmall_done:
    pop esi
    pop ebx
    ret
.Lsmall_corrupt:
    push offset str_heap_free_list
    call panic

# heap_new_slab(shift) -> a fresh slab page on the class's list, or 0 when no page or frame is left
heap_new_slab:
    push ebx
    push esi
    push edi
    xor ecx, ecx                                    # find an unused page of the slab window
.Lnew_slab_scan:
    cmp ecx, HEAP_SLAB_PAGES
    jae .Lnew_slab_none
    bt [heap_slab_pages_used], ecx
    jnc .Lnew_slab_found
    inc ecx
    jmp .Lnew_slab_scan
.Lnew_slab_found:
    mov ebx, ecx
    shl ebx, PAGE_SHIFT
    add ebx, [heap_slab_base]
    push ecx
    push PTE_P | PTE_RW
    push ebx
    call vmm_back_page                              # a cleared frame: bitmap and links start at zero
    add esp, 0x8
    pop ecx
    test eax, eax
    jz .Lnew_slab_none
    bts [heap_slab_pages_used], ecx
    mov ecx, [esp + 0x10]                           # shift
    mov edx, 0x1
    shl edx, cl
    mov dword ptr [ebx], HEAP_SLAB_MAGIC
    mov [ebx + 0x4], edx
    mov esi, edx                                    # first block: the header rounded up to the block size
    cmp esi, HEAP_SLAB_HEADER
    jae .Lnew_slab_first
    mov esi, HEAP_SLAB_HEADER
.Lnew_slab_first:
    mov eax, PAGE_SIZE
    sub eax, esi
    shr eax, cl
    mov [ebx + 0x18], eax
    mov [ebx + 0x8], eax
    add esi, ebx
    mov [ebx + 0xc], esi
    lea edi, [ebx + PAGE_SIZE]
.Lnew_slab_link:                                    # each free block links to the one after it
    lea eax, [esi + edx]
    cmp eax, edi
    jae .Lnew_slab_linked
    mov [esi], eax
    mov esi, eax
    jmp .Lnew_slab_link
.Lnew_slab_linked:
    mov ecx, [esp + 0x10]
    mov eax, [heap_partial + ecx*4 - HEAP_MIN_SHIFT*4]
    mov [ebx + 0x10], eax
    test eax, eax
    jz .Lnew_slab_alone
    mov [eax + 0x14], ebx
.Lnew_slab_alone:
    mov [heap_partial + ecx*4 - HEAP_MIN_SHIFT*4], ebx
    inc dword ptr [heap_slabs]
    mov eax, ebx
    jmp .Lnew_slab_done
.Lnew_slab_none:
    xor eax, eax
.Lnew_slab_done:
    pop edi
    pop esi
    pop ebx
    ret

# heap_unlink_slab(slab): take a slab off its class's list of slabs with room
heap_unlink_slab:
    mov edx, [esp + 0x4]
    mov eax, [edx + 0x10]                           # next
    mov ecx, [edx + 0x14]                           # previous
    test ecx, ecx
    jz .Lunlink_head
    mov [ecx + 0x10], eax
    jmp .Lunlink_next
.Lunlink_head:
    mov ecx, [edx + 0x4]
    bsf ecx, ecx
    mov [heap_partial + ecx*4 - HEAP_MIN_SHIFT*4], eax
.Lunlink_next:
    test eax, eax
    jz .Lunlink_done
    mov ecx, [edx + 0x14]
    mov [eax + 0x14], ecx
.Lunlink_done:
    mov dword ptr [edx + 0x10], 0x0
    mov dword ptr [edx + 0x14], 0x0
    ret

# heap_check_slab(slab): stop the kernel if the header was overwritten
heap_check_slab:
    mov edx, [esp + 0x4]
    cmp dword ptr [edx], HEAP_SLAB_MAGIC
    jne .Lcheck_slab_bad
    mov eax, [edx + 0x4]                            # block size: a power of two within the classes
    cmp eax, 0x1 << HEAP_MIN_SHIFT
    jb .Lcheck_slab_bad
    cmp eax, 0x1 << HEAP_MAX_SHIFT
    ja .Lcheck_slab_bad
    lea ecx, [eax - 0x1]
    test eax, ecx
    jnz .Lcheck_slab_bad
    mov ecx, [edx + 0x8]
    cmp ecx, [edx + 0x18]
    ja .Lcheck_slab_bad
    ret
.Lcheck_slab_bad:
    push offset str_heap_header
    call panic

# heap_block_index(slab, block) -> index of the block in its slab; stops the kernel if block is not the start
# of one of the slab's blocks
heap_block_index:
    mov edx, [esp + 0x4]
    mov eax, [esp + 0x8]
    sub eax, edx
    mov ecx, [edx + 0x4]
    cmp ecx, HEAP_SLAB_HEADER
    jae .Lindex_first
    mov ecx, HEAP_SLAB_HEADER
.Lindex_first:
    sub eax, ecx                                    # offset from the first block
    jb .Lindex_bad
    mov ecx, [edx + 0x4]
    dec ecx
    test eax, ecx
    jnz .Lindex_bad
    inc ecx
    bsf ecx, ecx
    shr eax, cl
    cmp eax, [edx + 0x18]
    jae .Lindex_bad
    ret
.Lindex_bad:
    push offset str_heap_not_block
    call panic

# heap_alloc_large(...) is entered by a jump from kmalloc_aligned with its arguments in place:
# kmalloc_aligned(size, align) -> whole pages, aligned to max(align, PAGE_SIZE)
heap_alloc_large:
    push ebx
    push esi
    push edi
    xor ebx, ebx                                    # a free record
.Llarge_slot:
    cmp ebx, HEAP_LARGE_SLOTS
    jae .Llarge_no_slot
    cmp dword ptr [heap_large + ebx*8], 0x0
    je .Llarge_slot_found
    inc ebx
    jmp .Llarge_slot
.Llarge_slot_found:
    mov esi, [esp + 0x10]                           # pages = ceil(size / PAGE_SIZE)
    add esi, PAGE_SIZE - 1
    shr esi, PAGE_SHIFT
    mov edi, [esp + 0x14]                           # extra pages reserved so an aligned start fits
    shr edi, PAGE_SHIFT
    jz .Llarge_reserve
    dec edi
.Llarge_reserve:
    lea eax, [esi + edi]
    push eax
    call vrange_reserve
    add esp, 0x4
    test eax, eax
    jz .Llarge_fail
    mov ecx, [esp + 0x14]                           # aligned start
    cmp ecx, PAGE_SIZE
    jae .Llarge_align
    mov ecx, PAGE_SIZE
.Llarge_align:
    dec ecx
    lea edx, [eax + ecx]
    not ecx
    and edx, ecx
    mov [heap_large + ebx*8], edx
    mov [heap_large + ebx*8 + 0x4], esi
    sub edx, eax                                    # give back the pages before the aligned start...
    jz .Llarge_no_head
    shr edx, PAGE_SHIFT
    sub edi, edx
    push edx
    push eax
    call vrange_release
    add esp, 0x8
.Llarge_no_head:
    test edi, edi                                   # ...and those after the block
    jz .Llarge_back
    push edi
    mov eax, esi
    shl eax, PAGE_SHIFT
    add eax, [heap_large + ebx*8]
    push eax
    call vrange_release
    add esp, 0x8
.Llarge_back:
    mov edi, [heap_large + ebx*8]
.Llarge_back_page:
    push PTE_P | PTE_RW
    push edi
    call vmm_back_page
    add esp, 0x8
    test eax, eax
    jz .Llarge_unwind
    add edi, PAGE_SIZE
    dec esi
    jnz .Llarge_back_page
    mov eax, [heap_large + ebx*8]
    jmp .Llarge_done
.Llarge_unwind:                                     # out of frames part way: free what was backed
    push dword ptr [heap_large + ebx*8]
    call heap_free_large
    add esp, 0x4
    jmp .Llarge_fail
.Llarge_no_slot:
    push offset str_heap_large_full
    call serial_puts
    add esp, 0x4
.Llarge_fail:
    xor eax, eax
.Llarge_done:
    pop edi
    pop esi
    pop ebx
    ret

# heap_free_large(block) -> 1 when block was a large block (its pages and range are given back), else 0
heap_free_large:
    push ebx
    push esi
    push edi
    mov eax, [esp + 0x10]
    test eax, eax
    jz .Lfree_large_none
    xor ebx, ebx
.Lfree_large_find:
    cmp ebx, HEAP_LARGE_SLOTS
    jae .Lfree_large_none
    cmp [heap_large + ebx*8], eax
    je .Lfree_large_found
    inc ebx
    jmp .Lfree_large_find
.Lfree_large_found:
    mov esi, eax
    mov edi, [heap_large + ebx*8 + 0x4]
.Lfree_large_page:
    push esi
    call vmm_translate
    add esp, 0x4
    cmp eax, VMM_NONE
    je .Lfree_large_next
    push esi
    call vmm_release_page
    add esp, 0x4
.Lfree_large_next:
    add esi, PAGE_SIZE
    dec edi
    jnz .Lfree_large_page
    push dword ptr [heap_large + ebx*8 + 0x4]
    push dword ptr [heap_large + ebx*8]
    call vrange_release
    add esp, 0x8
    mov dword ptr [heap_large + ebx*8], 0x0
    mov eax, 0x1
    jmp .Lfree_large_done
.Lfree_large_none:
    xor eax, eax
.Lfree_large_done:
    pop edi
    pop esi
    pop ebx
    ret

# kfree(block): give a block back; 0 is ignored. Anything else the heap did not hand out stops the kernel.
kfree:
    push ebx
    push esi
    mov esi, [esp + 0xc]
    test esi, esi
    jz .Lkfree_done
    mov eax, esi                                    # a slab block lies inside the slab window
    sub eax, [heap_slab_base]
    cmp eax, HEAP_SLAB_PAGES * PAGE_SIZE
    jae .Lkfree_large
    shr eax, PAGE_SHIFT
    bt [heap_slab_pages_used], eax
    jnc .Lkfree_foreign
    mov ebx, esi
    and ebx, PTE_FRAME_MASK
    push ebx
    call heap_check_slab
    add esp, 0x4
    push esi
    push ebx
    call heap_block_index
    add esp, 0x8
    btr [ebx + 0x20], eax
    jnc .Lkfree_twice
    mov eax, [ebx + 0xc]
    mov [esi], eax
    mov [ebx + 0xc], esi
    inc dword ptr [ebx + 0x8]
    mov eax, [ebx + 0x8]
    cmp eax, [ebx + 0x18]
    je .Lkfree_slab_empty
    cmp eax, 0x1
    jne .Lkfree_done
    mov ecx, [ebx + 0x4]                            # it was full: it has room again
    bsf ecx, ecx
    mov eax, [heap_partial + ecx*4 - HEAP_MIN_SHIFT*4]
    mov [ebx + 0x10], eax
    mov dword ptr [ebx + 0x14], 0x0
    test eax, eax
    jz .Lkfree_relisted
    mov [eax + 0x14], ebx
.Lkfree_relisted:
    mov [heap_partial + ecx*4 - HEAP_MIN_SHIFT*4], ebx
    jmp .Lkfree_done
.Lkfree_slab_empty:                                 # every block free: the page goes back
    cmp dword ptr [ebx + 0x18], 0x1                 # a one-block slab was never on the list once full
    je .Lkfree_release
    push ebx
    call heap_unlink_slab
    add esp, 0x4
.Lkfree_release:
    mov eax, ebx
    sub eax, [heap_slab_base]
    shr eax, PAGE_SHIFT
    btr [heap_slab_pages_used], eax
    push ebx
    call vmm_release_page
    add esp, 0x4
    dec dword ptr [heap_slabs]
    jmp .Lkfree_done
.Lkfree_large:
    push esi
    call heap_free_large
    add esp, 0x4
    test eax, eax
    jz .Lkfree_foreign
.Lkfree_done:
    pop esi
    pop ebx
    ret
.Lkfree_twice:
    push offset str_heap_double_free
    call panic
.Lkfree_foreign:
    push offset str_heap_not_block
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
.balign 4
heap_slab_base:
    .skip 0x4
heap_slabs:
    .skip 0x4
heap_partial:
    .skip (HEAP_MAX_SHIFT - HEAP_MIN_SHIFT + 1) * 4
heap_slab_pages_used:
    .skip HEAP_SLAB_PAGES / 8
heap_large:
    .skip HEAP_LARGE_SLOTS * 8
