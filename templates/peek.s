# A read by the CPU itself through the current page tables, for the harness's oracle: the dword a routine gets
# from a virtual address must be the one the host's page walk finds at the predicted physical address.

.section .text
# peek32(vaddr) -> the dword at vaddr (a page fault here is reported like any other)
peek32:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    mov eax, [xax]
    ret
