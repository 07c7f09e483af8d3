# The call channel: with `kgen.serve` on its command line the kernel, after its boot report, waits on COM2 for
# requests and runs any kernel routine for the harness (kgen/guest/calls.py), which names it by symbol. The frame,
# its magic numbers, its port and the SERVING_TEXT line are kgen/protocol.py's, which both sides read.
# Request (little-endian words: 4 bytes on i386, 8 on x86_64):
#     CALL_REQUEST_MAGIC, routine address, argument count n, n arguments
# Reply (words):
#     CALL_REPLY_MAGIC, status (CALL_STATUS_RAN or CALL_STATUS_REFUSED), xax, xdx, rdtsc delta (low half, high half)
#
# Routines follow kgen's convention (templates/serial.s): arguments pushed right to left, result in xax (xdx:xax
# for a double word). They run with interrupts off. The rdtsc delta brackets the call alone.
#
# Between requests the kernel sleeps in `hlt` with only COM2's IRQ open, so an idle kernel changes no memory
# and the harness may stop the machine and read it.

.section .text
serve:
    call com2_init
    push CALL_IRQ
    call pic_unmask
    add xsp, WORD_SIZE
    push offset str_serving
    call serial_puts
    add xsp, WORD_SIZE
.Lserve_next:
    call com2_get_word
    cmp xax, CALL_REQUEST_MAGIC
    jne .Lserve_bad_magic
    call com2_get_word
    mov [call_routine], xax
    call com2_get_word
    mov [call_argc], xax
    cmp xax, CALL_MAX_ARGS
    ja .Lserve_bad_argc
    xor ebx, ebx
.Lserve_arg:
    cmp xbx, [call_argc]
    jae .Lserve_args_read
    call com2_get_word
    mov [call_args + xbx*WORD_SIZE], xax
    inc xbx
    jmp .Lserve_arg
.Lserve_args_read:
    mov xax, [call_routine]                         # only code inside the kernel's text may be called
    cmp xax, offset __text_start
    jb .Lserve_refuse
    cmp xax, offset __text_end
    jae .Lserve_refuse
    mov xcx, [call_argc]
.Lserve_push:
    test xcx, xcx
    jz .Lserve_pushed
    push xword ptr [call_args + xcx*WORD_SIZE - WORD_SIZE]
    dec xcx
    jmp .Lserve_push
.Lserve_pushed:
    rdtsc
    mov [call_tsc_start], eax
    mov [call_tsc_start + 0x4], edx
.if ARCH_X86_64
    # The first six arguments also go where the System V ABI expects them, so a routine written in C for
    # x86_64 can be called as well as kgen's own (which read the stack).
    mov rdi, [call_args]
    mov rsi, [call_args + 0x8]
    mov rdx, [call_args + 0x10]
    mov rcx, [call_args + 0x18]
    mov r8, [call_args + 0x20]
    mov r9, [call_args + 0x28]
.endif
    call xword ptr [call_routine]
    mov [call_result], xax
    mov [call_result_high], xdx
    rdtsc
    sub eax, [call_tsc_start]
    sbb edx, [call_tsc_start + 0x4]
    mov xsp, offset boot_stack_top                  # drop the arguments, whatever the routine did to xsp
    mov esi, eax
    mov edi, edx
    push CALL_REPLY_MAGIC
    call com2_put_word
    push CALL_STATUS_RAN
    call com2_put_word
    push xword ptr [call_result]
    call com2_put_word
    push xword ptr [call_result_high]
    call com2_put_word
    push xsi
    call com2_put_word
    push xdi
    call com2_put_word
    mov xsp, offset boot_stack_top
    jmp .Lserve_next
.Lserve_refuse:
    push CALL_REPLY_MAGIC
    call com2_put_word
    push CALL_STATUS_REFUSED
    call com2_put_word
    push 0x0
    call com2_put_word
    push 0x0
    call com2_put_word
    push 0x0
    call com2_put_word
    push 0x0
    call com2_put_word
    mov xsp, offset boot_stack_top
    jmp .Lserve_next
.Lserve_bad_magic:
    push offset str_bad_magic
    jmp .Lserve_fail
.Lserve_bad_argc:
    push offset str_bad_argc
.Lserve_fail:
    call serial_puts
    push DEBUG_EXIT_FAILURE
    call debug_exit

# COM2 as COM1 (templates/serial.s), plus the received-data interrupt that wakes the kernel from hlt.
com2_init:
    mov dx, CALL_PORT + 0x1
    xor al, al
    out dx, al
    mov dx, CALL_PORT + 0x3
    mov al, 0x80
    out dx, al
    mov dx, CALL_PORT
    mov al, 0x1
    out dx, al
    mov dx, CALL_PORT + 0x1
    xor al, al
    out dx, al
    mov dx, CALL_PORT + 0x3
    mov al, 0x3
    out dx, al
    mov dx, CALL_PORT + 0x2
    mov al, 0xc7
    out dx, al
    mov dx, CALL_PORT + 0x4
    mov al, UART_MCR_DTR_RTS_OUT2
    out dx, al
    mov dx, CALL_PORT + 0x1
    mov al, UART_IER_RX_AVAILABLE
    out dx, al
    ret

# com2_get_byte() -> al. Checks with interrupts off, then `sti; hlt`: sti takes effect after hlt has begun, so
# an interrupt that arrives in between still ends the hlt instead of being lost before it.
com2_get_byte:
    cli
    mov dx, CALL_PORT + 0x5
    in al, dx
    test al, UART_LSR_DATA_READY
    jnz .Lget_byte_ready
    sti
    hlt
    jmp com2_get_byte
.Lget_byte_ready:
    mov dx, CALL_PORT
    in al, dx
    movzx eax, al
    ret

# com2_get_word() -> xax: WORD_SIZE bytes, least significant first
com2_get_word:
    push xbx
    push xsi
    xor ebx, ebx
    xor esi, esi
.Lget_word_byte:
    call com2_get_byte
    mov ecx, esi
    shl xax, cl
    or xbx, xax
    add esi, 0x8
    cmp esi, 8*WORD_SIZE
    jb .Lget_word_byte
    mov xax, xbx
    pop xsi
    pop xbx
    ret

# com2_put_word(value): WORD_SIZE bytes, least significant first
com2_put_word:
    mov ecx, WORD_SIZE
.Lput_word_byte:
    mov dx, CALL_PORT + 0x5
.Lput_word_wait:
    in al, dx
    test al, UART_LSR_TX_EMPTY
    jz .Lput_word_wait
    mov dx, CALL_PORT
    mov al, [xsp + WORD_SIZE]
    out dx, al
    shr xword ptr [xsp + WORD_SIZE], 0x8
    dec ecx
    jnz .Lput_word_byte
    ret

.section .rodata
str_serving:
    SERVING_TEXT                                    # kgen/protocol.py's SERVING, then the line's end
    .asciz "\n"
str_bad_magic:
    .asciz "kgen: call channel: bad request magic\n"
str_bad_argc:
    .asciz "kgen: call channel: too many arguments\n"

.section .bss
.balign 8, 0
call_routine:
    .skip WORD_SIZE
call_argc:
    .skip WORD_SIZE
call_args:
    .skip CALL_MAX_ARGS * WORD_SIZE
call_result:
    .skip WORD_SIZE
call_result_high:
    .skip WORD_SIZE
call_tsc_start:
    .skip 0x8
