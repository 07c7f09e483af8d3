"""kgen's gdb helper: the page tables and the free-page stack of a kernel stopped under QEMU's gdbstub, seen the way
kgen's own checks see them.

`kgen debug` sources this file into gdb and runs `kgen-load`; by hand (another terminal, an IDE's gdb):

    (gdb) source /path/to/kgen/debug/gdb_kgen.py
    (gdb) kgen-load [--python-path DIR]... [--arch i386|x86_64 [--config kgen.toml]] build/kernel.elf
    (gdb) target remote 127.0.0.1:1234

Commands:

    kgen-load ELF     loads the ELF's symbols a second time at the addresses its sections are loaded at, so the
                      boot stub, which runs before paging, has names too (kgen/debug/symbols.py says why that way);
                      with --arch it is a kgen kernel whose layout comes from the config (for kgen-free)
    kgen-pt [VA]      the current address space from CR3: every mapped range, merged (kgen/guest/pagewalk.py's
                      Walker); with VA (any gdb expression: 0xc0100000, &pmm_top, $sp) the entries that translate it
    kgen-free [N|all] the free-page stack (kgen/guest/pmmview.py): its counts and the first N frames (default 16)
    kgen-src [ADDR]   the template source of the function at ADDR (default $pc): file, line, its text and comments

gdb's embedded Python is the system python3, not kgen's virtualenv. This file imports only `gdb` and the standard
library when sourced; it puts the package it was sourced from on sys.path (so the kgen next to it is the one
used), and `kgen-load --python-path DIR` adds where pyelftools lives (`kgen debug` passes the directory of the
pyelftools its own Python imports).

Physical memory is read through the gdbstub: QEMU's `Qqemu.PhyMemMode:1` packet turns gdb's memory reads (`m`
packets) into physical reads until `Qqemu.PhyMemMode:0`. That is a binary read of any size, a page table in one or
two packets; HMP `monitor xp` would print hex text at about 150 ms per MiB to be parsed back. gdb's own caches
are flushed on each switch, so a byte read in one mode is never served in the other. The registers come from
`monitor info registers`, parsed by the parser kgen uses on QMP (kgen/machine/registers.py), which also gives
EFER and CR4 whatever gdb's register set is.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

import gdb  # noqa: E402  (only inside gdb)

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DEFAULT_FRAMES_SHOWN = 16


class _Loaded:
    """What kgen-load was told: the kernel's ELF (kgen.guest.elfinfo.ElfInfo) and its layout, None if foreign."""
    elf = None
    layout = None


# kgen's own modules are imported inside the commands, never here: sourced into gdb, this file may import only gdb and
# the standard library (see above), and pyelftools is on sys.path only once kgen-load has run.
def _kgen_error():
    from kgen.errors import KgenError
    return KgenError


def _command(fn):
    """Turn a KgenError (a walk that cannot go on, a broken chain) into gdb's one-line error, not a traceback."""
    def invoke(self, arg, from_tty):
        try:
            fn(self, arg, from_tty)
        except gdb.GdbError:
            raise
        except gdb.error as err:    # no target yet ("monitor" needs one), the target gone
            raise gdb.GdbError(f"{self._name}: {err}") from None
        except ImportError as err:
            raise gdb.GdbError(f"{self._name}: cannot import {err.name} in gdb's Python: give its directory with "
                               "kgen-load --python-path DIR") from None
        except Exception as err:    # noqa: BLE001 - every other failure is one line in gdb
            if isinstance(err, _kgen_error()):
                raise gdb.GdbError(f"{self._name}: {err}") from None
            raise
    return invoke


@contextmanager
def _physical():
    """gdb's memory reads are physical inside this block (QEMU's PhyMemMode), virtual again after it."""
    gdb.execute("maintenance packet Qqemu.PhyMemMode:1", to_string=True)
    gdb.execute("maintenance flush dcache", to_string=True)
    try:
        yield
    finally:
        gdb.execute("maintenance packet Qqemu.PhyMemMode:0", to_string=True)
        gdb.execute("maintenance flush dcache", to_string=True)


def read_phys(addr: int, size: int) -> bytes:
    """Guest physical memory, inside `_physical()`."""
    try:
        return bytes(gdb.selected_inferior().read_memory(addr, size))
    except gdb.MemoryError:
        raise _kgen_error()(f"cannot read physical {addr:#x}+{size:#x} through the gdbstub") from None


def registers():
    from kgen.machine.registers import parse_info_registers
    text = gdb.execute("monitor info registers", to_string=True).replace("\r\n", "\n")
    try:
        return parse_info_registers(text)
    except ValueError as err:
        raise _kgen_error()(f"monitor info registers: {err}") from None


def _need_loaded(name: str):
    if _Loaded.elf is None:
        raise gdb.GdbError(f"{name}: no kernel loaded; run kgen-load ELF first (kgen debug does)")


def _view():
    from kgen.guest.invariants import GuestView
    return GuestView(registers(), read_phys, _Loaded.elf, _Loaded.layout)


def _address(expression: str) -> int:
    """A gdb expression as an address: 0xc0100000, kmain, &pmm_top, $sp. A bare symbol name is its linked address
    from the ELF: gdb, holding two copies of the symbols, may evaluate it to the load address instead."""
    symbol = _Loaded.elf.symbols.get(expression.strip())
    if symbol is not None:
        return symbol.value
    try:
        value = gdb.parse_and_eval(expression)
        if value.type.code == gdb.TYPE_CODE_FUNC:
            value = value.address
        return int(value.cast(gdb.lookup_type("long").pointer())) & (2 ** 64 - 1)
    except gdb.error as err:
        raise gdb.GdbError(f"kgen-pt: {expression}: {err}") from None


def _where(addr: int) -> str:
    sym = _Loaded.elf.symbol_at(addr)
    if sym is None:
        return ""
    offset = addr - sym.value
    return f"  <{sym.name}{f'+{offset:#x}' if offset else ''}>"


def pt_lines(view, vaddr: int | None = None) -> list[str]:
    """kgen-pt's output for a GuestView (separate from gdb so a test can give it a view of its own)."""
    regs, mode = view.regs, view.mode
    from kgen.arch import hw
    if not regs.cr0 & hw.CR0_PG:
        return [f"paging is off (CR0={regs.cr0:#x}): virtual addresses are physical"]
    walker = view.walker
    width = 2 * mode.entry_size + 2 if mode.entry_size == 8 else 10
    lines = [f"CR3={regs.cr3:#x}: {mode.name} paging, {mode.levels} levels ({'/'.join(mode.level_names)})"]
    if vaddr is not None:
        if not mode.contains(vaddr):
            return lines + [f"{vaddr:#x} is not a {mode.name} virtual address (non-canonical or too wide)"]
        t = walker.translate(vaddr)
        bad = walker.malformed_at(vaddr) if t is None else None
        if bad is not None:
            lines.append(f"{vaddr:#0{width}x} not mapped: {bad}")
        elif t is None:
            lines.append(f"{vaddr:#0{width}x} not mapped: an access raises #PF (page not present)")
        else:
            lines.append(f"{t.vaddr:#0{width}x} -> {t.paddr:#x} ({t.size // 1024} KiB page) {t.attrs}{_where(t.vaddr)}")
            for ref in t.chain:
                lines.append(f"  {ref} = {ref.value:#0{2 * mode.entry_size + 2}x}")
        return lines
    for window in walker.recursive_windows():
        lines.append(f"recursive slot {window.slot}: {window.vstart:#0{width}x}-"
                     f"{window.vstart + window.size:#0{width}x} shows the tables ({window.attrs})")
    for m in walker.mappings():
        lines.append(f"{m.vstart:#0{width}x}-{m.vstart + m.size:#0{width}x} -> {m.pstart:#0{width}x} "
                     f"{m.size // 4096:6d} pages  {m.attrs}{_where(m.vstart)}")
    return lines


def free_lines(view, shown: int | None) -> list[str]:
    """kgen-free's output: the free stack (or a bitmap kernel's free frames) as kgen/guest/pmmview.py reads it."""
    from kgen.guest.pmmview import PmmView
    pmm = PmmView(view.read_phys, view.elf, view.layout)
    state = pmm.state()
    frames = pmm.free_frames(state)
    if pmm.kind == "stack":
        lines = [f"pmm: top={state.top:#x} on the stack={state.count} untouched={state.untouched} free={state.free} "
                 f"total={state.total} reserved={state.reserved_frames} frames"]
    else:
        lines = [f"pmm: bitmap, free={state.free} total={state.total} reserved={state.reserved_frames} frames, "
                 f"hint at dword {pmm.u32('pmm_hint')}"]
    listed = frames if shown is None else frames[:shown]
    if listed:
        lines.append(("stack (top first): " if pmm.kind == "stack" else "free in the bitmap (lowest first): ")
                     + " ".join(f"{f:#x}" for f in listed)
                     + (f" ... ({len(frames) - len(listed)} more)" if len(listed) < len(frames) else ""))
    return lines


def source_lines(elf, layout, addr: int) -> list[str]:
    """kgen-src's output: the template text of the function holding `addr` (linked or load address), from the
    comment block above its label to the next global label, with file and line numbers. gdb's own `list` and
    `info line` give the line of one instruction (the ELF's DWARF line table, kgen/build/dwarf.py); this gives the
    whole function with the comment that explains it."""
    from kgen.build import asm
    from kgen.build.pipeline import kernel_units
    from kgen.build.resources import templates_dir
    sym = elf.symbol_at(addr)
    if sym is None and elf.virtual_of_physical(addr) is not None:
        addr = elf.virtual_of_physical(addr)
        sym = elf.symbol_at(addr)
    if sym is None:
        raise _kgen_error()(f"{addr:#x} is in no symbol of {elf.path.name}")
    templates = templates_dir()
    for unit in kernel_units(layout.arch, layout.pmm_unit):
        for piece in asm.load_unit(templates, unit, layout.arch):
            starts = [(number, m.group(1)) for number, text in piece.lines
                      if (m := asm._LABEL_RE.match(text)) and not m.group(1).startswith(".L")]
            for i, (number, label) in enumerate(starts):
                if label != sym.name:
                    continue
                path = templates / f"{unit}.s"
                raw = path.read_text(encoding="ascii").splitlines()
                first = number
                while first > 1 and raw[first - 2].lstrip().startswith("#"):
                    first -= 1      # the comment that says what the function does
                last = starts[i + 1][0] - 1 if i + 1 < len(starts) else piece.lines[-1][0]
                while last > number and (not raw[last - 1].strip() or raw[last - 1].lstrip().startswith("#")):
                    last -= 1       # the next function's comment and the blank line before it
                offset = addr - sym.value
                head = f"templates/{unit}.s:{number}: {sym.name}" + (f"+{offset:#x}" if offset else "")
                return [head] + [f"{n:5d}  {raw[n - 1]}" for n in range(first, last + 1)]
    raise _kgen_error()(f"{sym.name} is not defined in kgen's templates (generated by the build)")


class KgenLoad(gdb.Command):
    """kgen-load [--python-path DIR]... [--arch i386|x86_64 [--config FILE]] ELF
Load ELF's symbols a second time where its sections are loaded (the boot stub runs there before paging), and tell
kgen-pt / kgen-free which kernel this is. --arch: a kgen kernel (layout from --config, else the defaults)."""

    _name = "kgen-load"

    def __init__(self):
        super().__init__(self._name, gdb.COMMAND_USER, gdb.COMPLETE_FILENAME)

    @_command
    def invoke(self, arg, from_tty):
        parser = argparse.ArgumentParser(prog=self._name, add_help=False)
        parser.add_argument("--python-path", action="append", default=[])
        parser.add_argument("--arch")
        parser.add_argument("--config")
        parser.add_argument("elf")
        try:
            opts = parser.parse_args(shlex.split(arg))
        except SystemExit:
            raise gdb.GdbError(f"usage: {self.__doc__.splitlines()[0]}") from None
        for path in opts.python_path:
            if path not in sys.path:
                sys.path.append(path)
        from kgen.debug.symbols import add_symbol_file_command
        from kgen.guest.elfinfo import ElfInfo
        elf = ElfInfo.load(Path(opts.elf))
        layout = None
        if opts.arch is not None:
            from kgen.build import config as configmod
            from kgen.build.layout import compute
            cfg = (configmod.load(Path(opts.config), opts.arch) if opts.config
                   else configmod.Config().with_arch(opts.arch))
            layout = compute(cfg)
        command = add_symbol_file_command(Path(opts.elf))
        if command is not None:
            gdb.execute(command, from_tty=False, to_string=True)    # from_tty=False: no "(y or n)" question
        _Loaded.elf, _Loaded.layout = elf, layout
        where = "its sections' load addresses" if command else "nowhere else (it runs where it is linked)"
        print(f"kgen: symbols of {opts.elf} also at {where}; kgen-pt [VA], kgen-free [N|all], kgen-src [ADDR]")


class KgenPt(gdb.Command):
    """kgen-pt [VA]
The current address space, walked from CR3 by kgen's Walker: every mapped range with its attributes, or, with VA
(a gdb expression), the entries that translate it."""

    _name = "kgen-pt"

    def __init__(self):
        super().__init__(self._name, gdb.COMMAND_DATA)

    @_command
    def invoke(self, arg, from_tty):
        _need_loaded(self._name)
        vaddr = _address(arg) if arg.strip() else None
        with _physical():
            lines = pt_lines(_view(), vaddr)
        print("\n".join(lines))


class KgenFree(gdb.Command):
    """kgen-free [N|all]
The kernel's free-page stack (templates/pmm.s) read the way kgen's checks read it: counts, then the first N frames
(default 16) by following the links kept inside the free frames."""

    _name = "kgen-free"

    def __init__(self):
        super().__init__(self._name, gdb.COMMAND_DATA)

    @_command
    def invoke(self, arg, from_tty):
        _need_loaded(self._name)
        if _Loaded.layout is None:
            raise gdb.GdbError("kgen-free: not a kgen kernel (kgen-load without --arch): its free stack is unknown")
        text = arg.strip()
        if text == "all":
            shown = None
        elif not text:
            shown = DEFAULT_FRAMES_SHOWN
        elif text.isdigit():
            shown = int(text)
        else:
            raise gdb.GdbError(f"kgen-free: {text!r}: give a number of frames or all")
        with _physical():
            lines = free_lines(_view(), shown)
        print("\n".join(lines))


class KgenSrc(gdb.Command):
    """kgen-src [ADDR]
The template source of the function at ADDR (default: $pc, also in the boot stub at its load address): file, line
and the function's text with its comments."""

    _name = "kgen-src"

    def __init__(self):
        super().__init__(self._name, gdb.COMMAND_FILES)

    @_command
    def invoke(self, arg, from_tty):
        _need_loaded(self._name)
        if _Loaded.layout is None:
            raise gdb.GdbError("kgen-src: not a kgen kernel (kgen-load without --arch): no templates")
        addr = _address(arg) if arg.strip() else _address("$pc")
        print("\n".join(source_lines(_Loaded.elf, _Loaded.layout, addr)))


KgenLoad()
KgenPt()
KgenFree()
KgenSrc()
