# Stop the machine with a status: QEMU's isa-debug-exit device turns the value written to its port into the
# process exit status (value << 1) | 1. Under TCG that exit happens asynchronously, so the CPU halts for good
# right after the write: a later instruction must not run and change the outcome.

.section .text
# debug_exit(value): does not return
debug_exit:
    mov eax, [esp + 0x4]
    mov dx, DEBUG_EXIT_PORT
    out dx, eax
.Lhalt:
    cli
    hlt
    jmp .Lhalt
