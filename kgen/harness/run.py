"""`kgen run`: boot a kernel with its serial output on the terminal; exit 0 only when the kernel reported success."""
from __future__ import annotations

import os
import sys

from kgen.build import config as configmod
from kgen.guest.diagnose import explain
from kgen.guest.elfinfo import ElfInfo
from kgen.errors import KgenError, MachineError
from kgen.build.layout import compute

KVM_DEVICE = "/dev/kvm"


def require_kvm():
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        raise KgenError(f"--accel kvm: {KVM_DEVICE} is missing or not accessible on this host; use --accel tcg")


def run(args) -> int:
    from kgen.build.pipeline import build
    from kgen.machine import Machine

    cfg = configmod.load(args.config, args.arch)
    if args.memory is not None:
        cfg = cfg.with_values(machine_memory_mib=args.memory, source=f"{cfg.source} with --memory")
    layout = compute(cfg)
    if args.accel == "kvm":
        require_kvm()
    if args.append is not None and args.iso is not None:
        raise KgenError("--append needs a directly booted kernel (--kernel or --direct); GRUB's menu sets the "
                        "ISO's command line")
    target: dict = {}
    elf_path = None
    if args.kernel is not None:
        elf_path = args.kernel
        target = {"kernel": args.kernel, "append": args.append}
    elif args.iso is not None:
        if not args.iso.is_file():
            raise KgenError(f"--iso {args.iso}: no such file")
        target = {"iso": args.iso}
    else:
        out = build(cfg, args.out, iso=not args.direct, force=False)
        elf_path = out.elf
        target = {"kernel": out.elf, "append": args.append} if args.direct else {"iso": out.iso}
    if elf_path is not None and not elf_path.is_file():
        raise KgenError(f"--kernel {elf_path}: no such file")
    elf = ElfInfo.load(elf_path) if elf_path is not None else None

    # GRUB 2.06 on SeaBIOS under TCG can crash in real mode when a timer interrupt lands at the wrong moment,
    # which happens on a loaded host (see TOOLCHAIN-NOTES). Counting instructions for time makes the boot
    # deterministic and it does not crash; it costs a few seconds.
    icount = "iso" in target and args.accel == "tcg"
    with Machine(**target, accel=args.accel, memory_mib=layout.memory_mib, echo_serial=True, icount=icount,
                 debug_exit_port=layout.debug_exit_port, qemu=layout.architecture.qemu) as machine:
        try:
            status = machine.wait_exit(args.timeout)
        except MachineError as err:
            failure = explain(machine, elf, err)
            hint = ""
            if args.accel == "kvm":
                hint = (f" - this host's KVM may be unable to run {layout.arch}'s paging mode (docs/toolchain.md); "
                        "try --accel tcg")
            sys.stdout.flush()
            print(failure.details, file=sys.stderr)
            raise KgenError(failure.summary + hint) from None
        if status == layout.success_status:
            return 0
        meaning = "the kernel's failure status" if status == layout.failure_status else (
            f"not the kernel's success status {layout.success_status}")
        failure = explain(machine, elf, f"exit status {status}, {meaning}")
    sys.stdout.flush()
    print(failure.details, file=sys.stderr)
    print(f"kgen: {failure.summary}", file=sys.stderr)
    return 1
