"""`kgen build | run | test`. Every failure ends as one line on stderr and a non-zero status, never a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kgen.build import config as configmod
from kgen.arch import ARCHES
from kgen.errors import KgenError

DEFAULT_OUT = Path("build")
DEFAULT_TIMEOUT = 30.0


def _add_config_args(p: argparse.ArgumentParser):
    p.add_argument("--config", type=Path, help="kgen.toml to read (default: ./kgen.toml if present, else defaults)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: build/)")
    p.add_argument("--arch", choices=tuple(ARCHES),
                   help="target architecture (default: the config's `arch`, else i386); keys the config does not set "
                        "take this architecture's defaults")


def cmd_build(args) -> int:
    from kgen.build.pipeline import build
    cfg = configmod.load(args.config, args.arch)
    out = build(cfg, args.out, iso=not args.no_iso)
    print(f"kgen: wrote {out.elf}" + (f" and {out.iso}" if out.iso else ""))
    return 0


def cmd_run(args) -> int:
    from kgen.harness.run import run
    return run(args)


def cmd_test(args, extra: list[str]) -> int:
    from kgen.harness.testing import run_suite
    return run_suite(args, extra)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kgen", description="Generate a higher-half x86 kernel and check it in QEMU.")
    sub = top.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="write build/kernel.elf and build/kernel.iso")
    _add_config_args(b)
    b.add_argument("--no-iso", action="store_true", help="write the ELF only")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("run", help="boot the kernel in QEMU with its serial output on stdout")
    _add_config_args(r)
    what = r.add_mutually_exclusive_group()
    what.add_argument("--iso", type=Path, help="boot this ISO instead of building one")
    what.add_argument("--kernel", type=Path, help="boot this Multiboot ELF directly (QEMU -kernel)")
    r.add_argument("--append", help="kernel command line (with --kernel or the built ELF via --direct)")
    r.add_argument("--direct", action="store_true", help="boot the built ELF with -kernel instead of the ISO")
    r.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="QEMU accelerator (default: tcg)")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds before a run counts as hung")
    r.add_argument("--memory", type=int, help="guest RAM in MiB (default: machine.memory_mib from the config)")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("test", help="build the kernel and run the machine-state test suite (pytest)",
                       description="Extra arguments after -- go to pytest unchanged.")
    _add_config_args(t)
    t.add_argument("-k", dest="keyword", help="only tests matching this pytest expression")
    t.add_argument("-x", dest="exitfirst", action="store_true", help="stop at the first failure")
    t.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    t.add_argument("--junitxml", type=Path, help="write a JUnit XML report here")
    t.add_argument("--kernel", type=Path, help="check this Multiboot ELF (any kernel) with the generic invariants")
    t.add_argument("-j", "--jobs", default="auto", help="parallel machines (pytest-xdist; default: one per core)")
    t.set_defaults(func=cmd_test)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser().parse_args(argv)
    try:
        if args.command == "test":
            return cmd_test(args, extra)
        return args.func(args)
    except KgenError as err:
        print(f"kgen: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
