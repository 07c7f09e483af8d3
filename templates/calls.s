# The call channel: with `kgen.serve` on its command line the kernel, after its boot report, waits on COM2 for
# requests and runs any kernel routine for the harness (kgen/calls.py), which names it by symbol.
#
# Request (little-endian dwords):  CALL_REQUEST_MAGIC, routine address, argument count n, n arguments
# Reply:                           CALL_REPLY_MAGIC, status (0 ran, 1 refused), eax, edx, rdtsc delta (lo, hi)
#
# Routines follow cdecl: arguments pushed right to left, result in eax (edx:eax for 64 bits), ebx/esi/edi/ebp
# preserved. They run with interrupts off. The rdtsc delta brackets the call alone.
#
# Between requests the kernel sleeps in `hlt` with only COM2's IRQ open, so an idle kernel changes no memory
# and the harness may stop the machine and read it.

.section .text
serve:
    call com2_init
    push COM2_IRQ
    call pic_unmask
    add esp, 0x4
    push offset str_serving
    call serial_puts
    add esp, 0x4
.Lserve_next:
    call com2_get_dword
    cmp eax, CALL_REQUEST_MAGIC
    jne .Lserve_bad_magic
    call com2_get_dword
    mov [call_routine], eax
    call com2_get_dword
    mov [call_argc], eax
    cmp eax, CALL_MAX_ARGS
    ja .Lserve_bad_argc
    xor ebx, ebx
.Lserve_arg:
    cmp ebx, [call_argc]
    jae .Lserve_args_read
    call com2_get_dword
    mov [call_args + ebx*4], eax
    inc ebx
    jmp .Lserve_arg
.Lserve_args_read:
    mov eax, [call_routine]                         # only code inside the kernel's text may be called
    cmp eax, offset __text_start
    jb .Lserve_refuse
    cmp eax, offset __text_end
    jae .Lserve_refuse
    mov ecx, [call_argc]
.Lserve_push:
    test ecx, ecx
    jz .Lserve_pushed
    push dword ptr [call_args + ecx*4 - 0x4]
    dec ecx
    jmp .Lserve_push
.Lserve_pushed:
    rdtsc
    mov [call_tsc_start], eax
    mov [call_tsc_start + 0x4], edx
    call dword ptr [call_routine]
    mov [call_eax], eax
    mov [call_edx], edx
    rdtsc
    sub eax, [call_tsc_start]
    sbb edx, [call_tsc_start + 0x4]
    mov esp, offset boot_stack_top                  # drop the arguments, whatever the routine did to esp
    mov esi, eax
    mov edi, edx
    push CALL_REPLY_MAGIC
    call com2_put_dword
    push 0x0
    call com2_put_dword
    push dword ptr [call_eax]
    call com2_put_dword
    push dword ptr [call_edx]
    call com2_put_dword
    push esi
    call com2_put_dword
    push edi
    call com2_put_dword
    mov esp, offset boot_stack_top
    jmp .Lserve_next
.Lserve_refuse:
    push CALL_REPLY_MAGIC
    call com2_put_dword
    push 0x1
    call com2_put_dword
    push 0x0
    call com2_put_dword
    push 0x0
    call com2_put_dword
    push 0x0
    call com2_put_dword
    push 0x0
    call com2_put_dword
    mov esp, offset boot_stack_top
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
    mov dx, COM2_PORT + 0x1
    xor al, al
    out dx, al
    mov dx, COM2_PORT + 0x3
    mov al, 0x80
    out dx, al
    mov dx, COM2_PORT
    mov al, 0x1
    out dx, al
    mov dx, COM2_PORT + 0x1
    xor al, al
    out dx, al
    mov dx, COM2_PORT + 0x3
    mov al, 0x3
    out dx, al
    mov dx, COM2_PORT + 0x2
    mov al, 0xc7
    out dx, al
    mov dx, COM2_PORT + 0x4
    mov al, UART_MCR_DTR_RTS_OUT2
    out dx, al
    mov dx, COM2_PORT + 0x1
    mov al, UART_IER_RX_AVAILABLE
    out dx, al
    ret

# com2_get_byte() -> al. Checks with interrupts off, then `sti; hlt`: sti takes effect after hlt has begun, so
# an interrupt that arrives in between still ends the hlt instead of being lost before it.
com2_get_byte:
    cli
    mov dx, COM2_PORT + 0x5
    in al, dx
    test al, UART_LSR_DATA_READY
    jnz .Lget_byte_ready
    sti
    hlt
    jmp com2_get_byte
.Lget_byte_ready:
    mov dx, COM2_PORT
    in al, dx
    movzx eax, al
    ret

# com2_get_dword() -> eax
com2_get_dword:
    push ebx
    push esi
    xor ebx, ebx
    xor esi, esi
.Lget_dword_byte:
    call com2_get_byte
    mov ecx, esi
    shl eax, cl
    or ebx, eax
    add esi, 0x8
    cmp esi, 0x20
    jb .Lget_dword_byte
    mov eax, ebx
    pop esi
    pop ebx
    ret

# com2_put_dword(value)
com2_put_dword:
    mov ecx, 0x4
.Lput_dword_byte:
    mov dx, COM2_PORT + 0x5
.Lput_dword_wait:
    in al, dx
    test al, UART_LSR_TX_EMPTY
    jz .Lput_dword_wait
    mov dx, COM2_PORT
    mov al, [esp + 0x4]
    out dx, al
    shr dword ptr [esp + 0x4], 0x8
    dec ecx
    jnz .Lput_dword_byte
    ret

.section .rodata
str_serving:
    .asciz "kgen: serving calls on COM2\n"
str_bad_magic:
    .asciz "kgen: call channel: bad request magic\n"
str_bad_argc:
    .asciz "kgen: call channel: too many arguments\n"

.section .bss
.balign 4
call_routine:
    .skip 0x4
call_argc:
    .skip 0x4
call_args:
    .skip CALL_MAX_ARGS * 4
call_eax:
    .skip 0x4
call_edx:
    .skip 0x4
call_tsc_start:
    .skip 0x8
