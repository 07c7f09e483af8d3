"""CPU registers of a stopped (or running) QEMU guest, parsed from HMP `info registers`.

QEMU 7.2 has no structured register query over QMP, so the text of `info registers` is the interface; this module
is the one place that knows its format. A 32-bit CPU prints `EAX=xxxxxxxx ... EIP= EFL=`; a CPU in long mode (on
qemu-system-x86_64) prints `RAX=<16 digits> ... RIP= RFL=`, R8-R15, 64-bit CR2/CR3 and wider segment and
descriptor-table bases. Both land in the same fields, so `eax` holds RAX and `eip` RIP when `long_mode` is set;
`r8`..`r15` are None outside long mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kgen.arch import Arch

# `NAME=hex` pairs; segment lines put a space before `=` ("CS =0008 ..."), and their first number is the selector.
_PAIR = re.compile(r"\b([A-Z][A-Z0-9]*)\s?=([0-9a-fA-F]+)\b")
# Descriptor-table lines have no selector: "GDT=     000cb2b8 00000027".
_TABLE = re.compile(r"^(GDT|IDT)=\s+([0-9a-fA-F]+)\s+([0-9a-fA-F]+)", re.MULTILINE)

_GENERAL = ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
_CONTROL = ("cr0", "cr2", "cr3", "cr4")
_EXTENDED = tuple(f"r{n}" for n in range(8, 16))     # printed "R8 =", "R9 =", "R10=" .. "R15=", long mode only


@dataclass(frozen=True)
class Registers:
    eax: int
    ebx: int
    ecx: int
    edx: int
    esi: int
    edi: int
    esp: int
    ebp: int
    eip: int
    eflags: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cs: int
    ds: int
    es: int
    fs: int
    gs: int
    ss: int
    gdtr_base: int
    gdtr_limit: int
    idtr_base: int
    idtr_limit: int
    cpl: int | None = None
    halted: bool | None = None
    efer: int | None = None
    long_mode: bool = False     # the CPU ran 64-bit code: the E* fields hold the R* registers
    r8: int | None = None       # R8-R15: long mode only
    r9: int | None = None
    r10: int | None = None
    r11: int | None = None
    r12: int | None = None
    r13: int | None = None
    r14: int | None = None
    r15: int | None = None

    @property
    def mode(self) -> Arch:
        """The architecture whose code the CPU ran: how these registers are named and printed (Arch.hex, ip_name)."""
        return Arch.for_cpu(self.long_mode)


def parse_info_registers(text: str) -> Registers:
    """Parse the first CPU's block of `info registers` (`info registers -a` prints one block per CPU).

    Raises ValueError naming the missing register when the text is not a register dump (e.g. an HMP error line).
    """
    blocks = re.split(r"^CPU#\d+\s*$", text, flags=re.MULTILINE)
    block = next((b for b in blocks if "=" in b), "")
    pairs: dict[str, int] = {}
    for name, value in _PAIR.findall(block):
        pairs.setdefault(name, int(value, 16))  # first wins: later lines (XMM, FPR) never reuse these names
    tables = {name: (int(base, 16), int(limit, 16)) for name, base, limit in _TABLE.findall(block)}

    long_mode = "RAX" in pairs
    prefix = "R" if long_mode else "E"

    def need(name: str) -> int:
        try:
            return pairs[name]
        except KeyError:
            raise ValueError(f"info registers: no {name}= in {block.strip()[:80]!r}") from None

    def table(name: str) -> tuple[int, int]:
        try:
            return tables[name]
        except KeyError:
            raise ValueError(f"info registers: no {name}= line") from None

    general = {f"e{r}": need(prefix + r.upper()) for r in _GENERAL}
    extended = {r: need(r.upper()) for r in _EXTENDED} if long_mode else {}
    (gdtr_base, gdtr_limit), (idtr_base, idtr_limit) = table("GDT"), table("IDT")
    return Registers(
        **general,
        eip=need(prefix + "IP"),
        eflags=need(prefix + "FL"),
        **{cr: need(cr.upper()) for cr in _CONTROL},
        **{seg: need(seg.upper()) for seg in _SEGMENTS},
        gdtr_base=gdtr_base,
        gdtr_limit=gdtr_limit,
        idtr_base=idtr_base,
        idtr_limit=idtr_limit,
        cpl=pairs.get("CPL"),
        halted=bool(pairs["HLT"]) if "HLT" in pairs else None,
        efer=pairs.get("EFER"),
        long_mode=long_mode,
        **extended,
    )
