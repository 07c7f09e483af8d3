"""A kernel whose ready point races a process switch: the address space live when `--ready TEXT` stops the machine
depends on timing, the way it did on a teaching kernel with processes (issue 22, "Which space, every run").

i386, written in C with tests/zoo_c.py's boot stub and linker script (higher-half at 0xC0000000, 4 MiB pages). `kmain`
builds the kernel's own top-level table (`kpgdir`: the kernel half, 16 MiB of large supervisor pages) and one process
space (`proc_pgdir`, its physical address in `proc_cr3`: the kernel half's entries copied, one user page at
USER_CODE), loads a GDT and an IDT of its own in the kernel half, starts the PIT at TICK_HZ and prints READY on COM1.
From then on it idles in `hlt`, interrupts on, and every timer tick loads the other space into CR3: own, process,
own... so the machine stopped "when READY appeared" is in either, half the time each.

FLAW=1: after the process space copied the kernel half, the kernel's own table gets its first kernel-half entry
(the 4 MiB page holding the image) user-accessible: ring 3 could read and write the kernel, but only while the
kernel's own space is live, so a check of CR3 alone finds it in some runs only.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from zoo_c import BOOT, CFLAGS, KBASE, LINKER_SCRIPT

READY = "zoo-race: ready"
USER_CODE = 0x400000
TICK_HZ = 1000
FLAWED_ENTRY = KBASE["i386"] >> 22      # the PD entry of the image's 4 MiB page

KERNEL = r"""
typedef unsigned long uword;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned int pte_t;
#define KBASE 0xC0000000UL
#define PAGE 4096
#define PTE_P 1
#define PTE_W 2
#define PTE_U 4
#define PTE_PS 0x80
#define V2P(a) ((uword)(a) - KBASE)
#define P2V(a) ((void *)((uword)(a) + KBASE))

static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline void lcr3(uword top) { __asm__ volatile("mov %0, %%cr3" : : "r"(top) : "memory"); }
static void puts(const char *s) { while (*s) outb(0x3F8, *s++); }
static void fill(void *at, u8 value) { for (int i = 0; i < PAGE; i++) ((volatile u8 *)at)[i] = value; }

static uword next_frame = 0x400000;         /* physical: frames above the image, inside the 16 MiB mapped */
static void *alloc_page(void) { void *page = P2V(next_frame); next_frame += PAGE; fill(page, 0); return page; }

pte_t *kpgdir;                              /* the kernel's own top-level table (as xv6 names it) */
pte_t *proc_pgdir;                          /* the one process's */
uword proc_cr3;                             /* ... its physical address: `--address-spaces proc_cr3,1` */
volatile unsigned ticks;

static void kernel_space(void) {
    kpgdir = alloc_page();
    for (uword i = 0; i < 4; i++)
        kpgdir[768 + i] = (i << 22) | PTE_P | PTE_W | PTE_PS;
    lcr3(V2P(kpgdir));
}

static pte_t *new_space(void) {
    pte_t *top = alloc_page(), *table = alloc_page();
    for (int i = 512; i < 1024; i++)
        top[i] = kpgdir[i];
    top[USER_CODE >> 22] = V2P(table) | PTE_P | PTE_W | PTE_U;
    table[(USER_CODE >> 12) & 1023] = V2P(alloc_page()) | PTE_P | PTE_W | PTE_U;
    return top;
}

/* The timer: each tick makes the other space live. */
void on_tick(void) {
    ticks++;
    lcr3(ticks & 1 ? V2P(proc_pgdir) : V2P(kpgdir));
    outb(0x20, 0x20);
}
__asm__(".globl timer_entry\n timer_entry:\n pusha\n cld\n call on_tick\n popa\n iret\n");
void timer_entry(void);

static unsigned long long gdt[3] = {0, 0x00CF9A000000FFFFULL, 0x00CF92000000FFFFULL};
static unsigned long long idt[256];
static struct __attribute__((packed)) { u16 limit; u32 base; } gdtr, idtr;

static void tables(void) {                  /* the loader's GDT lies low, where kpgdir maps nothing */
    gdtr.limit = sizeof gdt - 1;
    gdtr.base = (u32)gdt;
    __asm__ volatile("lgdt %0\n ljmp $0x08, $1f\n 1: mov $0x10, %%ax\n mov %%ax, %%ds\n mov %%ax, %%es\n"
                     " mov %%ax, %%ss\n mov %%ax, %%fs\n mov %%ax, %%gs" : : "m"(gdtr) : "eax", "memory");
    u32 entry = (u32)timer_entry;
    idt[0x20] = (entry & 0xFFFF) | (0x08 << 16) | ((unsigned long long)((entry & 0xFFFF0000) | 0x8E00) << 32);
    idtr.limit = sizeof idt - 1;
    idtr.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* PIC: IRQs 0-7 at vectors 0x20-0x27, 8-15 at 0x28-0x2F, all masked but the timer's */
    outb(0x20, 0x11); outb(0xA0, 0x11); outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 4); outb(0xA1, 2); outb(0x21, 1); outb(0xA1, 1);
    outb(0x21, 0xFE); outb(0xA1, 0xFF);
    unsigned divisor = 1193182 / TICK_HZ;
    outb(0x43, 0x36); outb(0x40, divisor & 0xFF); outb(0x40, divisor >> 8);
}

void kmain(void) {
    kernel_space();
    proc_pgdir = new_space();
    proc_cr3 = V2P(proc_pgdir);
#if FLAW
    kpgdir[768] |= PTE_U;
#endif
    tables();
    __asm__ volatile("sti");
    puts("zoo-race: ready\n");
    for (;;)
        __asm__ volatile("hlt");
}
"""


def race_kernel(out: Path, *, flaw: bool) -> Path:
    """Build the racing kernel (i386) into out/, with the flaw in the kernel's own space or without; its path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed (Debian package gcc)")
    name = f"zoo-race{'-flaw' if flaw else ''}"
    (out / f"{name}.S").write_text(BOOT)
    (out / f"{name}.c").write_text(KERNEL)
    (out / f"{name}.ld").write_text(LINKER_SCRIPT.format(kbase=KBASE["i386"]))
    elf = out / f"{name}.elf"
    subprocess.run([gcc, *CFLAGS["i386"], "-ffreestanding", "-fno-pic", "-no-pie", "-nostdlib", "-static", "-g",
                    "-O1", "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-builtin",
                    f"-DFLAW={int(flaw)}", f"-DTICK_HZ={TICK_HZ}", f"-DUSER_CODE={USER_CODE:#x}UL",
                    "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-T", out / f"{name}.ld",
                    "-o", elf, out / f"{name}.S", out / f"{name}.c"], check=True, capture_output=True, text=True)
    return elf
