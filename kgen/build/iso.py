"""A bootable BIOS ISO: the GRUB tree from boot/ plus the kernel, made by grub-mkrescue."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from kgen.errors import KgenError, ToolMissing
from kgen.build.resources import boot_dir

GRUB_PC_MODULES = Path("/usr/lib/grub/i386-pc")


def require_grub() -> str:
    tool = shutil.which("grub-mkrescue")
    if tool is None:
        raise ToolMissing("grub-mkrescue not found: install the Debian packages grub-common grub-pc-bin xorriso")
    if not GRUB_PC_MODULES.is_dir():
        raise ToolMissing(f"{GRUB_PC_MODULES} missing: install the Debian package grub-pc-bin (BIOS GRUB)")
    if shutil.which("xorriso") is None:
        raise ToolMissing("xorriso not found: install the Debian package xorriso (grub-mkrescue needs it)")
    return tool


def make_iso(kernel_elf: Path, iso: Path) -> None:
    """Write `iso` whole or not at all: grub-mkrescue writes a temp file (a name of its own, so two builds never
    share it) that replaces `iso` on success and is removed on any failure or interrupt."""
    tool = require_grub()
    iso.parent.mkdir(parents=True, exist_ok=True)
    partial = iso.with_name(f".{iso.name}.{secrets.token_hex(6)}.partial")
    try:
        with tempfile.TemporaryDirectory(prefix="kgen-iso-") as tmp:
            tree = Path(tmp) / "tree"
            shutil.copytree(boot_dir(), tree / "boot")   # the ISO root holds /boot/grub/grub.cfg
            shutil.copyfile(kernel_elf, tree / "boot" / "kernel.elf")
            cmd = [tool, "--install-modules=multiboot normal configfile", "--fonts=", "--locales=", "--themes=",
                   "-o", str(partial), str(tree)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not partial.exists():
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise KgenError(f"grub-mkrescue failed with status {result.returncode}: {tail}")
            os.replace(partial, iso)
    finally:
        partial.unlink(missing_ok=True)
