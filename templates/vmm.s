# Virtual memory: map, unmap and translate through the recursive page directory; page tables straight from the
# frame allocator.
#
# Every paging structure is edited through the recursive window: the PD is at RECURSIVE_PD and the page table of
# PD[i] at RECURSIVE_BASE + i*4K, so the PTE of a virtual address v is the dword at RECURSIVE_BASE + (v >> 12)*4.
#
# A missing page table is allocated *at its own address in that window*: the window's page for table i is mapped
# by PD[i] itself, so pmm_map_top(RECURSIVE_BASE + i*4K) writes the new frame into PD[i], and the frame is then
# cleared through the same window. No temp slot and no heap are involved, so table growth cannot deadlock on the
# heap that will later grow through it.
#
# vmm_pt_used[i] counts the present PTEs of table i; when the last goes, the table is pushed back onto the free
# stack while still mapped (pmm_free_at at its window address) and PD[i] cleared. Tables the boot stub built are
# pinned and never freed.
#
# Sharing the kernel half: a kernel page table is referenced by a PDE of index >= KERNEL_PDE_KERNEL_HALF and is
# only ever reached through such PDEs, never through user ones. Another address space shares the kernel half by
# copying those PDEs; every change to one (a table created or freed) bumps vmm_kernel_pde_generation, so an
# address space whose copy is older re-copies the kernel half before it runs. Kernel-half PTEs carry G, so a CR3
# switch keeps them in the TLB.
#
# The kernel's virtual ranges, allocations backed now or on first touch, and the page-fault path that backs them
# live in templates/vrange.s.

.section .text
vmm_init:
    xor ecx, ecx
.Lvmm_init_pin:
    test dword ptr [RECURSIVE_PD + ecx*4], PTE_P
    jz .Lvmm_init_next
    mov dword ptr [vmm_pt_used + ecx*4], VMM_TABLE_PINNED
.Lvmm_init_next:
    inc ecx
    cmp ecx, I386_ENTRIES
    jb .Lvmm_init_pin
    jmp vrange_init

# vmm_table_for(vaddr) -> 1 when vaddr's page table exists (made now if it did not), 0 when out of memory
vmm_table_for:
    mov eax, [esp + 0x4]
    shr eax, I386_PDE_SHIFT
    test dword ptr [RECURSIVE_PD + eax*4], PTE_P
    jnz .Ltable_exists
    push ebx
    push edi
    mov ebx, eax
    mov edi, ebx
    shl edi, PAGE_SHIFT
    add edi, RECURSIVE_BASE                         # the table's own page in the recursive window
    push PTE_P | PTE_RW
    push edi
    call pmm_map_top                                # writes PD[ebx]
    add esp, 0x8
    test eax, eax
    jz .Ltable_done
.if VMM_CLEAR_TABLES
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
.endif
    mov dword ptr [vmm_pt_used + ebx*4], 0x0
    cmp ebx, KERNEL_PDE_KERNEL_HALF
    jb .Ltable_user_half
    inc dword ptr [vmm_kernel_pde_generation]
.Ltable_user_half:
    mov eax, 0x1
.Ltable_done:
    pop edi
    pop ebx
    ret
.Ltable_exists:
    mov eax, 0x1
    ret

# vmm_table_put(vaddr): one PTE of vaddr's table went away; free the table when it was the last
vmm_table_put:
    mov eax, [esp + 0x4]
    shr eax, I386_PDE_SHIFT
    dec dword ptr [vmm_pt_used + eax*4]
    jnz .Lput_done
    push ebx
    mov ebx, eax
    shl eax, PAGE_SHIFT
    add eax, RECURSIVE_BASE
    push eax
    call pmm_free_at                                # pushes the table's frame while mapped; clears PD[ebx]
    add esp, 0x4
    mov eax, ebx
    shl eax, I386_PDE_SHIFT
    invlpg [eax]                                    # drop any cached PDE for the region
    cmp ebx, KERNEL_PDE_KERNEL_HALF
    jb .Lput_user_half
    inc dword ptr [vmm_kernel_pde_generation]
.Lput_user_half:
    pop ebx
.Lput_done:
    ret

# vmm_pte_flags(vaddr, flags) -> flags to store: G added in the kernel half
vmm_pte_flags:
    mov eax, [esp + 0x8]
    and eax, PAGE_SIZE - 1
    cmp dword ptr [esp + 0x4], KERNEL_VIRTUAL_BASE
    jb .Lpte_flags_done
    or eax, PTE_G
.Lpte_flags_done:
    ret

# vmm_map(vaddr, phys, flags) -> 1, or 0 when refused (already mapped) or out of memory for a page table
vmm_map:
    push ebx
    mov ebx, [esp + 0x8]
    and ebx, PTE_FRAME_MASK
    push ebx
    call vmm_table_for
    add esp, 0x4
    test eax, eax
    jz .Lmap_done
    mov ecx, ebx
    shr ecx, PAGE_SHIFT
    test dword ptr [RECURSIVE_BASE + ecx*4], PTE_P
    jnz .Lmap_present
    push dword ptr [esp + 0x10]
    push ebx
    call vmm_pte_flags
    add esp, 0x8
    mov edx, [esp + 0xc]
    and edx, PTE_FRAME_MASK
    or eax, edx
    or eax, PTE_P
    mov ecx, ebx
    shr ecx, PAGE_SHIFT
    mov [RECURSIVE_BASE + ecx*4], eax
    invlpg [ebx]
    mov eax, ebx
    shr eax, I386_PDE_SHIFT
    inc dword ptr [vmm_pt_used + eax*4]
    mov eax, 0x1
.Lmap_done:
    pop ebx
    ret
.Lmap_present:
    push offset str_map_present
    call serial_puts
    push ebx
    call serial_puthex
    push offset str_newline
    call serial_puts
    add esp, 0xc
    xor eax, eax
    pop ebx
    ret

# vmm_unmap(vaddr) -> the frame that was mapped there, or VMM_NONE
vmm_unmap:
    push ebx
    mov ebx, [esp + 0x8]
    and ebx, PTE_FRAME_MASK
    mov eax, ebx
    shr eax, I386_PDE_SHIFT
    test dword ptr [RECURSIVE_PD + eax*4], PTE_P
    jz .Lunmap_none
    mov ecx, ebx
    shr ecx, PAGE_SHIFT
    mov eax, [RECURSIVE_BASE + ecx*4]
    test eax, PTE_P
    jz .Lunmap_none
    mov dword ptr [RECURSIVE_BASE + ecx*4], 0x0
    invlpg [ebx]
    and eax, PTE_FRAME_MASK
    push eax
    push ebx
    call vmm_table_put
    add esp, 0x4
    pop eax
    pop ebx
    ret
.Lunmap_none:
    mov eax, VMM_NONE
    pop ebx
    ret

# vmm_translate(vaddr) -> physical address, or VMM_NONE
vmm_translate:
    mov edx, [esp + 0x4]
    mov eax, edx
    shr eax, I386_PDE_SHIFT
    mov eax, [RECURSIVE_PD + eax*4]
    test eax, PTE_P
    jz .Ltranslate_none
    test eax, PTE_PS
    jnz .Ltranslate_large
    mov eax, edx
    shr eax, PAGE_SHIFT
    mov eax, [RECURSIVE_BASE + eax*4]
    test eax, PTE_P
    jz .Ltranslate_none
    and eax, PTE_FRAME_MASK
    and edx, PAGE_SIZE - 1
    or eax, edx
    ret
.Ltranslate_large:
    and eax, -I386_LARGE_PAGE                       # the 4 MiB frame
    and edx, I386_LARGE_PAGE - 1
    or eax, edx
    ret
.Ltranslate_none:
    mov eax, VMM_NONE
    ret

# vmm_back_page(vaddr, flags) -> phys, or 0 when out of memory: a cleared frame at vaddr (table made if needed)
vmm_back_page:
    push ebx
    mov ebx, [esp + 0x8]
    and ebx, PTE_FRAME_MASK
    push ebx
    call vmm_table_for
    add esp, 0x4
    test eax, eax
    jz .Lback_done
    push dword ptr [esp + 0xc]
    push ebx
    call vmm_pte_flags
    add esp, 0x8
    push eax
    push ebx
    call pmm_alloc_at
    add esp, 0x8
    test eax, eax
    jz .Lback_unused_table
    mov ecx, ebx
    shr ecx, I386_PDE_SHIFT
    inc dword ptr [vmm_pt_used + ecx*4]
.Lback_done:
    pop ebx
    ret
.Lback_unused_table:                                # no frame for the page: give back a table made for it
    mov ecx, ebx
    shr ecx, I386_PDE_SHIFT
    cmp dword ptr [vmm_pt_used + ecx*4], 0x0
    jne .Lback_done
    inc dword ptr [vmm_pt_used + ecx*4]
    push ebx
    call vmm_table_put
    add esp, 0x4
    xor eax, eax
    pop ebx
    ret

# vmm_release_page(vaddr) -> phys: give the frame mapped at vaddr back to the allocator (pushed while still
# mapped), unmap it, and free its page table if that was the table's last page. vaddr must be mapped.
vmm_release_page:
    push ebx
    push dword ptr [esp + 0x8]
    call pmm_free_at
    mov ebx, eax
    call vmm_table_put                              # same argument, still on the stack
    add esp, 0x4
    mov eax, ebx
    pop ebx
    ret

# vmm_report_fault(error): "kgen: page fault: not-present write supervisor" (plus "reserved-bit", "fetch")
vmm_report_fault:
    push ebx
    mov ebx, [esp + 0x8]
    push offset str_pf
    call serial_puts
    mov eax, offset str_pf_not_present
    test ebx, PF_P
    jz .Lpf_p
    mov eax, offset str_pf_protection
.Lpf_p:
    push eax
    call serial_puts
    mov eax, offset str_pf_read
    test ebx, PF_W
    jz .Lpf_w
    mov eax, offset str_pf_write
.Lpf_w:
    push eax
    call serial_puts
    mov eax, offset str_pf_supervisor
    test ebx, PF_U
    jz .Lpf_u
    mov eax, offset str_pf_user
.Lpf_u:
    push eax
    call serial_puts
    add esp, 0x10
    test ebx, PF_RSVD
    jz .Lpf_rsvd
    push offset str_pf_reserved
    call serial_puts
    add esp, 0x4
.Lpf_rsvd:
    test ebx, PF_I
    jz .Lpf_fetch
    push offset str_pf_fetch
    call serial_puts
    add esp, 0x4
.Lpf_fetch:
    push offset str_newline
    call serial_puts
    add esp, 0x4
    pop ebx
    ret

# kmem_read32(vaddr) -> the dword the CPU reads at vaddr (through the page tables, faults included)
kmem_read32:
    mov eax, [esp + 0x4]
    mov eax, [eax]
    ret

# kmem_write32(vaddr, value)
kmem_write32:
    mov eax, [esp + 0x4]
    mov ecx, [esp + 0x8]
    mov [eax], ecx
    ret

.section .rodata
str_map_present:
    .asciz "kgen: vmm_map: already mapped at "
str_pf:
    .asciz "kgen: page fault:"
str_pf_not_present:
    .asciz " not-present"
str_pf_protection:
    .asciz " protection"
str_pf_read:
    .asciz " read"
str_pf_write:
    .asciz " write"
str_pf_supervisor:
    .asciz " supervisor"
str_pf_user:
    .asciz " user"
str_pf_reserved:
    .asciz " reserved-bit"
str_pf_fetch:
    .asciz " fetch"

.section .bss
.balign 4
vmm_pt_used:
    .skip I386_ENTRIES * 4
vmm_kernel_pde_generation:
    .skip 0x4
