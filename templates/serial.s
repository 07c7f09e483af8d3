# COM1 output: the kernel's only voice. 115200 8N1, no interrupts; putc polls the transmit-empty bit so it also
# works on a real 16550.
#
# kgen's calling convention, the same on both architectures: arguments are words (4 or 8 bytes) pushed right to
# left, the first at [xsp + WORD_SIZE] on entry, read as [xsp + ARG1] (FRAME and its companions in
# templates/macros.inc keep ARGn right across pushes); the result is in xax; xax, xcx and xdx may be clobbered, the
# other registers are preserved. `xax`, `xsi`, `xword`... are word-size selectors (kgen/arch), so this one file
# assembles as i386 and as x86_64 code.

.section .text
serial_init:
    mov dx, COM1_PORT + 0x1                         # interrupts off
    xor al, al
    out dx, al
    mov dx, COM1_PORT + 0x3                         # DLAB on to set the divisor
    mov al, 0x80
    out dx, al
    mov dx, COM1_PORT                               # divisor 1: 115200 baud
    mov al, 0x1
    out dx, al
    mov dx, COM1_PORT + 0x1
    xor al, al
    out dx, al
    mov dx, COM1_PORT + 0x3                         # 8 bits, no parity, 1 stop bit, DLAB off
    mov al, 0x3
    out dx, al
    mov dx, COM1_PORT + 0x2                         # FIFO on and cleared
    mov al, 0xc7
    out dx, al
    ret

# serial_putc(char)
serial_putc:
    mov dx, COM1_PORT + 0x5
.Lputc_wait:
    in al, dx
    test al, UART_LSR_TX_EMPTY
    jz .Lputc_wait
    mov dx, COM1_PORT
    FRAME 0x0
    mov al, [xsp + ARG1]
    out dx, al
    ret

# serial_puts(const char *s)
serial_puts:
    push xsi
    FRAME 0x1
    mov xsi, [xsp + ARG1]
.Lputs_next:
    movzx eax, byte ptr [xsi]
    test eax, eax
    jz .Lputs_done
    push xax
    call serial_putc
    add xsp, WORD_SIZE
    inc xsi
    jmp .Lputs_next
.Lputs_done:
    pop xsi
    ret

# serial_putdigits(value): a word in hex, two digits per byte (8 on i386, 16 on x86_64), no prefix
serial_putdigits:
    push xbx
    push xsi
    FRAME 0x2
    mov xbx, [xsp + ARG1]
    mov esi, 2*WORD_SIZE
.Ldigit:
    rol xbx, 0x4
    mov eax, ebx
    and eax, 0xf
    movzx eax, byte ptr [hex_digits + xax]
    push xax
    call serial_putc
    add xsp, WORD_SIZE
    dec esi
    jnz .Ldigit
    pop xsi
    pop xbx
    ret

# serial_puthex(value): "0x" and the word's hex digits
serial_puthex:
    FRAME 0x0
    PUSHW offset str_hex_prefix
    call serial_puts
    DROP 0x1
    PUSHW xword ptr [xsp + ARG1]
    call serial_putdigits
    DROP 0x1
    ret

# serial_putline(text, value): text, "0x" and the value's digits, a newline: the shape of every refusal the kernel
# reports ("kgen: not an address space: 0x...")
serial_putline:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    call serial_puts
    DROP 0x1
    PUSHW xword ptr [xsp + ARG2]
    call serial_puthex
    DROP 0x1
    PUSHW offset str_newline
    call serial_puts
    DROP 0x1
    ret

.section .rodata
hex_digits:
    .ascii "0123456789abcdef"
str_hex_prefix:
    .asciz "0x"
str_newline:
    .asciz "\n"

.section .text
# serial_putdec(value): unsigned decimal
serial_putdec:
    push xbx
    push xsi
    FRAME 0x2
    mov xax, [xsp + ARG1]
    mov ebx, 0xa
    xor esi, esi                                    # digits pushed so far
.Ldec_divide:
    xor edx, edx
    div xbx
    add edx, 0x30
    push xdx
    inc esi
    test xax, xax
    jnz .Ldec_divide
.Ldec_print:
    call serial_putc                                # the digit is already on the stack as the argument
    add xsp, WORD_SIZE
    dec esi
    jnz .Ldec_print
    pop xsi
    pop xbx
    ret
