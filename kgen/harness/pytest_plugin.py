"""pytest fixtures for tests of a running kernel: a kgen kernel built from a config, or any Multiboot ELF.

    def test_frames_come_from_ram(kgen_machine):
        frame = kgen_machine.call("pmm_alloc")          # continues the guest, runs the routine by symbol
        view = kgen_machine.view()                      # stops it: registers, page walk, ELF, layout
        assert view.walker.translate(...)

Fixtures: `kgen_kernel` (session: elf_path, elf, layout), `kgen_layout` (skips unless kgen built the kernel),
`kgen_machine` (a fresh machine per test, in serve mode for a kgen kernel; shut down afterwards whatever happens),
`kgen_idle` (one boot per module, stopped: for tests that only look), `kgen_kvm` (session: `(usable, why)` from a
probe boot under KVM), `kgen_accel`; `kgen_boot(kernel, accel)` and `assert_holds(check, view)` for your own.
Options: --kgen-config, --kgen-arch, --kgen-out, --kgen-kernel, --kgen-accel, --kgen-cold-boot, --kgen-shard K/N
(share K of N of the tests, kgen/harness/shard.py); for a kernel given
with --kgen-kernel how to boot it and when to look: --kgen-ready, --kgen-ready-symbol, --kgen-ready-after,
--kgen-ready-at, --kgen-ready-vga, --kgen-boot-timeout, --kgen-memory, --kgen-append, --kgen-module, --kgen-qemu-arg,
--kgen-boot-only-segment, --kgen-symbols, --kgen-kernel-base, --kgen-address-spaces (the page-table checks take
`kgen_space` and run once per address space the kernel lists, or an expression over its globals yields;
`space_view(live, kgen_space)` is the machine seen through it), --kgen-check-at, --kgen-check-count,
--kgen-check-for (the checks at every hit of a symbol, kgen/harness/checkat.py); --kgen-json FILE writes the results
as JSON (kgen/harness/jsonreport.py).

Every machine a fixture hands out is as a cold boot leaves it, but only the first per kernel is booted: the
others are restored from a snapshot of it (kgen/machine/snapshot.py), unless --kgen-cold-boot.

What the report says besides pytest's lines: the address spaces each check of a stopped machine judged
(`kgen_spaces` on its report, the distinct ones in one line at the end), and the checks that only apply to a kernel kgen built
(`skip_kgen_only`) as one line with the reason, not one line each (the JSON report keeps one record per check).

Installed as a pytest11 entry point, so it loads in every pytest run of an environment holding kgen: importing it
costs pytest alone, and nothing is built or booted unless a test asks for a kgen fixture.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("kgen", "kgen: kernels booted in QEMU")
    group.addoption("--kgen-config", type=Path, help="kgen.toml to build the kernel from (default: ./kgen.toml "
                    "if present, else kgen's defaults)")
    group.addoption("--kgen-out", type=Path, help="build directory for the kernel (default: a temporary one)")
    group.addoption("--kgen-kernel", type=Path, help="test this Multiboot ELF instead of building one: only what "
                    "an ELF and a running machine show can be checked")
    group.addoption("--kgen-ready", help="with --kgen-kernel: COM1 text the kernel prints once booted (default: "
                    "booted when the CPU halts with interrupts off, or sits idle in hlt with paging on)")
    group.addoption("--kgen-ready-symbol", metavar="SYMBOL", help="with --kgen-kernel: booted once the CPU stays "
                    "inside this function (its idle or busy loop), found by sampling EIP")
    group.addoption("--kgen-ready-after", type=float, metavar="SECONDS", help="with --kgen-kernel: booted once "
                    "paging is on and the page tables have not changed for this long")
    group.addoption("--kgen-ready-at", metavar="SYMBOL", help="with --kgen-kernel: stop the CPU the first time it "
                    "reaches this symbol (or 0x address), by a breakpoint through QEMU's gdbstub")
    group.addoption("--kgen-ready-vga", metavar="TEXT", help="with --kgen-kernel: booted once the VGA text screen "
                    "shows this text")
    group.addoption("--kgen-boot-timeout", type=float, help="with --kgen-kernel: seconds to wait for the booted "
                    "state (default: 60)")
    group.addoption("--kgen-memory", type=int, help="with --kgen-kernel: guest RAM in MiB (default: 128)")
    group.addoption("--kgen-append", help="with --kgen-kernel: the kernel command line (Multiboot)")
    group.addoption("--kgen-module", action="append", default=[], metavar="FILE[,ARGS]",
                    help="with --kgen-kernel: a Multiboot module (QEMU -initrd), with its command line; repeatable")
    group.addoption("--kgen-qemu-arg", action="append", default=[], metavar="ARGS",
                    help="with --kgen-kernel: more QEMU arguments, split like a shell line ('-smp 2'); repeatable")
    group.addoption("--kgen-boot-only-segment", action="append", metavar="N", help="with --kgen-kernel: program "
                    "header N (as readelf -l numbers them) is boot code the kernel may unmap; repeatable; `none`: no "
                    "segment is (default: a segment linked where it is loaded in an otherwise higher-half kernel)")
    from kgen.harness.bootnames import BOOT_METHODS, FIRMWARES
    group.addoption("--kgen-boot", choices=BOOT_METHODS, help="with --kgen-kernel: how "
                    "to boot it (direct: QEMU's -kernel; grub: an ISO with GRUB around it; default by its headers)")
    group.addoption("--kgen-image", type=Path, help="with --kgen-kernel: boot this image of the author's (ISO: "
                    "CD-ROM, else the first disk), never written")
    group.addoption("--kgen-symbols", action="append", metavar="ELF[@OFFSET]", help="with --kgen-kernel: the "
                    "ELF judged and symbolised when --kgen-kernel is a loader stage carrying it; repeatable")
    group.addoption("--kgen-kernel-base", type=lambda text: int(text, 0), metavar="ADDR", help="with "
                    "--kgen-kernel, a 32-bit kernel: where its kernel half starts (default: its ELF's higher-half "
                    "base)")
    group.addoption("--kgen-qemu-command", help="with --kgen-kernel: boot it with this QEMU command line (kgen "
                    "adds its sockets, kgen/harness/qemucommand.py)")
    group.addoption("--kgen-firmware", choices=FIRMWARES, help="bios (default) or uefi (OVMF, through GRUB), for "
                    "kgen's kernel or one given with --kgen-kernel")
    group.addoption("--kgen-accel", choices=("tcg", "kvm"), default="tcg", help="QEMU accelerator (default: tcg)")
    group.addoption("--kgen-cold-boot", action="store_true", help="boot a new machine for every test instead of "
                    "restoring a snapshot of the booted kernel (the default: one boot per kernel and worker)")
    group.addoption("--kgen-address-spaces", metavar="SYMBOL[,COUNT]|EXPR", help="with --kgen-kernel: the "
                    "kernel's array of top-level table physical addresses (0 = unused slot), or an expression over "
                    "its globals evaluated with its DWARF (ptable.proc[state != UNUSED].pgdir, task_list[->next].cr3; "
                    "kgen/guest/dwarfspaces.py); the page-table checks run on every space it names, not only CR3's")
    group.addoption("--kgen-check-at", metavar="SYMBOL[,SYMBOL...]", help="with --kgen-kernel: check the page "
                    "tables each time the CPU reaches one of these symbols (kgen/harness/checkat.py)")
    group.addoption("--kgen-check-count", type=int, metavar="N", help="with --kgen-check-at: at most N hits "
                    "(default: 100)")
    group.addoption("--kgen-check-for", type=float, metavar="SECONDS", help="with --kgen-check-at: for at most "
                    "this long (default: the boot timeout)")
    group.addoption("--kgen-json", type=Path, metavar="FILE", help="also write the results as JSON, one object "
                    "per check (kgen/harness/jsonreport.py)")
    group.addoption("--kgen-shard", metavar="K/N", help="run share K of N of the selected tests (by node id; the N "
                    "shares hold every test once): one machine's part of a CI matrix")
    group.addoption("--kgen-arch", help="architecture to build for (default: the config's `arch`); keys the "
                    "config does not set take that architecture's defaults")


def pytest_configure(config):
    if config.getoption("kgen_shard", None) is not None:
        from kgen.harness.shard import Shard, ShardError
        try:
            config.stash[_SHARD] = Shard.parse(config.getoption("kgen_shard"))
        except ShardError as err:
            raise pytest.UsageError(f"--kgen-shard {err}") from None
    if config.getoption("kgen_cold_boot", False):
        from kgen.machine.snapshot import set_cold_boot
        set_cold_boot(True)
    if config.getoption("kgen_kernel", None) is not None:
        from kgen.harness.spacesjudged import SpacesJudged      # which spaces were judged, where the ready point came
        config.pluginmanager.register(SpacesJudged(), "kgen-spaces-judged")
    if config.getoption("kgen_json", None) is not None and not hasattr(config, "workerinput"):
        # On the process that reports (an xdist worker's reports reach it too), not on each worker.
        from kgen.harness.jsonreport import JsonReport
        config.pluginmanager.register(JsonReport(config.getoption("kgen_json"), lambda: _kernel_record(config),
                                                 config.getoption("kgen_accel")), "kgen-json")


_SHARD = pytest.StashKey()


@pytest.hookimpl(trylast=True)      # after -k and -m: the N machines split what they selected
def pytest_collection_modifyitems(config, items):
    shard = config.stash.get(_SHARD, None)
    if shard is None:
        return
    mine = shard.take([item.nodeid for item in items])
    others = [item for item in items if item.nodeid not in mine]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if item.nodeid in mine]


def _kernel_record(config) -> dict:
    from kgen.harness import jsonreport
    opt = config.getoption
    if opt("kgen_kernel") is not None:
        return jsonreport.foreign_kernel_record(opt("kgen_kernel"))
    from kgen.build import config as configmod
    from kgen.build.pipeline import ELF_NAME
    cfg = configmod.load(opt("kgen_config"), opt("kgen_arch"))
    elf = opt("kgen_out") / ELF_NAME if opt("kgen_out") is not None else None     # else a temporary build
    return jsonreport.kernel_record(elf.resolve() if elf and elf.is_file() else None, "kgen", cfg.arch)


def pytest_generate_tests(metafunc):
    """A test that takes `kgen_space` runs once per slot of --kgen-address-spaces SYMBOL[,COUNT], or once per space
    its expression yields on the booted kernel (ids name the slot or the space)."""
    spec = metafunc.config.getoption("kgen_address_spaces", None)
    if spec is None or "kgen_space" not in metafunc.fixturenames:
        return
    from kgen.errors import KgenError
    from kgen.guest.addrspaces import SpaceArray, SpaceSlot, parse_spec
    from kgen.guest.elfinfo import ElfInfo
    from kgen.harness.symbols import judged_elf
    kernel = metafunc.config.getoption("kgen_kernel")
    if kernel is None:
        raise pytest.UsageError("--kgen-address-spaces is for a kernel given with --kgen-kernel")
    try:
        symbols = metafunc.config.getoption("kgen_symbols", None)
        elf = judged_elf(symbols) or ElfInfo.load(kernel)
        parsed = parse_spec(spec, elf)
    except KgenError as err:
        raise pytest.UsageError(str(err)) from None
    if isinstance(parsed, SpaceArray):
        slots = [SpaceSlot(parsed, i) for i in range(parsed.count)]
    else:
        slots = _expression_spaces(metafunc.config, spec)
    from kgen.guest.ownspace import OwnSpaceSlot, own_space_symbol
    if own_space_symbol(elf) is not None:       # the kernel's own space, which the listed ones may not hold
        slots = [*slots, OwnSpaceSlot(spec)]       # a new list: the expression's is kept for every test
    metafunc.parametrize("kgen_space", slots, ids=[slot.name for slot in slots])


def _expression_spaces(config, spec: str) -> list:
    """The spaces `spec` yields on the kernel booted to its ready state, once per process (the boot leaves the
    snapshot every later machine of this process is restored from, so it costs no boot of its own)."""
    cached = getattr(config, "_kgen_expression_spaces", None)
    if cached is not None:
        return cached
    from kgen.errors import KgenError
    from kgen.guest import dwarfspaces
    from kgen.guest.addrspaces import NamedSpace, NoSpaces
    from kgen.guest.diagnose import RunFailed
    from kgen.harness.live import boot
    try:
        with boot(_foreign_kernel(config), config.getoption("kgen_accel")) as live:
            found = dwarfspaces.spaces_in_view(live.view(), spec)
        spaces = ([NamedSpace(spec, space.name) for space in found] if found else
                  [NoSpaces(spec, f"{spec} yields no space on the booted kernel: every element null or skipped")])
    except (RunFailed, KgenError) as err:
        spaces = [NoSpaces(spec, f"{spec} could not be evaluated: {err}", failed=True)]
    config._kgen_expression_spaces = spaces
    return spaces


def _foreign_kernel(config):
    """The --kgen-kernel kernel with its options, read the way `kgen test` reads its own (kgen/cli/test.py forwards
    each as --kgen-<option>)."""
    from types import SimpleNamespace

    from kgen.harness.foreign import FOREIGN_OPTIONS, foreign_kernel_from_args
    opt = config.getoption
    args = SimpleNamespace(kernel=opt("kgen_kernel"),
                           **{attr: opt(f"kgen_{attr}") for attr in FOREIGN_OPTIONS.values()})
    args.boot_only_segment = _boot_only(args.boot_only_segment)
    return foreign_kernel_from_args(args)


@pytest.fixture(scope="session")
def kgen_kernel(request, tmp_path_factory):
    from kgen.errors import KgenError
    from kgen.harness.kernel import KernelUnderTest

    opt = request.config.getoption
    try:
        if opt("kgen_kernel") is not None:
            return _foreign_kernel(request.config)
        return KernelUnderTest.built(opt("kgen_config"), opt("kgen_out") or tmp_path_factory.mktemp("kgen-kernel"),
                                     opt("kgen_arch"), opt("kgen_firmware"))
    except KgenError as err:
        pytest.fail(f"kgen: cannot get the kernel under test: {err}", pytrace=False)


def _boot_only(values: list[str] | None) -> list[int] | None:
    """--kgen-boot-only-segment values: None when not given (the default rule), [] for `none`."""
    if values is None:
        return None
    try:
        return [int(v, 0) for v in values if v != "none"]
    except ValueError:
        raise pytest.UsageError(f"--kgen-boot-only-segment {values}: give program-header indices, or none") from None


@pytest.fixture(scope="session")
def kgen_kvm(request, kgen_kernel):
    from kgen.harness.kvmprobe import probe_kvm
    return probe_kvm(kgen_kernel, request.config.getoption("kgen_out"))


@pytest.fixture(scope="session")
def kgen_accel(request):
    accel = request.config.getoption("kgen_accel")
    if accel == "kvm":
        usable, why = request.getfixturevalue("kgen_kvm")
        if not usable:
            pytest.skip(f"KVM cannot run this kernel here: {why}")
    return accel


def skip_kgen_only(kernel) -> None:
    """Skip a check that needs kgen's layout or call channel, for anyone else's kernel: reported once for all such
    checks, not per check. Raised from this one line with one reason, so pytest's -rs folds them too."""
    skip = pytest.skip.Exception(f"{kernel.elf_path.name} was not built by kgen: its layout and call channel are "
                                 f"unknown")
    skip.kgen_only = True       # pytest's own skip, so it is worded and counted as any other
    raise skip


@pytest.fixture(scope="session")
def kgen_layout(kgen_kernel):
    """The layout the kernel was built from; tests that need it are skipped for anyone else's ELF."""
    if kgen_kernel.layout is None:
        skip_kgen_only(kgen_kernel)
    return kgen_kernel.layout


@contextmanager
def kgen_boot(kernel, accel: str = "tcg"):
    """Boot `kernel` for a test; a boot that fails fails the test with the diagnosis (what the kernel did
    instead: exception, triple fault, hang), not with a traceback of the harness."""
    from kgen.guest.diagnose import RunFailed
    from kgen.harness.live import boot
    failed = None
    try:
        with boot(kernel, accel) as live:
            yield live
    except RunFailed as err:
        failed = f"{err}\n{err.details()}"
    if failed is not None:      # outside the handler: no "during handling of the above exception" chain
        pytest.fail(failed, pytrace=False)


@pytest.fixture
def kgen_machine(kgen_kernel, kgen_accel):
    with kgen_boot(kgen_kernel, kgen_accel) as live:
        yield live


@pytest.fixture(scope="module")
def kgen_idle(kgen_kernel, kgen_accel):
    with kgen_boot(kgen_kernel, kgen_accel) as live:
        live.stop()
        yield live


@pytest.fixture
def kgen_space():
    """The address space a page-table check looks at: None for the one in CR3; with --kgen-address-spaces the
    test is parametrised over the slots instead (`pytest_generate_tests`) and `space_view` gives each its view."""
    return None


def space_view(live, space):
    """The stopped machine seen through `space` (a `SpaceSlot` or a `NamedSpace`, or None for CR3); an unused slot
    (0) is skipped, and so is an expression that yields no space."""
    from kgen.guest.addrspaces import NamedSpace, NoSpaces
    view = live.view()
    if space is None:
        return view
    if isinstance(space, NoSpaces):
        if space.failed:
            pytest.fail(space.reason, pytrace=False)
        pytest.skip(space.reason)
    if isinstance(space, NamedSpace):
        found = space.find(view)
        if found is None:
            pytest.fail(f"{space.name} is no longer among the spaces of {space.expression}", pytrace=False)
        if found.problem is not None:
            pytest.fail(found.problem, pytrace=False)
        top = found.top & view.mode.cr3_mask
        holder = f"does {space.expression} hold their addresses?"
    else:
        top = space.top(view.read_phys) & view.mode.cr3_mask
        if top == 0:
            pytest.skip(f"{space.name} is 0: no address space in this slot")
        holder = f"is {space.array.symbol} the array of their physical addresses?"
    ram = live.machine.ram_windows
    if ram and not any(w.start <= top and top + 4096 <= w.end for w in ram):
        pytest.fail(f"{space.name} = {top:#x} is not in the guest's RAM: not the top-level table of an address space "
                    f"({holder})", pytrace=False)
    return view.in_space(top, space_label(view, space, top))


def judged_views(live, space) -> list:
    """The views a page-table check judges for `space`: the slot's (`space_view`); given none (no
    --address-spaces), for a kernel kgen did not build, the kernel's own space and the live one when they differ, so
    a ready point that lands in a process's space gives the same verdict as one in the kernel's (kgen/guest/
    ownspace.py `judged_spaces`); else the space in CR3. Given the kernel's own space beside --address-spaces' spaces
    (`OwnSpaceSlot`): that space, and the live one when it is none of those."""
    from kgen.guest.ownspace import OwnSpaceSlot, judged_spaces
    if isinstance(space, OwnSpaceSlot):
        views, said = space.judged(live.view())
        if not views:
            pytest.skip(said)
        return views
    view = space_view(live, space)
    if space is not None:
        return [view]
    return [judged.view for judged in judged_spaces(view)[0]]


def assert_holds(check, view, *more) -> None:
    """Run one `kgen.guest.invariants` check on each view given (`judged_views`: the kernel's own space and the live
    one): fail with the problems of every one (one line per page), skip where it applies to none; in a view of
    another address space than CR3's, both name that space."""
    from kgen.guest.findings import failures
    from kgen.guest.invariants import NotApplicable
    failed, skipped = [], []
    for seen in (view, *more):
        where = f" in address space {seen.space}" if getattr(seen, "space", None) else ""
        noted = len(seen.notes)
        try:
            findings = check(seen)
        except NotApplicable as why:
            skipped.append(f"{why}{where}")
            continue
        problems = failures(findings)
        # What this check learnt (where the kernel is) and the information it found (a guard page): in the report,
        # pass or fail, never the verdict.
        for note in seen.notes[noted:] + [f"note: {f}" for f in findings if getattr(f, "info", False)]:
            print(f"{note}{where}")
        if problems:
            failed.append(f"{check.__doc__.splitlines()[0]}{where}\n" + "\n".join(f"  {p}" for p in problems))
    if failed:
        pytest.fail("\n".join(failed), pytrace=False)
    if len(skipped) == 1 + len(more):
        pytest.skip(skipped[0])


# ---- what the report says besides pytest's lines -----------------------------------------------------------------

_SPACE_SPEC = pytest.StashKey()


def _space_spec(config):
    """--kgen-address-spaces parsed once per process (`parse_spec`: an array or an expression; None without it)."""
    if _SPACE_SPEC not in config.stash:
        from kgen.guest.addrspaces import parse_spec
        from kgen.guest.elfinfo import ElfInfo
        from kgen.harness.symbols import judged_elf
        spec, kernel = config.getoption("kgen_address_spaces", None), config.getoption("kgen_kernel", None)
        config.stash[_SPACE_SPEC] = (parse_spec(spec, judged_elf(config.getoption("kgen_symbols", None))
                                                or ElfInfo.load(kernel))
                                     if spec is not None and kernel is not None else None)
    return config.stash[_SPACE_SPEC]


def space_label(view, space, top: int) -> str:
    """"spaces[1]: PD at 0x106000 (the space in CR3)": how reports name a space a check was given."""
    current = " (the space in CR3)" if top == view.regs.cr3 & view.mode.cr3_mask else ""
    return f"{space.name}: {view.mode.level_names[0]} at {top:#x}{current}"


def judged_space_names(item) -> list[str] | None:
    """The address spaces the test judged, in words: those of `judged_views` for a page-table check (the slot it was
    given, or the kernel's own space and the live one), else the one in CR3 of the stopped machine it looked at; the
    space in CR3 named when the kernel lists it. None for a test of no stopped machine."""
    live = item.funcargs.get("kgen_idle") if hasattr(item, "funcargs") else None
    if live is None:
        return None
    from kgen.arch import hw
    from kgen.guest.addrspaces import cr3_space_text
    try:
        view = live.view()
        if not view.regs.cr0 & hw.CR0_PG:
            return [f"none: paging is off (CR3={view.regs.cr3:#x})"]
        views = judged_views(live, item.funcargs["kgen_space"]) if "kgen_space" in item.funcargs else [view]
        return [seen.space or cr3_space_text(seen, _space_spec(item.config)) for seen in views]
    except BaseException:  # noqa: BLE001 - a slot skipped or failed, the machine gone: the test's own report says
        return None         # why; naming the space must never turn a verdict into an internal error


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # Plain attributes: pytest-xdist carries them from a worker to the process that reports.
    if call.excinfo is not None and getattr(call.excinfo.value, "kgen_only", False):
        report.kgen_only = True
    if call.when == "call":
        report.kgen_spaces = judged_space_names(item)


# Set once the run's own summary lines are written: pytest's short summary (-rs, -rA), after them, asks each skip's
# word again, and a kgen-only skip is then "SKIPPED" like any other (its line would start with nothing else).
_SUMMARISING = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report, config):
    if report.skipped and getattr(report, "kgen_only", False) and config.getoption("verbose") < 2:
        # Counted, but not a letter or a line each while the tests run: one line at the end says why.
        return "skipped", "", "SKIPPED" if config.stash.get(_SUMMARISING, False) else ""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    config.stash[_SUMMARISING] = True
    reports = [r for outcome in ("passed", "failed", "skipped") for r in terminalreporter.stats.get(outcome, ())
               if getattr(r, "when", None) in ("call", "setup")]
    kgen_only = [r for r in reports if getattr(r, "kgen_only", False)]
    if kgen_only:
        reason = kgen_only_reason(kgen_only[0])
        terminalreporter.write_line(f"kgen: {len(kgen_only)} checks skipped, for kernels kgen built only: {reason} "
                                    f"(-vv or --json lists them)")
    from kgen.harness.jsonreport import distinct_spaces
    spaces = distinct_spaces(getattr(r, "kgen_spaces", None) for r in sorted(reports, key=lambda r: r.nodeid))
    # Where a kernel's own space and the live one were judged, the SpacesJudged line says it (kgen/harness/
    # spacesjudged.py); this one names the spaces otherwise: kgen's own kernel, --address-spaces' slots.
    if spaces and not any(getattr(r, "kgen_ready_space", None) for r in reports):
        terminalreporter.write_line(f"kgen: address space{'s' * (len(spaces) > 1)} judged: {'; '.join(spaces)}")


def kgen_only_reason(report) -> str:
    longrepr = report.longrepr
    text = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")
