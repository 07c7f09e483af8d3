"""A kernel given with --kernel (or the config's [foreign] table), as `kgen test`, `kgen run` and `kgen inspect`
take it: its options from the command line and the table, checked against its ELF before anything boots, and one
boot before the suite so a kernel that never gets ready is reported once.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from kgen.build import config as configmod
from kgen.build.config import show_path, show_value
from kgen.errors import EXIT_CHECKS_FAILED, KgenError, UsageError, input_file_problem
from kgen.guest import dwarfspaces
from kgen.guest.addrspaces import parse_spec
from kgen.guest.diagnose import RunFailed
from kgen.guest.elfinfo import ElfInfo
from kgen.build.layout import compute
from kgen.build.pipeline import check_out_dir
from kgen.guest.loaded import kernel_not_in_memory
from kgen.harness.bootnames import BOOT_METHODS, FIRMWARES
from kgen.harness.bootpath import cache_dir
from kgen.harness.checkat import CheckAt
from kgen.harness.image import check_image, find_kernel
from kgen.harness.kernel import KernelUnderTest, boot_only_problem, check_qemu_accepts, kernel_base_problem
from kgen.harness.live import boot, boot_with_zeroed_ram
from kgen.harness.qemuargs import check_modules, require_qemu, split_qemu_args
from kgen.harness.symbols import judged_elf
from kgen.harness.ready import READY_OPTIONS, resolve_ready_at

# [foreign] key (kgen/build/config.py ForeignConfig) -> the command-line option's attribute holding the same.
FOREIGN_OPTIONS = {**{name: name for name in READY_OPTIONS}, "boot_timeout": "boot_timeout", "memory": "memory",
                   "append": "append", "modules": "module", "qemu_args": "qemu_arg",
                   "address_spaces": "address_spaces", "boot_only_segments": "boot_only_segment", "boot": "boot",
                   "firmware": "firmware", "qemu_command": "qemu_command",
                   "image": "image", "symbols": "symbols", "kernel_base": "kernel_base",
                   "check_at": "check_at", "check_count": "check_count", "check_for": "check_for"}
# The --check-at keys: `kgen test` only, for a kernel given with --kernel (kgen's own is checked at every as_switch
# by the suite's own stage, kgen/harness/suite/test_check_at.py).
CHECK_AT_OPTIONS = ("check_at", "check_count", "check_for")


def apply_foreign_config(args) -> None:
    """Give `kgen test`, `kgen run` and `kgen inspect` what the config's [foreign] table holds for a kernel under
    test (the --config file, else ./kgen.toml): with `kernel` set and no --kernel (nor --iso or --direct), that
    kernel is the one checked; for a kernel given either way, every option the command line left unset takes the
    table's value (one --ready* option on the command line sets aside all the table's ready keys), and --memory
    falls back to [foreign].memory, then to machine.memory_mib if the file sets it. A value of the table that is
    wrong for this kernel (no such file, symbol or program header) is one line naming its key (UsageError)."""
    if getattr(args, "iso", None) is not None or getattr(args, "direct", False):
        return      # kgen's own kernel: the table is not about it
    config = configmod.load(args.config, args.arch)
    foreign = config.foreign
    if (args.kernel is None and getattr(args, "image", None) is None
            and (foreign is None or foreign.kernel is None and foreign.image is None)):
        if getattr(args, "boot_only_segment", None):
            raise UsageError("--boot-only-segment is for a kernel given with --kernel (or [foreign] kernel)")
        return
    from_table: set[str] = set()     # the keys whose values the table gave
    if foreign is not None:
        if args.kernel is None:
            args.kernel = foreign.kernel
            from_table.add("kernel")
        ready_given = any(getattr(args, FOREIGN_OPTIONS[key], None) is not None for key in READY_OPTIONS)
        for key, attr in FOREIGN_OPTIONS.items():
            if key == "boot_timeout" and not hasattr(args, attr):
                attr = "timeout"        # kgen run's name for it
            value = getattr(foreign, key)
            if value is None or not hasattr(args, attr) or getattr(args, attr) is not None:
                continue
            if key in READY_OPTIONS and ready_given:
                continue
            if key == "qemu_args":
                value = [shlex.join(value)] if value else []      # one array item, one QEMU argument
            elif key in ("modules", "boot_only_segments", "symbols"):
                value = list(value)
            setattr(args, attr, value)
            from_table.add(key)
    if getattr(args, "memory", None) is None and "machine_memory_mib" in config.explicit:
        args.memory = config.machine_memory_mib     # the one key of kgen's own config a foreign kernel uses
    if from_table:
        _check_from_table(args, foreign, from_table)


def _check_from_table(args, foreign, from_table: set[str]) -> None:
    """The table's values that only this kernel can judge, each refused in one line naming its key."""

    def refuse(key: str, why: str) -> UsageError:
        value = getattr(foreign, key)
        shown = show_value(str(value) if key == "kernel" else list(value) if isinstance(value, tuple) else value,
                           decimal=key != "kernel_base")
        return UsageError(f"{foreign.key(key)} = {shown}: {why}")

    if "kernel" in from_table and input_file_problem(args.kernel):
        raise refuse("kernel", input_file_problem(args.kernel))
    if "modules" in from_table:
        for spec in foreign.modules:
            path = spec.partition(",")[0]
            problem = input_file_problem(path)
            if problem:
                raise refuse("modules", f"{path!r}: {problem}")
    if not args.kernel.is_file():
        return          # --kernel's own check says so
    try:
        elf = ElfInfo.load(args.kernel)
    except KgenError as err:
        if "kernel" in from_table:
            raise refuse("kernel", str(err).removeprefix(f"{args.kernel}: ")) from None
        return          # --kernel's own check says so
    try:
        elf = judged_elf(getattr(args, "symbols", None)) or elf     # what the symbol keys below are about
    except KgenError as err:
        if "symbols" in from_table:
            raise refuse("symbols", str(err).removeprefix("--symbols ")) from None
        return          # --symbols' own check says so
    for index in (args.boot_only_segment or ()) if "boot_only_segments" in from_table else ():
        problem = boot_only_problem(elf, index)
        if problem is not None:
            raise refuse("boot_only_segments", f"{index}: {problem}")
    if "kernel_base" in from_table and (problem := kernel_base_problem(elf, foreign.kernel_base)) is not None:
        raise refuse("kernel_base", problem)
    for key, allowed in (("boot", BOOT_METHODS), ("firmware", FIRMWARES)):
        if key in from_table and getattr(foreign, key) not in allowed:
            raise refuse(key, f"give one of {', '.join(allowed)}")
    if "ready_symbol" in from_table and foreign.ready_symbol not in elf.symbols:
        raise refuse("ready_symbol", f"{elf.path.name} has no such symbol")
    if "ready_at" in from_table:
        try:
            resolve_ready_at(elf, foreign.ready_at)
        except KgenError as err:
            raise refuse("ready_at", str(err)) from None
    if from_table & set(CHECK_AT_OPTIONS):
        try:
            CheckAt.from_options(elf, args.check_at, args.check_count, args.check_for)
        except KgenError as err:
            key = next(key for key in CHECK_AT_OPTIONS if key in from_table)
            raise refuse(key, str(err).removeprefix(f"{elf.path.name}: ")) from None
    if "address_spaces" in from_table:
        try:
            parse_spec(foreign.address_spaces, elf)
        except KgenError as err:
            raise refuse("address_spaces", str(err)) from None


def image_kernel(args) -> Path | None:
    """--image checked (one line if it cannot be read) and, without --kernel, the kernel its loader names taken out
    of it into args.kernel, saying which; the image, or None without --image."""
    image = getattr(args, "image", None)
    if image is None:
        return None
    check_image(image)
    if args.kernel is None:
        found = find_kernel(image, cache_dir("image-kernels"))
        if found is None:
            raise UsageError(f"--image {image}: found no kernel in it (an ISO's GRUB multiboot/multiboot2 line or "
                             "Limine kernel path); name the ELF it boots with --kernel")
        print(f"kgen: --image {image.name}: checking {found.path_in_image}, the kernel its {found.config} loads",
              file=sys.stderr)
        args.kernel = found.elf
    return image


def foreign_kernel_from_args(args) -> KernelUnderTest:
    """The --kernel ELF and its boot and "when to look" options (`_add_foreign_boot_args` in kgen/cli), as
    `kgen test --kernel` and `kgen inspect --kernel` take them (after `apply_foreign_config`): a missing file or
    module, no usable ELF, or options that do not fit it, is one line (UsageError)."""
    image = image_kernel(args)
    problem = input_file_problem(args.kernel)
    if problem:
        raise UsageError(f"--kernel {show_path(args.kernel)}: {problem}")
    check_modules(getattr(args, "module", None) or ())
    judged = judged_elf(getattr(args, "symbols", None))     # one line for a missing file, no ELF, a bad @OFFSET
    try:
        kernel = KernelUnderTest.foreign(   # a file that is no usable ELF fails here, in one line
            args.kernel, boot_timeout=getattr(args, "boot_timeout", None),
            memory_mib=getattr(args, "memory", None), append=getattr(args, "append", None),
            modules=getattr(args, "module", None) or (),
            qemu_args=split_qemu_args(getattr(args, "qemu_arg", None) or ()),
            boot_only_segments=getattr(args, "boot_only_segment", None), boot_method=getattr(args, "boot", None),
            firmware=getattr(args, "firmware", None), qemu_command=getattr(args, "qemu_command", None), image=image,
            judged=judged, kernel_base=getattr(args, "kernel_base", None),
            **{name: getattr(args, name, None) for name in READY_OPTIONS})
    except KgenError as err:
        raise UsageError(f"--kernel {err}") from None
    if getattr(args, "address_spaces", None):
        try:
            parse_spec(args.address_spaces, kernel.elf)
        except KgenError as err:
            raise UsageError(str(err)) from None
    try:
        CheckAt.from_options(kernel.elf, *(getattr(args, key, None) for key in CHECK_AT_OPTIONS))
    except KgenError as err:
        raise UsageError(str(err)) from None
    return kernel


def checked_kernel(args) -> KernelUnderTest:
    """The kernel `kgen test` and `kgen inspect` look at, ready to boot: --kernel's, its options checked and QEMU
    asked once whether it takes it; or kgen's own, built from the config (and an option only --kernel takes refused
    in one line)."""
    if args.kernel is not None or getattr(args, "image", None) is not None:
        kernel = foreign_kernel_from_args(args)
        require_qemu(kernel.qemu)
        check_qemu_accepts(kernel)
        if kernel.boot.name != "direct":        # not QEMU's -kernel, as before boot paths: say which way in
            print(f"kgen: booting {kernel.elf_path.name} through {kernel.boot.describe()}", file=sys.stderr)
        return kernel
    used = [attr for key, attr in FOREIGN_OPTIONS.items()
            if key not in ("boot_only_segments", "firmware") and getattr(args, attr, None)]
    if "qemu_command" in used:
        used.insert(0, used.pop(used.index("qemu_command")))     # the one the others follow from
    if used and used[0] in CHECK_AT_OPTIONS:
        raise UsageError(f"--{used[0].replace('_', '-')} is for a kernel given with --kernel; kgen's own kernel "
                         "is checked at every as_switch by the suite (test_every_space_holds_at_every_as_switch)")
    if used:
        raise UsageError(f"--{used[0].replace('_', '-')} is for a kernel given with --kernel; a kgen kernel "
                         "takes its machine from the config")
    check_out_dir(args.out)
    require_qemu(compute(configmod.load(args.config, args.arch)).arch.qemu)     # before a build: say it now
    # Built once here, so parallel workers find it up to date instead of each writing it.
    return KernelUnderTest.built(args.config, args.out, args.arch, getattr(args, "firmware", None))


def check_boots(kernel: KernelUnderTest, accel: str, *, find_spaces: bool = False) -> str | None:
    """Boot a foreign kernel once before the suite: one that never gets to the state the checks look at is
    reported once, its diagnosis on stderr and one line, status 1 (a finding about the kernel), instead of once per
    test. With `find_spaces` (no --address-spaces given), the expressions its DWARF suggests are tried on the booted
    machine (`proposed_spaces`): the one used, or None."""
    try:
        with boot(kernel, accel, cold=True) as live:
            # A loader of the author's (--image, --qemu-command) may boot another file than the ELF given.
            elsewhere = (kernel_not_in_memory(live.view(), kernel.elf_path) if kernel.boot.loads_its_own
                         else None)
            chosen = proposed_spaces(live.view()) if find_spaces and elsewhere is None else None
    except RunFailed as err:
        sys.stdout.flush()
        print(err.details(), file=sys.stderr)
        failure = boot_with_zeroed_ram(kernel, accel, err.failure)
        what = (f"--image {kernel.boot.image.name}" if kernel.boot.name == "image"
                else f"--kernel {kernel.elf_path.name}")
        for finding in failure.findings:        # each a line of its own, before the verdict
            print(f"kgen: finding: {what} {finding}", file=sys.stderr)
        failed = KgenError(f"{what} did not boot to a state the checks can look at: {failure.summary}",
                           exit_code=EXIT_CHECKS_FAILED)
        failed.failure = failure            # for the --json report
        raise failed from None
    if elsewhere is not None:
        raise UsageError(f"--kernel {kernel.elf_path.name}: {elsewhere}; give the ELF the image boots")
    return chosen


def proposed_spaces(view) -> str | None:
    """Without --address-spaces: the candidates the kernel's DWARF suggests (kgen/guest/dwarfspaces.py `propose`),
    each tried on the booted machine and said on stderr with its verdict; the usable one that yields the most spaces
    is used, and said so with the option that pins it. None (and nothing said) for an ELF without DWARF or
    candidates."""
    proposals = dwarfspaces.propose(view)
    if not proposals:
        return None
    name = view.elf.path.name
    for proposal in proposals:
        verdict = "plausible" if proposal.problem is None else "not used"
        print(f"kgen: {name}: its DWARF suggests --address-spaces {proposal.describe()} [{verdict}]", file=sys.stderr)
    best = proposals[0]
    if best.problem is not None:
        print(f"kgen: {name}: no suggested expression names plausible top-level tables; checking the space in CR3 "
              f"only (give --address-spaces EXPR)", file=sys.stderr)
        return None
    print(f"kgen: {name}: checking every space of {best.expression}; pin it with "
          f"--address-spaces {shlex.quote(best.expression)}", file=sys.stderr)
    return best.expression
