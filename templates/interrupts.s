# The interrupt entry points both architectures share: one 16-byte stub per vector, the PIC acknowledgement, the
# exception frame with its page-fault and user-fault hand-offs, and the exception report. Each architecture's
# idt.s fills its gates from interrupt_stubs and names the frame's registers in exception_fields.
#
# Each stub is 16 bytes so the gate for vector v is interrupt_stubs + 16*v. Stubs of vectors that push no error
# code push a 0 first, so every handler sees the same frame: error code, then vector, each a word. Which vectors
# push one is a CPU fact, passed in as EXCEPTIONS_WITH_ERROR_CODE_MASK.
#
# The report is one line the harness parses (kgen/guest/diagnose.py):
# "kgen: exception vector=0x... error=0x... eip=0x... cr2=0x... ..." (rip= and 64-bit values on x86_64).

.section .text
.macro INTERRUPT_STUB vector
.balign 0x10, 0xcc
.if ((EXCEPTIONS_WITH_ERROR_CODE_MASK >> \vector) & 1) == 0
    push 0x0
.endif
    push \vector
    jmp interrupt_common
.endm

.balign 0x10, 0xcc
interrupt_stubs:
INTERRUPT_STUB 0x0
INTERRUPT_STUB 0x1
INTERRUPT_STUB 0x2
INTERRUPT_STUB 0x3
INTERRUPT_STUB 0x4
INTERRUPT_STUB 0x5
INTERRUPT_STUB 0x6
INTERRUPT_STUB 0x7
INTERRUPT_STUB 0x8
INTERRUPT_STUB 0x9
INTERRUPT_STUB 0xa
INTERRUPT_STUB 0xb
INTERRUPT_STUB 0xc
INTERRUPT_STUB 0xd
INTERRUPT_STUB 0xe
INTERRUPT_STUB 0xf
INTERRUPT_STUB 0x10
INTERRUPT_STUB 0x11
INTERRUPT_STUB 0x12
INTERRUPT_STUB 0x13
INTERRUPT_STUB 0x14
INTERRUPT_STUB 0x15
INTERRUPT_STUB 0x16
INTERRUPT_STUB 0x17
INTERRUPT_STUB 0x18
INTERRUPT_STUB 0x19
INTERRUPT_STUB 0x1a
INTERRUPT_STUB 0x1b
INTERRUPT_STUB 0x1c
INTERRUPT_STUB 0x1d
INTERRUPT_STUB 0x1e
INTERRUPT_STUB 0x1f
INTERRUPT_STUB 0x20
INTERRUPT_STUB 0x21
INTERRUPT_STUB 0x22
INTERRUPT_STUB 0x23
INTERRUPT_STUB 0x24
INTERRUPT_STUB 0x25
INTERRUPT_STUB 0x26
INTERRUPT_STUB 0x27
INTERRUPT_STUB 0x28
INTERRUPT_STUB 0x29
INTERRUPT_STUB 0x2a
INTERRUPT_STUB 0x2b
INTERRUPT_STUB 0x2c
INTERRUPT_STUB 0x2d
INTERRUPT_STUB 0x2e
INTERRUPT_STUB 0x2f

interrupt_common:
    cmp xword ptr [xsp], IRQ_BASE
    jb exception_common
    # A PIC interrupt: acknowledge it (the slave too for IRQ 8-15) and return to whatever `hlt` it ended.
    push xax
    mov al, PIC_EOI
    cmp xword ptr [xsp + WORD_SIZE], IRQ_BASE + 0x8
    jb .Lirq_master_only
    out PIC2_COMMAND, al
.Lirq_master_only:
    out PIC1_COMMAND, al
    pop xax
    add xsp, 2*WORD_SIZE
    IRET

# exception_common: the frame is cr2, the general registers, then the stub's vector and error code and the CPU's
# frame; EXC_VECTOR, EXC_ERROR... name their offsets from its base (computed once, kgen/build/layout.py). i386
# saves its eight registers with pushad; x86_64 has no pushad and saves the fifteen besides rsp, rax lowest. A page
# fault while probe_access waits for one (templates/peek.s) is its answer; any other goes to page_fault first: when
# it backed the page, the faulting instruction runs again. Anything else from ring 3 stops the task (user_fault);
# from the kernel it is reported (exception_report) and the machine exits.
exception_common:
.if WORD_SIZE == 4
    pushad
.else
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rbp
    push rdi
    push rsi
    push rdx
    push rcx
    push rbx
    push rax
.endif
    mov xax, cr2
    push xax
    mov xbp, xsp
    cmp xword ptr [xbp + EXC_VECTOR], VECTOR_PAGE_FAULT
    jne .Lexception_not_handled
    cmp xword ptr [probe_resume], 0x0               # a probe_access runs (templates/peek.s): the fault is its answer
    jne .Lexception_probe
    push xword ptr [xbp + EXC_ERROR]
    push xword ptr [xbp + EXC_CR2]
    call page_fault
    add xsp, 2*WORD_SIZE
    test eax, eax
    jz .Lexception_not_handled
.Lexception_resume:
    add xsp, WORD_SIZE                              # cr2
.if WORD_SIZE == 4
    popad
.else
    pop rax
    pop rbx
    pop rcx
    pop rdx
    pop rsi
    pop rdi
    pop rbp
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
.endif
    add xsp, 2*WORD_SIZE                            # vector and error code
    IRET
.Lexception_probe:                                  # return to the probe's resume point, the fault recorded
    mov xax, [xbp + EXC_ERROR]
    mov [probe_error], xax
    mov xax, [xbp + EXC_CR2]
    mov [probe_cr2], xax
    mov xax, [probe_resume]
    mov [xbp + EXC_IP], xax
    mov xword ptr [probe_resume], 0x0
    jmp .Lexception_resume
.Lexception_not_handled:
    test xword ptr [xbp + EXC_CS], SELECTOR_RPL3    # from ring 3: the task stops, not the kernel
    jz exception_report
    push xword ptr [xbp + EXC_ERROR]
    push xword ptr [xbp + EXC_IP]
    push xword ptr [xbp + EXC_CR2]
    push xword ptr [xbp + EXC_VECTOR]
    call user_fault                                 # (vector, cr2, ip, error); does not return

# page_fault(cr2, error) -> 1 when the fault was the first touch of a lazy allocation, now backed: the handler
# returns to the faulting instruction. Else 0, once the fault's cause is on COM1 (the exception report follows).
page_fault:
    FRAME 0x0
    test xword ptr [xsp + ARG2], PF_U               # from ring 3: only the task's lazy range is backed here
    jnz user_page_fault                             # (templates/task.s); a 0 stops the task
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xword ptr [xsp + ARG1]
    call vmm_page_fault
    DROP 0x2
    test eax, eax
    jnz .Lpage_fault_done
    PUSHW xword ptr [xsp + ARG2]
    call vmm_report_fault
    DROP 0x1
    xor eax, eax
.Lpage_fault_done:
    ret

# exception_report: xbp points at the frame exception_common saved; exception_fields pairs each field's label
# with its offset in that frame (a word each, ended by a zero label). Does not return.
exception_report:
    push offset str_exception
    call serial_puts
    add xsp, WORD_SIZE
    mov xsi, offset exception_fields
.Lexception_field:
    mov xax, [xsi]
    test xax, xax
    jz .Lexception_done
    mov xcx, [xsi + WORD_SIZE]
    push xword ptr [xbp + xcx]
    push xax
    call serial_putfield
    add xsp, 2*WORD_SIZE
    add xsi, 2*WORD_SIZE
    jmp .Lexception_field
.Lexception_done:
    push offset str_newline
    call serial_puts
    push DEBUG_EXIT_FAILURE
    call debug_exit

.section .rodata
str_exception:
    EXCEPTION_TEXT
    .byte 0x0
