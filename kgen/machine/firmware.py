"""The machine's firmware: SeaBIOS (QEMU's default, nothing to set up) or UEFI through OVMF.

OVMF comes as two flash images (Debian's `ovmf` package): the firmware code, mapped read-only, and a template of
its variable store, which the firmware writes (boot entries, the last console mode). Each machine gets a private
copy of the variable store in its own directory, so two machines never share one and the template stays clean.

The copy is a qcow2 image rather than raw bytes: QEMU's `savevm` refuses a machine with a writable drive that
cannot hold a snapshot ("Device 'pflash1' is writable but does not support snapshots", QEMU 7.2), and a pflash
drive in qcow2 format can. `savevm` then writes its snapshot into the variable store as into every writable drive,
and `loadvm` puts it back: the one firmware state kept outside RAM is restored with the rest (docs/toolchain.md,
"OVMF"). So a machine with a snapshot image keeps its variable store beside that image (`vars_beside`), not in its
own directory: a new QEMU restoring the snapshot (the pool's relaunch) needs the store that holds it too.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kgen.errors import MachineError, ToolMissing

FIRMWARES = ("bios", "uefi")
# qemu-img makes the qcow2 images OVMF's variable stores (here) and the machines' snapshots (snapshot.py) live in.
QEMU_IMG = "qemu-img"
QEMU_IMG_PACKAGE = "qemu-utils"
OVMF_PACKAGE = "ovmf"
# Debian bookworm's `ovmf`: the 4 MiB build without Secure Boot or SMM, the one QEMU's own firmware descriptor
# (/usr/share/qemu/firmware/60-edk2-x86_64.json) names for `pc` and `q35`. The 2 MiB build is the older layout.
OVMF_CANDIDATES = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)
VARS_NAME = "ovmf-vars.qcow2"


@dataclass(frozen=True)
class Ovmf:
    """The OVMF firmware code and the template of its variable store."""
    code: Path
    vars_template: Path


def find_ovmf() -> Ovmf:
    """The installed OVMF images, or ToolMissing naming the Debian package."""
    for code, template in OVMF_CANDIDATES:
        if code.is_file() and template.is_file():
            return Ovmf(code, template)
    raise ToolMissing(f"UEFI firmware (OVMF) not found in /usr/share/OVMF: install the Debian package {OVMF_PACKAGE}")


def vars_beside(snapshot_image: Path) -> Path:
    """Where a machine with this snapshot image keeps its variable store; whoever removes the image removes it."""
    return snapshot_image.with_name(snapshot_image.name + ".ovmf-vars.qcow2")


def machine_vars(ovmf: Ovmf, machine_dir: Path, snapshot_image: Path | None) -> Path:
    """The variable store a machine boots with: a new private copy in its directory, or with a snapshot image the
    one beside it (made on first use, then kept: it holds the snapshot's firmware state)."""
    if snapshot_image is None:
        return private_vars(ovmf, machine_dir / VARS_NAME)
    target = vars_beside(snapshot_image)
    return target if target.exists() else private_vars(ovmf, target)


def private_vars(ovmf: Ovmf, target: Path) -> Path:
    """A copy of the variable store template at `target`, as qcow2 (so `savevm` can snapshot it)."""
    tool = shutil.which(QEMU_IMG)
    if tool is None:
        raise ToolMissing(f"{QEMU_IMG} not found: install the Debian package {QEMU_IMG_PACKAGE} (UEFI needs it for the "
                          "firmware's variable store)")
    result = subprocess.run([tool, "convert", "-q", "-f", "raw", "-O", "qcow2", str(ovmf.vars_template),
                             str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise MachineError(f"qemu-img convert of {ovmf.vars_template} failed: {tail}")
    return target


def pflash_args(ovmf: Ovmf, vars_copy: Path, opt) -> list[str]:
    """QEMU arguments mapping the firmware code read-only (unit 0) and the private variable store (unit 1);
    `opt` escapes a value inside an option."""
    return ["-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={opt(ovmf.code)}",
            "-drive", f"if=pflash,unit=1,format=qcow2,file={opt(vars_copy)}"]
