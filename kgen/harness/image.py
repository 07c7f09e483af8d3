"""`--image`: the author's own bootable image, and the kernel ELF inside it.

An ISO 9660 file boots as a CD-ROM, anything else as the first disk; both are opened read-only or `snapshot=on`, so
nothing is ever written into the user's file. Without --kernel, the ELF that gives symbols and segments is looked for
in an ISO through its bootloader's configuration: GRUB's `multiboot`/`multiboot2` line, Limine's kernel path. It is
copied out with xorriso (the tool that makes kgen's own ISOs) into kgen's cache.
"""
from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kgen.build.iso import XORRISO
from kgen.errors import ToolMissing, UsageError, input_file_problem

ISO9660_MAGIC = b"CD001"
ISO9660_MAGIC_AT = 0x8001         # the primary volume descriptor, 16 sectors of 2 KiB in
# Where bootloaders keep their configuration inside an ISO, in the order they are looked at.
GRUB_CONFIGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/grub/grub.cfg", "/EFI/BOOT/grub.cfg")
LIMINE_CONFIGS = ("/limine.conf", "/boot/limine.conf", "/boot/limine/limine.conf", "/limine.cfg", "/boot/limine.cfg",
                  "/boot/limine/limine.cfg", "/EFI/BOOT/limine.conf")
_GRUB_KERNEL = re.compile(r"^\s*(multiboot2?)\s+(?:--\S+\s+)*(\S+)", re.M)
# limine.conf (v8+): `kernel_path: boot():/boot/kernel` or `path: ...`; limine.cfg (v5-7): `KERNEL_PATH=boot:///k`.
_LIMINE_KERNEL = re.compile(r"^\s*(?:kernel_path|path)\s*:\s*(\S+)|^\s*KERNEL_PATH\s*=\s*(\S+)", re.M | re.I)


def is_iso(path: Path) -> bool:
    with open(path, "rb") as stream:
        stream.seek(ISO9660_MAGIC_AT)
        return stream.read(len(ISO9660_MAGIC)) == ISO9660_MAGIC


def check_image(path: Path) -> Path:
    """--image FILE as a usable file, else one line (status 2): missing, a directory, empty or cut short."""
    problem = input_file_problem(path)
    if problem:
        raise UsageError(f"--image {path}: {problem}" + ("" if problem == "no such file" else
                                                         " (give the bootable image itself)"))
    size = path.stat().st_size
    if size < 512:
        raise UsageError(f"--image {path}: {size} bytes is too short to boot (a disk's boot sector is 512)")
    if size % 512:
        raise UsageError(f"--image {path}: {size} bytes is not a whole number of 512-byte sectors: truncated?")
    return path


@dataclass(frozen=True)
class FoundKernel:
    path_in_image: str      # as the bootloader's configuration names it
    config: str             # the configuration file that named it
    elf: Path               # the copy kgen reads


def find_kernel(image: Path, cache: Path) -> FoundKernel | None:
    """The kernel the image's bootloader loads, copied out of an ISO into `cache`; None when the image is not an
    ISO or names none kgen can read."""
    if not is_iso(image):
        return None
    files = _files(image)
    for config in [c for c in GRUB_CONFIGS + LIMINE_CONFIGS if c in files]:
        text = _extract_text(image, config, cache)
        if text is None:
            continue
        inside = _kernel_path(text, config in GRUB_CONFIGS)
        if inside is None:
            continue
        # Taken out again every time (tens of ms): the image may have been rebuilt since.
        copy = cache / hashlib.sha256(str(image.resolve()).encode()).hexdigest()[:16] / Path(inside).name
        if not _extract(image, inside, copy):
            continue
        return FoundKernel(inside, config, copy)
    return None


@functools.lru_cache(maxsize=16)
def _listing(image: Path, mtime_ns: int) -> frozenset[str]:
    return frozenset(_files(image))


def holds_grub(image: Path) -> bool:
    """Whether the image is an ISO whose loader is GRUB (it has a GRUB configuration)."""
    return is_iso(image) and any(config in _listing(image, image.stat().st_mtime_ns) for config in GRUB_CONFIGS)


def _kernel_path(text: str, grub: bool) -> str | None:
    if grub:
        match = _GRUB_KERNEL.search(text)
        return match.group(2).strip("'\"") if match else None
    match = _LIMINE_KERNEL.search(text)
    if not match:
        return None
    uri = match.group(1) or match.group(2)
    # boot():/k, boot:///k, boot(1):/k: the path after the resource
    return "/" + re.sub(r"^[a-z]+(\(\d*\))?:/*", "", uri).lstrip("/")


def _xorriso() -> str:
    tool = shutil.which(XORRISO)
    if tool is None:
        raise ToolMissing(f"{XORRISO} not found (it reads the kernel out of --image): install the Debian package "
                          f"{XORRISO}")
    return tool


def _files(image: Path) -> set[str]:
    """Every file's path in the ISO (xorriso prints them quoted, one a line)."""
    result = subprocess.run([_xorriso(), "-indev", str(image), "-find", "/", "-type", "f"], capture_output=True,
                            text=True, errors="replace")
    return {line.strip().strip("'") for line in result.stdout.splitlines() if line.startswith("'")}


def _extract(image: Path, inside: str, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    result = subprocess.run([_xorriso(), "-osirrox", "on", "-indev", str(image), "-extract", inside, str(partial)],
                            capture_output=True)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        return False
    partial.chmod(0o644)
    partial.replace(target)
    return True


def _extract_text(image: Path, inside: str, cache: Path) -> str | None:
    target = cache / "configs" / hashlib.sha256(f"{image.resolve()}:{inside}".encode()).hexdigest()[:16]
    if not _extract(image, inside, target):
        return None
    return target.read_text(errors="replace")
