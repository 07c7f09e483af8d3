"""Bootable GRUB ISOs, made by grub-mkrescue: kgen's own (the GRUB tree from boot/ plus the kernel), and one around
anyone's Multiboot or Multiboot 2 kernel (`make_boot_iso`).

Both are hybrid when the platforms are installed: grub-mkrescue puts GRUB for every platform it finds under
/usr/lib/grub into the image, so with grub-pc-bin (i386-pc) and grub-efi-amd64-bin (x86_64-efi) one ISO boots from
SeaBIOS (El Torito, no emulation) and from OVMF (an EFI system partition image, which grub-mkrescue writes with
mtools). BIOS GRUB is required; EFI GRUB is used when it is there (`grub_platforms`).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kgen.errors import KgenError, ToolMissing, UsageError, input_file_problem
from kgen.build.resources import boot_dir
from kgen.scratch import scratch_dir

# The programs and GRUB platform trees an ISO needs, and the Debian package that brings each (`kgen doctor` lists them).
GRUB_MKRESCUE = "grub-mkrescue"
GRUB_COMMON_PACKAGE = "grub-common"
GRUB_PC_MODULES = Path("/usr/lib/grub/i386-pc")
GRUB_PC_PACKAGE = "grub-pc-bin"
GRUB_EFI_MODULES = Path("/usr/lib/grub/x86_64-efi")
GRUB_EFI_PACKAGE = "grub-efi-amd64-bin"
XORRISO = "xorriso"             # the program and its package share the name
MFORMAT = "mformat"
MTOOLS_PACKAGE = "mtools"
# The GRUB modules the image carries beyond its core. EFI GRUB's early config probes every partition map it knows
# (`insmod part_*`); without them it prints one "file not found" line each, on COM1 under OVMF.
_GRUB_MODULES = ("multiboot multiboot2 normal configfile part_acorn part_amiga part_apple part_bsd part_dfly part_dvh "
                 "part_gpt part_msdos part_plan part_sun part_sunpc")

# GRUB's command that loads a kernel by its boot protocol, and the one that adds a module beside it.
GRUB_LOADERS = {"multiboot": ("multiboot", "module"), "multiboot2": ("multiboot2", "module2")}


def require_grub() -> str:
    tool = shutil.which(GRUB_MKRESCUE)
    if tool is None:
        raise ToolMissing(f"{GRUB_MKRESCUE} not found: install the Debian packages {GRUB_COMMON_PACKAGE} "
                          f"{GRUB_PC_PACKAGE} {XORRISO}")
    if not GRUB_PC_MODULES.is_dir():
        raise ToolMissing(f"{GRUB_PC_MODULES} missing: install the Debian package {GRUB_PC_PACKAGE} (BIOS GRUB)")
    if shutil.which(XORRISO) is None:
        raise ToolMissing(f"{XORRISO} not found: install the Debian package {XORRISO} (grub-mkrescue needs it)")
    if GRUB_EFI_MODULES.is_dir() and shutil.which(MFORMAT) is None:
        raise ToolMissing(f"{MFORMAT} not found: install the Debian package {MTOOLS_PACKAGE} (grub-mkrescue needs it "
                          "for the ISO's UEFI boot image)")
    return tool


def grub_platforms() -> tuple[str, ...]:
    """The firmware an ISO made here boots from: "bios" always (require_grub), "uefi" with EFI GRUB installed."""
    return ("bios", "uefi") if GRUB_EFI_MODULES.is_dir() else ("bios",)


def require_grub_efi() -> None:
    """Refuse, naming the package, to make an ISO meant for UEFI without EFI GRUB."""
    if not GRUB_EFI_MODULES.is_dir():
        raise ToolMissing(f"{GRUB_EFI_MODULES} missing: install the Debian package {GRUB_EFI_PACKAGE} (UEFI GRUB)")


def make_iso(kernel_elf: Path, iso: Path) -> None:
    """kgen's own ISO: boot/ (its grub.cfg boots /boot/kernel.elf) plus the kernel."""
    def fill(tree: Path) -> None:
        shutil.copytree(boot_dir(), tree / "boot")   # the ISO root holds /boot/grub/grub.cfg
        shutil.copyfile(kernel_elf, tree / "boot" / "kernel.elf")
    _mkrescue(fill, iso)


def grub_quote(word: str) -> str:
    """One word of a grub.cfg command, taken literally by GRUB's shell (single quotes; a quote as '\\'')."""
    return "'" + word.replace("'", "'\\''") + "'"


def grub_config(protocol: str, kernel: str, append: str | None = None,
                modules: Sequence[tuple[str, str]] = ()) -> str:
    """A grub.cfg that boots `kernel` (a path inside the ISO) at once by `protocol` ("multiboot" or "multiboot2"),
    with `append` as its command line and `modules` as (path inside the ISO, command line) pairs. GRUB joins the
    words of a line with single spaces: runs of spaces in a command line become one."""
    loader, module = GRUB_LOADERS[protocol]

    def line(command: str, path: str, args: str | None) -> str:
        return " ".join([command, grub_quote(path), *(grub_quote(w) for w in (args or "").split())])

    return "\n".join(["# made by kgen: boot the kernel at once", "set timeout=0", "set default=0", "",
                      'menuentry "kernel" {', "    " + line(loader, kernel, append),
                      *("    " + line(module, path, args) for path, args in modules), "    boot", "}", ""])


def make_boot_iso(kernel_elf: Path, directory: Path, *, protocol: str, modules: Sequence[str] = (),
                  append: str | None = None, name: str = "boot.iso") -> Path:
    """A GRUB ISO in `directory` (created if missing) that boots `kernel_elf` by `protocol` ("multiboot": GRUB's
    `multiboot` and `module`; "multiboot2": `multiboot2` and `module2`), with `append` as the kernel's command line
    and `modules` given as `--module` takes them (FILE[,ARGS]: GRUB loads FILE, ARGS is its command line), in that
    order. BIOS and, with grub-efi-amd64-bin installed, UEFI (`grub_platforms()`). Returns the ISO's path.

    Inside the ISO the kernel is /kernel/<its file name> and module N is /modules/<N>-<its file name>.
    A missing kernel or module file is a UsageError; missing GRUB tools are ToolMissing (require_grub)."""
    if protocol not in GRUB_LOADERS:
        raise ValueError(f"protocol must be one of {', '.join(GRUB_LOADERS)}, not {protocol!r}")
    kernel_elf = Path(kernel_elf)
    if not kernel_elf.is_file():
        raise UsageError(f"{kernel_elf}: no such file (the kernel to boot through GRUB)")
    sources = []
    for index, spec in enumerate(modules):
        path, _, args = spec.partition(",")
        problem = input_file_problem(path)
        if problem:
            raise UsageError(f"--module {spec}: {path!r}: {problem}")
        sources.append((Path(path), f"/modules/{index}-{Path(path).name}", args))
    kernel_in_iso = f"/kernel/{kernel_elf.name}"
    config = grub_config(protocol, kernel_in_iso, append, [(inside, args) for _, inside, args in sources])

    def fill(tree: Path) -> None:
        (tree / "boot" / "grub").mkdir(parents=True)
        (tree / "boot" / "grub" / "grub.cfg").write_text(config)
        (tree / "kernel").mkdir()
        shutil.copyfile(kernel_elf, tree / kernel_in_iso.lstrip("/"))
        if sources:
            (tree / "modules").mkdir()
        for source, inside, _ in sources:
            shutil.copyfile(source, tree / inside.lstrip("/"))

    iso = Path(directory) / name
    _mkrescue(fill, iso)
    return iso


def tool_reason(stderr: str) -> str:
    """The line of a tool's stderr that says why it failed: the last line naming a root cause (xorriso's FAILURE or
    SORRY, a full disk, a refused permission), else the last "error" line (grub-mkrescue's own, which only says that
    xorriso failed), else the last line that says anything (grub-mkrescue may end with a lone ".")."""
    lines = [line.strip() for line in stderr.splitlines() if len(line.strip()) > 1]
    for markers in (_ROOT_CAUSES, ("error", "cannot", "failed")):
        found = [line for line in lines if any(marker in line for marker in markers)]
        if found:
            return found[-1]
    return (lines or ["no output"])[-1]


_ROOT_CAUSES = ("FAILURE", "SORRY", "FATAL", "No space left", "Permission denied", "Read-only file system",
                "Disk quota")


def _mkrescue(fill, iso: Path) -> None:
    """Write `iso` whole or not at all from the tree `fill(root)` writes: grub-mkrescue writes a temp file (a name
    of its own, so two builds never share it) that replaces `iso` on success and is removed on any failure or
    interrupt."""
    tool = require_grub()
    iso.parent.mkdir(parents=True, exist_ok=True)
    partial = iso.with_name(f".{iso.name}.{secrets.token_hex(6)}.partial")
    try:
        tmp = scratch_dir("iso")        # named after this process: swept by a later run if this one is killed
        try:
            tree = tmp / "tree"
            fill(tree)
            cmd = [tool, f"--install-modules={_GRUB_MODULES}", "--fonts=", "--locales=", "--themes=",
                   "-o", str(partial), str(tree)]
            # Its own TMPDIR inside ours: grub-mkrescue leaves its grub.* directories behind when it fails.
            result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
            if result.returncode != 0 or not partial.exists():
                raise KgenError(f"grub-mkrescue failed with status {result.returncode}: "
                                f"{tool_reason(result.stderr)}")
            os.replace(partial, iso)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        partial.unlink(missing_ok=True)
