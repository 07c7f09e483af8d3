"""`kgen doctor`: which of the programs kgen drives are on this host, the Debian package that brings each, and what
each is for; with --probe-kvm, whether KVM can run kgen's kernels (a short boot of each).

Each fact (a program's name, its package, its path) is the module's that uses it: the doctor only asks them. Only the
facts no kgen module uses live here: chromium and gcc, which serve the user's side (looking at `kgen inspect --html`,
building a kernel from C).

Exit status: 0 when everything `kgen test` needs by default is here (QEMU, pytest, pytest-xdist), else 3, the
missing-tool status, with one line on stderr naming what to install; a missing optional tool is listed but does not
change the status, nor does a KVM that cannot run a kernel (TCG is the default).
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kgen.arch import ARCHES
from kgen.build import iso
from kgen.errors import EXIT_OK, ToolMissing
from kgen.machine import KVM_DEVICE, QEMU_IMG, QEMU_IMG_PACKAGE, QEMU_PACKAGE, firmware, kvm_accessible

CHROMIUM = "chromium"       # Debian's package and program: a browser for `kgen inspect --html`'s page (headless in tests)
GCC = "gcc"                 # kgen assembles with keystone; a hobby kernel in C is built with gcc (docs/ci.md)
TEST_EXTRA = "pip: kgen[test]"
# Where a software hypervisor shows itself: kvm_pvm runs long mode but not 32-bit paging (docs/toolchain.md).
KVM_PVM_MODULE = Path("/sys/module/kvm_pvm")


@dataclass(frozen=True)
class Tool:
    """One thing kgen drives: `find` says where it is on this host (None: missing)."""
    name: str
    package: str
    needed_for: str
    find: Callable[[], str | None]
    required: bool = False      # `kgen test` needs it by default (its own kernel, or --kernel, under TCG)


def _program(name: str) -> Callable[[], str | None]:
    return lambda: shutil.which(name)


def _directory(path: Path) -> Callable[[], str | None]:
    return lambda: str(path) if path.is_dir() else None


def _python_module(name: str) -> Callable[[], str | None]:
    def find() -> str | None:
        spec = importlib.util.find_spec(name)
        return spec.origin if spec is not None else None
    return find


def _ovmf() -> str | None:
    try:
        return str(firmware.find_ovmf().code)
    except ToolMissing:
        return None


def _gdb_package() -> str:
    from kgen.debug.launcher import GDB_PACKAGE       # here: the launcher's imports cost more than the doctor's own
    return GDB_PACKAGE


def tools() -> list[Tool]:
    """Everything the doctor looks for, in the order it lists them."""
    qemus = [Tool(arch.qemu, QEMU_PACKAGE, f"booting {name} kernels: kgen test, run, inspect, debug",
                  _program(arch.qemu), required=True) for name, arch in ARCHES.items()]
    return [
        *qemus,
        Tool(QEMU_IMG, QEMU_IMG_PACKAGE, "snapshots (a fresh machine per test by restore; without it every test "
             "boots cold) and UEFI's variable store", _program(QEMU_IMG)),
        Tool(iso.GRUB_MKRESCUE, iso.GRUB_COMMON_PACKAGE, "ISOs: kgen build (without --no-iso), kgen run, "
             "--boot grub, --firmware uefi", _program(iso.GRUB_MKRESCUE)),
        Tool("GRUB for BIOS", iso.GRUB_PC_PACKAGE, "ISOs that boot from SeaBIOS (BIOS), kgen's own and --boot grub",
             _directory(iso.GRUB_PC_MODULES)),
        Tool("GRUB for UEFI", iso.GRUB_EFI_PACKAGE, "ISOs that boot from OVMF: --firmware uefi",
             _directory(iso.GRUB_EFI_MODULES)),
        Tool(iso.XORRISO, iso.XORRISO, "ISOs (grub-mkrescue writes them with it); reading the kernel out of --image",
             _program(iso.XORRISO)),
        Tool(iso.MFORMAT, iso.MTOOLS_PACKAGE, "the UEFI boot image inside an ISO, when GRUB for UEFI is installed",
             _program(iso.MFORMAT)),
        Tool("OVMF", firmware.OVMF_PACKAGE, "--firmware uefi (UEFI firmware for QEMU)", _ovmf),
        Tool("gdb", _gdb_package(), "kgen debug", _program("gdb")),
        Tool(CHROMIUM, CHROMIUM, "viewing kgen inspect --html's page headless (kgen's own tests of it)",
             _program(CHROMIUM)),
        Tool(GCC, GCC, "building your kernel from C (kgen itself needs no compiler)", _program(GCC)),
        Tool("pytest", TEST_EXTRA, "kgen test runs its checks on pytest", _python_module("pytest"), required=True),
        Tool("pytest-xdist", TEST_EXTRA, "kgen test -j (default: one machine per core; -j 1 runs without it)",
             _python_module("xdist"), required=True),
    ]


def kvm_line(probing: bool) -> str:
    """KVM without booting anything: the device, and what kind of hypervisor is behind it when it says so."""
    if not kvm_accessible():
        return (f"KVM      no: {KVM_DEVICE} is missing or not accessible (needs a host with hardware virtualisation "
                "and this user in group kvm); kgen runs under TCG, the default, without it")
    kind = (" behind it is kvm_pvm, a software hypervisor: it runs long mode, not 32-bit paging;"
            if KVM_PVM_MODULE.is_dir() else "")
    if probing:
        return f"KVM      {KVM_DEVICE} is accessible;{kind} booting kgen's kernels under it:"
    return (f"KVM      {KVM_DEVICE} is accessible;{kind} whether it runs a kernel takes a boot: kgen doctor "
            "--probe-kvm (kgen test --accel kvm probes its own kernel)")


def probe_kvm_lines() -> list[str]:
    """Boot kgen's default kernel of each architecture once under KVM (kgen/harness/kvmprobe.py): usable or why not."""
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.kvmprobe import probe_kvm
    lines = []
    with tempfile.TemporaryDirectory(prefix="kgen-doctor-") as scratch:
        for name in ARCHES:
            config = Path(scratch) / f"{name}.toml"
            config.write_text(f'arch = "{name}"\n')       # kgen's defaults, whatever ./kgen.toml says
            kernel = KernelUnderTest.built(config, Path(scratch) / name)
            usable, why = probe_kvm(kernel)
            lines.append(f"KVM      {'yes' if usable else 'no'} for kgen's {name} kernel: {why}")
    return lines


def doctor(args) -> int:
    found = [(tool, tool.find()) for tool in tools()]
    width = max(len(tool.name) for tool, _ in found)
    pwidth = max(len(tool.package) for tool, _ in found)
    print(f"{'':<8} {'tool':<{width}}  {'Debian package':<{pwidth}}  needed for")
    for tool, where in found:
        state = "ok" if where else ("MISSING" if tool.required else "missing")
        print(f"{state:<8} {tool.name:<{width}}  {tool.package:<{pwidth}}  {tool.needed_for}"
              + (f" [{where}]" if where and args.verbose else ""))
    print(kvm_line(args.probe_kvm))
    if args.probe_kvm:
        if kvm_accessible() and all(where for tool, where in found if tool.name in {a.qemu for a in ARCHES.values()}):
            for line in probe_kvm_lines():
                print(line)
        else:
            print("KVM      not probed: needs an accessible KVM device and QEMU")
    missing = [tool for tool, where in found if tool.required and not where]
    if missing:
        packages = " ".join(dict.fromkeys(tool.package for tool in missing if not tool.package.startswith("pip")))
        pips = any(tool.package == TEST_EXTRA for tool in missing)
        fix = " and ".join(filter(None, [packages and f"apt-get install {packages}",
                                         pips and "pip install 'kgen[test]'"]))
        raise ToolMissing(f"kgen test cannot run here: {', '.join(t.name for t in missing)} missing: {fix}")
    print("kgen doctor: everything kgen test needs by default is here")
    return EXIT_OK
