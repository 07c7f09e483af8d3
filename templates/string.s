# Byte-string helpers (kgen's convention: templates/serial.s).

.section .text
# str_contains(haystack, needle) -> 1 when needle occurs in haystack, else 0 (both NUL-terminated)
str_contains:
    push xsi
    push xdi
    push xbx
    FRAME 0x3
    mov xbx, [xsp + ARG1]
.Lcontains_start:
    mov xsi, xbx
    mov xdi, [xsp + ARG2]
.Lcontains_byte:
    mov al, [xdi]
    test al, al
    jz .Lcontains_yes
    cmp al, [xsi]
    jne .Lcontains_next
    inc xsi
    inc xdi
    jmp .Lcontains_byte
.Lcontains_next:
    cmp byte ptr [xbx], 0x0
    je .Lcontains_no
    inc xbx
    jmp .Lcontains_start
.Lcontains_yes:
    mov eax, 0x1
    jmp .Lcontains_done
.Lcontains_no:
    xor eax, eax
.Lcontains_done:
    pop xbx
    pop xdi
    pop xsi
    ret
