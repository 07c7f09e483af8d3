# Byte-string helpers (cdecl).

.section .text
# str_contains(haystack, needle) -> 1 when needle occurs in haystack, else 0 (both NUL-terminated)
str_contains:
    push esi
    push edi
    push ebx
    mov ebx, [esp + 0x10]
.Lcontains_start:
    mov esi, ebx
    mov edi, [esp + 0x14]
.Lcontains_byte:
    mov al, [edi]
    test al, al
    jz .Lcontains_yes
    cmp al, [esi]
    jne .Lcontains_next
    inc esi
    inc edi
    jmp .Lcontains_byte
.Lcontains_next:
    cmp byte ptr [ebx], 0x0
    je .Lcontains_no
    inc ebx
    jmp .Lcontains_start
.Lcontains_yes:
    mov eax, 0x1
    jmp .Lcontains_done
.Lcontains_no:
    xor eax, eax
.Lcontains_done:
    pop ebx
    pop edi
    pop esi
    ret
