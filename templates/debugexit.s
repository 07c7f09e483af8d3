# Stop the machine with a status: QEMU's isa-debug-exit device turns the value written to its port into the
# process exit status (value << 1) | 1. Under TCG that exit happens asynchronously, so the CPU halts for good
# right after the write: a later instruction must not run and change the outcome.
#
# Why success also needs a line on COM1: the process status keeps only the low 8 bits, so writing 0x90, or
# 0xdead0010, to the port gives the same status as DEBUG_EXIT_SUCCESS. A stray write can happen; printing
# "kgen: exit success" right before the port write cannot happen by accident. The harness (kgen/harness/run.py)
# wants both: that line last on COM1, and the success status.

.section .text
# debug_exit(value): does not return
debug_exit:
    mov xax, [xsp + WORD_SIZE]
    mov dx, DEBUG_EXIT_PORT
    out dx, eax
.Lhalt:
    cli
    hlt
    jmp .Lhalt

# exit_success(): say so on COM1, then stop with DEBUG_EXIT_SUCCESS; the only way a kgen kernel succeeds.
exit_success:
    push offset str_exit_success                    # generated from kgen/guest/bootreport.py's EXIT_SUCCESS
    call serial_puts
    push offset str_newline
    call serial_puts
    push DEBUG_EXIT_SUCCESS
    call debug_exit

# panic(message): a kernel structure is corrupt or an invariant broke; say so on COM1 and stop with failure.
panic:
    push offset str_panic
    call serial_puts
    push xword ptr [xsp + 2*WORD_SIZE]
    call serial_puts
    push offset str_newline
    call serial_puts
    push DEBUG_EXIT_FAILURE
    call debug_exit

.section .rodata
str_panic:
    .asciz "kgen: panic: "
