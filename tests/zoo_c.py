"""Multiboot kernels written in C (Debian's gcc, -ffreestanding -g), i.e. with DWARF the way teaching kernels have it:
what `--address-spaces EXPR` and the candidates it proposes must handle (kgen/guest/dwarfspaces.py).

Both kernels are higher-half (linked at KBASE + 1 MiB, loaded at 1 MiB, one RWX segment), i386 (`gcc -m32`,
KBASE 0xC0000000) or x86_64 (`gcc -m64 -mcmodel=kernel -mno-red-zone`, KBASE 0xFFFFFFFF80000000, booted by QEMU's
-kernel through the Multiboot header's address fields). A small asm stub (BOOT, assembled by gcc) clears .bss,
maps the first 16 MiB at 0 and at KBASE with large pages, turns paging on (and long mode) and calls `kmain`.
`kmain` builds the kernel's own top-level table (`kpgdir`: the kernel half, 16 MiB of large supervisor pages), then
creates three processes, "init", "sh" and "cat", each with a top-level table of its own that shares the kernel half
and maps one user page at USER_CODE, runs ROUNDS rounds of switches between them (`switch_to`, which loads CR3),
ends in the first process's space, prints READY on COM1 and halts with interrupts off. Page frames come from a bump
allocator above the image (physical 4 MiB on), so no user page lies on the image.

KIND=array (xv6 style): `struct proc` in `ptable.proc[NPROC]` holds a *virtual* pointer to the top-level table
(`pgdir`), a `state` (enum, UNUSED = 0) and a `name`; a fourth process ran and exited: its slot is UNUSED again but
still holds its stale `pgdir`, a freed page filled with junk (as xv6's `wait` leaves it), so the expression needs
its condition.
KIND=list: `struct task`, allocated from page frames, linked from `task_list` through `next`, holds the *physical*
address of its top-level table (`cr3`) and a `comm`.
FLAW=1: the first switch into the third process ("cat") maps a user page at USER_PEEK onto the frame of the kernel's
`kernel_secret` (ring 3 sees the kernel): a flaw of that space only, and only after a context switch.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

READY = "zoo-c: ready"
NAMES = ("init", "sh", "cat")
FLAWED = 2                      # the third process created
USER_CODE = 0x400000
USER_PEEK = 0x800000
ARRAY_EXPRESSION = "ptable.proc[state != UNUSED].pgdir"
LIST_EXPRESSION = "task_list[->next].cr3"
KBASE = {"i386": 0xC0000000, "x86_64": 0xFFFFFFFF80000000}
CFLAGS = {"i386": ["-m32"], "x86_64": ["-m64", "-mcmodel=kernel", "-mno-red-zone", "-mgeneral-regs-only"]}

BOOT = r"""
#ifdef __x86_64__
#define KBASE 0xFFFFFFFF80000000
#else
#define KBASE 0xC0000000
#endif
#define V2P(x) ((x) - KBASE)
#ifdef __x86_64__
#define FLAGS 0x00010003                    /* page-aligned modules, memory info, the address fields below */
#else
#define FLAGS 0x00000003
#endif
.section .multiboot, "a"
.align 4
mb_header:
    .long 0x1BADB002, FLAGS, -(0x1BADB002 + FLAGS)
#ifdef __x86_64__
    .long V2P(mb_header), V2P(__image_start), V2P(__load_end), V2P(__bss_end), V2P(_start)
#endif

.text
.code32
.globl _start
_start:                                     /* at its load address, paging off */
    cli
    mov $V2P(__bss_start), %edi             /* .bss: the loader leaves it as RAM was (poisoned by the tests) */
    mov $V2P(__bss_end), %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
#ifdef __x86_64__
    movl $(V2P(boot_pdpt_low) + 3), V2P(boot_pml4)
    movl $(V2P(boot_pdpt_high) + 3), V2P(boot_pml4) + 511 * 8
    movl $(V2P(boot_pd) + 3), V2P(boot_pdpt_low)
    movl $(V2P(boot_pd) + 3), V2P(boot_pdpt_high) + 510 * 8
    mov $V2P(boot_pd), %edi
    mov $0x83, %eax                         /* 2 MiB pages: P RW PS */
    mov $8, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov %cr4, %eax
    or $0x20, %eax                          /* PAE */
    mov %eax, %cr4
    mov $V2P(boot_pml4), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx                   /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax                    /* PG | WP | PE */
    mov %eax, %cr0
    lgdt V2P(boot_gdtr)
    ljmp $0x08, $V2P(long_mode)
.code64
long_mode:
    movabs $higher_half, %rax
    jmp *%rax
higher_half:
    xor %eax, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    movabs $boot_stack_top, %rsp
    call kmain
#else
    mov $V2P(boot_pd), %edi
    mov $0x83, %eax                         /* 4 MiB pages: P RW PS */
    mov $4, %ecx
1:  mov %eax, (%edi)
    mov %eax, 768 * 4(%edi)
    add $0x400000, %eax
    add $4, %edi
    loop 1b
    mov %cr4, %eax
    or $0x10, %eax                          /* PSE */
    mov %eax, %cr4
    mov $V2P(boot_pd), %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                    /* PG | WP */
    mov %eax, %cr0
    mov $higher_half, %eax
    jmp *%eax
higher_half:
    mov $boot_stack_top, %esp
    call kmain
#endif
halt:
    cli
    hlt
    jmp halt

.data
.align 8
boot_gdt:
    .quad 0, 0x00AF9A000000FFFF
boot_gdtr:
    .word 2 * 8 - 1
    .long V2P(boot_gdt)

.bss
.align 4096
#ifdef __x86_64__
boot_pml4: .skip 4096
boot_pdpt_low: .skip 4096
boot_pdpt_high: .skip 4096
#endif
boot_pd: .skip 4096
boot_stack: .skip 16384
boot_stack_top:
"""

KERNEL = r"""
typedef unsigned long uword;
typedef unsigned char u8;
#ifdef __x86_64__
typedef unsigned long pte_t;
#define KBASE 0xFFFFFFFF80000000UL
#else
typedef unsigned int pte_t;
#define KBASE 0xC0000000UL
#endif
#define PAGE 4096
#define PTE_P 1
#define PTE_W 2
#define PTE_U 4
#define PTE_PS 0x80
#define V2P(a) ((uword)(a) - KBASE)
#define P2V(a) ((void *)((uword)(a) + KBASE))

static inline void outb(unsigned short port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline void lcr3(uword top) { __asm__ volatile("mov %0, %%cr3" : : "r"(top) : "memory"); }

static void puts(const char *s) { while (*s) outb(0x3F8, *s++); }
static void fill(void *at, u8 value) { for (int i = 0; i < PAGE; i++) ((volatile u8 *)at)[i] = value; }
static void copy_name(char *to, const char *from) {
    int i = 0;
    for (; from[i] && i < 15; i++)
        to[i] = from[i];
    to[i] = 0;
}

const char kernel_secret[] = "the kernel's own data";
static uword next_frame = 0x400000;         /* physical: frames above the image, inside the 16 MiB mapped */
static void *alloc_page(void) { void *page = P2V(next_frame); next_frame += PAGE; fill(page, 0); return page; }

pte_t *kpgdir;                              /* the kernel's own top-level table */

/* The last-level entry for `va` in the space `top`, the tables on the way made (user-accessible: user half only). */
static pte_t *entry_for(pte_t *top, uword va) {
    pte_t *table = top;
#ifdef __x86_64__
    for (int level = 3; level > 0; level--) {
        unsigned index = (va >> (12 + 9 * level)) & 511;
        if (!(table[index] & PTE_P))
            table[index] = V2P(alloc_page()) | PTE_P | PTE_W | PTE_U;
        table = P2V(table[index] & ~0xFFFUL);
    }
    return &table[(va >> 12) & 511];
#else
    unsigned index = va >> 22;
    if (!(table[index] & PTE_P))
        table[index] = V2P(alloc_page()) | PTE_P | PTE_W | PTE_U;
    table = P2V(table[index] & ~0xFFFUL);
    return &table[(va >> 12) & 1023];
#endif
}

static void kernel_space(void) {
    kpgdir = alloc_page();
#ifdef __x86_64__
    pte_t *pdpt = alloc_page(), *pd = alloc_page();
    kpgdir[511] = V2P(pdpt) | PTE_P | PTE_W;
    pdpt[510] = V2P(pd) | PTE_P | PTE_W;
    for (uword i = 0; i < 8; i++)
        pd[i] = (i << 21) | PTE_P | PTE_W | PTE_PS;
#else
    for (uword i = 0; i < 4; i++)
        kpgdir[768 + i] = (i << 22) | PTE_P | PTE_W | PTE_PS;
#endif
    lcr3(V2P(kpgdir));
}

/* A process's space: the kernel half shared (its top-level entries copied), one user page of its own. */
static pte_t *new_space(void) {
    pte_t *top = alloc_page();
    for (int i = PAGE / sizeof(pte_t) / 2; i < PAGE / (int)sizeof(pte_t); i++)
        top[i] = kpgdir[i];
    *entry_for(top, USER_CODE) = V2P(alloc_page()) | PTE_P | PTE_W | PTE_U;
    return top;
}

static int flaw_planted;
static void plant_flaw(pte_t *top) {
#if FLAW
    if (!flaw_planted)
        *entry_for(top, USER_PEEK) = (V2P(kernel_secret) & ~0xFFFUL) | PTE_P | PTE_U;
#endif
    flaw_planted = 1;
}

int switches;

#if KIND_LIST
struct task {
    struct task *next;
    int pid;
    char comm[16];
    uword cr3;                              /* physical: what switch_to loads */
};
struct task *task_list;

__attribute__((noinline)) void switch_to(struct task *t) {
    if (t->pid == 3)
        plant_flaw(P2V(t->cr3));
    switches++;
    lcr3(t->cr3);
}

static struct task *spawn(int pid, const char *name) {
    struct task *t = alloc_page(), **end = &task_list;
    t->pid = pid;
    copy_name(t->comm, name);
    t->cr3 = V2P(new_space());
    while (*end)
        end = &(*end)->next;
    *end = t;
    return t;
}

void kmain(void) {
    kernel_space();
    struct task *first = spawn(1, "init");
    spawn(2, "sh");
    spawn(3, "cat");
    for (int round = 0; round < ROUNDS; round++)
        for (struct task *t = task_list; t; t = t->next)
            switch_to(t);
    switch_to(first);
    puts("zoo-c: ready\n");
}
#else
enum procstate { UNUSED, EMBRYO, RUNNABLE, RUNNING };
struct proc {
    pte_t *pgdir;                           /* virtual: the top-level table */
    enum procstate state;
    int pid;
    char name[16];
};
#define NPROC 8
struct {
    int lock;
    struct proc proc[NPROC];
} ptable;

__attribute__((noinline)) void switch_to(struct proc *p) {
    if (p->pid == 3)
        plant_flaw(p->pgdir);
    switches++;
    p->state = RUNNING;
    lcr3(V2P(p->pgdir));
}

static struct proc *spawn(int pid, const char *name) {
    struct proc *p = &ptable.proc[pid - 1];
    p->pid = pid;
    copy_name(p->name, name);
    p->pgdir = new_space();
    p->state = RUNNABLE;
    return p;
}

void kmain(void) {
    kernel_space();
    spawn(1, "init");
    spawn(2, "sh");
    spawn(3, "cat");
    struct proc *gone = spawn(4, "true");   /* ran and exited: its slot keeps the freed table's pointer */
    fill(gone->pgdir, 1);
    gone->state = UNUSED;
    gone->pid = 0;
    gone->name[0] = 0;
    for (int round = 0; round < ROUNDS; round++)
        for (int i = 0; i < NPROC; i++)
            if (ptable.proc[i].state != UNUSED) {
                switch_to(&ptable.proc[i]);
                ptable.proc[i].state = RUNNABLE;
            }
    switch_to(&ptable.proc[0]);
    puts("zoo-c: ready\n");
}
#endif
"""

LINKER_SCRIPT = """
ENTRY(_start)
PHDRS {{ image PT_LOAD FLAGS(7); }}
SECTIONS {{
  . = {kbase:#x} + 0x100000;
  __image_start = .;
  .text : AT(ADDR(.text) - {kbase:#x}) {{ *(.multiboot) *(.text .text.*) }} :image
  .rodata : AT(ADDR(.rodata) - {kbase:#x}) {{ *(.rodata .rodata.*) }} :image
  .data : AT(ADDR(.data) - {kbase:#x}) {{ *(.data .data.*) }} :image
  __load_end = .;
  .bss : AT(ADDR(.bss) - {kbase:#x}) {{ __bss_start = .; *(.bss .bss.* COMMON) . = ALIGN(4); __bss_end = .; }} :image
  /DISCARD/ : {{ *(.eh_frame*) *(.note*) *(.comment) }}
}}
"""


def c_kernel(out: Path, kind: str, arch: str = "i386", *, flaw: bool = False, rounds: int = 2) -> Path:
    """Build the kernel of `kind` ("array" or "list") for `arch` into out/, with the flaw or without; its path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed (Debian package gcc)")
    name = f"zoo-c-{kind}-{arch}{'-flaw' if flaw else ''}"
    (out / f"{name}.S").write_text(BOOT)
    (out / f"{name}.c").write_text(KERNEL)
    (out / f"{name}.ld").write_text(LINKER_SCRIPT.format(kbase=KBASE[arch]))
    elf = out / f"{name}.elf"
    subprocess.run([gcc, *CFLAGS[arch], "-ffreestanding", "-fno-pic", "-no-pie", "-nostdlib", "-static", "-g", "-O1",
                    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-builtin",
                    f"-DKIND_LIST={int(kind == 'list')}", f"-DFLAW={int(flaw)}",
                    f"-DROUNDS={rounds}", f"-DUSER_CODE={USER_CODE:#x}UL", f"-DUSER_PEEK={USER_PEEK:#x}UL",
                    "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-T", out / f"{name}.ld",
                    "-o", elf, out / f"{name}.S", out / f"{name}.c"], check=True, capture_output=True, text=True)
    return elf
