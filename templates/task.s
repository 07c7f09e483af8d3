# User mode: tasks that run in ring 3 in an address space of their own, system calls through `int 0x80`, demand
# paging in user space, and faults that stop the task instead of the kernel. One source for both architectures; the
# GDT (user segments, TSS) and the gates are in templates/<arch>/gdt.s and idt.s.
#
# How does the kernel get into ring 3 at all? There is no "call ring 3": it builds the frame an interrupt from ring 3
# would have left on the stack (SS:SP of the user stack, flags, CS:IP of the entry, with the user selectors, RPL 3)
# and returns from that interrupt with iret. How does it get back? Every interrupt or exception from ring 3 switches
# to the stack TSS.sp0 names; task_run sets sp0 to its own stack pointer once it has saved the kernel's registers,
# so a system call or a fault runs just below task_run's frame, and task_finish only has to reload that stack
# pointer and return from task_run. The scheduler is therefore the simplest one there is: run to completion. The
# user's flags start with IF clear, so nothing preempts a task; it ends by `exit` or by a fault.
#
# A task's pages: its program's text, copied by user_load into fresh frames mapped at USER_TEXT_BASE with U/S and
# without R/W (read-only, executable), and the lazy range [USER_LAZY_BASE, USER_LAZY_END), backed on first touch
# by user_page_fault with U/S, R/W and, on x86_64, NX (data never runs). The user stack's top is passed to
# task_create; the tests put it at the end of the lazy range, so the stack is demand-paged too. A user page is
# mapped into the running space through the foreign slot attached to the running space itself (vmm_map_in makes
# user-half tables with U/S, which the kernel's own vmm_map does not).
#
# System calls: `int 0x80` (a DPL-3 interrupt gate) on both architectures, `syscall` on x86_64 (which keeps rcx and
# r11 for itself; kvm_pvm, this project's KVM, answers `int 0x80` from ring 3 with #UD, `syscall` it runs).
# xax = number, xbx and xdx = arguments, result in xax, every other register kept.
#     SYS_WRITE (buf, len) -> len, or -1 when [buf, buf+len) is not all mapped user pages: the bytes go to COM1.
#     SYS_EXIT (status)    -> does not return; task_run returns status.
# The kernel reads a user buffer only after checking every page of it is present and user-accessible in the
# running space, so a bad pointer is an error return, never a kernel fault.
#
# A fault in ring 3 that is not the first touch of the lazy range (a kernel page, a write to the text, a fetch from
# an NX page, a privileged instruction...) reaches user_fault from exception_common. It prints one line,
#     kgen: user fault: task=0x1 space=0x... vector=0x0e addr=0x... ip=0x... error=0x07 protection write user
# (the page-fault error bits decoded for vector 14), marks the task killed and finishes it: the kernel switches back
# to the boot space, destroys the task's space (every frame given back) and task_run returns TASK_KILLED_STATUS.
# An exited task's space is destroyed the same way. The kernel then goes on serving calls.

.section .text
# task_record(id) -> the address of task id's record (1..TASK_MAX), or 0
task_record:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    test xax, xax
    jz .Lrecord_none
    cmp xax, TASK_MAX
    ja .Lrecord_none
    dec xax
    imul xax, xax, TASK_RECORD_WORDS * WORD_SIZE
    add xax, offset task_table
    ret
.Lrecord_none:
    xor eax, eax
    ret

# task_create(space, entry, stack) -> task id (1..TASK_MAX), or 0 when space is no address space or the table is full
task_create:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    call as_find
    DROP 0x1
    test xax, xax
    jz .Lcreate_task_none
    mov xcx, offset task_table
    mov edx, 0x1
.Lcreate_task_slot:
    cmp xword ptr [xcx], 0x0
    je .Lcreate_task_found
    add xcx, TASK_RECORD_WORDS * WORD_SIZE
    inc edx
    cmp edx, TASK_MAX
    jbe .Lcreate_task_slot
.Lcreate_task_none:
    xor eax, eax
    ret
.Lcreate_task_found:
    mov xword ptr [xcx], TASK_READY
    mov xax, [xsp + ARG1]
    mov [xcx + WORD_SIZE], xax                      # space
    mov xax, [xsp + ARG2]
    mov [xcx + 2*WORD_SIZE], xax                    # entry
    mov xax, [xsp + ARG3]
    mov [xcx + 3*WORD_SIZE], xax                    # stack
    xor eax, eax
    mov [xcx + 4*WORD_SIZE], xax                    # status, vector, address, error
    mov [xcx + 5*WORD_SIZE], xax
    mov [xcx + 6*WORD_SIZE], xax
    mov [xcx + 7*WORD_SIZE], xax
    mov eax, edx
    ret

# task_release(id): give task id's record back (a task that has exited or was killed)
task_release:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    call task_record
    DROP 0x1
    test xax, xax
    jz .Lrelease_done
    mov xword ptr [xax], 0x0
.Lrelease_done:
    ret

# user_load(space, start, end) -> the entry (USER_TEXT_BASE), or 0: the kernel bytes [start, end) copied into fresh
# frames mapped read-only and executable at USER_TEXT_BASE in space (through the foreign slot)
user_load:
    push xbx
    push xsi
    push xdi
    push xbp
    FRAME 0x4
    PUSHW xword ptr [as_attached]                   # put back at the end
    PUSHW xword ptr [xsp + ARG1]
    call as_attach
    DROP 0x1
    test eax, eax
    jz .Lload_failed
    mov xsi, [xsp + ARG2]
    mov xbp, USER_TEXT_BASE
.Lload_page:
    cmp xsi, [xsp + ARG3]
    jae .Lload_done
    call pmm_alloc
    test xax, xax
    jz .Lload_failed
    mov xbx, xax
    PUSHW xax
    call temp_map
    DROP 0x1
    test xax, xax
    jz .Lload_no_slot
    mov xdi, xax
    PUSHW xax
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
    mov xdi, [xsp]
    mov xcx, [xsp + ARG3]                           # bytes left, at most a page
    sub xcx, xsi
    cmp xcx, PAGE_SIZE
    jbe .Lload_copy
    mov ecx, PAGE_SIZE
.Lload_copy:
    rep movsb
    call temp_unmap                                 # the slot, still on the stack
    DROP 0x1
.if USER_TEXT_WRITABLE
    # Build variant: the text is mapped writable, so a program can rewrite its own code (and a stray user write
    # corrupts it) instead of faulting.
    PUSHW PTE_P | PTE_US | PTE_RW
.else
    PUSHW PTE_P | PTE_US                            # read-only, executable
.endif
    PUSHW xbx
    PUSHW xbp
    PUSHW xword ptr [xsp + ARG1]
    call vmm_map_in
    DROP 0x4
    test eax, eax
    jz .Lload_map_failed
    add xbp, PAGE_SIZE
    jmp .Lload_page
.Lload_done:
    call as_set_foreign                             # the previous attachment
    DROP 0x1
    mov xax, USER_TEXT_BASE
    jmp .Lload_return
.Lload_map_failed:
    FRAME 0x5
    PUSHW xbx
    call pmm_free
    DROP 0x1
    jmp .Lload_failed
.Lload_no_slot:
    PUSHW xbx
    call pmm_free
    DROP 0x1
.Lload_failed:                                      # what was mapped belongs to the space: as_destroy takes it
    call as_set_foreign
    DROP 0x1
    xor eax, eax
.Lload_return:
    pop xbp
    pop xdi
    pop xsi
    pop xbx
    ret

# task_run(id) -> the task's exit status, or TASK_KILLED_STATUS when a fault stopped it (also when id is not a
# ready task). Enters ring 3; comes back through task_finish.
task_run:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    call task_record
    DROP 0x1
    test xax, xax
    jz .Lrun_refused
    cmp xword ptr [xax], TASK_READY
    jne .Lrun_refused
    PUSHW xbx
    PUSHW xsi
    PUSHW xdi
    PUSHW xbp
    mov xbx, xax
    PUSHW xword ptr [xbx + WORD_SIZE]
    call as_switch
    DROP 0x1
    test eax, eax
    jz .Lrun_no_space
    mov xax, [xsp + ARG1]
    mov [task_current], xax
    mov [task_kernel_sp], xsp
    mov [tss + TSS_SP0], xsp                        # ring 3's interrupts land just below this frame
.if ARCH_I386
    mov eax, USER_DS                                # data segments ring 3 may keep (iret would null ring 0's)
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
.endif
    push USER_DS                                    # the frame an interrupt from ring 3 leaves: SS, SP,
    push xword ptr [xbx + 3*WORD_SIZE]              # flags, CS, IP
    push USER_EFLAGS
    push USER_CS
    push xword ptr [xbx + 2*WORD_SIZE]
    xor eax, eax                                    # nothing of the kernel's registers goes to ring 3
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor ebp, ebp
.if ARCH_X86_64
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    iretq
.else
    iretd
.endif
.Lrun_no_space:
    mov xword ptr [xbx], TASK_KILLED
    FRAME 0x4
    POPW xbp
    POPW xdi
    POPW xsi
    POPW xbx
.Lrun_refused:
    mov xax, TASK_KILLED_STATUS
    ret

# task_run_all() -> how many tasks ran: every ready task, in id order, each to completion (the whole scheduler)
task_run_all:
    push xbx
    push xsi
    mov ebx, 0x1
    xor esi, esi
.Lall_next:
    cmp ebx, TASK_MAX
    ja .Lall_done
    push xbx
    call task_record
    add xsp, WORD_SIZE
    cmp xword ptr [xax], TASK_READY
    jne .Lall_skip
    push xbx
    call task_run
    add xsp, WORD_SIZE
    inc esi
.Lall_skip:
    inc ebx
    jmp .Lall_next
.Lall_done:
    mov eax, esi
    pop xsi
    pop xbx
    ret

# task_finish: the running task is done (its record says how). Runs on the stack below task_run's frame, in the
# task's space: back to the boot space, the task's space destroyed, return from task_run with the status.
task_finish:
    mov eax, KERNEL_DS
.if ARCH_I386
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
.endif
    mov ss, eax
    push xword ptr [task_current]
    call task_record
    add xsp, WORD_SIZE
    mov xbx, xax
    push xword ptr [as_spaces]                      # record 0: the boot space
    call as_switch
    add xsp, WORD_SIZE
    push xword ptr [xbx + WORD_SIZE]
    call as_destroy
    add xsp, WORD_SIZE
    mov xword ptr [task_current], 0x0
    mov xax, [xbx + 4*WORD_SIZE]
    mov xsp, [task_kernel_sp]
    pop xbp
    pop xdi
    pop xsi
    pop xbx
    ret

# syscall_entry: the `int 0x80` gate (interrupts off). xax = number, xbx, xcx = arguments.
syscall_entry:
    cld
    cmp xax, SYS_WRITE
    je .Lsys_write
    cmp xax, SYS_EXIT
    je .Lsys_exit
    mov xax, -1
    jmp .Lsys_return
.Lsys_write:
    push xbx
    push xcx
    push xdx
    push xsi
    push xdi
    push xbp
    push xdx
    push xbx
    call user_write
    add xsp, 2*WORD_SIZE
    pop xbp
    pop xdi
    pop xsi
    pop xdx
    pop xcx
    pop xbx
.Lsys_return:
    IRET
.Lsys_exit:
    push xbx
    push xword ptr [task_current]
    call task_record
    add xsp, WORD_SIZE
    pop xcx
    mov xword ptr [xax], TASK_EXITED
    mov [xax + 4*WORD_SIZE], xcx
    jmp task_finish

.if ARCH_X86_64
# syscall_entry64: `syscall` from ring 3 (MSR_LSTAR, set in gdt_init). rcx holds the user's rip and r11 its rflags;
# the stack is still the user's, so the kernel's comes from task_kernel_sp, as TSS.rsp0 gives it to `int 0x80`.
# Same numbers and arguments as syscall_entry; rcx and r11 are the instruction's, so they are not kept.
syscall_entry64:
    mov [syscall_user_sp], rsp
    mov rsp, [task_kernel_sp]
    push qword ptr [syscall_user_sp]
    push r11
    push rcx
    cmp rax, SYS_WRITE
    je .Lsys64_write
    cmp rax, SYS_EXIT
    je .Lsys_exit
    mov rax, -1
    jmp .Lsys64_return
.Lsys64_write:
    push rbx
    push rdx
    push rsi
    push rdi
    push rbp
    push rdx
    push rbx
    call user_write
    add rsp, 2*WORD_SIZE
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rbx
.Lsys64_return:
    pop rcx
    pop r11
    pop rsp
    .byte 0x48, 0xf, 0x7                            # sysretq: keystone cannot encode it
.endif

# user_page_mapped(vaddr) -> 1 when vaddr's page is present and user-accessible in the running space, else 0
user_page_mapped:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    call paging_table_present                       # every level above present, none a large page
    DROP 0x1
    test eax, eax
    jz .Lmapped_no
    mov xcx, [xsp + ARG1]
    ENTRY_OF xcx, xdx, PAGE_SHIFT, LEAF_ENTRIES
    mov xax, [xcx]
    and eax, PTE_P | PTE_US
    cmp eax, PTE_P | PTE_US
    jne .Lmapped_no
    mov eax, 0x1
    ret
.Lmapped_no:
    xor eax, eax
    ret

# user_write(buf, len) -> len, or -1 when the buffer is not all mapped user pages of the running space
user_write:
    push xbx
    push xsi
    FRAME 0x2
    mov xsi, [xsp + ARG1]
    mov xbx, [xsp + ARG2]
    add xbx, xsi                                    # the end
    jc .Lwrite_bad
    mov xax, USER_HALF_END
    cmp xbx, xax
    ja .Lwrite_bad
    mov xax, xsi                                    # first, every page of the buffer
    and xax, -PAGE_SIZE
.Lwrite_check:
    cmp xax, xbx
    jae .Lwrite_out
    PUSHW xax
    PUSHW xax
    call user_page_mapped
    DROP 0x1
    test eax, eax
    POPW xax
    jz .Lwrite_bad
    add xax, PAGE_SIZE
    jmp .Lwrite_check
.Lwrite_out:
    cmp xsi, xbx
    jae .Lwrite_done
    movzx eax, byte ptr [xsi]
    PUSHW xax
    call serial_putc
    DROP 0x1
    inc xsi
    jmp .Lwrite_out
.Lwrite_done:
    mov xax, [xsp + ARG2]
    pop xsi
    pop xbx
    ret
.Lwrite_bad:
    mov xax, -1
    pop xsi
    pop xbx
    ret

# user_page_fault(cr2, error) -> 1 when a ring-3 fault was the first touch of the lazy range, now backed (a cleared
# frame mapped user, writable, NX on x86_64); else 0, and exception_common stops the task
user_page_fault:
    FRAME 0x0
    cld
    test xword ptr [xsp + ARG2], PF_P | PF_I        # present already, or a fetch: never backed here
    jnz .Luser_pf_no
    mov xax, [xsp + ARG1]
    cmp xax, USER_LAZY_BASE
    jb .Luser_pf_no
    cmp xax, USER_LAZY_END
    jae .Luser_pf_no
    PUSHW xbx
    PUSHW xdi
    call pmm_alloc
    test xax, xax
    jz .Luser_pf_popped
    mov xbx, xax
    PUSHW xword ptr [as_attached]                   # put back below
    call as_current
    PUSHW xax
    call as_set_foreign                             # the running space, attached to itself
    mov xcx, PTE_P | PTE_RW | PTE_US
    SET_NX xcx
    PUSHW xcx
    PUSHW xbx
    mov xdi, [xsp + ARG1]
    and xdi, -PAGE_SIZE
    PUSHW xdi
    PUSHW xword ptr [xsp + 3*WORD_SIZE]
    call vmm_map_in
    DROP 0x5
    PUSHW xax                                       # 1 when mapped
    PUSHW xword ptr [xsp + WORD_SIZE]
    call as_set_foreign                             # the previous attachment
    DROP 0x1
    POPW xax
    DROP 0x1
    test eax, eax
    jz .Luser_pf_unused
    xor eax, eax                                    # not present before: no stale entry to flush
    mov ecx, PAGE_SIZE / 4
    rep stosd
    inc dword ptr [user_demand_faults]
    mov eax, 0x1
    pop xdi
    pop xbx
    ret
.Luser_pf_unused:
    PUSHW xbx
    call pmm_free
    DROP 0x1
.Luser_pf_popped:
    POPW xdi
    POPW xbx
.Luser_pf_no:
    xor eax, eax
    ret

# user_fault(vector, cr2, ip, error): a fault in ring 3 nobody handled. Reported, the task killed; does not return.
user_fault:
    FRAME 0x0
    mov xbx, [task_current]
    test xbx, xbx
    jz exception_report                             # ring 3 without a task: cannot be, report it as the kernel's
    PUSHW offset str_user_fault
    call serial_puts
    PUSHW xbx
    call serial_puthex
    PUSHW offset str_uf_space
    call serial_puts
    call as_current
    PUSHW xax
    call serial_puthex
    PUSHW offset str_uf_vector
    call serial_puts
    PUSHW xword ptr [xsp + ARG1]
    call serial_puthex
    PUSHW offset str_uf_addr
    call serial_puts
    PUSHW xword ptr [xsp + ARG2]
    call serial_puthex
    PUSHW offset str_uf_ip
    call serial_puts
    PUSHW xword ptr [xsp + ARG3]
    call serial_puthex
    PUSHW offset str_uf_error
    call serial_puts
    PUSHW xword ptr [xsp + ARG4]
    call serial_puthex
    DROP 0xc
    cmp xword ptr [xsp + ARG1], VECTOR_PAGE_FAULT
    jne .Luser_fault_line
    PUSHW xword ptr [xsp + ARG4]
    call user_fault_bits
    DROP 0x1
.Luser_fault_line:
    PUSHW offset str_newline
    call serial_puts
    DROP 0x1
    PUSHW xbx
    call task_record
    DROP 0x1
    mov xword ptr [xax], TASK_KILLED
    mov xcx, TASK_KILLED_STATUS
    mov [xax + 4*WORD_SIZE], xcx
    mov xcx, [xsp + ARG1]
    mov [xax + 5*WORD_SIZE], xcx
    mov xcx, [xsp + ARG2]
    mov [xax + 6*WORD_SIZE], xcx
    mov xcx, [xsp + ARG4]
    mov [xax + 7*WORD_SIZE], xcx
    jmp task_finish

# user_fault_bits(error): " not-present|protection read|write user|supervisor [reserved-bit] [fetch]"
user_fault_bits:
    push xbx
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    mov xax, offset str_pf_not_present
    test ebx, PF_P
    jz .Lbits_p
    mov xax, offset str_pf_protection
.Lbits_p:
    PUSHW xax
    call serial_puts
    mov xax, offset str_pf_read
    test ebx, PF_W
    jz .Lbits_w
    mov xax, offset str_pf_write
.Lbits_w:
    PUSHW xax
    call serial_puts
    mov xax, offset str_pf_supervisor
    test ebx, PF_U
    jz .Lbits_u
    mov xax, offset str_pf_user
.Lbits_u:
    PUSHW xax
    call serial_puts
    DROP 0x3
    test ebx, PF_RSVD
    jz .Lbits_rsvd
    PUSHW offset str_pf_reserved
    call serial_puts
    DROP 0x1
.Lbits_rsvd:
    test ebx, PF_I
    jz .Lbits_fetch
    PUSHW offset str_pf_fetch
    call serial_puts
    DROP 0x1
.Lbits_fetch:
    pop xbx
    ret

.section .rodata
str_user_fault:
    .asciz "kgen: user fault: task="
str_uf_space:
    .asciz " space="
str_uf_vector:
    .asciz " vector="
str_uf_addr:
    .asciz " addr="
str_uf_ip:
    .asciz " ip="
str_uf_error:
    .asciz " error="

.section .bss
.balign 8, 0
task_table:                                         # per task: state, space, entry, stack, status, vector, addr, error
    .skip TASK_MAX * TASK_RECORD_WORDS * WORD_SIZE
task_current:                                       # the running task's id, 0 when none
    .skip WORD_SIZE
task_kernel_sp:                                     # task_run's stack pointer while a task runs
    .skip WORD_SIZE
syscall_user_sp:                                    # the user's rsp while syscall_entry64 runs
    .skip WORD_SIZE
user_demand_faults:
    .skip 0x4
