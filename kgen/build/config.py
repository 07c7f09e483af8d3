"""The user's config: an optional `kgen.toml` whose every key has a default.

This module only reads and type-checks keys. Rules that relate values to each other (alignment, overlap, slot
ranges) belong to `layout.py`, which turns a Config into addresses.

    arch = "i386"               # or "x86_64"; every key below then defaults to that architecture's choice

    [kernel]
    virtual_base = 0xC0000000   # virtual address that maps physical 0; the image sits at virtual_base + load_address
    load_address = 0x100000     # physical address of the first byte of the image
    max_size = 0x400000         # room reserved for the image (text, data, bss, boot page tables, stack)
    stack_size = 0x4000

    [paging]
    recursive_slot = 1023       # page-directory entry that points at the page directory itself
    foreign_slot = 1021         # entry that points at another address space's top table while one is attached

    [tempmap]
    base = 0xFF800000           # first virtual page of the temp-map window
    slots = 16                  # pages in the window

    [vmm]
    base = 0xD0000000           # the kernel's virtual-range allocator hands out pages from here...
    size = 0x10000000           # ...to here (vmm_alloc, and the heap on top of it)

    [machine]
    memory_mib = 128            # guest RAM for `kgen run` and `kgen test`

    [pmm]
    kind = "stack"              # the frame allocator: "stack" (templates/pmm.s) or "bitmap" (templates/pmm_bitmap.s)

    [foreign]                   # a kernel kgen did not build: `kgen test|run|inspect` check it (`ForeignConfig`)
    kernel = "build/myos.bin"   # relative to this file; each key below is the --kernel option of the same name

    [variant]                   # kernels broken on purpose, to prove the tests catch the break
    fault_at_boot = false       # one key per entry of kgen/build/variants.py (each names the bug it seeds)
"""
from __future__ import annotations

import datetime
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from kgen.arch import ARCHES, I386, named
from kgen.build.variants import VARIANT_NAMES
from kgen.errors import ConfigError, input_file_problem

DEFAULT_CONFIG_NAME = "kgen.toml"
# pmm.kind: the physical frame allocators kgen generates, the first the default.
PMM_KINDS = ("stack", "bitmap")
# The values that differ between architectures are the architecture record's; the Config defaults are i386's.
_I386 = dict(I386.defaults)


@dataclass(frozen=True)
class Config:
    arch: str = I386.name
    kernel_virtual_base: int = _I386["kernel_virtual_base"]
    kernel_load_address: int = 0x100000
    kernel_max_size: int = 0x400000
    kernel_stack_size: int = 0x4000
    paging_recursive_slot: int = _I386["paging_recursive_slot"]
    paging_foreign_slot: int = _I386["paging_foreign_slot"]
    tempmap_base: int = _I386["tempmap_base"]
    tempmap_slots: int = 16
    vmm_base: int = _I386["vmm_base"]
    vmm_size: int = _I386["vmm_size"]
    machine_memory_mib: int = 128
    pmm_kind: str = PMM_KINDS[0]
    # Build variants that break the kernel on purpose, so tests can prove they catch the break: one bool field per
    # entry of kgen/build/variants.py, off by default (`Config(fault_at_boot=True)` seeds that bug).
    for _variant in VARIANT_NAMES:
        __annotations__[_variant] = "bool"
        vars()[_variant] = False
    del _variant

    source: str = "defaults"   # where the values came from, for error messages
    # Fields the user set; the others take their architecture's default (`for_arch`).
    explicit: frozenset = frozenset()
    # [foreign]: not an input of kgen's own build (left out of its fingerprint and of comparisons).
    foreign: ForeignConfig | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def key_of(field_name: str) -> str:
        """The TOML key a field is read from: `kernel_virtual_base` -> `kernel.virtual_base`."""
        return _FIELD_TO_KEY[field_name]

    def with_values(self, **values) -> "Config":
        """This config with `values` set, as if the user had written them (a rule they break names them)."""
        fields_set = frozenset(values) - {"source", "explicit"}
        return replace(self, explicit=self.explicit | fields_set, **values)

    @classmethod
    def for_arch(cls, arch: str, **values) -> "Config":
        """A config for `arch`: the architecture's defaults (`kgen.arch`) where `values` say nothing."""
        return cls(arch=arch, explicit=frozenset(values), **values).with_arch(arch)

    def with_arch(self, arch: str) -> "Config":
        """This config for `arch`: keys the user did not set take that architecture's defaults."""
        if arch not in ARCHES:
            raise ConfigError(f"{self.source}: arch = {show_value(arch)}: must be one of {', '.join(ARCHES)}")
        given = set(self.explicit) | {"arch"}
        defaults = {name: value for name, value in named(arch).defaults if name not in given}
        return replace(self, arch=arch, **defaults)


@dataclass(frozen=True)
class ForeignConfig:
    """[foreign]: how to boot and judge a kernel kgen did not build, for `kgen test`, `kgen run` and `kgen inspect`.
    Each key holds what the command-line option of the same name holds (`modules` is --module, repeated;
    `qemu_args` is --qemu-arg, one array item per QEMU argument, not split; `boot_only_segments` is
    --boot-only-segment, repeated; `symbols` is --symbols, repeated) and that option, when given, wins (one --ready*
    option replaces all the table's ready keys; --module, --qemu-arg or --symbols replaces the whole array). `kernel`
    and the files of `modules` and `symbols` are relative to the config file; with `kernel` set the commands check that kernel without --kernel
    (kgen/harness/foreign.py `apply_foreign_config`)."""
    source: str
    kernel: Path | None = None
    ready: str | None = None
    ready_at: str | None = None
    ready_symbol: str | None = None
    ready_vga: str | None = None
    ready_after: float | None = None
    boot_timeout: float | None = None
    memory: int | None = None       # MiB
    append: str | None = None
    modules: tuple[str, ...] | None = None
    qemu_args: tuple[str, ...] | None = None
    address_spaces: str | None = None
    boot_only_segments: tuple[int, ...] | None = None
    boot: str | None = None         # --boot: direct, grub, grub-multiboot2
    firmware: str | None = None     # --firmware: bios, uefi
    qemu_command: str | None = None     # --qemu-command: the project's own QEMU command line
    image: Path | None = None           # --image: the project's own bootable image
    symbols: tuple[str, ...] | None = None  # --symbols: ELF[@OFFSET] each, the ELF judged when a loader stage boots
    kernel_base: int | None = None      # --kernel-base: where a 32-bit kernel's half starts
    check_at: str | None = None         # --check-at: SYMBOL[,SYMBOL...], where to check at every hit
    check_count: int | None = None      # --check-count: hits
    check_for: float | None = None      # --check-for: seconds

    def key(self, name: str) -> str:
        """`kgen.toml: foreign.memory`, how an error names where a value came from."""
        return f"{self.source}: foreign.{name}"


# [foreign] key -> what its value must be: a non-empty string, any string, a path, seconds above 0, a count above 0,
# an address (an integer, 0 or above), an array of strings, an array of indices.
_FOREIGN_KINDS = {"kernel": "path", "ready": "text", "ready_at": "text", "ready_symbol": "text", "ready_vga": "text",
                  "ready_after": "seconds", "boot_timeout": "seconds", "memory": "count", "append": "any text",
                  "modules": "paths", "qemu_args": "texts", "address_spaces": "text", "boot_only_segments": "indices",
                  "boot": "text", "firmware": "text", "qemu_command": "text", "image": "path",
                  "symbols": "symbol files", "kernel_base": "address",
                  "check_at": "text", "check_count": "hits", "check_for": "seconds"}


def _foreign_from_mapping(table: dict, where: str, base_dir: Path) -> ForeignConfig:
    """Type-check [foreign] (one line naming the key for anything wrong) and resolve its paths against `base_dir`."""
    values = {}
    for key, value in table.items():
        kind = _FOREIGN_KINDS.get(key)
        dotted = show_key("foreign", key)
        if kind is None:
            raise ConfigError(f"{where}: unknown key {dotted}; known keys of [foreign]: {', '.join(_FOREIGN_KINDS)}")
        shown = show_value(value, decimal=kind != "address")

        def bad(rule: str) -> ConfigError:
            return ConfigError(f"{where}: {dotted} = {shown}: {rule}")

        if kind in ("path", "text", "any text"):
            if not isinstance(value, str):
                raise bad("must be a string")
            if kind != "any text" and not value:
                raise bad("must not be empty")
            value = base_dir / value if kind == "path" else value
        elif kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad("must be a number of seconds")
            if not math.isfinite(value) or value <= 0:
                raise bad("must be a finite number of seconds above 0")
            value = float(value)
        elif kind == "address":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad("must be an address, an integer (0xC0000000)")
        elif kind in ("count", "hits"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad("must be an integer (" + ("MiB" if kind == "count" else "a number of hits") + ")")
            if value <= 0:
                raise bad("must be above 0")
        else:
            if not isinstance(value, list):
                raise bad("must be an array" + (" of strings" if kind != "indices" else " of program-header indices"))
            for item in value:
                if kind == "indices" and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
                    raise bad(f"item {show_value(item)}: must be a program-header index (0 or above, as "
                              "`readelf -l` numbers them)")
                if kind != "indices" and not isinstance(item, str):
                    raise bad(f"item {show_value(item)}: must be a string")
                if kind == "paths" and not item.partition(",")[0]:
                    raise bad(f"item {show_value(item)}: must name a file (FILE[,ARGS])")
                if kind == "symbol files" and not item:
                    raise bad("an item is empty: each names an ELF (ELF or ELF@OFFSET)")
            if kind == "paths":     # FILE[,ARGS]: the file relative to the config, its command line as written
                value = [str(base_dir / item.partition(",")[0]) + item[len(item.partition(",")[0]):]
                         for item in value]
            if kind == "symbol files":      # ELF[@OFFSET]: relative to the config (the @OFFSET tail joins as is)
                value = [str(base_dir / item) for item in value]
            value = tuple(value)
        values[key] = value
    return ForeignConfig(source=where, **values)


# TOML table -> keys it may hold. A key at top level has table "".
_SCHEMA: dict[str, tuple[str, ...]] = {
    "": ("arch",),
    "kernel": ("virtual_base", "load_address", "max_size", "stack_size"),
    "paging": ("recursive_slot", "foreign_slot"),
    "tempmap": ("base", "slots"),
    "vmm": ("base", "size"),
    "machine": ("memory_mib",),
    "pmm": ("kind",),
    "variant": VARIANT_NAMES,
}


def _field_name(table: str, key: str) -> str:
    if table in ("", "variant"):
        return key
    return f"{table}_{key}"


_FIELD_TO_KEY = {
    _field_name(table, key): (f"{table}.{key}" if table else key)
    for table, keys in _SCHEMA.items() for key in keys
}
_FIELD_TYPES = {f.name: f.type for f in fields(Config)}
# Keys that count things rather than address them: their values read better in decimal.
DECIMAL_KEYS = frozenset({"paging.recursive_slot", "paging.foreign_slot", "tempmap.slots", "machine.memory_mib"})


# ---- showing what the user wrote: every ConfigError is one line, `<file>: <key> = <value>: <rule>` ------------------
# A value is echoed so the user recognises it, never in full when it is long: a number keeps its first and last
# digits and says how many it has; a string, key or file name is quoted when it holds anything unprintable (a
# newline in a quoted TOML key must not split the line).
SHOWN_DIGITS = 8               # digits kept at each end of a long number
SHOWN_CHARS = 40               # characters kept of a long string
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Decimal conversion of a huge int is quadratic (and refused beyond sys.get_int_max_str_digits()): above this many
# bits a number is shown in hex, which is linear.
_DECIMAL_BITS = 256


def _abbreviate_digits(prefix: str, digits: str, unit: str) -> str:
    if len(digits) <= 2 * SHOWN_DIGITS + 4:
        return prefix + digits
    return f"{prefix}{digits[:SHOWN_DIGITS]}…{digits[-SHOWN_DIGITS:]} ({len(digits)} {unit})"


def show_int(value: int, decimal: bool = False) -> str:
    """An integer as a config error echoes it: hex for addresses and sizes, decimal for counts; long ones cut."""
    sign = "-" if value < 0 else ""
    if decimal and abs(value).bit_length() <= _DECIMAL_BITS:
        return _abbreviate_digits(sign, str(abs(value)), "digits")
    return _abbreviate_digits(sign + "0x", f"{abs(value):x}", "hex digits")


def show_text(text: str) -> str:
    """A string as written in TOML, quoted, cut when long; escapes keep it on one line."""
    if len(text) > 2 * SHOWN_CHARS:
        return f"{text[:SHOWN_CHARS]!r}…{text[-SHOWN_CHARS // 2:]!r} ({len(text)} characters)"
    return repr(text)


def show_value(value, decimal: bool = True) -> str:
    """Any TOML value, on one line and bounded: numbers and strings as above, arrays and tables by their first items."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return show_int(value, decimal)
    if isinstance(value, str):
        return show_text(value)
    if isinstance(value, list):
        items = [show_value(v, decimal) for v in value[:3]]
        return "[" + ", ".join(items) + (f", … ({len(value)} items)]" if len(value) > 3 else "]")
    if isinstance(value, dict):
        items = [f"{show_key_part(k)} = {show_value(v, decimal)}" for k, v in list(value.items())[:3]]
        return "{" + ", ".join(items) + (f", … ({len(value)} keys)}}" if len(value) > 3 else "}")
    if isinstance(value, (datetime.date, datetime.time)):     # as TOML writes them, not as Python's repr
        return value.isoformat()
    shown = repr(value)         # floats: short by nature
    return shown if len(shown) <= 2 * SHOWN_CHARS else shown[:2 * SHOWN_CHARS] + "…"


def show_key_part(part: str) -> str:
    """One part of a dotted key: bare when TOML allows it bare, else quoted with escapes."""
    if not _BARE_KEY.fullmatch(part):
        return show_text(part)
    if len(part) <= 2 * SHOWN_CHARS:
        return part
    return f"{part[:SHOWN_CHARS]}…{part[-SHOWN_CHARS // 2:]} ({len(part)} characters)"


def show_key(*parts: str) -> str:
    return ".".join(show_key_part(p) for p in parts if p != "")


def show_path(path) -> str:
    """A file name for the start of a message: as is, unless it holds something that would break the line."""
    text = str(path)
    return text if text.isprintable() and len(text) <= 4 * SHOWN_CHARS else show_text(text)


def _check_type(where: str, key: str, value, expected: str):
    shown = show_value(value)
    if expected == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} = {shown}: must be an integer")
    if expected == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} = {shown}: must be true or false")
    if expected == "str" and not isinstance(value, str):
        raise ConfigError(f"{where}: {key} = {shown}: must be a string")
    if expected == "int" and value < 0:
        raise ConfigError(f"{where}: {key} = {show_int(value, key in DECIMAL_KEYS)}: must not be negative")


def from_mapping(data: dict, where: str = "config", base_dir: Path | None = None) -> Config:
    """Type-check a parsed TOML document and return the Config it describes; [foreign]'s paths are relative to
    `base_dir` (the config file's directory; default: the current one)."""
    values = {}
    foreign = None
    for name, value in data.items():
        if name == "foreign":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: foreign = {show_value(value)}: must be a table ([foreign] and its keys "
                                  f"{', '.join(_FOREIGN_KINDS)})")
            foreign = _foreign_from_mapping(value, where, Path(base_dir) if base_dir is not None else Path())
            continue
        if isinstance(value, dict):
            if name not in _SCHEMA or name == "":
                raise ConfigError(f"{where}: unknown table [{show_key(name)}]; known tables: "
                                  + ", ".join(f"[{t}]" for t in _SCHEMA if t) + ", [foreign]")
            items = [(name, key, v) for key, v in value.items()]
        elif name in _SCHEMA and name != "":
            raise ConfigError(f"{where}: {show_key(name)} = {show_value(value)}: must be a table ([{name}] and its "
                              f"keys {', '.join(_SCHEMA[name])})")
        else:
            items = [("", name, value)]
        for table, key, v in items:
            dotted = show_key(table, key)
            if key not in _SCHEMA.get(table, ()):
                # The keys of the table it was written in (the [variant] list alone is long): one readable line.
                if table:
                    known = f"known keys of [{table}]: {', '.join(_SCHEMA[table])}"
                else:
                    known = "known top-level keys: " + ", ".join(_SCHEMA[""]) + "; tables: " + ", ".join(
                        f"[{t}]" for t in _SCHEMA if t) + ", [foreign]"
                raise ConfigError(f"{where}: unknown key {dotted}; {known}")
            field = _field_name(table, key)
            _check_type(where, dotted, v, _FIELD_TYPES[field])
            values[field] = v
    config = Config(source=where, explicit=frozenset(values), foreign=foreign, **values)
    return config.with_arch(config.arch)


def load(path: Path | None, arch: str | None = None) -> Config:
    """Read `path`, or `./kgen.toml` when it exists, or return the defaults; `arch` (the command line's --arch)
    overrides the file's and brings that architecture's defaults for every key the file does not set."""
    config = _load(path)
    return config if arch is None else config.with_arch(arch)


# A config is a few dozen lines; a file far larger is the wrong file (read whole, it could exhaust memory).
MAX_CONFIG_BYTES = 1 << 20


def _load(path: Path | None) -> Config:
    if path is None:
        default = Path(DEFAULT_CONFIG_NAME)
        if not default.exists():
            return Config()
        path = default
    where = show_path(path)
    problem = input_file_problem(path)
    if problem is not None and problem != "no such file":
        raise ConfigError(f"{where}: cannot read config: {problem}")
    if problem is None and Path(path).stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {Path(path).stat().st_size} bytes: a kgen config is a few lines of TOML (at most "
                          f"{MAX_CONFIG_BYTES} bytes); is this the right file?")
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read config: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{where}: line {line}: byte {raw[err.start]:#04x} is not UTF-8: a config is UTF-8 TOML; "
                          "save the file as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML: {_one_line(str(err))}") from None
    except ValueError:
        # int() refuses a decimal literal longer than sys.get_int_max_str_digits(); tomllib lets that through.
        raise ConfigError(_too_many_digits(where, text)) from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid TOML for kgen: arrays or tables nested too deeply") from None
    return from_mapping(data, where=where, base_dir=Path(path).parent)


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


_LONG_DECIMAL = re.compile(r"^[ \t]*([^=\n]+?)[ \t]*=[ \t]*([+-]?[0-9][0-9_]*)", re.MULTILINE)
_TABLE_HEADER = re.compile(r"^[ \t]*\[[ \t]*([^\]\n]+?)[ \t]*\]", re.MULTILINE)


def _too_many_digits(where: str, text: str) -> str:
    """The line for a decimal literal too long to read: its key (as written, under its table) and its size."""
    limit = sys.get_int_max_str_digits()
    for match in _LONG_DECIMAL.finditer(text):
        digits = match.group(2).lstrip("+-").replace("_", "")
        if limit and len(digits) > limit:
            headers = [h for h in _TABLE_HEADER.finditer(text, 0, match.start())]
            key = match.group(1).strip()
            if headers:
                key = f"{headers[-1].group(1).strip()}.{key}"
            key = key if key.isprintable() and len(key) <= 2 * SHOWN_CHARS else show_text(key)
            shown = _abbreviate_digits("", digits, "digits")
            return f"{where}: {key} = {shown}: a number this long is no address or size (at most {limit} digits)"
    return f"{where}: a decimal number has more than {limit} digits: no config value is that long"
