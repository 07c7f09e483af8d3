"""`kgen run`: boot a kernel with its serial output on the terminal; exit 0 only when the kernel reported success:
its last COM1 line is `kgen: exit success` (kgen/guest/bootreport.py) and QEMU exited with the success status.
Either alone can be faked: the status keeps only 8 bits, and a line can be printed by anyone.

A kernel given with --kernel may know nothing of kgen: it also succeeds when it prints its --ready text (reaches
its --ready-at symbol, shows its --ready-vga text on the screen), or, without one, when it stops cleanly the way
`kgen test` waits for (kgen/harness/ready.py `wait_booted`): halted with interrupts off, or idle in hlt with
paging on. The line printed then says where it halted."""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from kgen.arch import X86_64, hw
from kgen.build import config as configmod
from kgen.build.config import show_path
from kgen.build.layout import compute
from kgen.build.pipeline import build, check_out_dir
from kgen.errors import (EXIT_KERNEL_FAILED, EXIT_OK, KernelFailed, KgenError, MachineError, ToolMissing,
                         UsageError, input_file_problem)
from kgen.guest.bootreport import reported_success
from kgen.guest.diagnose import at_ip, explain
from kgen.guest.elfinfo import ElfInfo
from kgen.harness.bootpath import boot_path_for, grub_icount, launch_refusing
from kgen.harness.foreign import image_kernel
from kgen.harness.image import ISO9660_MAGIC_AT, is_iso
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.qemuargs import check_modules, split_qemu_args
from kgen.harness.ready import READY_OPTIONS, Ready, wait_booted
from kgen.machine import KVM_DEVICE, Machine, kvm_accessible
from kgen.protocol import EXIT_SUCCESS

SERIAL_GRACE = 5.0      # seconds to wait for COM1's last line after QEMU exited with the success status


def require_kvm():
    if not kvm_accessible():
        raise ToolMissing(f"--accel kvm: {KVM_DEVICE} is missing or not accessible on this host; use --accel tcg")


def machine_config(args):
    """(config, layout) of `kgen run` and `kgen debug`: the config with --memory applied; KVM checked when asked for."""
    cfg = configmod.load(args.config, args.arch)
    if args.memory is not None and getattr(args, "kernel", None) is None:
        # kgen's own kernel: its layout's rule for RAM applies. Anyone's kernel (--kernel) gets the RAM it asks for,
        # as under `kgen test --kernel` (`guest_memory_mib`).
        cfg = cfg.with_values(machine_memory_mib=args.memory, source=f"{cfg.source} with --memory")
    layout = compute(cfg)
    if args.accel == "kvm":
        require_kvm()
    return cfg, layout


def guest_memory_mib(args, layout) -> int:
    """The guest RAM of `kgen run` and `kgen debug`: --memory for anyone's kernel, else the layout's."""
    if getattr(args, "kernel", None) is not None and args.memory is not None:
        return args.memory
    return layout.memory_mib


def _existing_file(option: str, path: Path) -> Path:
    problem = input_file_problem(path)
    if problem:
        raise UsageError(f"{option} {show_path(path)}: {problem}")
    return path


def _late_exit_status(machine, grace: float = 1.0) -> int | None:
    """QEMU's exit status if it was on its way out when waiting for it failed; None if it stays up (a hang, a
    triple fault kept for inspection)."""
    deadline = time.monotonic() + grace
    while machine.alive and time.monotonic() < deadline:
        time.sleep(0.02)
    if machine.alive:
        return None
    try:
        return machine.wait_exit(grace)
    except MachineError:
        return None


def run(args) -> int:
    image = image_kernel(args)
    foreign_only = [name for name in (*READY_OPTIONS, "module", "qemu_arg", "boot", "qemu_command")
                    if getattr(args, name, None)]
    if foreign_only and args.kernel is None:
        raise UsageError(f"--{foreign_only[0].replace('_', '-')} is for a kernel given with --kernel")
    if args.append is not None and args.iso is not None:
        raise UsageError("--append needs a directly booted kernel (--kernel or --direct); GRUB's menu sets the "
                         "ISO's command line")
    building = args.kernel is None and args.iso is None
    if building:
        check_out_dir(args.out)
    cfg, layout = machine_config(args)
    target: dict = {}
    elf_path = None
    boot = None
    if args.kernel is not None:
        elf_path = _existing_file("--kernel", args.kernel)
        check_modules(args.module or ())
    elif args.iso is not None:
        iso = _existing_file("--iso", args.iso)
        if not is_iso(iso):
            raise UsageError(f"--iso {show_path(iso)}: not an ISO 9660 image (no CD001 volume descriptor at "
                             f"{ISO9660_MAGIC_AT:#x}); an ELF boots with --kernel, a disk image with kgen test --image")
        target = {"iso": iso}
    else:
        out = build(cfg, args.out, iso=not args.direct, force=False)
        elf_path = out.elf
        target = {"kernel": out.elf, "append": args.append} if args.direct else {"iso": out.iso}
    try:
        elf = ElfInfo.load(elf_path) if elf_path is not None else None
    except KgenError as err:
        raise UsageError(f"--kernel {err}") from None

    try:
        ready = Ready.from_options(elf, **{name: getattr(args, name, None) for name in READY_OPTIONS})
    except KgenError as err:
        raise UsageError(str(err)) from None

    qemu = layout.arch.qemu
    if args.kernel is not None:
        try:
            boot = boot_path_for(elf, method=args.boot, firmware=args.firmware, memory_mib=args.memory,
                                 append=args.append, modules=args.module or (),
                                 qemu_args=split_qemu_args(args.qemu_arg or ()), qemu_command=args.qemu_command,
                                 image=image)
        except KgenError as err:
            raise UsageError(str(err)) from None
        qemu = KernelUnderTest(elf_path, elf, boot=boot).qemu     # as under kgen test
        # The user's disks as given: under `kgen run` the guest's writes are the user's to keep.
        target = boot.machine_options(elf_path, qemu=qemu, accel=args.accel, poison=None, disks_writable=True)
    elif args.firmware == "uefi":
        if "iso" not in target:
            raise UsageError("--firmware uefi boots an ISO (GRUB under OVMF): drop --direct")
        target.update(firmware="uefi", qemu=X86_64.qemu)    # OVMF is x86_64 firmware; it boots an i386 kernel too
    target = {"accel": args.accel, "memory_mib": guest_memory_mib(args, layout), "qemu": qemu, **target}
    # Under TCG, QEMU logs the exceptions from the start: a triple fault is then named from its first fault.
    target.setdefault("exception_log", args.accel == "tcg")
    # GRUB on SeaBIOS under TCG: counted instructions (grub_icount).
    target.setdefault("icount", grub_icount("iso" in target, target.get("firmware", "bios"), args.accel))
    # --ready-at: held at the first instruction with the gdbstub up, so its breakpoint is in before the CPU runs.
    held = dict(gdbstub=True, start_paused=True) if ready.kind == "at" else {}
    machine = Machine(**target, echo_serial=True, **held)
    launch_refusing(machine, elf_path if elf is not None else None, elf, boot)
    with _shut_down_after(machine):
        try:
            if args.kernel is not None:
                stopped = _foreign_stop(machine, elf, ready, args.timeout, boot.loads_its_own)
                if stopped is not None:
                    _end_kernel_line(machine)
                    print(f"kgen: {stopped}", file=sys.stderr)
                    return EXIT_OK
            status = machine.wait_exit(args.timeout)
        except MachineError as err:
            # A kernel that exits at once can close QMP under a query: then its exit status is the verdict.
            status = _late_exit_status(machine)
            if status is None:
                failure = explain(machine, elf, err)
                hint = ""
                if args.accel == "kvm":
                    hint = (f" - this host's KVM may be unable to run {layout.arch}'s paging mode "
                            "(docs/toolchain.md); try --accel tcg")
                _end_kernel_line(machine)
                print(failure.details, file=sys.stderr)
                raise KernelFailed(failure.summary + hint) from None
        if status == -signal.SIGINT:
            raise KeyboardInterrupt     # Ctrl-C reached QEMU (same process group) before it reached us
        said_success = reported_success(machine.serial)
        deadline = time.monotonic() + SERIAL_GRACE
        while status == layout.success_status and not said_success and time.monotonic() < deadline:
            time.sleep(0.05)        # QEMU is gone; on a loaded host its last COM1 bytes may still be on the way
            said_success = reported_success(machine.serial)
        if status == layout.success_status and said_success:
            return EXIT_OK
        host = machine.host_failure(status)
        if host is not None:
            _end_kernel_line(machine)
            raise KgenError(host)       # status 5: the host failed, no verdict on the kernel
        if status == layout.success_status:
            meaning = (f"the success status, but the kernel's last COM1 line is not {EXIT_SUCCESS!r}: "
                       "something other than exit_success wrote to the debug-exit port")
        elif status == layout.failure_status:
            meaning = "the kernel's failure status"
        else:
            meaning = f"not the kernel's success status {layout.success_status}"
        failure = explain(machine, elf, f"exit status {status}, {meaning}")
    _end_kernel_line(machine)
    print(failure.details, file=sys.stderr)
    print(f"kgen: {failure.summary}", file=sys.stderr)
    return EXIT_KERNEL_FAILED


def _end_kernel_line(machine) -> None:
    """End the kernel's last COM1 line on the terminal, so kgen's own lines on stderr start on a line of their own."""
    if machine.serial and not machine.serial.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


@contextmanager
def _shut_down_after(machine):
    try:
        yield machine
    finally:
        machine.shutdown()


def _foreign_stop(machine, elf: ElfInfo, ready: Ready, timeout: float, in_kernel_only: bool = False) -> str | None:
    """For a kernel given with --kernel: the line saying it stopped cleanly (ready as `ready` says, or halted as
    `kgen test` waits for), or None when QEMU exited first (its status is then judged as for any kernel). A
    kernel that gets neither far raises the MachineError `explain` reads."""
    try:
        how = wait_booted(machine, ready, timeout, elf, in_kernel_only=in_kernel_only)
    except MachineError:
        if machine.status() == "exited":
            return None
        raise
    machine.stop()
    regs = machine.registers()
    where = at_ip(elf, regs.eip, regs.mode)
    paging = "on" if regs.cr0 & hw.CR0_PG else "off"
    if ready.kind is not None:
        return f"ready: the kernel {how} (CPU at {where}, paging {paging})"
    return f"halted: the kernel {how}, at {where} (a clean stop; --ready TEXT asks for its own line instead)"

