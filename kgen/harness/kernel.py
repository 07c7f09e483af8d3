"""The kernel under test: its ELF, the layout kgen built it from (None for anyone else's), how it is booted and
when it counts as booted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kgen.arch import Arch, hw
from kgen.build import config as configmod
from kgen.build.layout import Layout, compute
from kgen.build.pipeline import build, current_elf
from kgen.errors import KgenError
from kgen.guest.bootreport import BOOT_OK
from kgen.guest.elfinfo import ElfInfo
from kgen.harness.bootpath import BootPath, DirectMultiboot, boot_path_for, launch_refusing, serving_boot
from kgen.harness.ready import Ready
from kgen.machine import Machine

BOOT_TIMEOUT = 60.0


@dataclass(frozen=True)
class KernelUnderTest:
    """The ELF and, for a kernel kgen built, the layout it was built from (None for anyone else's ELF). A foreign
    kernel also has how it is booted (`boot`), when it counts as booted (`ready`) and how long that may take.

    `elf_path` is the file that boots and `elf` the ELF the checks judge and name addresses from: the same file,
    unless a loader stage boots (--kernel) and carries the real kernel (--symbols, kgen/harness/symbols.py); then
    `boot_elf` is the stage's own ELF, which only the boot path looks at."""
    elf_path: Path
    elf: ElfInfo
    layout: Layout | None = None
    boot: BootPath = field(default_factory=DirectMultiboot)
    ready: Ready = field(default_factory=Ready)
    boot_timeout: float = BOOT_TIMEOUT
    # Program-header indices of segments that are boot code (may be unmapped once the kernel runs high, not the
    # kernel base); None: the default rule (GuestView.boot_segments).
    boot_only_segments: tuple[int, ...] | None = None
    boot_elf: ElfInfo | None = None     # the booted file's ELF when it is not `elf` (--symbols)
    # Where the kernel half starts (--kernel-base, a 32-bit kernel's); None: the ELF's higher-half base
    # (GuestView.kernel_half).
    kernel_base: int | None = None

    @classmethod
    def built(cls, config_path: Path | None, out_dir: Path, arch: str | None = None,
              firmware: str | None = None) -> KernelUnderTest:
        """kgen's own kernel, built from the config (or found up to date in out_dir); with firmware "uefi" booted
        through GRUB under OVMF instead of QEMU's -kernel."""
        config = configmod.load(config_path, arch)
        # Each parallel worker asks; linking again (~0.4 s) only to find the ELF up to date is the common case. The
        # stamp names the ELF's bytes too, so an ELF another build left beside it is not taken for this config's.
        elf = current_elf(config, out_dir) or build(config, out_dir, iso=False, force=False).elf
        layout = compute(config)
        return cls(elf, ElfInfo.load(elf), layout, serving_boot(layout.memory_mib, firmware))

    @classmethod
    def foreign(cls, elf_path: Path, ready: str | None = None, *, boot: BootPath | None = None,
                boot_timeout: float | None = None, boot_only_segments=None, memory_mib: int | None = None,
                append: str | None = None, modules=(), qemu_args=(), boot_method: str | None = None,
                firmware: str | None = None, qemu_command: str | None = None, image: Path | None = None,
                judged: ElfInfo | None = None, kernel_base: int | None = None, **when) -> KernelUnderTest:
        """Anyone else's ELF. `ready` is --ready's text and `when` holds the other "when to look" options by their
        READY_OPTIONS names (ready_symbol=, ready_at=, ...); `boot` how to boot it, else the way `boot_path_for`
        picks from the ELF, `boot_method` (--boot) and `firmware` (--firmware), with `memory_mib`, `append`,
        `modules` and `qemu_args`. `judged`: the ELF the checks judge when it is not the one that boots
        (--symbols); the symbols, segments and kernel-base options are checked against it. A value wrong for this
        ELF raises KgenError."""
        booted = ElfInfo.load(elf_path)
        elf = judged if judged is not None else booted
        for index in boot_only_segments or ():
            problem = boot_only_problem(elf, index)
            if problem is not None:
                raise KgenError(f"{elf_path}: --boot-only-segment {index}: {problem}")
        if kernel_base is not None and (problem := kernel_base_problem(elf, kernel_base)) is not None:
            raise KgenError(f"{elf_path}: --kernel-base {kernel_base:#x}: {problem}")
        how = Ready.from_options(elf, ready=ready, **when)
        if boot is None:
            boot = boot_path_for(booted, method=boot_method, firmware=firmware, memory_mib=memory_mib, append=append,
                                 modules=modules, qemu_args=qemu_args, qemu_command=qemu_command, image=image)
        return cls(Path(elf_path), elf, None, boot, how, boot_timeout or BOOT_TIMEOUT,
                   None if boot_only_segments is None else tuple(sorted(set(boot_only_segments))),
                   booted if judged is not None else None, kernel_base)

    @property
    def booted_elf(self) -> ElfInfo:
        """The ELF of the file that boots (`elf_path`): a loader stage's under --symbols, else `elf`."""
        return self.boot_elf if self.boot_elf is not None else self.elf

    @property
    def qemu(self) -> str:
        """The QEMU binary for this kernel: its architecture's (a foreign kernel's judged from its code,
        `Arch.for_elf`), or the one its way in needs (OVMF and an author's image: qemu-system-x86_64)."""
        if self.layout is not None:
            return self.layout.arch.qemu
        # A 32-bit loader stage may carry a 64-bit kernel: qemu-system-x86_64 runs both.
        arch = Arch.for_elf(self.elf)
        if self.boot_elf is not None and not arch.long_mode:
            arch = Arch.for_elf(self.boot_elf)
        return self.boot.qemu_for(arch.qemu)

    @property
    def memory_mib(self) -> int:
        return self.layout.memory_mib if self.layout is not None else self.boot.memory_mib

    def machine_options(self, accel: str, poison: bytes | None) -> dict:
        """Machine(...) arguments that boot this foreign kernel as the user asked."""
        options = self.boot.machine_options(self.elf_path, qemu=self.qemu, accel=accel, poison=poison)
        # Under TCG, QEMU logs the exceptions from the start: a triple fault is then named from its first fault.
        options.update(exception_log=accel == "tcg")
        if self.ready.kind == "at":
            # Held at the first instruction (-S) with the gdbstub up, so the breakpoint is in before the CPU runs
            # anything (a symbol in the boot code is passed within microseconds).
            options.update(gdbstub=True, start_paused=True)
        return options

    @property
    def probe_marker(self) -> str | None:
        """COM1 text that shows a boot got far enough, for the KVM probe."""
        return BOOT_OK if self.layout is not None else self.ready.get("text")


def boot_only_problem(elf: ElfInfo, index: int) -> str | None:
    """Why program header `index` of `elf` cannot be a boot-only segment (out of range, not a PT_LOAD), or None."""
    count = len(elf.program_headers)
    if not 0 <= index < count:
        return (f"out of range: the ELF has {count} program headers, numbered 0 to {count - 1} as `readelf -l` "
                "shows them" if count else "the ELF has no program headers")
    if elf.program_headers[index] != "PT_LOAD":
        return (f"program header {index} is {elf.program_headers[index]}, not a PT_LOAD segment (`readelf -l` "
                "lists them)")
    return None


def kernel_base_problem(elf: ElfInfo, address: int) -> str | None:
    """Why `address` cannot be where `elf`'s kernel half starts, or None. Only 32-bit paging leaves that to the
    kernel: x86-64 defines its kernel half (the upper canonical half)."""
    arch = Arch.for_elf(elf)
    if arch.long_mode:
        return (f"{elf.path.name} is a 64-bit kernel, whose kernel half is the upper canonical half (from "
                f"{arch.kernel_half:#x}) whatever it says; --kernel-base is for a 32-bit kernel")
    if not 0 < address < 1 << arch.va_bits:
        return f"give an address above 0 and below {1 << arch.va_bits:#x} (32-bit paging), where the kernel half starts"
    if address % hw.PAGE_SIZE:
        return f"not page-aligned: give the first address of the kernel half, a multiple of {hw.PAGE_SIZE:#x}"
    return None


def check_qemu_accepts(kernel: KernelUnderTest) -> None:
    """Launch QEMU once, paused, on the kernel and its options: a kernel or argument it refuses is one line, with
    QEMU's own reason, before the suite runs (not once per test)."""
    options = kernel.machine_options("tcg", None)
    machine = Machine(**{**options, "start_paused": True}, ram_file=False)
    try:
        launch_refusing(machine, kernel.elf_path, kernel.booted_elf, kernel.boot)
    finally:
        machine.quit()
