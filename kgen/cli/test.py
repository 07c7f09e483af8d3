"""`kgen test`: build the kernel (or take the one given with --kernel), check what can be checked before anything
runs, then run the invariant suite (kgen/harness/suite, shipped in the package) on pytest, with pytest's exit
statuses mapped onto kgen's.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

from kgen.errors import (EXIT_CHECKS_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, KgenError,
                         ToolMissing, UsageError)
from kgen.harness import suite
from kgen.scratch import scratch_dir
from kgen.harness.foreign import FOREIGN_OPTIONS, check_boots, checked_kernel
from kgen.harness.kvmprobe import require_kvm_for
from kgen.harness.outputs import check_report_path
from kgen.machine.machine import check_room_for_ram

PLUGIN_ENTRY_POINT = "kgen"
SUITE = Path(suite.__file__).resolve().parent


def pytest_args(args, extra: list[str]) -> list[str]:
    """The pytest command line that runs the packaged suite as `kgen test` was asked to."""
    argv = [str(SUITE), "-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE),
            # The suite may live in site-packages: write no cache there.
            "-p", "no:cacheprovider", "--kgen-accel", args.accel]
    if importlib.metadata.entry_points(group="pytest11", name=PLUGIN_ENTRY_POINT):
        # pytest would rewrite the asserts of the plugin's package, but `kgen test` has imported kgen already.
        argv += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    else:
        argv += ["-p", "kgen.harness.pytest_plugin"]      # a checkout on PYTHONPATH: the entry point is not installed
    if args.kernel is not None:
        argv += ["--kgen-kernel", str(args.kernel.resolve())]
        # Each of the kernel's options as the plugin's --kgen-<option>; `=` forms: a value may begin with "-" (a QEMU
        # argument) or hold spaces.
        for attr in FOREIGN_OPTIONS.values():
            value = getattr(args, attr, None)
            option = "--kgen-" + attr.replace("_", "-")
            if attr == "module":        # the file as an absolute path: pytest runs elsewhere
                value = [f"{Path(m.partition(',')[0]).resolve()}" + m[len(m.partition(',')[0]):] for m in value or ()]
            if attr == "symbols":           # ELF[@OFFSET], absolute: pytest runs elsewhere
                value = [os.path.abspath(spec) for spec in value or ()]
            if attr == "boot_only_segment" and value == []:     # [foreign] boot_only_segments = []: none at all
                value = ["none"]
            if isinstance(value, list):
                argv += [f"{option}={item}" for item in value]
            elif value is not None and value != "":
                argv.append(f"{option}={value}")
    else:
        if args.config is not None:
            argv += ["--kgen-config", str(args.config.resolve())]
        if args.arch is not None:
            argv += ["--kgen-arch", args.arch]
        argv += ["--kgen-out", str(args.out.resolve())]
        if getattr(args, "firmware", None) is not None:
            argv += ["--kgen-firmware", args.firmware]
    if getattr(args, "cold_boot", False):
        argv.append("--kgen-cold-boot")
    if args.keyword:
        argv += ["-k", args.keyword]
    if getattr(args, "shard", None) is not None:
        argv.append(f"--kgen-shard={args.shard}")
    if args.exitfirst:
        argv.append("-x")
    if args.junitxml is not None:
        argv.append(f"--junitxml={args.junitxml.resolve()}")
    if getattr(args, "json_path", None) is not None:      # set by kgen.harness.jsonreport.run_suite_json
        argv.append(f"--kgen-json={args.json_path.resolve()}")
    if str(args.jobs) not in ("0", "1"):
        if importlib.util.find_spec("xdist") is None:
            raise ToolMissing("parallel machines need pytest-xdist: pip install 'kgen[test]', or pass -j 1")
        # By module: a module's machine booted for looking (kgen_idle) and the KVM probe then happen once.
        argv += ["-n", str(args.jobs), "--dist", "loadscope"]
    return argv + list(extra)


# pytest's exit codes (pytest.ExitCode) as kgen's (kgen/errors.py): pytest's 2 (interrupted) would read as a config
# error and its 3 (internal error) as a missing tool. 5 is "no tests collected" (a -k that selects nothing), 6 more
# warnings than a --max-warnings the user set.
PYTEST_EXIT = {0: EXIT_OK, 1: EXIT_CHECKS_FAILED, 2: EXIT_INTERRUPTED, 3: EXIT_INTERNAL, 4: EXIT_USAGE, 5: EXIT_USAGE,
               6: EXIT_CHECKS_FAILED}


class StopReason:
    """Why pytest's run ended early. pytest-xdist stops `-x` / `--maxfail` runs by raising its own `Interrupted` (a
    KeyboardInterrupt), so pytest reports them as interrupted (2): that is a failed check, only a real Ctrl-C is 130."""
    def __init__(self) -> None:
        self.failures_reached_maxfail = False

    def pytest_keyboard_interrupt(self, excinfo) -> None:
        try:
            from xdist.dsession import Interrupted
        except ImportError:         # -j 1 without pytest-xdist: a KeyboardInterrupt is a Ctrl-C
            return
        self.failures_reached_maxfail = isinstance(excinfo.value, Interrupted)


def check_keyword(expression: str) -> None:
    """Refuse a -k expression pytest would refuse, before anything is built."""
    try:
        from _pytest.mark.expression import Expression     # pytest's own parser; private, so only if it is there
    except ImportError:
        return
    try:
        Expression.compile(expression)
    except Exception as err:  # noqa: BLE001 - ParseError, whose home module is private too
        raise UsageError(f"-k {expression!r}: {err}") from None


def run_suite(args, extra: list[str]) -> int:
    """`kgen test`: build the kernel (unless --kernel), run the suite; pytest's exit status mapped onto kgen's.

    pytest's temporary directories go in a directory of this run's, removed at the end, so nothing is left in the
    user's TMPDIR (pytest would keep `pytest-of-USER/` there)."""
    if importlib.util.find_spec("pytest") is None:
        raise ToolMissing("kgen test needs pytest: pip install 'kgen[test]'")
    if args.keyword:
        check_keyword(args.keyword)
    if args.junitxml is not None:
        check_report_path("--junitxml", args.junitxml)
    kernel = checked_kernel(args)
    check_room_for_ram(kernel.memory_mib)       # a full TMPDIR: one line (status 5), not an error per test
    if args.accel == "kvm":
        require_kvm_for(kernel, args.out if args.kernel is None else None)     # its probe is a boot under KVM
    elif args.kernel is not None:
        found = check_boots(kernel, args.accel, find_spaces=not getattr(args, "address_spaces", None))
        if found is not None:
            args.address_spaces = found     # forwarded to the suite as --kgen-address-spaces
    argv = pytest_args(args, extra)
    import pytest       # here, not at the top: `kgen test` without pytest installed is the one line above

    scratch = None
    if not any(arg == "--basetemp" or arg.startswith("--basetemp=") for arg in extra):
        scratch = scratch_dir("test")
        argv += ["--basetemp", str(scratch / "pytest")]
    stop = StopReason()
    try:
        status = int(pytest.main(argv, plugins=[stop]))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    code = PYTEST_EXIT.get(status, EXIT_INTERNAL)
    if code == EXIT_INTERRUPTED and stop.failures_reached_maxfail:
        code = EXIT_CHECKS_FAILED
    if code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt         # one line and 130, as anywhere else in kgen
    if status == 5:
        if getattr(args, "shard", None) is not None:
            raise UsageError(f"share {args.shard} of the checks is empty: fewer checks were selected"
                             + (f" by -k {args.keyword!r}" if args.keyword else "") + " than there are shares; "
                             "use fewer shares (`kgen test -- --collect-only -q` lists the checks)")
        raise UsageError("no test was selected" + (f" by -k {args.keyword!r}" if args.keyword else "")
                         + "; `kgen test -- --collect-only -q` lists them")
    if status == 3:
        raise KgenError("pytest stopped with an internal error (its report is above)")
    return code
