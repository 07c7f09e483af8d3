# COM1 output: the kernel's only voice. 115200 8N1, no interrupts; putc polls the transmit-empty bit so it also
# works on a real 16550. Routines follow cdecl: arguments on the stack, eax/ecx/edx clobbered.

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
    test al, 0x20
    jz .Lputc_wait
    mov dx, COM1_PORT
    mov al, [esp + 0x4]
    out dx, al
    ret

# serial_puts(const char *s)
serial_puts:
    push esi
    mov esi, [esp + 0x8]
.Lputs_next:
    movzx eax, byte ptr [esi]
    test eax, eax
    jz .Lputs_done
    push eax
    call serial_putc
    add esp, 0x4
    inc esi
    jmp .Lputs_next
.Lputs_done:
    pop esi
    ret

# serial_putdigits(value): eight hex digits, no prefix
serial_putdigits:
    push ebx
    push esi
    mov ebx, [esp + 0xc]
    mov esi, 0x8
.Ldigit:
    rol ebx, 0x4
    mov eax, ebx
    and eax, 0xf
    movzx eax, byte ptr [hex_digits + eax]
    push eax
    call serial_putc
    add esp, 0x4
    dec esi
    jnz .Ldigit
    pop esi
    pop ebx
    ret

# serial_puthex(value): "0x" and eight hex digits
serial_puthex:
    push offset str_hex_prefix
    call serial_puts
    add esp, 0x4
    push dword ptr [esp + 0x4]
    call serial_putdigits
    add esp, 0x4
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
    push ebx
    push esi
    mov eax, [esp + 0xc]
    mov ebx, 0xa
    xor esi, esi                                    # digits pushed so far
.Ldec_divide:
    xor edx, edx
    div ebx
    add edx, 0x30
    push edx
    inc esi
    test eax, eax
    jnz .Ldec_divide
.Ldec_print:
    call serial_putc                                # the digit is already on the stack as the argument
    add esp, 0x4
    dec esi
    jnz .Ldec_print
    pop esi
    pop ebx
    ret
