"""The build pipeline: config -> layout -> assembled units -> linked image -> ELF -> ISO."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import asm, link
from .config import Config
from .image import LinkedImage
from .layout import Layout, compute
from .resources import templates_dir

# The kernel's units, in the order their pieces are placed within each section.
KERNEL_UNITS = ("multiboot", "boot", "gdt", "idt", "serial", "debugexit", "report")


@dataclass(frozen=True)
class Kernel:
    layout: Layout
    linked: link.LinkResult

    @property
    def image(self) -> LinkedImage:
        return self.linked.image


def kernel_pieces(templates: Path | None = None) -> list[asm.Piece]:
    templates = templates or templates_dir()
    return [piece for unit in KERNEL_UNITS for piece in asm.load_unit(templates, unit)]


def link_kernel(config: Config) -> Kernel:
    layout = compute(config)
    return Kernel(layout, link.link(kernel_pieces(), layout, layout.asm_constants()))
