# Stop the machine with a status: QEMU's isa-debug-exit device turns the value written to its port into the
# process exit status (value << 1) | 1. Under TCG that exit happens asynchronously, so the CPU halts for good
# right after the write: a later instruction must not run and change the outcome.
#
# Why success also needs a line on COM1: the process status keeps only the low 8 bits, so writing 0x90, or
# 0xdead0010, to the port gives the same status as DEBUG_EXIT_SUCCESS. A stray write can happen; printing
# "kgen: exit success" right before the port write cannot happen by accident. The harness (kgen/harness/run.py)
# wants both: that line last on COM1, and the success status.
#
# Why it first waits for the UART to finish: serial_putc only waits for room in the FIFO (THRE), so the last bytes
# can still be on their way when the port write stops the machine. QEMU hands a byte to COM1's socket when it leaves
# the shift register, and retries later if the socket is full (a busy host reads it late); stopping before that
# loses "s\n" of "kgen: exit success". TEMT (transmitter empty) is set once every byte is out, as on a real 16550
# before power-off.

.section .text
# debug_exit(value): does not return
debug_exit:
    FRAME 0x0
    mov dx, COM1_PORT + 0x5                         # line status register
.Lwait_sent:
    in al, dx
    test al, UART_LSR_TX_DONE
    jz .Lwait_sent
    mov xax, [xsp + ARG1]
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
    FRAME 0x0
    PUSHW offset str_panic
    call serial_puts
    PUSHW xword ptr [xsp + ARG1]
    call serial_puts
    PUSHW offset str_newline
    call serial_puts
    PUSHW DEBUG_EXIT_FAILURE
    call debug_exit

.section .rodata
str_panic:
    PANIC_TEXT
    .byte 0x0
