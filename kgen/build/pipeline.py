"""The build pipeline: config -> layout -> assembled units -> linked image -> ELF -> ISO."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import json
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from kgen import protocol
from kgen.build import asm
from kgen.errors import ConfigError, ImageTooLarge, UsageError

from kgen.arch import Arch
from kgen.build import dwarf, link
from kgen.build.config import Config
from kgen.build.image import LinkedImage
from kgen.build.iso import make_iso, require_grub
from kgen.build.layout import Layout, compute
from kgen.build.resources import boot_dir, templates_dir

# The kernel's units, in the order their pieces are placed within each section. `{arch}/` units are the entry,
# GDT and IDT of one architecture (templates/i386/, templates/x86_64/); every other unit serves both word sizes.
KERNEL_UNITS = ("multiboot", "bootinfo", "{arch}/boot", "{arch}/gdt", "{arch}/idt", "interrupts", "pic", "serial",
                "debugexit", "string", "report", "calls", "peek", "task", "user/programs")
# The memory managers, the same templates for both word sizes; `{pmm}` is the frame allocator pmm.kind chose
# (Layout.pmm_unit: templates/pmm.s, the free-page stack, or templates/pmm_bitmap.s); pmm_common what both share.
MEMORY_UNITS = ("paging", "tempmap", "{pmm}", "pmm_common", "vmm", "vrange", "heap", "aspace", "bench")


def kernel_units(arch: Arch, pmm_unit: str = "pmm") -> tuple[str, ...]:
    return (tuple(unit.format(arch=arch.name) for unit in KERNEL_UNITS)
            + tuple(unit.format(pmm=pmm_unit) for unit in MEMORY_UNITS))


@dataclass(frozen=True)
class Kernel:
    layout: Layout
    linked: link.LinkResult

    @property
    def image(self) -> LinkedImage:
        return self.linked.image


def generated_pieces(layout: Layout) -> list[asm.Piece]:
    """The layout's string constants and per-level paging tables as labelled .rodata, so templates name them like
    any other data: `paging_level_shift` (a byte per level, top first) and `paging_level_entries` (a word per
    level: where that level's entries appear through the recursive slot), and `paging_foreign_entries` (the same for
    the space attached to the foreign slot, templates/aspace.s)."""
    lines = [".section .rodata"]
    for label, text in layout.asm_strings().items():
        if not text.isascii() or '"' in text or "\\" in text:
            raise ValueError(f"string constant {label} must be plain ASCII")
        lines += [f"{label}:", f'    .asciz "{text}"']
    levels = range(layout.arch.levels)
    lines += [".balign 8", "paging_level_entries:"] + [f"    .xword LEVEL{n}_ENTRIES" for n in levels]
    lines += ["paging_foreign_entries:"] + [f"    .xword FOREIGN_LEVEL{n}_ENTRIES" for n in levels]
    lines += ["paging_level_shift:"] + [f"    .byte LEVEL{n}_SHIFT" for n in levels]
    # The line the kernel prints just before it exits with success (templates/debugexit.s, exit_success): `kgen run`
    # wants it as well as the exit status, which QEMU cuts to 8 bits, so a stray write to the port cannot succeed.
    lines += ["str_exit_success:", f'    .asciz "{protocol.EXIT_SUCCESS}"']
    return asm.parse_unit("layout_strings", "\n".join(lines), layout.arch)


def kernel_pieces(layout: Layout, templates: Path | None = None) -> list[asm.Piece]:
    templates = templates or templates_dir()
    units = [piece for unit in kernel_units(layout.arch, layout.pmm_unit) for piece in
             asm.load_unit(templates, unit, layout.arch)]
    return units + generated_pieces(layout)


def link_kernel(config: Config) -> Kernel:
    layout = compute(config)
    try:
        linked = link.link(kernel_pieces(layout), layout, layout.asm_constants())
        # gdb's source lines: the DWARF line table of the templates' code (kgen/build/dwarf.py)
        return Kernel(layout, dwarf.with_line_table(linked, layout, str(templates_dir())))
    except ImageTooLarge as err:
        page = 0x1000
        raise ConfigError(f"{config.source}: kernel.max_size = {err.limit:#x}: the kernel image needs {err.needed:#x} "
                          f"bytes; set kernel.max_size to at least {(err.needed + page - 1) // page * page:#x}"
                          ) from None


@dataclass(frozen=True)
class BuildOutput:
    kernel: Kernel
    elf: Path
    iso: Path | None
    rebuilt: bool


# The stamp is written last, after the ELF and ISO are whole: it names the inputs (fingerprint) and the bytes of the
# ELF and ISO that were made from them, so an ELF or ISO from another build beside it is never taken as current.
FINGERPRINT_NAME = ".kgen-build"
LOCK_NAME = ".kgen.lock"
ELF_NAME, ISO_NAME = "kernel.elf", "kernel.iso"
# Temporary files a build writes in the output directory before renaming them into place (kgen/build/elf.py,
# kgen/build/iso.py, the stamp below); one left by a build that was killed is removed by the next build.
_TEMP_PATTERNS = (f".{ELF_NAME}.*.tmp", f".{ISO_NAME}.*.partial", f".{ISO_NAME}.partial", f".{FINGERPRINT_NAME}.*.tmp")


def config_text(config: Config) -> str:
    """The config as the build reads it, the same text in every process: the `repr` of a set (`Config.explicit`)
    follows the string hash, which PYTHONHASHSEED draws anew per process. `source` and `[foreign]` are not inputs."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.compare and f.name != "source"}
    values["explicit"] = sorted(values["explicit"])
    return json.dumps(values, sort_keys=True)


def fingerprint(config: Config) -> str:
    """What the outputs depend on: the config, the templates, kgen's own source and the boot tree."""
    digest = hashlib.sha256(config_text(config).encode())
    package = Path(__file__).resolve().parent.parent  # all of kgen, not only this stage
    for root in (templates_dir(), boot_dir(), package):
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".s", ".inc", ".py", ".cfg"):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


# --- the output directory ------------------------------------------------------------------------------------

def check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory kgen cannot write into, in one line, before anything is built or created.

    Nothing is left behind: a directory that does not exist yet is not created here, only its nearest existing
    parent is probed with a file that is removed at once."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"--out {out_dir}: {why}; choose another --out")

    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise refuse("exists and is not a directory")
        for name in (ELF_NAME, ISO_NAME, FINGERPRINT_NAME, LOCK_NAME):
            inside = out_dir / name
            if inside.is_dir() or (inside.exists() and not inside.is_file()):
                raise refuse(f"{inside} is a directory or special file where kgen writes a regular file; remove it")
        probe_writable(out_dir, refuse)
        return
    parent = out_dir.parent
    while not (parent.exists() or parent.is_symlink()):
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"{parent} is not a directory")
    probe_writable(parent, refuse)


def probe_writable(directory: Path, refuse) -> None:
    # os.access says yes to root for a read-only directory, and nothing for a read-only file system or /proc:
    # only creating a file tells.
    probe = directory / f".kgen-probe.{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise refuse(f"cannot create files in {directory} ({err.strerror or err})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def _make_dirs(out_dir: Path) -> list[Path]:
    """Create out_dir and its missing parents; return the ones created, deepest first, for removal on failure."""
    missing = []
    path = out_dir
    while not (path.exists() or path.is_symlink()):
        missing.append(path)
        path = path.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_dirs([p for p in missing if p.is_dir()])
        raise UsageError(f"--out {out_dir}: cannot create it ({err.strerror or err}); choose another --out") from None
    return missing


def _remove_dirs(created: list[Path]) -> None:
    for path in created:                       # deepest first
        with contextlib.suppress(OSError):
            if [p.name for p in path.iterdir()] == [LOCK_NAME]:     # nothing else: no other build's output
                (path / LOCK_NAME).unlink()
            path.rmdir()


@contextlib.contextmanager
def locked(out_dir: Path, *, shared: bool = False):
    """Hold out_dir's build lock: builds into one directory run one after another, and a reader (`kgen test`
    checking the stamp) never sees a build half done."""
    try:
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UsageError(f"--out {out_dir}: cannot create its lock file {LOCK_NAME} ({err.strerror or err}); "
                         "choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)            # releases the lock


def _sweep_temp_files(out_dir: Path) -> None:
    """Remove temporary files of builds that were killed; safe only while holding the lock."""
    for pattern in _TEMP_PATTERNS:
        for path in out_dir.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _read_stamp(out_dir: Path) -> dict:
    try:
        stamp = json.loads((out_dir / FINGERPRINT_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _current(out_dir: Path, wanted: str, iso: bool) -> bool:
    stamp = _read_stamp(out_dir)
    if stamp.get("fingerprint") != wanted or stamp.get("elf") != _digest(out_dir / ELF_NAME):
        return False
    return not iso or (stamp.get("iso") is not None and stamp["iso"] == _digest(out_dir / ISO_NAME))


def current_elf(config: Config, out_dir: Path) -> Path | None:
    """out_dir/kernel.elf if a finished build of exactly this config and kgen wrote it, else None."""
    if not (out_dir / LOCK_NAME).exists():
        return None
    with locked(out_dir, shared=True):
        return out_dir / ELF_NAME if _current(out_dir, fingerprint(config), iso=False) else None


def _write_stamp(out_dir: Path, stamp: dict) -> None:
    path = out_dir / FINGERPRINT_NAME
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def import_deferring_sigint(name: str):
    """Import a module with Ctrl-C held back until the import is done, then delivered as usual.

    LIEF's C++ extension aborts the process (std::terminate, ~27 lines) when a KeyboardInterrupt is raised while it
    initialises; a handler that only records the signal lets the import finish, then the interrupt is raised."""
    if name in sys.modules or threading.current_thread() is not threading.main_thread():
        return importlib.import_module(name)
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        module = importlib.import_module(name)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt
    return module


def build(config: Config, out_dir: Path, *, iso: bool = True, force: bool = True) -> BuildOutput:
    """Write out_dir/kernel.elf and, with `iso`, out_dir/kernel.iso, as one pair.

    Under out_dir's lock: the old stamp, ISO and ELF go first, then the new ELF and ISO are renamed into place whole,
    and the stamp naming both is written last. A build that does not finish therefore leaves no pair that claims
    to be current; a directory this build created is removed again if it fails.
    Without `force`, outputs whose stamp matches the inputs and the files' bytes are kept as they are.
    """
    # LIEF (kgen.build.elf) takes 0.3 s to import and aborts the process if Ctrl-C lands meanwhile: imported here,
    # under import_deferring_sigint, when an ELF is written, not by everything that imports the pipeline.
    import_deferring_sigint("lief")
    from kgen.build import elf as elf_module
    from kgen.build.elf import write_elf

    check_out_dir(out_dir)
    kernel = link_kernel(config)          # a config or template error stops the build before out_dir is touched
    if iso:
        require_grub()                    # as does a missing GRUB
    wanted = fingerprint(config)
    elf_path, iso_path = out_dir / ELF_NAME, out_dir / ISO_NAME
    created = _make_dirs(out_dir)
    try:
        with locked(out_dir):
            _sweep_temp_files(out_dir)
            if not force and _current(out_dir, wanted, iso):
                return BuildOutput(kernel, elf_path, iso_path if iso else None, rebuilt=False)
            for stale in (out_dir / FINGERPRINT_NAME, iso_path, elf_path):
                try:
                    stale.unlink(missing_ok=True)
                except IsADirectoryError:
                    raise UsageError(f"--out {out_dir}: {stale} is a directory where kgen writes a regular file; "
                                     "remove it or choose another --out") from None
                except OSError as err:
                    raise UsageError(f"--out {out_dir}: cannot replace {stale} ({err.strerror or err}); "
                                     "choose another --out") from None
            write_elf(kernel.image, elf_path, target=getattr(elf_module, kernel.layout.arch.elf_target))
            if iso:
                make_iso(elf_path, iso_path)
            _write_stamp(out_dir, {"fingerprint": wanted, "elf": _digest(elf_path),
                                   "iso": _digest(iso_path) if iso else None})
    except BaseException:
        _remove_dirs(created)
        raise
    return BuildOutput(kernel, elf_path, iso_path if iso else None, rebuilt=True)
