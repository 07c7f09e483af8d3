"""`kgen build | run | test`. Every failure ends as one line on stderr and a documented exit status (kgen/errors.py),
never a traceback; Ctrl-C at any moment ends with one line and status 130.

Only the standard library is imported at module level: an interrupt during the imports that follow (LIEF's
extension takes ~0.2 s) must land inside `main`'s handler, not in the interpreter's traceback printer.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import signal
import sys
import threading
from pathlib import Path

from kgen.errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, KgenError, OneLineParser,
                         exit_codes_text)

# The default output folder. It was build/ until this release; a build/ that holds a kgen build and no out/ beside it
# is still used, with a note (`output_folder`), so a checkout's old `kgen run` keeps finding its kernel. build/ read
# as the package kgen/build to newcomers.
DEFAULT_OUT = Path("out")
OLD_DEFAULT_OUT = Path("build")
DEFAULT_TIMEOUT = 30.0


def positive_seconds(text: str) -> float:
    """A timeout: a finite number of seconds above zero (nan, inf, 0 and negatives would each disable or break the
    hang detection)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a timeout must be a finite number of seconds above 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0")
    return value


def nonempty_text(text: str) -> str:
    """A text to wait for or a symbol to stop at: an empty one would match at once or nothing ([foreign] refuses
    it too)."""
    if text == "":
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def segment_index(text: str) -> int:
    """--boot-only-segment: a program-header index, as `readelf -l` numbers them (its range is the ELF's to judge)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a program-header index (0, 1, ... as readelf -l "
                                         "shows them)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a program-header index is 0 or above")
    return value


def address(text: str) -> int:
    """--kernel-base: an address, 0x... or decimal (whether it fits the kernel is the ELF's to judge)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (0xC0000000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an address is 0 or above")
    return value


def shard(text: str):
    """--shard K/N: one machine's share of the checks (kgen/harness/shard.py)."""
    from kgen.harness.shard import Shard, ShardError
    try:
        return Shard.parse(text)
    except ShardError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# More parallel machines than this is no plan but a typo: each is a QEMU with its RAM, and pytest-xdist would try to
# start them all (-j 99999999999 ended in MemoryError).
MAX_JOBS = 256


def jobs(text: str) -> str:
    """-j: how many machines at once; pytest-xdist's own refusal would be a usage screen, not one line."""
    if text in ("auto", "logical"):
        return text
    if text.isdigit() and text.isascii():
        if int(text) > MAX_JOBS:
            raise argparse.ArgumentTypeError(f"{text}: at most {MAX_JOBS} parallel machines (each is a QEMU with its "
                                             "own RAM); give fewer, or auto (one per core)")
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give a number of parallel machines, or auto")


def _add_config_args(p: argparse.ArgumentParser):
    from kgen.arch import ARCHES
    p.add_argument("--config", type=Path, help="kgen.toml to read (default: ./kgen.toml if present, else defaults)")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default: {DEFAULT_OUT}/)")
    p.add_argument("--arch", choices=tuple(ARCHES),
                   help="target architecture (default: the config's `arch`, else i386); keys the config does not set "
                        "take this architecture's defaults")


def _add_foreign_boot_args(p: argparse.ArgumentParser):
    """How to boot a kernel given with --kernel, and when it counts as booted (kgen/harness/bootpath.py, ready.py)."""
    p.add_argument("--ready", type=nonempty_text, metavar="TEXT", help="with --kernel: COM1 text the kernel prints once booted (default: "
                   "booted when it halts with interrupts off, or idles in hlt with paging on)")
    p.add_argument("--ready-symbol", type=nonempty_text, metavar="SYMBOL", help="with --kernel: booted once the CPU stays inside this "
                   "function of the ELF (its idle or busy loop), found by sampling EIP")
    p.add_argument("--ready-at", type=nonempty_text, metavar="SYMBOL", help="with --kernel: stop the CPU the first time it reaches this "
                   "symbol of the ELF (or 0x address), by a breakpoint through QEMU's gdbstub")
    p.add_argument("--ready-vga", type=nonempty_text, metavar="TEXT", help="with --kernel: booted once the VGA text screen (0xB8000) "
                   "shows this text (a kernel that prints only to the screen)")
    p.add_argument("--ready-after", type=positive_seconds, metavar="SECONDS", help="with --kernel: booted once "
                   "paging is on and the page tables have not changed for this long (a kernel that never halts)")
    p.add_argument("--module", action="append", metavar="FILE[,ARGS]",
                   help="with --kernel: a Multiboot module (QEMU -initrd) and its command line; repeatable")
    p.add_argument("--qemu-arg", action="append", metavar="ARGS",
                   help="with --kernel: more QEMU arguments, split like a shell line (--qemu-arg '-smp 2'); "
                        "repeatable")
    from kgen.harness.bootnames import BOOT_METHODS, FIRMWARES
    p.add_argument("--boot", choices=BOOT_METHODS, help="with --kernel: how to boot it: "
                   "direct is QEMU's -kernel (Multiboot 1, BIOS); grub an ISO kgen makes with GRUB around the ELF "
                   "(its multiboot line, or multiboot2 for an ELF with only a Multiboot 2 header; grub-multiboot2 "
                   "for one with both). Default: direct for a Multiboot 1 ELF under the BIOS, else grub")
    p.add_argument("--image", type=Path, metavar="FILE", help="boot your own bootable image as it is (an ISO as the "
                   "CD-ROM, anything else as the first disk; never written); --kernel names the ELF it boots, else "
                   "kgen looks for it in an ISO's GRUB or Limine configuration")
    p.add_argument("--qemu-command", metavar="'qemu-system-x86_64 ...'", help="with --kernel: boot it with your own "
                   "QEMU command line (your Makefile's run target), kept but for what kgen owns: its QMP socket, COM1 "
                   "capture instead of -serial stdio, -display none, the RAM as a shared file sized from -m")
    p.add_argument("--firmware", choices=FIRMWARES, help="SeaBIOS (default) or UEFI through OVMF (Debian's ovmf; "
                   "boots through GRUB), for kgen's kernel or one given with --kernel")


def _add_checked_kernel_args(p: argparse.ArgumentParser, what: str):
    """--kernel and everything about booting and judging it, alike for `kgen test` and `kgen inspect`."""
    p.add_argument("--kernel", type=Path, help=f"{what} (default: the config's [foreign] kernel, if set; [foreign] "
                   "also holds the options below)")
    _add_foreign_boot_args(p)
    p.add_argument("--boot-timeout", type=positive_seconds, metavar="SECONDS",
                   help="with --kernel: seconds to wait for the booted state (default: 60)")
    p.add_argument("--memory", type=positive_int, metavar="MIB", help="with --kernel: guest RAM in MiB (default: "
                   "machine.memory_mib of --config, else 128)")
    p.add_argument("--append", metavar="CMDLINE", help="with --kernel: the kernel command line")
    p.add_argument("--boot-only-segment", type=segment_index, action="append", metavar="N", help="with --kernel: "
                   "program header N (as readelf -l numbers them) is boot code: unmapped once the kernel runs high "
                   "is as meant, and it is not the kernel base (default: a segment linked where it is loaded in an "
                   "otherwise higher-half kernel); repeatable")
    p.add_argument("--symbols", action="append", metavar="ELF[@OFFSET]", help="with --kernel or --image: the ELF "
                   "of the kernel that runs, when what boots is a loader stage carrying it: its segments are judged "
                   "and its symbols name addresses (--ready-at, --ready-symbol, fault reports); @OFFSET for one "
                   "running OFFSET bytes above its link addresses; repeatable (judged as one kernel, the first "
                   "ELF's name winning a symbol two define; --boot-only-segment counts their program headers on)")
    p.add_argument("--kernel-base", type=address, metavar="ADDR", help="with --kernel, a 32-bit kernel: its kernel "
                   "half starts at ADDR (default: where its ELF is linked above its load address; x86_64's is always "
                   "the upper canonical half): supervisor mappings from there up are the kernel's, pages below "
                   "belong to processes")


def cmd_build(args) -> int:
    from kgen.build import config as configmod
    from kgen.build.pipeline import build, check_out_dir
    check_out_dir(args.out)
    cfg = configmod.load(args.config, args.arch)
    out = build(cfg, args.out, iso=not args.no_iso)
    print(f"kgen: wrote {out.elf}" + (f" and {out.iso}" if out.iso else ""))
    return 0


def cmd_run(args) -> int:
    from kgen.harness.run import run
    return run(args)


def cmd_bench(args, extra: list[str]) -> int:
    if args.harness:
        from kgen.harness.benchharness import main as bench_main
        return bench_main(extra)
    from kgen.harness.bench import main as bench_main
    from kgen.inspect.html import render_bench_html     # the page is inspect's; the harness below it takes it
    return bench_main(extra, render_html=render_bench_html)


def cmd_test(args, extra: list[str]) -> int:
    from kgen.cli.test import run_suite
    if args.json is not None:
        from kgen.harness.jsonreport import run_suite_json
        return run_suite_json(args, extra, run_suite)
    return run_suite(args, extra)


def virtual_address(text: str) -> int:
    """--va: an address in hex (0x...) or decimal, 0 or above."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (0xc0100000 or decimal)") from None
    if value < 0 or value >= 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 64-bit virtual address")
    return value


def cmd_inspect(args) -> int:
    from kgen.inspect import run as inspect_run
    return inspect_run(args)


def cmd_debug(args, extra: list[str]) -> int:
    from kgen.debug.launcher import debug
    return debug(args, extra)


def cmd_doctor(args) -> int:
    from kgen.cli.doctor import doctor
    return doctor(args)


def parser() -> argparse.ArgumentParser:
    top = OneLineParser(prog="kgen", description="Generate a higher-half x86 kernel and check it in QEMU.",
                  epilog=exit_codes_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, epilog=exit_codes_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
                              **kwargs)

    b = command("build", help=f"write {DEFAULT_OUT}/kernel.elf and {DEFAULT_OUT}/kernel.iso")
    _add_config_args(b)
    b.add_argument("--no-iso", action="store_true", help="write the ELF only")
    b.set_defaults(func=cmd_build)

    r = command("run", help="boot the kernel in QEMU with its serial output on stdout")
    _add_config_args(r)
    what = r.add_mutually_exclusive_group()
    what.add_argument("--iso", type=Path, help="boot this ISO instead of building one")
    what.add_argument("--kernel", type=Path, help="boot this Multiboot ELF directly (QEMU -kernel; default: the "
                      "config's [foreign] kernel, if set)")
    r.add_argument("--append", help="kernel command line (with --kernel or the built ELF via --direct)")
    r.add_argument("--direct", action="store_true", help="boot the built ELF with -kernel instead of the ISO")
    r.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="QEMU accelerator (default: tcg)")
    r.add_argument("--timeout", type=positive_seconds, default=None,   # [foreign] boot_timeout may fill it
                   help=f"seconds before a run counts as hung (default: {DEFAULT_TIMEOUT:g})")
    r.add_argument("--boot-timeout", dest="timeout", type=positive_seconds, default=argparse.SUPPRESS,
                   metavar="SECONDS", help="the same as --timeout (the name `kgen test --kernel` uses)")
    r.add_argument("--memory", type=positive_int, help="guest RAM in MiB (default: machine.memory_mib from the config)")
    _add_foreign_boot_args(r)
    r.set_defaults(func=cmd_run)

    t = command("test", help="build the kernel and run the machine-state test suite (pytest)",
                description="Extra arguments after -- go to pytest unchanged.")
    _add_config_args(t)
    t.add_argument("-k", dest="keyword", help="only tests matching this pytest expression")
    t.add_argument("-x", dest="exitfirst", action="store_true", help="stop at the first failure")
    t.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    t.add_argument("--junitxml", type=Path, help="write a JUnit XML report here")
    t.add_argument("--json", metavar="FILE", help="write the results as JSON, one object per check (name, outcome, "
                   "messages) and a summary; - for stdout (pytest's own lines then go to stderr)")
    t.add_argument("--address-spaces", metavar="SYMBOL[,COUNT]|EXPR", help="with --kernel: the kernel's array of "
                   "top-level page table physical addresses (0 = unused), or an expression over its globals evaluated "
                   "with its DWARF: ptable.proc[state != UNUSED].pgdir, task_list[->next].cr3 (docs/your-kernel.md); the "
                   "page-table checks run on each space. Without it, a kernel with DWARF gets the expression kgen "
                   "finds there, said on stderr")
    t.add_argument("--check-at", metavar="SYMBOL[,SYMBOL...]", help="with --kernel: stop the CPU each time it "
                   "reaches one of these symbols (a context switch) and check the page tables there, the space in "
                   "CR3 and every space --address-spaces lists; the verdict names the first hit at which one breaks")
    t.add_argument("--check-count", type=positive_int, metavar="N", help="with --check-at: stop after N hits "
                   "(default: 100)")
    t.add_argument("--check-for", type=positive_seconds, metavar="SECONDS", help="with --check-at: stop after "
                   "this long (default: the boot timeout)")
    _add_checked_kernel_args(t, "check this Multiboot ELF (any kernel) with the generic invariants")
    t.add_argument("-j", "--jobs", type=jobs, default="auto", help="parallel machines (pytest-xdist; default: one per core)")
    t.add_argument("--shard", type=shard, metavar="K/N", help="run share K of N of the checks (1 <= K <= N), split "
                   "by test id after -k: N machines of a CI matrix given 1/N .. N/N run every check once between them "
                   "(docs/ci.md)")
    t.add_argument("--cold-boot", action="store_true",
                   help="boot a new machine for every test instead of restoring a snapshot of the booted kernel")
    t.set_defaults(func=cmd_test)

    ins = command("inspect", help="boot the kernel, stop it where it is ready and show its virtual address space, "
                                   "physical memory and invariants, or one translation (--va)",
                  description="Text on a terminal, --json for scripts (docs/inspect.md), --html FILE for a page.")
    _add_config_args(ins)
    _add_checked_kernel_args(ins, "inspect this Multiboot ELF (any kernel) instead of kgen's")
    ins.add_argument("--address-spaces", metavar="SYMBOL[,COUNT]|EXPR", help="with --kernel: the kernel's spaces, "
                     "as kgen test takes them: the space in CR3 is named by the slot or the expression's element "
                     "holding it")
    ins.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="QEMU accelerator (default: tcg)")
    ins.add_argument("--va", type=virtual_address, metavar="ADDR",
                     help="explain the translation of this virtual address step by step")
    ins.add_argument("--json", action="store_true", help="print the document as JSON (schema: docs/inspect.md)")
    ins.add_argument("--html", type=Path, metavar="FILE", help="write the document as one self-contained HTML page")
    ins.add_argument("--bench", type=Path, metavar="FIGURES.json", help="with --html: draw these `kgen bench --json` "
                     "figures in the page too")
    ins.set_defaults(func=cmd_inspect)

    d = command("debug", help="boot the kernel paused under QEMU's gdbstub and start gdb with its symbols "
                              "(also where the boot stub runs) and kgen's gdb helper",
                description="Arguments after -- go to gdb unchanged (-batch, -ex CMD, -x FILE). docs/debugging.md.")
    _add_config_args(d)
    what = d.add_mutually_exclusive_group()
    what.add_argument("--kernel", type=Path, help="debug this Multiboot ELF (any kernel), booted with -kernel")
    what.add_argument("--direct", action="store_true", help="boot the built ELF with -kernel instead of the ISO")
    d.add_argument("--append", metavar="CMDLINE", help="kernel command line (with --kernel or --direct)")
    d.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="QEMU accelerator (default: tcg)")
    d.add_argument("--memory", type=positive_int, metavar="MIB", help="guest RAM in MiB (default: the config's)")
    d.add_argument("--gdb-port", type=int, metavar="PORT", help="TCP port of the gdbstub on 127.0.0.1 (default: "
                   "a free one; a busy one is refused)")
    d.add_argument("--no-gdb", action="store_true", help="start no gdb: wait for a debugger and print the command "
                   "line that attaches one")
    d.add_argument("--gdb", default="gdb", metavar="PATH", help="the gdb to run (default: gdb from PATH)")
    d.set_defaults(func=cmd_debug)

    be = command("bench", help="measure the memory managers (instructions under TCG -icount, KVM cycles) or, "
                               "with --harness, what a fresh machine per test costs",
                 description="Arguments after the options are those of `python -m kgen.harness.bench` "
                             "(--arch, --no-init, --no-kvm, --no-allocators, --json, --html FILE: the figures as "
                             "charts, --from-json FILE: draw saved figures) or of kgen.harness.benchharness with "
                             "--harness.")
    be.add_argument("--harness", action="store_true", help="benchmark the test harness: restore vs cold boot")
    be.set_defaults(func=cmd_bench)

    doc = command("doctor", help="list which tools kgen drives are on this host (QEMU, GRUB, xorriso, OVMF, gdb, "
                                 "KVM...), the Debian package of each and what it is for",
                  description="Status 0 when everything kgen test needs by default is here (QEMU, pytest, "
                              "pytest-xdist), 3 when one is missing; optional tools are listed without changing it.")
    doc.add_argument("--probe-kvm", action="store_true", help="also boot kgen's kernel of each architecture once "
                     "under KVM: usable or why not (seconds each; without it nothing is booted)")
    doc.add_argument("-v", "--verbose", action="store_true", help="also show where each tool was found")
    doc.set_defaults(func=cmd_doctor)
    return top


class _PipeSafeStdout:
    """sys.stdout that survives its reader going away (`kgen run | head`): the first broken pipe points the file
    descriptor at /dev/null and later writes vanish. Without it the write raised in QEMU's serial pump, which then
    stopped reading COM1, so the kernel's success line was lost and a good run reported as failed; or the last
    message of a finished build ended in a traceback."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args, unknown = parser().parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, unknown + extra)
    if unknown:
        parser().parse_args(argv)      # reports the first unknown argument in one line, exit 2
    if hasattr(args, "out") and args.out is None:
        args.out = output_folder()
    if args.command in ("test", "run", "inspect"):
        from kgen.harness.foreign import apply_foreign_config
        apply_foreign_config(args)     # the config's [foreign] table: a kernel to check and its options
        if args.command == "run" and args.timeout is None:
            args.timeout = DEFAULT_TIMEOUT
    if args.command == "test":
        return cmd_test(args, extra)
    if args.command == "debug":
        return cmd_debug(args, extra)
    return args.func(args)


def output_folder() -> Path:
    """Where a command writes when --out is not given: out/, or build/ (the old default) when it holds a kgen build
    and out/ does not exist, said in one note on stderr."""
    from kgen.build.pipeline import FINGERPRINT_NAME       # not at the top: see this module's docstring
    if not DEFAULT_OUT.exists() and (OLD_DEFAULT_OUT / FINGERPRINT_NAME).is_file():
        print(f"kgen: note: using {OLD_DEFAULT_OUT}/, the old default output folder (the default is {DEFAULT_OUT}/ "
              f"now; pass --out {OLD_DEFAULT_OUT} to keep it, or remove it)", file=sys.stderr)
        return OLD_DEFAULT_OUT
    return DEFAULT_OUT


# What each refusal of a path means for the person who typed it.
_PATH_ADVICE = {
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows (255 bytes): choose a shorter path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.EISDIR: "is a directory: name a file",
    errno.EACCES: "permission denied: choose a path you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose another path",
    errno.EROFS: "on a read-only file system: choose another path",
    errno.ELOOP: "too many symbolic links: check the path",
}
_HOST_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some (TMPDIR and the output's disk) and run again",
    errno.EDQUOT: "disk quota exceeded: free some space and run again",
    errno.EIO: "input/output error: the host's disk failed",
}


def os_error_text(err: OSError) -> tuple[str, int]:
    """An OSError as (one line, exit status): a path the user gave that cannot be used is status 2; the host failing
    (disk full, I/O error) is status 5."""
    from kgen.build.config import show_path     # here: only the standard library at module level (see the top)
    where = f"{show_path(err.filename)}: " if err.filename is not None else ""
    if err.errno in _PATH_ADVICE:
        return f"{where}{_PATH_ADVICE[err.errno]}", EXIT_USAGE
    advice = _HOST_ADVICE.get(err.errno, f"{err.strerror or err}")
    return f"{where or 'the host refused an operation: '}{advice}", EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None      # the kgen program itself, not a caller running it in its own process
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout
    if stdout is not None:
        sys.stdout = _PipeSafeStdout(stdout)
    terminated = []
    if own_process and threading.current_thread() is threading.main_thread():
        def on_sigterm(signum, frame):
            # Unwind as Ctrl-C does (pytest stops its workers, every `finally` removes its directory, the machines'
            # own handler has killed QEMU first), then end with SIGTERM's status: a CI runner's cancel leaves
            # nothing behind.
            terminated.append(signum)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _main(argv)
    except KgenError as err:
        print(f"kgen: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            print("kgen: terminated" if terminated else "kgen: interrupted", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except OSError as err:
        # A file kgen was asked to read or write that the operating system refused, wherever it surfaced: one line
        # naming it. Paths the user chose (too long, missing, not writable) are a usage error; the host failing
        # (a full disk, an I/O error) is kgen's environment failing, not a verdict on any kernel.
        text, code = os_error_text(err)
        with contextlib.suppress(OSError):
            print(f"kgen: error: {text}", file=sys.stderr)
        return code
    finally:
        sys.stdout = stdout
        if own_process and threading.current_thread() is threading.main_thread():
            # The work is over and its status decided: a Ctrl-C between here and the process's exit would end it by
            # the signal instead (status -2), a finished build reported as killed.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
