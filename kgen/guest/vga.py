"""The VGA text screen of a guest: what a kernel that prints only to the screen has said (`--ready-vga TEXT`, and
the failure report of a kernel whose COM1 is empty).

In text mode 3, which the BIOS leaves set, the screen is 80 x 25 cells at physical 0xB8000, row after row; each
cell is two bytes, the character (code page 437) and its colour attribute. Writing there is the first thing most
hobby kernels do ("Bare Bones" writes `0x0F00 | c` words).

The window is the VGA device's memory, not RAM: QEMU maps `vga-lowmem` over 0xA0000-0xBFFFF, so the bytes do not
come from the guest-RAM file (kgen/machine/ram.py keeps that window out of its mapping) but through QEMU's memory
API (`Machine.read_phys` falls back to QMP `pmemsave`, ≈1 ms for the 4000 bytes). The BIOS's own lines
("SeaBIOS (version ...)", "Booting from ROM...") are on the screen too until the kernel clears it.
"""
from __future__ import annotations

from kgen.arch.hw import (VGA_TEXT_BUFFER as TEXT_BUFFER, VGA_TEXT_CELL as CELL, VGA_TEXT_CODEPAGE as CODEPAGE,
                          VGA_TEXT_COLUMNS as COLUMNS, VGA_TEXT_ROWS as ROWS)


def decode_rows(cells: bytes) -> list[str]:
    """The screen's rows as text: each cell's character byte (attributes dropped), NUL shown as a space, trailing
    spaces cut."""
    chars = bytes(cells[0::CELL]).replace(b"\0", b" ")
    text = chars.decode(CODEPAGE)
    return [text[row * COLUMNS:(row + 1) * COLUMNS].rstrip() for row in range(len(text) // COLUMNS)]


def screen_rows(machine) -> list[str]:
    """The 25 rows of the guest's VGA text screen now."""
    return decode_rows(machine.read_phys(TEXT_BUFFER, COLUMNS * ROWS * CELL))


def shows(rows: list[str], text: str) -> bool:
    """Whether `text` is on the screen: within a row, or running on from one row into the next (a long line the
    kernel let wrap at column 80)."""
    if any(text in row for row in rows):
        return True
    return text in "".join(row.ljust(COLUMNS) for row in rows)


def non_empty_lines(rows: list[str]) -> list[str]:
    return [row for row in rows if row.strip()]
