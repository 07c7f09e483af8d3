# What the CPU itself does through the current page tables, for the harness's oracles: the dword a routine gets
# from a virtual address must be the one the host's page walk finds at the predicted physical address (peek32), and
# an access the tables no longer allow must fault (probe_access).

.section .text
# peek32(vaddr) -> the dword at vaddr (a page fault here is reported like any other)
peek32:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    mov eax, [xax]
    ret

# probe_access(vaddr, kind) -> 0 when the CPU carried out the access, else PROBE_FAULTED | the page fault's error
# code, with the faulting address (cr2) in xdx. kind: PROBE_READ (a dword load), PROBE_WRITE (a locked add of 0:
# a write as paging sees it, the memory unchanged), PROBE_FETCH (a call to vaddr, which must hold a `ret`).
#
# Why a probe at all? Entries say what a page *should* allow; the TLB says what the CPU *will* allow. When a kernel
# narrows a page's rights (read-only, NX, unmapped) and forgets INVLPG, the entry is right and the old translation
# stays cached, so only an access by the CPU shows the bug. A page fault while probe_resume is set is the answer,
# not an error: exception_common (templates/interrupts.s) stores the error code and cr2 here, clears probe_resume
# and returns to it instead of to the faulting instruction (the page-fault handler is not asked: a lazy page is not
# backed behind the probe's back). The stack is whatever the access left (a fetch fault has pushed a return
# address), so the resume point takes the stack pointer saved on entry.
probe_access:
    FRAME 0x0
    mov xcx, [xsp + ARG1]
    mov xax, [xsp + ARG2]
    mov [probe_sp], xsp
    mov xdx, offset .Lprobe_faulted
    mov [probe_resume], xdx
    cmp eax, PROBE_WRITE
    je .Lprobe_write
    cmp eax, PROBE_FETCH
    je .Lprobe_fetch
    mov eax, [xcx]
    jmp .Lprobe_done
.Lprobe_write:
    lock add dword ptr [xcx], 0x0
    jmp .Lprobe_done
.Lprobe_fetch:
    call xcx
.Lprobe_done:
    xor eax, eax
    mov [probe_resume], xax
    xor edx, edx
    ret
.Lprobe_faulted:                                    # from exception_common, probe_resume already cleared
    mov xsp, [probe_sp]
    mov xax, [probe_error]
    or xax, PROBE_FAULTED
    mov xdx, [probe_cr2]
    ret

.section .bss
.balign 8, 0
probe_resume:                                       # where a page fault returns to while a probe runs, else 0
    .skip WORD_SIZE
probe_sp:
    .skip WORD_SIZE
probe_error:
    .skip WORD_SIZE
probe_cr2:
    .skip WORD_SIZE
