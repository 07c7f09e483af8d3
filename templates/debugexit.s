# Stop the machine with a status: QEMU's isa-debug-exit device turns the value written to its port into the
# process exit status (value << 1) | 1. Under TCG that exit happens asynchronously, so the CPU halts for good
# right after the write: a later instruction must not run and change the outcome.

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
