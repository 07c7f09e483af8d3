"""Paging modes as data: entry width, index bits per level, which levels may map large pages, reserved bits.

The walker (`kgen.guest.pagewalk`) walks any of them with one piece of code, and an `Arch` (`kgen.arch`) names the
one its kernel is built for, so the numbers a kernel is built with and the numbers its tables are checked with are
the same object. PAE has no kgen kernel yet; the walker reads foreign PAE tables with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from kgen.arch.hw import PTE_FRAME_MASK, PTE_PS


@dataclass(frozen=True)
class PagingMode:
    name: str
    title: str                       # as reports name the mode: "32-bit", "PAE", "4-level"
    entry_size: int                  # bytes per entry
    index_bits: tuple[int, ...]      # virtual-address bits that index each level, top level first
    level_names: tuple[str, ...]     # for messages, top level first
    large_levels: frozenset[int]     # levels where PS makes the entry map a page instead of a table
    large_needs_pse: bool            # non-PAE paging honours PS only when CR4.PSE is on
    rights_levels: frozenset[int]    # levels whose RW and US bits restrict access (PAE PDPTEs have none)
    frame_mask: int                  # address bits of an entry pointing to a table or a 4 KiB page
    cr3_mask: int                    # address bits of CR3 locating the top-level table
    reserved: tuple[int, ...]        # per level, bits that must be clear in a present entry
    canonical: bool = False          # addresses sign-extend above the top index bit (x86-64)
    nx_levels: frozenset[int] = frozenset()  # levels whose bit 63 is XD with EFER.NXE on, reserved with it off
    # The widest physical address an entry can hold: 52 bits in a 64-bit entry; 40 in a 32-bit 4 MiB PDE, whose bits
    # 20:13 hold address bits 39:32 (PSE-36). A CPU reserves the address bits at and above its own MAXPHYADDR.
    max_phys_bits: int = 52

    @property
    def levels(self) -> int:
        return len(self.index_bits)

    @property
    def va_bits(self) -> int:
        return 12 + sum(self.index_bits)

    def shift(self, level: int) -> int:
        """log2 of the span one entry at `level` covers."""
        return 12 + sum(self.index_bits[level + 1:])

    def sign_extend(self, vaddr: int) -> int:
        top = 1 << (self.va_bits - 1)
        if self.canonical and vaddr & top:
            return vaddr | ((1 << 64) - (top << 1))
        return vaddr

    @property
    def upper_half(self) -> int | None:
        """The first address of the upper canonical half (x86-64's kernel half by its own definition), None for a
        mode whose addresses do not sign-extend (32-bit and PAE paging: where the kernel half starts is the
        kernel's choice)."""
        return self.sign_extend(1 << (self.va_bits - 1)) if self.canonical else None

    def contains(self, vaddr: int) -> bool:
        if self.canonical:
            return self.sign_extend(vaddr & ((1 << self.va_bits) - 1)) == vaddr
        return 0 <= vaddr < 1 << self.va_bits


I386 = PagingMode(
    name="i386", title="32-bit", entry_size=4, index_bits=(10, 10), level_names=("PD", "PT"),
    large_levels=frozenset({0}), large_needs_pse=True, rights_levels=frozenset({0, 1}),
    frame_mask=PTE_FRAME_MASK, cr3_mask=PTE_FRAME_MASK,
    reserved=(0, 0),
    max_phys_bits=40,
)

# `reserved` holds the bits every CPU reserves; the address bits at and above the CPU's MAXPHYADDR, which the Walker
# is told (`maxphyaddr`), are reserved too. Bit 63 (XD) of the levels in nx_levels is execute-disable or reserved
# depending on EFER.NXE, which the Walker is told (`nxe`).
_ADDR52 = 0x000F_FFFF_FFFF_F000

PAE = PagingMode(
    name="pae", title="PAE", entry_size=8, index_bits=(2, 9, 9), level_names=("PDPT", "PD", "PT"),
    large_levels=frozenset({1}), large_needs_pse=False, rights_levels=frozenset({1, 2}),
    frame_mask=_ADDR52, cr3_mask=0xFFFF_FFE0,
    # A PDPTE has no RW, US, A, D, PS or G; PAE reserves bits 62:52 everywhere and 63 in the PDPTE too: a PDPTE has
    # no XD either.
    reserved=(0xFFF0_0000_0000_01E6, 0x7FF0_0000_0000_0000, 0x7FF0_0000_0000_0000),
    nx_levels=frozenset({1, 2}),
)

X86_64 = PagingMode(
    name="x86-64", title="4-level", entry_size=8, index_bits=(9, 9, 9, 9), level_names=("PML4", "PDPT", "PD", "PT"),
    large_levels=frozenset({1, 2}), large_needs_pse=False, rights_levels=frozenset({0, 1, 2, 3}),
    frame_mask=_ADDR52, cr3_mask=_ADDR52,
    # Bits 62:52 are free for software in 4-level paging; only PS in a PML4E is reserved.
    reserved=(PTE_PS, 0, 0, 0),
    canonical=True,
    nx_levels=frozenset({0, 1, 2, 3}),
)
