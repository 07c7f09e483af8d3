"""The architecture record: everything that differs between the i386 and the x86_64 kernel, in one place.

The layout, the assembler, the ELF writer, the walker, the invariants, the call channel and the machine all read an
`Arch`; none of them says "i386" or "x86_64" itself. Paging geometry (levels, index bits, entry size, which levels
may map large pages) is a `PagingMode` (`kgen.arch.paging`), which the walker reads too, so the numbers the kernel is
built with and the numbers its page tables are checked with are the same object.

Templates see the word size through a handful of selectors (Linux's asm.h does the same for its 32/64-bit sources):

    xax xbx xcx xdx xsi xdi xbp xsp   the word-sized registers: eax.. on i386, rax.. on x86_64
    xword ptr                         dword ptr / qword ptr
    .xword                            .long / .quad
    WORD_SIZE, WORD_SHIFT             4, 2 / 8, 3
    ARCH_I386, ARCH_X86_64            1 or 0: the instruction set, for `.if` around lines written for one of them

so one template serves both word sizes; only the entry, GDT, IDT and interrupt frames live per architecture, in
`templates/<arch>/`. What the kernel does differently beyond the instruction set is a feature of the record, and
the templates ask the feature, not the name (`kgen.build.layout` exports them): HAS_NX (with the SET_NX macro),
KERNEL_HALF_GENERATION, CLIPS_RAM_AT_4G; the IRET macro picks the interrupt return of the word size. A third paging
mode (i386 PAE, LA57) is then one more record here plus the templates it needs (docs/design.md, "Adding a paging mode").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from elftools.elf.constants import P_FLAGS
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from kgen.arch import hw
from kgen.arch.paging import I386 as I386_PAGING
from kgen.arch.paging import X86_64 as X86_64_PAGING
from kgen.arch.paging import PagingMode

_WORD_REGISTERS = ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")


@dataclass(frozen=True)
class Arch:
    name: str                     # the config's `arch` value
    word_size: int                # bytes in a general register, a pointer, a call-channel argument
    paging: PagingMode            # levels, index bits, entry size, large-page levels
    keystone_mode: int            # 32 or 64: the mode kernel code is assembled in (an entry may switch with .code32)
    elf_target: str               # name of the kgen.build.elf.ElfTarget the image is written as
    qemu: str                     # QEMU binary that runs the kernel
    gas_flags: tuple[str, ...]    # GNU as flags for the keystone-against-GNU-as comparison
    ld_emulation: str             # GNU ld -m value for the same comparison
    objdump_machine: str          # objdump -m value for decoding the kernel's code
    boot_protocol: str            # how a loader enters the kernel
    va_bits: int                  # canonical virtual-address width (32 for i386)
    max_memory_mib: int           # guest RAM the kernel can use: below QEMU pc's PCI hole, or above 4 GiB too
    memory_limit_reason: str
    # Config defaults a kernel of this architecture would pick (see config.py for their meaning).
    defaults: tuple[tuple[str, int], ...]
    # ---- how kgen's kernel differs, beyond word size and paging geometry ----------------------------------------
    kernel_half_at_base: bool     # the kernel half starts at kernel.virtual_base (the user's split, 3 GiB by default);
                                  # else it is the upper canonical half
    kernel_half_generation: bool  # spaces copy the kernel half's top-level entries and re-copy them on a switch
                                  # when vmm_kernel_pde_generation moved; else vmm_init gives every kernel-half
                                  # top-level entry its table at boot and those tables never go
    boot_shares_tables: bool      # the boot stub points the image's identity and higher-half top-level entries at
                                  # the same page tables (kernel.virtual_base aligned to a top-level entry's span)
    # GDT selectors (RPL 0) of ring 3's code and data and of the TSS: i386 puts user code and data after the
    # kernel's and the TSS last; x86_64 the TSS (two slots) first, then user data and code, the order sysret wants.
    user_code_selector: int
    user_data_selector: int
    tss_selector: int

    def __str__(self) -> str:
        return self.name

    # ---- features that follow from the above ------------------------------------------------------------------
    @property
    def long_mode(self) -> bool:
        """The kernel's code runs in 64-bit mode: the x86_64 instruction set, 64-bit code segments, interrupt gates
        and TSS (the templates' ARCH_X86_64; ARCH_I386 is its negation)."""
        return self.keystone_mode == 64

    @property
    def has_nx(self) -> bool:
        """Entries have an XD bit (bit 63): the kernel turns EFER.NXE on and maps data and windows no-execute."""
        return bool(self.paging.nx_levels)

    @property
    def clips_ram_at_4g(self) -> bool:
        """The PMM keeps a frame's address in a word: with 4-byte words it takes no RAM at or above 4 GiB."""
        return self.word_size == 4

    @property
    def code_segment_flags(self) -> int:
        """GDT flags of a code descriptor: 32-bit protected mode, or L (64-bit) in long mode."""
        return hw.SEG_FLAGS_64BIT_CODE if self.long_mode else hw.SEG_FLAGS_32BIT_4K

    @property
    def interrupt_gate(self) -> int:
        return hw.IDT_GATE_INTERRUPT64 if self.long_mode else hw.IDT_GATE_INTERRUPT32

    def hex(self, value: int) -> str:
        """`value` as a register of this mode prints: 8 hex digits, 16 in long mode (0x-prefixed)."""
        return f"{value:#0{2 * self.word_size + 2}x}"

    @staticmethod
    def for_elf(elf) -> Arch:
        """The architecture of a kernel kgen did not build (`elf`: a kgen.guest.elfinfo.ElfInfo), by what its code
        does rather than by its ELF class alone: a Multiboot kernel always enters in 32-bit protected mode, and a
        64-bit one often comes wrapped in an ELF32 (GRUB's and QEMU's Multiboot loaders take an ELF32 as is).

        An ELF64 is x86_64. An ELF32 is x86_64 when its loaded bytes hold both things a switch to long mode from that
        32-bit entry cannot do without: the EFER MSR's number loaded for wrmsr (`mov ecx, 0xC0000080`) in executable
        code, and a 64-bit code descriptor (L set, D clear) in a GDT. Either alone does not decide it: an i386 PAE
        kernel writes EFER to turn NX on, and a descriptor is eight bytes that data could hold by chance. A kernel
        that builds its GDT at run time is judged i386 (its QEMU would then be qemu-system-i386); see
        `long_mode_evidence`.
        """
        if elf.bits == 64:
            return X86_64
        return X86_64 if long_mode_evidence(elf.path) else I386

    @staticmethod
    def for_cpu(long_mode: bool) -> Arch:
        """The architecture whose code a CPU in this mode runs (x86_64 in long mode): how its registers are named
        and printed, whatever the ELF it was booted from."""
        return X86_64 if long_mode else I386

    @property
    def ip_name(self) -> str:
        """The instruction pointer's name: EIP, RIP in long mode."""
        return "RIP" if self.long_mode else "EIP"

    # ---- word size --------------------------------------------------------------------------------------------
    @property
    def word_shift(self) -> int:
        return self.word_size.bit_length() - 1

    @property
    def word_mask(self) -> int:
        return (1 << 8 * self.word_size) - 1

    @property
    def register_prefix(self) -> str:
        return "e" if self.word_size == 4 else "r"

    def selectors(self) -> dict[str, str]:
        """Template word -> what this architecture assembles it as."""
        table = {f"x{r}": self.register_prefix + r for r in _WORD_REGISTERS}
        table["xword"] = "dword" if self.word_size == 4 else "qword"
        table[".xword"] = ".long" if self.word_size == 4 else ".quad"
        return table

    def apply_selectors(self, line: str) -> str:
        """Replace the word-size selectors in one template line (outside string literals)."""
        return _select(line, self.selectors())

    # ---- paging geometry ----------------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return self.paging.levels

    @property
    def entry_size(self) -> int:
        return self.paging.entry_size

    @property
    def entries_per_table(self) -> int:
        """Entries in every table (both architectures use the same count at every level)."""
        return 1 << self.paging.index_bits[-1]

    @property
    def index_bits(self) -> int:
        return self.paging.index_bits[-1]

    def shift(self, level: int) -> int:
        """log2 of the span one entry at `level` (0 = the top table) covers."""
        return self.paging.shift(level)

    def span(self, level: int) -> int:
        return 1 << self.shift(level)

    @property
    def va_mask(self) -> int:
        return (1 << self.va_bits) - 1

    def canonical(self, vaddr: int) -> int:
        return self.paging.sign_extend(vaddr & self.va_mask)

    def is_canonical(self, vaddr: int) -> bool:
        return self.paging.contains(vaddr)

    def recursive_window(self, slot: int, level: int, foreign: int | None = None) -> int:
        """Virtual address where the entries of `level` (0 = top) appear when top-level entry `slot` points at
        its own table.

        The leaf entries (PTEs) of all of memory fill the slot's window R in address order. The entries one level up
        are the PTEs of that window itself, so they sit at R + (W >> 12) * entry, W being the level below's window;
        the top table's entries come last, at the page where all indices equal the slot.

        With `foreign`, a second top-level entry that points at another space's top-level table: that space's leaf
        entries fill the foreign slot's window F, and each level up is again reached through `slot` (the current
        space's own self-map), so its top table appears at the page whose indices are slot, slot, ..., foreign.
        """
        window = self.canonical((slot if foreign is None else foreign) << self.shift(0))
        for _ in range(self.levels - 1 - level):
            window = self.canonical((slot << self.shift(0)) + ((window & self.va_mask) >> self.shift(self.levels - 1))
                                    * self.entry_size)
        return window

    def entry_address(self, slot: int, vaddr: int, level: int) -> int:
        """The virtual address of the entry that maps `vaddr` at `level`, reached through recursive slot `slot`."""
        return self.recursive_window(slot, level) + ((vaddr & self.va_mask) >> self.shift(level)) * self.entry_size

    @property
    def kernel_half(self) -> int:
        """The lowest address of the kernel half: the top-level entries from here on are shared by every space."""
        return self.canonical(1 << (self.va_bits - 1))


def _select(line: str, table: dict[str, str]) -> str:
    pattern = re.compile(r"(?<![\w.$])(" + "|".join(map(re.escape, sorted(table, key=len, reverse=True)))
                         + r")(?![\w$])")
    parts = re.split(r'("(?:[^"\\]|\\.)*")', line)
    return "".join(part if i % 2 else pattern.sub(lambda m: table[m.group(1)], part) for i, part in enumerate(parts))


I386 = Arch(
    name="i386", word_size=4, paging=I386_PAGING, keystone_mode=32, elf_target="ELF32_I386",
    qemu="qemu-system-i386", gas_flags=("--32",), ld_emulation="elf_i386", objdump_machine="i386",
    boot_protocol="multiboot1", va_bits=32, max_memory_mib=3072,
    memory_limit_reason="RAM below the PCI hole of QEMU's pc machine; the i386 PMM cannot reach RAM above 4 GiB",
    defaults=(("kernel_virtual_base", 0xC0000000), ("paging_recursive_slot", 1023),
              ("paging_foreign_slot", 1021),
              ("tempmap_base", 0xFF800000), ("vmm_base", 0xD0000000), ("vmm_size", 0x10000000)),
    # The kernel half's PDEs point at page tables, made on demand and given back: a generation count, not tables
    # made at boot (templates/aspace.s).
    kernel_half_at_base=True, kernel_half_generation=True, boot_shares_tables=True,
    user_code_selector=0x18, user_data_selector=0x20, tss_selector=0x28,
)

X86_64 = Arch(
    name="x86_64", word_size=8, paging=X86_64_PAGING, keystone_mode=64, elf_target="ELF64_X86_64",
    qemu="qemu-system-x86_64", gas_flags=("--64",), ld_emulation="elf_x86_64", objdump_machine="i386:x86-64",
    boot_protocol="multiboot1 (ELF64 with the a.out-kludge address fields), 32-bit entry into long mode",
    va_bits=48, max_memory_mib=16384,
    memory_limit_reason="QEMU's pc machine moves RAM past 3 GiB above 4 GiB, where the memory map reports it and the "
                        "PMM uses it; 16 GiB keeps a poisoned RAM file of the harness affordable",
    # The top 2 GiB for the image (mcmodel=kernel), PML4[510] recursive: its window is 0xFFFFFF0000000000.., below
    # the image's PML4[511]; the temp-map and vmm windows sit in PML4[509] and PML4[508], the foreign window in
    # PML4[507].
    defaults=(("kernel_virtual_base", 0xFFFFFFFF80000000), ("paging_recursive_slot", 510),
              ("paging_foreign_slot", 507),
              ("tempmap_base", 0xFFFFFE8000000000), ("vmm_base", 0xFFFFFE0000000000),
              ("vmm_size", 0x10000000)),
    # The kernel half's PML4 entries point at PDPTs, a level above the tables that come and go: made once at boot,
    # so a copy of the 256 entries never falls out of step (templates/vmm.s).
    kernel_half_at_base=False, kernel_half_generation=False, boot_shares_tables=False,
    user_code_selector=0x30, user_data_selector=0x28, tss_selector=0x18,
)

ARCHES: dict[str, Arch] = {a.name: a for a in (I386, X86_64)}

# `mov ecx, imm32` with EFER's MSR number (0xC0000080): how 32-bit code names the MSR it then writes with wrmsr.
_MOV_ECX_EFER = b"\xb9" + hw.MSR_EFER.to_bytes(4, "little")


def long_mode_evidence(path) -> bool:
    """Whether the ELF at `path` names EFER in executable code and holds a 64-bit code descriptor in its loaded
    bytes (`Arch.for_elf`). The descriptor is looked for at 8-byte-aligned virtual addresses, where a GDT's entries
    are: present, a code segment (S and the code type bit), L = 1, D = 0, base 0 (long mode ignores the base; every
    kernel writes 0)."""
    try:
        with open(path, "rb") as stream:
            loads = [(seg["p_vaddr"], seg["p_flags"], seg.data()) for seg in ELFFile(stream).iter_segments()
                     if seg["p_type"] == "PT_LOAD"]
    except (OSError, ELFError):     # an ELF kgen.guest.elfinfo read but whose segments are cut short: no evidence
        return False
    names_efer = any(flags & P_FLAGS.PF_X and _MOV_ECX_EFER in data for _, flags, data in loads)
    return names_efer and any(_holds_long_mode_descriptor(vaddr, data) for vaddr, _, data in loads)


def _holds_long_mode_descriptor(vaddr: int, data: bytes) -> bool:
    for offset in range(-vaddr % 8, len(data) - 7, 8):
        value = int.from_bytes(data[offset:offset + 8], "little")
        access, flags, base = value >> 40 & 0xFF, value >> 52 & 0xF, (value >> 16 & 0xFF_FFFF) | value >> 56
        if (access & hw.SEG_ACCESS_CODE == hw.SEG_ACCESS_CODE
                and flags & (hw.SEG_FLAG_L | hw.SEG_FLAG_D) == hw.SEG_FLAG_L and base == 0):
            return True
    return False


def named(name: str) -> Arch:
    """The record a user's or a report's architecture name stands for (`arch = "x86_64"`, --arch): the one place a
    name becomes an Arch."""
    return ARCHES[name]
