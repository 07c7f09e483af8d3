"""How a kernel given with --kernel is booted: the one place a way of booting plugs in.

A boot path turns the kernel's ELF into the arguments of a `Machine` (kgen/machine) and says, before QEMU does, why
it cannot boot an ELF. `DirectMultiboot` is QEMU's own Multiboot loader (`-kernel`, BIOS only); `GrubBoot` puts GRUB
around the ELF in an ISO, as most hobby kernels are booted (Multiboot 2 needs it; some Multiboot 1 kernels need what
GRUB hands over and QEMU's loader does not), under SeaBIOS or OVMF. `boot_path_for` picks one from the ELF's headers
and the options. kgen's own kernel is booted by `KernelSession` (kgen/harness/session.py) from its layout.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

from kgen import protocol
from kgen.arch import I386, X86_64, Arch
from kgen.build.iso import grub_platforms, make_boot_iso
from kgen.errors import KgenError, MachineError, UsageError
from kgen.guest.elfinfo import ElfInfo
from kgen.harness.bootnames import BOOT_METHODS, FIRMWARES
from kgen.harness.image import holds_grub, is_iso
from kgen.harness.qemucommand import adapt
from kgen.harness.qemuargs import drives_copy_on_write, initrd_args, qemu_refusal
from kgen.machine import Machine

DEFAULT_MEMORY_MIB = 128


def users_args(qemu_args: tuple[str, ...], disks_writable: bool) -> tuple[str, ...]:
    """The user's --qemu-arg arguments: their disks copy-on-write unless `disks_writable` (`kgen run`: there the
    guest's writes are the user's to keep)."""
    return tuple(qemu_args) if disks_writable else drives_copy_on_write(qemu_args)


@dataclass(frozen=True)
class DirectMultiboot:
    """QEMU's -kernel: QEMU loads a Multiboot (v1) ELF itself, its modules through -initrd, its command line through
    -append; the user's disks are opened `snapshot=on` (`drives_copy_on_write`), never written."""
    memory_mib: int = DEFAULT_MEMORY_MIB
    append: str | None = None
    modules: tuple[str, ...] = ()       # FILE[,ARGS] as --module takes them
    qemu_args: tuple[str, ...] = ()     # the user's own QEMU arguments
    name: ClassVar[str] = "direct"
    # Whether a loader of the author's (not QEMU's, not a GRUB kgen set up) loads the kernel: it may boot another file
    # than the ELF given, and it may halt or idle before the kernel runs (kgen/harness/ready.py in_kernel_only).
    loads_its_own: ClassVar[bool] = False

    def problem(self, elf: ElfInfo) -> str | None:
        """What stops this path from booting `elf`, or None (QEMU may still refuse it: `launch_refusing`)."""
        return multiboot_problem(elf)

    def machine_options(self, elf_path: Path, *, qemu: str, accel: str, poison: bytes | None,
                        disks_writable: bool = False) -> dict:
        """Machine(...) arguments that boot `elf_path` this way; the user's disks copy-on-write unless
        `disks_writable` (`kgen run`: there the guest's writes are the user's to keep)."""
        extra = initrd_args(self.modules) + users_args(self.qemu_args, disks_writable)
        return dict(kernel=elf_path, accel=accel, poison=poison, qemu=qemu, memory_mib=self.memory_mib,
                    append=self.append, extra_args=extra)

    def qemu_for(self, arch_qemu: str) -> str:
        """The QEMU binary this way in runs the kernel on, given its architecture's."""
        return arch_qemu

    def describe(self) -> str:
        return "QEMU's -kernel"


@dataclass(frozen=True)
class GrubBoot:
    """GRUB around the ELF: an ISO kgen makes (grub.cfg's `multiboot` or `multiboot2` line with --append as the
    command line, a `module`/`module2` line per --module; kgen/build/iso.py `make_boot_iso`), booted from CD-ROM
    under SeaBIOS or, with `firmware="uefi"`, OVMF (then on qemu-system-x86_64, OVMF being x86_64 firmware). The
    ISO is kept in kgen's cache under a digest of everything in it, so each parallel machine and each later run
    boots the same file without making it again."""
    protocol: str = "multiboot"         # or "multiboot2"
    memory_mib: int = DEFAULT_MEMORY_MIB
    append: str | None = None
    modules: tuple[str, ...] = ()
    qemu_args: tuple[str, ...] = ()
    firmware: str = "bios"              # or "uefi"
    name: ClassVar[str] = "grub"
    loads_its_own: ClassVar[bool] = False

    def problem(self, elf: ElfInfo) -> str | None:
        headers = elf.multiboot_headers()
        if self.protocol == "multiboot2" and headers.v2_offset is None:
            return f"GRUB's multiboot2 needs a Multiboot 2 header, and this ELF has none ({headers.describe()})"
        if self.protocol == "multiboot" and headers.v1_offset is None:
            return f"GRUB's multiboot needs a Multiboot 1 header, and this ELF has none ({headers.describe()})"
        return None

    def machine_options(self, elf_path: Path, *, qemu: str, accel: str, poison: bytes | None,
                        disks_writable: bool = False) -> dict:
        iso = self.iso(elf_path)
        extra = users_args(self.qemu_args, disks_writable)
        return dict(iso=iso, firmware=self.firmware, accel=accel, poison=poison,
                    qemu=self.qemu_for(qemu), memory_mib=self.memory_mib,
                    extra_args=extra, icount=grub_icount(True, self.firmware, accel))

    def iso(self, elf_path: Path) -> Path:
        """The GRUB ISO that boots `elf_path` this way, made once per content (kgen's cache, `iso_cache_dir`)."""
        digest = hashlib.sha256(repr((self.protocol, self.append, grub_platforms())).encode())
        for path in [str(elf_path)] + [m.partition(",")[0] for m in self.modules]:
            digest.update(Path(path).read_bytes())
        digest.update(repr([m.partition(",")[2] for m in self.modules]).encode())
        directory = iso_cache_dir() / digest.hexdigest()[:24]
        iso = directory / "boot.iso"
        if not iso.is_file():
            make_boot_iso(Path(elf_path), directory, protocol=self.protocol, modules=self.modules,
                          append=self.append)
        return iso

    def qemu_for(self, arch_qemu: str) -> str:
        return X86_64.qemu if self.firmware == "uefi" else arch_qemu    # OVMF is x86_64 firmware

    def describe(self) -> str:
        return f"GRUB's {self.protocol} from an ISO kgen made, {self.firmware.upper()}"


@dataclass(frozen=True)
class QemuCommandBoot:
    """The user's own QEMU command line (--qemu-command), kept but for what kgen owns (kgen/harness/qemucommand.py):
    whatever it boots (-kernel, -cdrom, disks, -bios or pflash firmware) boots as in the user's `make run`."""
    command: str
    memory_mib: int = DEFAULT_MEMORY_MIB      # the command's -m
    name: ClassVar[str] = "qemu-command"
    loads_its_own: ClassVar[bool] = True

    @classmethod
    def from_command(cls, command: str) -> QemuCommandBoot:
        return cls(command, adapt(command, copy_on_write=True).memory_mib)     # a command kgen refuses: now

    def problem(self, elf: ElfInfo) -> str | None:
        binary = adapt(self.command, copy_on_write=True).binary
        if Arch.for_elf(elf).long_mode and binary == I386.qemu:
            return f"a 64-bit kernel cannot run on {binary}: the command names another architecture than the ELF"
        return None

    def machine_options(self, elf_path: Path, *, qemu: str, accel: str, poison: bytes | None,
                        disks_writable: bool = False) -> dict:
        user = adapt(self.command, copy_on_write=not disks_writable)
        return dict(boot_in_args=True, qemu=user.binary, accel=accel, poison=poison, memory_mib=user.memory_mib,
                    machine_type=user.machine_type + user.machine_props, extra_args=user.args,
                    **({"debug_exit_port": None} if user.has_debug_exit else {}))

    def qemu_for(self, arch_qemu: str) -> str:
        return adapt(self.command, copy_on_write=True).binary

    def describe(self) -> str:
        return "your QEMU command line (--qemu-command)"


@dataclass(frozen=True)
class ImageBoot:
    """The author's own bootable image (--image), booted as it is: an ISO 9660 file as a CD-ROM, anything else as
    the first IDE disk (snapshot=on: the guest's writes never reach the file), under SeaBIOS or OVMF. Whatever
    loader it holds (GRUB, Limine, a boot block of its own) loads the kernel."""
    image: Path
    memory_mib: int = DEFAULT_MEMORY_MIB
    qemu_args: tuple[str, ...] = ()
    firmware: str = "bios"
    name: ClassVar[str] = "image"
    loads_its_own: ClassVar[bool] = True

    def problem(self, elf: ElfInfo) -> str | None:
        return None     # whether the image boots this ELF shows once it runs (KernelUnderTest: the loaded bytes)

    def qemu_for(self, arch_qemu: str) -> str:
        # What the image boots may be another build than --kernel's ELF, of either architecture: the 64-bit
        # binary runs both, so a mismatch shows as a kernel not in memory (kgen/guest/loaded.py), not as a crash.
        return X86_64.qemu

    def machine_options(self, elf_path: Path, *, qemu: str, accel: str, poison: bytes | None,
                        disks_writable: bool = False) -> dict:
        media = {"iso": self.image} if is_iso(self.image) else {"disk": self.image}
        extra = users_args(self.qemu_args, disks_writable)
        # -icount for GRUB's sake only: under it Limine's BIOS menu timeout never runs out (seen with Limine 8.2).
        return dict(**media, firmware=self.firmware, accel=accel, poison=poison, qemu=self.qemu_for(qemu),
                    memory_mib=self.memory_mib, extra_args=extra,
                    icount=grub_icount(holds_grub(self.image), self.firmware, accel))

    def describe(self) -> str:
        kind = "CD-ROM" if is_iso(self.image) else "first disk"
        return f"its own image {self.image.name} as the {kind}, {self.firmware.upper()}"


BootPath = Union[DirectMultiboot, GrubBoot, QemuCommandBoot, ImageBoot]


def serving_boot(memory_mib: int, firmware: str | None = None) -> BootPath:
    """How kgen's own kernel is booted to serve calls: QEMU's -kernel with the serve token as its command line, or
    under UEFI (OVMF takes no -kernel) GRUB's EFI build loading the same ELF with the token on GRUB's line."""
    if firmware == "uefi":
        return GrubBoot("multiboot", memory_mib, protocol.SERVE_TOKEN, firmware="uefi")
    return DirectMultiboot(memory_mib, protocol.SERVE_TOKEN)


def grub_icount(iso: bool, firmware: str, accel: str) -> bool:
    """Whether to run QEMU with -icount: GRUB 2.06 on SeaBIOS under TCG can crash in real mode when a timer
    interrupt lands at the wrong moment, which happens on a loaded host (see docs/toolchain.md). Counting
    instructions for time makes the boot deterministic and it does not crash; it costs a few seconds."""
    return iso and firmware == "bios" and accel == "tcg"


def cache_dir(name: str) -> Path:
    """kgen's cache folder `name`: $XDG_CACHE_HOME/kgen/NAME (~/.cache by default). GRUB ISOs made around kernels
    (grub-iso) and kernels read out of images (image-kernels) are kept there, never in the user's folders."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kgen" / name


def iso_cache_dir() -> Path:
    return cache_dir("grub-iso")


def boot_path_for(elf: ElfInfo, *, method: str | None = None, firmware: str | None = None,
                  memory_mib: int | None = None, append: str | None = None, modules=(), qemu_args=(),
                  qemu_command: str | None = None, image: Path | None = None) -> BootPath:
    """How to boot `elf`: `method` (BOOT_METHODS) if given, else by its headers: QEMU's -kernel for a Multiboot 1
    ELF under the BIOS (today's default), GRUB for one with only a Multiboot 2 header or under UEFI. `grub` uses
    GRUB's `multiboot` when the ELF has a Multiboot 1 header, else `multiboot2`; `grub-multiboot2` asks for
    multiboot2 when it has both. `qemu_command` (--qemu-command) is the whole boot, so it takes none of the others.
    A combination that cannot work raises KgenError."""
    if image is not None:
        given = [flag for flag, value in (("--boot", method), ("--append", append), ("--module", modules),
                                          ("--qemu-command", qemu_command)) if value]
        if given:
            raise KgenError(f"--image boots as it is, its loader choosing the rest: drop {given[0]}")
        return ImageBoot(Path(image), memory_mib or DEFAULT_MEMORY_MIB, tuple(qemu_args), firmware or "bios")
    if qemu_command is not None:
        given = [flag for flag, value in (("--boot", method), ("--firmware", firmware), ("--memory", memory_mib),
                                          ("--append", append), ("--module", modules), ("--qemu-arg", qemu_args))
                 if value]
        if given:
            raise KgenError(f"--qemu-command holds the whole boot: drop {given[0]} (put it in the command instead)")
        boot = QemuCommandBoot.from_command(qemu_command)
        problem = boot.problem(elf)
        if problem is not None:
            raise KgenError(f"--qemu-command: {problem}")
        return boot
    firmware = firmware or "bios"
    if firmware not in FIRMWARES:
        raise KgenError(f"--firmware {firmware}: give one of {', '.join(FIRMWARES)}")
    if method is not None and method not in BOOT_METHODS:
        raise KgenError(f"--boot {method}: give one of {', '.join(BOOT_METHODS)}")
    headers = elf.multiboot_headers()
    if method is None:
        only_v2 = headers.v1_offset is None and headers.v2_offset is not None
        method = "grub" if firmware == "uefi" or only_v2 else "direct"
    common = dict(memory_mib=memory_mib or DEFAULT_MEMORY_MIB, append=append, modules=tuple(modules),
                  qemu_args=tuple(qemu_args))
    if method == "direct":
        if firmware == "uefi":
            raise KgenError("--boot direct is QEMU's -kernel, which needs the BIOS: use --boot grub with "
                            "--firmware uefi")
        return DirectMultiboot(**common)
    protocol = ("multiboot2" if method == "grub-multiboot2" or headers.v1_offset is None and headers.v2_offset
                is not None else "multiboot")
    boot = GrubBoot(protocol, firmware=firmware, **common)
    problem = boot.problem(elf)
    if problem is not None:
        raise KgenError(f"{elf.path}: --boot {method}: {problem}")
    return boot


def multiboot_problem(elf: ElfInfo) -> str | None:
    """What stops QEMU's -kernel from booting this ELF as Multiboot, or None: no header, or an ELF64 without the
    header's address fields (flag bit 16), which QEMU needs to load anything but an ELF32."""
    headers = elf.multiboot_headers()
    if headers.v1_offset is None and headers.v2_offset is not None:
        return (f"an ELF{elf.bits} with a Multiboot 2 header only: QEMU's -kernel boots Multiboot 1 kernels; "
                "--boot grub boots it through GRUB")
    if headers.v1_offset is None:
        return f"an ELF{elf.bits} with {headers.describe()}: QEMU's -kernel boots Multiboot (v1) kernels only"
    if elf.bits != 32 and not headers.v1_addresses:
        return ("an ELF64 whose Multiboot header lacks the address fields (flag bit 16): QEMU's -kernel loads "
                "an ELF64 only through them")
    return None



def launch_refusing(machine: Machine, elf_path: Path | None, elf: ElfInfo | None = None,
                    boot: BootPath | None = None) -> None:
    """Launch `machine`; when QEMU refuses a kernel the user gave (`elf_path`, from --kernel) that is the user's
    input: one line with what stops `boot` (default: QEMU's -kernel) from booting it, if anything, and QEMU's own
    reason (UsageError). kgen test, kgen run and kgen debug say it alike."""
    try:
        machine.launch()
    except MachineError as err:
        refusal = qemu_refusal(err)
        if refusal is None or elf_path is None:
            raise
        problem = (boot or DirectMultiboot()).problem(elf if elf is not None else ElfInfo.load(elf_path))
        raise UsageError(f"--kernel {elf_path}: " + (f"{problem}; " if problem else "")
                         + f"QEMU refused to boot it: {refusal}") from None
