"""Zoo kernels for `kgen test --check-at` (tests/harness/test_check_at.py): kernels that switch between address
spaces at a named symbol, `switch_to`, with a flaw that is there only for a while.

Both (i386 and x86_64) are flat (linked and run at 1 MiB, paging on with the image identity-mapped page by page:
text read-only, data and bss writable, a supervisor recursive slot) and keep three address spaces, each with tables
of its own mapping the same image, listed in the array `spaces` (physical top-table addresses). `main` (with a frame
pointer) calls `switch_to(spaces[i % 3])` for i = 1 .. SWITCHES; switch_to loads CR3 and counts the switch in
`switches`. Then `cli; hlt` for good.
FLAW_AT=n (n > 0): the n-th switch makes the first text page of space 2 writable (its page table's entry gets RW);
the (n + 3)-th makes it read-only again. So the flaw is in space 2 for hits n + 1 to n + 3 only (a hit is at
switch_to's first instruction, before its switch), and the kernel the other checks see, halted, is clean.
"""
from __future__ import annotations

from pathlib import Path

from minikernels import MULTIBOOT_HEADER, build, halt_loop

SYMBOL = "switch_to"
SPACES = "spaces"
SPACE_COUNT = 3
SWITCHES = 10
FLAW_AT = 4
# The hits that see the flaw in space 2 (spaces[2]), and the first of them where it is the space in CR3 (hit k runs
# in the space call k - 1 switched to: spaces[(k - 1) % 3]).
FLAWED_HITS = range(FLAW_AT + 1, FLAW_AT + 4)
FIRST_FLAWED_HIT = FLAW_AT + 1
FIRST_FLAWED_HIT_IN_CR3 = next(k for k in FLAWED_HITS if (k - 1) % SPACE_COUNT == 2)

# Text (RX) and data+bss (RW) each a PT_LOAD of their own, page-aligned, linked where they load.
LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); data PT_LOAD FLAGS(6); }
SECTIONS {
  . = 1M;
  __image_start = .;
  .text : { *(.text) } :text
  . = ALIGN(0x1000);
  __data_start = .;
  .data : { *(.data) } :data
  __load_end = .;
  .bss : { *(.bss) } :data
  . = ALIGN(0x1000);
  __image_end = .;
}
"""

# The switch and the flaw, the same in both: `w` is the word registers' prefix (e for i386, r for x86_64), `arg`
# the line that puts the argument in its ax.
SWITCH_TO = r"""switch_to:
    push %{w}bp
    mov %{w}sp, %{w}bp
{arg}
    mov %{w}ax, %cr3
    incl switches
.if FLAW_AT
    mov $__image_start, %eax                /* the first text page's entry in space 2's page table */
    shr $12, %eax
    and ${index_mask}, %eax
    cmpl $FLAW_AT, switches
    jne 1f
    or{suffix} $2, pt2(,%{w}ax,{entry})                /* writable: the flaw */
1:  cmpl $(FLAW_AT + 3), switches
    jne 2f
    and{suffix} $~2, pt2(,%{w}ax,{entry})              /* read-only again */
2:
.endif
    pop %{w}bp
    ret"""

MAIN = r"""main:
    push %{w}bp
    mov %{w}sp, %{w}bp
    mov $1, %ebx
1:
    mov %ebx, %eax
    xor %edx, %edx
    mov $3, %ecx
    div %ecx                               /* edx = i % 3 */
{call}
    inc %ebx
    cmp $SWITCHES, %ebx
    jbe 1b
    pop %{w}bp
    ret"""


def _fill_tables(entry: int, levels: str) -> str:
    """Map the image page by page into pt0, pt1, pt2 (identity, writable from __data_start on) and point each
    space's upper tables at its own; `levels` links them (i386: pd -> pt; x86_64: pml4 -> pdpt -> pd -> pt)."""
    return rf"""    mov $tables, %edi                   /* every table: RAM may be poisoned */
    xor %eax, %eax
    mov $(TABLE_PAGES * 1024), %ecx
    rep stosl
    mov $__image_start, %esi
map_page:
    mov %esi, %eax
    or $1, %eax
    cmp $__data_start, %esi
    jb 1f
    or $2, %eax
1:  mov %esi, %edx
    shr $12, %edx
    and $INDEX_MASK, %edx
    mov %eax, pt0(,%edx,{entry})
    mov %eax, pt1(,%edx,{entry})
    mov %eax, pt2(,%edx,{entry})
    add $0x1000, %esi
    cmp $__image_end, %esi
    jb map_page
{levels}"""


I386 = rf"""
.set TABLE_PAGES, 6
.set INDEX_MASK, 0x3ff
.text
.globl _start
{MULTIBOOT_HEADER}
_start:
    cli
    mov $stack_top, %esp
    xor %ebp, %ebp
{_fill_tables(4, '''    movl $(pt0 + 3), pd0
    movl $(pt1 + 3), pd1
    movl $(pt2 + 3), pd2
    movl $(pd0 + 3), pd0 + 1023 * 4         /* the recursive slot, supervisor */
    movl $(pd1 + 3), pd1 + 1023 * 4
    movl $(pd2 + 3), pd2 + 1023 * 4''')}
    mov $pd0, %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                /* PG | WP */
    mov %eax, %cr0
    call main
{halt_loop()}
{MAIN.format(w="e", call='''    push spaces(,%edx,4)
    call switch_to
    add $4, %esp''')}
{SWITCH_TO.format(w="e", arg="    mov 8(%ebp), %eax", index_mask="0x3ff", suffix="l", entry=4)}
.data
.align 4
.globl spaces
.type spaces, @object
spaces: .long pd0, pd1, pd2
.size spaces, . - spaces
switches: .long 0
.bss
.align 4096
tables:
pd0: .skip 4096
pd1: .skip 4096
pd2: .skip 4096
pt0: .skip 4096
pt1: .skip 4096
pt2: .skip 4096
stack: .skip 4096
stack_top:
"""

# ELF64 booted by QEMU's -kernel through the Multiboot header's address fields (flag 16): the entry is 32-bit code.
X86_64 = rf"""
.set TABLE_PAGES, 12
.set INDEX_MASK, 0x1ff
.set FLAGS, 0x00010003
.text
.code32
.globl _start
.align 4
mb_header:
    .long 0x1BADB002, FLAGS, -(0x1BADB002 + FLAGS)
    .long mb_header, mb_header, __load_end, __image_end, _start
_start:
    cli
    mov $stack_top, %esp
    xor %ebp, %ebp
{_fill_tables(8, '''    movl $(pt0 + 3), pd0
    movl $(pt1 + 3), pd1
    movl $(pt2 + 3), pd2
    movl $(pd0 + 3), pdpt0
    movl $(pd1 + 3), pdpt1
    movl $(pd2 + 3), pdpt2
    movl $(pdpt0 + 3), pml4
    movl $(pdpt1 + 3), pml4_1
    movl $(pdpt2 + 3), pml4_2
    movl $(pml4 + 3), pml4 + 511 * 8        /* the recursive slot, supervisor */
    movl $(pml4_1 + 3), pml4_1 + 511 * 8
    movl $(pml4_2 + 3), pml4_2 + 511 * 8''')}
    mov %cr4, %eax
    or $0x20, %eax                      /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx               /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax                /* PG | WP | PE */
    mov %eax, %cr0
    lgdt gdtr
    ljmp $0x08, $long_mode
.code64
long_mode:
    mov $stack_top, %rsp
    xor %rbp, %rbp
    call main
{halt_loop()}
{MAIN.format(w="r", call='''    mov spaces(,%rdx,8), %rdi
    call switch_to''')}
{SWITCH_TO.format(w="r", arg="    mov %rdi, %rax", index_mask="0x1ff", suffix="q", entry=8)}
.data
.align 8
gdt:  .quad 0, 0x00AF9A000000FFFF
gdtr: .word 2 * 8 - 1
      .long gdt
.globl spaces
.type spaces, @object
spaces: .quad pml4, pml4_1, pml4_2
.size spaces, . - spaces
switches: .long 0
.bss
.align 4096
tables:
pml4: .skip 4096
pml4_1: .skip 4096
pml4_2: .skip 4096
pdpt0: .skip 4096
pdpt1: .skip 4096
pdpt2: .skip 4096
pd0: .skip 4096
pd1: .skip 4096
pd2: .skip 4096
pt0: .skip 4096
pt1: .skip 4096
pt2: .skip 4096
stack: .skip 4096
stack_top:
"""

SOURCES = {"i386": (I386, 32), "x86_64": (X86_64, 64)}


def switcher(out: Path, arch: str, *, flaw_at: int = 0) -> Path:
    """The kernel above for `arch`, built into out/; `flaw_at` 0 for the clean one."""
    source, bits = SOURCES[arch]
    name = f"switcher-{arch}" + (f"-flaw{flaw_at}" if flaw_at else "")
    return build(out, name, source, LDS, bits=bits, FLAW_AT=flaw_at, SWITCHES=SWITCHES)
