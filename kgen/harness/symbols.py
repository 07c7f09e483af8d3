"""--symbols ELF[@OFFSET]: the ELF a kernel's checks judge when the file that boots is not it.

A loader stage (a Multiboot ELF that copies the real kernel, carried inside it, to where that kernel runs and jumps
to it) boots through --kernel, but its segments and symbols are the stage's: the checks would judge the wrong
program. --symbols names the real kernel's ELF (built beside the stage): its segments are what the segment checks
compare with the page tables, its symbols what --ready-at, --ready-symbol, fault reports and `kgen inspect` name.
`ELF@OFFSET` is an ELF the loader relocated: it runs OFFSET bytes (virtual; negative for down) above its link
addresses. Given more than once, the ELFs are judged as one kernel (kgen/guest/elfinfo.py `merged`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kgen.errors import KgenError, UsageError, input_file_problem
from kgen.guest.elfinfo import ElfInfo, merged


@dataclass(frozen=True)
class SymbolsFile:
    """One --symbols value: the ELF and the virtual offset it runs at above its link addresses."""
    path: Path
    offset: int = 0

    @classmethod
    def parse(cls, text: str) -> SymbolsFile:
        """`ELF` or `ELF@OFFSET` (OFFSET in hex 0x... or decimal, signed). A file whose own name holds an @ is
        taken whole when it exists. A bad OFFSET raises UsageError."""
        path, at, offset = str(text).rpartition("@")
        if not at or Path(text).is_file():
            return cls(Path(text))
        try:
            value = int(offset, 0)
        except ValueError:
            raise UsageError(f"--symbols {text}: {offset!r} is not an offset: give ELF@OFFSET with OFFSET in bytes, "
                             "hex (0x...) or decimal, negative for a kernel moved down") from None
        if not path:
            raise UsageError(f"--symbols {text}: no ELF before the @: give ELF@OFFSET")
        if not -(1 << 64) < value < 1 << 64:
            raise UsageError(f"--symbols {text}: {offset} is beyond any 64-bit address")
        return cls(Path(path), value)

    def load(self) -> ElfInfo:
        """The ELF as it runs (moved by the offset); a file that is missing or no ELF raises UsageError."""
        problem = input_file_problem(self.path)
        if problem:
            raise UsageError(f"--symbols {self.path}: {problem}: name the ELF of the kernel the loader stage carries")
        try:
            elf = ElfInfo.load(self.path)
        except KgenError as err:
            raise UsageError(f"--symbols {err}") from None
        return elf.relocated(self.offset)


def judged_elf(values) -> ElfInfo | None:
    """The ELF the checks judge for these --symbols values (strings as given), None for none given."""
    files = [SymbolsFile.parse(value) for value in values or ()]
    return merged([file.load() for file in files]) if files else None
