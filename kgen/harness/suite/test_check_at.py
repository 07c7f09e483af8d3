"""The page-table checks at every moment a kernel names, not only where it ends up (kgen/harness/checkat.py).

A kernel given with --check-at SYMBOL[,SYMBOL...] is booted once more for this test alone, held at its first
instruction while the breakpoints go in, then run hit by hit: at each, the space in CR3 and every space
--address-spaces lists are checked. The test fails with the first hit at which a check fails; every hit goes to the
--json report (`hits`). kgen's own kernel has a stage of its own: every space in `as_spaces` is checked at every
`as_switch` while a scenario of calls creates, fills, switches and destroys spaces and runs a task. A flaw that is
there only between two switches (the idle kernel the other tests look at is clean again) is seen only here.
"""
from __future__ import annotations

import pytest

from kgen.arch import hw
from kgen.errors import KgenError, MachineError
from kgen.guest.calls import CallError
from kgen.guest.diagnose import explain
from kgen.guest.spacesource import KgenSpaces, source_for
from kgen.harness.checkat import CheckAt, HitRun, hits_in_background, run_hits
from kgen.harness.jsonreport import HITS_PROPERTY
from kgen.harness.live import POISON
from kgen.harness.session import KernelSession
from kgen.machine.snapshot import fresh_machine

SWITCH = "as_switch"
USER_RW = hw.PTE_P | hw.PTE_RW | hw.PTE_US
SPACES = 2          # created by the scenario, besides the boot space (few: each hit checks every one)


def _fail_at_first_broken_hit(hits, what: str) -> None:
    failed = next((hit for hit in hits if hit.failed), None)
    if failed is not None:
        pytest.fail(f"the page tables broke at hit {failed.number} of {len(hits)} ({what})\n{failed.report()}",
                    pytrace=False)


def test_page_tables_hold_at_every_hit(request, kgen_kernel, kgen_accel):
    if kgen_kernel.layout is not None:
        pytest.skip("kgen's own kernel is checked at every as_switch (test_every_space_holds_at_every_as_switch)")
    opt = request.config.getoption
    try:
        check_at = CheckAt.from_options(kgen_kernel.elf, opt("kgen_check_at"), opt("kgen_check_count"),
                                        opt("kgen_check_for"))
        source = source_for(kgen_kernel.elf, opt("kgen_address_spaces"))
    except KgenError as err:
        raise pytest.UsageError(str(err)) from None
    if check_at is None:
        pytest.skip("no --check-at: the checks look at the kernel once, where it is ready")
    options = dict(kgen_kernel.machine_options(kgen_accel, POISON), gdbstub=True, start_paused=True)
    runs: list[HitRun] = []

    def hit_loop(machine) -> None:
        try:
            runs.append(run_hits(machine, kgen_kernel.elf, None, POISON, source, check_at, kgen_kernel.boot_timeout,
                                 kgen_kernel.boot_only_segments))
        except MachineError as err:
            failure = explain(machine, kgen_kernel.elf, err)
            hits = getattr(err, "hits", [])
            request.node.user_properties.append((HITS_PROPERTY, [hit.record() for hit in hits]))
            _fail_at_first_broken_hit(hits, f"then {failure.summary}")
            pytest.fail(f"{failure.summary}\n{failure.details}", pytrace=False)

    fresh_machine(options, hit_loop, "check-at", cold=True).shutdown()
    run = runs[0]
    request.node.user_properties.append((HITS_PROPERTY, [hit.record() for hit in run.hits]))
    print(run.summary())
    if not run.hits:
        pytest.fail(f"the CPU never reached {check_at.describe()} ({run.ended}): no moment was checked; name a "
                    "place the kernel passes", pytrace=False)
    _fail_at_first_broken_hit(run.hits, run.summary())


@pytest.fixture
def switching_kernel(kgen_layout, kgen_kernel, kgen_accel):
    if SWITCH not in kgen_kernel.elf.symbols:
        pytest.skip(f"this kernel has no {SWITCH}")
    with KernelSession(kgen_kernel.elf_path, kgen_layout, accel=kgen_accel, poison=POISON,
                       firmware=getattr(kgen_kernel.boot, "firmware", "bios"), gdbstub=True) as session:
        yield session


def test_every_space_holds_at_every_as_switch(request, switching_kernel, kgen_accel):
    s = switching_kernel
    check_at = CheckAt.from_options(s.elf, SWITCH)
    failed = None
    with hits_in_background(s.machine, s.elf, s.layout, POISON, KgenSpaces(), check_at) as hits:
        try:
            switches = _scenario(s, tasks=kgen_accel == "tcg")
        except CallError as err:
            failed = err            # said once the hits are no longer served (the diagnosis asks QMP too)
    request.node.user_properties.append((HITS_PROPERTY, [hit.record() for hit in hits]))
    if failed is not None:
        _fail_at_first_broken_hit(hits, f"then a call failed: {failed}")
        failure = explain(s.machine, s.elf, str(failed).split("; last output", 1)[0])
        pytest.fail(f"{failure.summary}\n{failure.details}", pytrace=False)
    assert len(hits) == switches, f"{switches} calls of {SWITCH}, {len(hits)} hits: a switch went unchecked"
    _fail_at_first_broken_hit(hits, f"every space in as_spaces, at every {SWITCH}")


def _scenario(s, *, tasks: bool) -> int:
    """Spaces created, each given a user page, switched through and back, one destroyed, a task run (it switches
    into its space and back, and its space is destroyed), the other switched to and back and destroyed; returns how
    many times as_switch ran. `tasks`: under kvm_pvm here ring 3 gets no system calls (tests/kernel/test_user.py),
    so none runs."""
    layout, arch = s.layout, s.layout.arch
    boot = s.call("as_current")
    user_page = arch.span(0) + 5 * hw.PAGE_SIZE + 3 * arch.span(arch.levels - 2)     # user half, top-level slot 1
    spaces = [s.call("as_create") for _ in range(SPACES)]
    assert all(spaces), "as_create failed"
    for top in spaces:
        assert s.call("as_attach", top) == 1
        assert s.call("vmm_map_in", top, user_page, s.call("pmm_alloc"), USER_RW) == 1
    s.call("as_detach")
    switches = 0
    for top in spaces + [boot]:
        assert s.call(SWITCH, top) == 1
        switches += 1
    assert s.call("as_destroy", spaces[1]) == 1
    if tasks:
        space = s.call("as_create")
        entry = s.call("user_load", space, s.symbol("user_hello"), s.symbol("user_hello_end"))
        task = s.call("task_create", space, entry, layout.user_lazy_window.end)
        assert task, "task_create failed"
        s.call("task_run", task)
        s.call("task_release", task)
        switches += 2           # into its space, and back when it exits
    assert s.call(SWITCH, spaces[0]) == 1
    assert s.call(SWITCH, boot) == 1
    assert s.call("as_destroy", spaces[0]) == 1
    return switches + 2
