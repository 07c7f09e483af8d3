"""The build pipeline: config -> layout -> assembled units -> linked image -> ELF -> ISO."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from kgen.build import asm

from kgen.build import link
from kgen.build.config import Config
from kgen.build.image import LinkedImage
from kgen.build.layout import Layout, compute
from kgen.build.resources import templates_dir

# The kernel's units, in the order their pieces are placed within each section. `{arch}/` units are the entry,
# GDT and IDT of one architecture (templates/i386/, templates/x86_64/); every other unit serves both word sizes.
KERNEL_UNITS = ("multiboot", "bootinfo", "{arch}/boot", "{arch}/gdt", "{arch}/idt", "interrupts", "pic", "serial",
                "debugexit", "string", "report", "calls", "peek")
# The memory managers, the same templates for both word sizes.
MEMORY_UNITS = ("paging", "tempmap", "pmm", "vmm", "vrange", "heap", "bench")


def kernel_units(arch: str) -> tuple[str, ...]:
    return tuple(unit.format(arch=arch) for unit in KERNEL_UNITS) + MEMORY_UNITS


@dataclass(frozen=True)
class Kernel:
    layout: Layout
    linked: link.LinkResult

    @property
    def image(self) -> LinkedImage:
        return self.linked.image


def generated_pieces(layout: Layout) -> list[asm.Piece]:
    """The layout's string constants and per-level paging tables as labelled .rodata, so templates name them like
    any other data: `paging_level_shift` (a byte per level, top first) and `paging_level_entries` (a word per
    level: where that level's entries appear through the recursive slot)."""
    lines = [".section .rodata"]
    for label, text in layout.asm_strings().items():
        if not text.isascii() or '"' in text or "\\" in text:
            raise ValueError(f"string constant {label} must be plain ASCII")
        lines += [f"{label}:", f'    .asciz "{text}"']
    levels = range(layout.architecture.levels)
    lines += [".balign 8", "paging_level_entries:"] + [f"    .xword LEVEL{n}_ENTRIES" for n in levels]
    lines += ["paging_level_shift:"] + [f"    .byte LEVEL{n}_SHIFT" for n in levels]
    return asm.parse_unit("layout_strings", "\n".join(lines), layout.architecture)


def kernel_pieces(layout: Layout, templates: Path | None = None) -> list[asm.Piece]:
    templates = templates or templates_dir()
    units = [piece for unit in kernel_units(layout.arch) for piece in
             asm.load_unit(templates, unit, layout.architecture)]
    return units + generated_pieces(layout)


def link_kernel(config: Config) -> Kernel:
    layout = compute(config)
    return Kernel(layout, link.link(kernel_pieces(layout), layout, layout.asm_constants()))


@dataclass(frozen=True)
class BuildOutput:
    kernel: Kernel
    elf: Path
    iso: Path | None
    rebuilt: bool


FINGERPRINT_NAME = ".kgen-build"



def fingerprint(config: Config) -> str:
    """What the outputs depend on: the config, the templates, kgen's own source and the boot tree."""
    from kgen.build.resources import boot_dir
    digest = hashlib.sha256(repr(dataclasses.replace(config, source="")).encode())
    package = Path(__file__).resolve().parent.parent  # all of kgen, not only this stage
    for root in (templates_dir(), boot_dir(), package):
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".s", ".inc", ".py", ".cfg"):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def build(config: Config, out_dir: Path, *, iso: bool = True, force: bool = True) -> BuildOutput:
    """Write out_dir/kernel.elf and, with `iso`, out_dir/kernel.iso. Each appears whole or not at all.

    Without `force`, outputs whose fingerprint matches the inputs are kept as they are.
    """
    from kgen.build import elf as elf_module
    from kgen.build.elf import write_elf
    from kgen.build.iso import make_iso

    out_dir.mkdir(parents=True, exist_ok=True)
    elf_path, iso_path = out_dir / "kernel.elf", out_dir / "kernel.iso"
    stamp = out_dir / FINGERPRINT_NAME
    kernel = link_kernel(config)
    wanted = fingerprint(config)
    fresh = (not force and stamp.exists() and stamp.read_text() == wanted and elf_path.exists()
             and (not iso or iso_path.exists()))
    if fresh:
        return BuildOutput(kernel, elf_path, iso_path if iso else None, rebuilt=False)
    stamp.unlink(missing_ok=True)
    write_elf(kernel.image, elf_path, target=getattr(elf_module, kernel.layout.architecture.elf_target))
    if iso:
        make_iso(elf_path, iso_path)
    stamp.write_text(wanted)
    return BuildOutput(kernel, elf_path, iso_path if iso else None, rebuilt=True)
