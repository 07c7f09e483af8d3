# The interrupt entry points both architectures share: one 16-byte stub per vector, the PIC acknowledgement, and
# the exception report. Each architecture's idt.s fills its gates from interrupt_stubs, saves its own frame in
# exception_common and names the frame's fields in exception_fields.
#
# Each stub is 16 bytes so the gate for vector v is interrupt_stubs + 16*v. Stubs of vectors that push no error
# code push a 0 first, so every handler sees the same frame: error code, then vector, each a word. Which vectors
# push one is a CPU fact, passed in as EXCEPTIONS_WITH_ERROR_CODE_MASK.
#
# The report is one line the harness parses (kgen/diagnose.py):
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

# page_fault(cr2, error) -> 1 when the fault was the first touch of a lazy allocation, now backed: the handler
# returns to the faulting instruction. Else 0, once the fault's cause is on COM1 (the exception report follows).
page_fault:
    test xword ptr [xsp + 2*WORD_SIZE], PF_U        # from ring 3: only the task's lazy range is backed here
    jnz user_page_fault                             # (templates/task.s); a 0 stops the task
    push xword ptr [xsp + 2*WORD_SIZE]
    push xword ptr [xsp + 2*WORD_SIZE]
    call vmm_page_fault
    add xsp, 2*WORD_SIZE
    test eax, eax
    jnz .Lpage_fault_done
    push xword ptr [xsp + 2*WORD_SIZE]
    call vmm_report_fault
    add xsp, WORD_SIZE
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
    .asciz "kgen: exception"
