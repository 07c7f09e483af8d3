# User programs: ring-3 code the kernel copies into a task's address space (user_load), each between a label and
# its _end label. They run at USER_TEXT_BASE, wherever these bytes sit in the kernel's .rodata, so they name only
# layout constants and their own labels relative to one another (a call over its text finds where it runs).
# System calls: xax = number, xbx/xdx = arguments; SYSTEM_CALL is `syscall` on x86_64, `int 0x80` on i386
# (templates/task.s takes both on x86_64; user_int80 uses the gate there).

.section .rodata
.macro SYSTEM_CALL
.if ARCH_X86_64
    syscall
.else
    int SYSCALL_VECTOR
.endif
.endm

.balign 0x10, 0x0
# user_hello: touches three pages of the lazy range (each a demand fault), writes a greeting, exits with the sum
# read back from those pages (0x33333333: the pages kept what was written).
user_hello:
    mov xdx, USER_LAZY_BASE
    mov dword ptr [xdx], 0x11111111
    mov dword ptr [xdx + 0x3000], 0x22222222
    mov eax, [xdx]
    add eax, [xdx + 0x3000]
    mov [xdx + 0x5000], eax
    call .Lhello_end                                # pushes where the text lies: the next byte
.Lhello_text:
    .ascii "hello from ring 3\n"
.Lhello_end:
    pop xbx
    mov edx, .Lhello_end - .Lhello_text
    mov eax, SYS_WRITE
    SYSTEM_CALL
    mov xdx, USER_LAZY_BASE
    mov ebx, [xdx + 0x5000]
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_hello_end:

# user_bad_write: asks the kernel to write from a kernel address; exits with 0 - the result (1 when refused)
.balign 0x10, 0x0
user_bad_write:
    mov xbx, KERNEL_VIRTUAL_START
    mov edx, 0x10
    mov eax, SYS_WRITE
    SYSTEM_CALL
    neg xax
    mov xbx, xax
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_bad_write_end:

# user_touch_kernel: reads the kernel image (present, supervisor-only): a protection fault, read, user
.balign 0x10, 0x0
user_touch_kernel:
    mov xax, KERNEL_VIRTUAL_START
    mov eax, [xax]
    mov ebx, 0x0
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_touch_kernel_end:

# user_write_text: writes its own (read-only) text: a protection fault, write, user
.balign 0x10, 0x0
user_write_text:
    mov xax, USER_TEXT_BASE
    mov dword ptr [xax], 0x0
    mov ebx, 0x0
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_write_text_end:

# user_exec_data: puts a `ret` in the lazy range and calls it: on x86_64 the page is NX, a protection fault on the
# fetch; i386 paging has no NX, so there the call returns and the task exits with 7
.balign 0x10, 0x0
user_exec_data:
    mov xax, USER_LAZY_BASE
    mov byte ptr [xax], 0xc3
    call xax
    mov ebx, 0x7
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_exec_data_end:

# user_int80: exits with 5 through the `int 0x80` gate, on both architectures
.balign 0x10, 0x0
user_int80:
    mov ebx, 0x5
    mov eax, SYS_EXIT
    int SYSCALL_VECTOR
user_int80_end:

# user_exit: exits with 0 at once (the benchmark's baseline for a task's run)
.balign 0x10, 0x0
user_exit:
    mov ebx, 0x0
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_exit_end:

# user_null_calls: USER_NULL_CALLS system calls that do nothing (SYS_WRITE of 0 bytes), then exit with the count of
# those that returned 0: the benchmark's system-call round trip
.balign 0x10, 0x0
user_null_calls:
    mov esi, USER_NULL_CALLS
    xor edi, edi
.Lnull_next:
    xor ebx, ebx
    xor edx, edx
    mov eax, SYS_WRITE
    SYSTEM_CALL
    test eax, eax
    jnz .Lnull_counted
    inc edi
.Lnull_counted:
    dec esi
    jnz .Lnull_next
    mov ebx, edi
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_null_calls_end:

# user_cli: a privileged instruction in ring 3 (IOPL is 0): a general-protection fault, not a page fault
.balign 0x10, 0x0
user_cli:
    cli
    mov ebx, 0x0
    mov eax, SYS_EXIT
    SYSTEM_CALL
user_cli_end:
