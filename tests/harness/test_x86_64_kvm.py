"""The x86_64 kernel under both accelerators: the invariant suite through `kgen test` under TCG and under KVM, and
a differential test that boots the same kernel under each and requires the same invariant results and the same
kernel-half page tables (this host's /dev/kvm, kvm_pvm, runs long mode; where a probe boot shows KVM cannot run
the kernel the KVM half is skipped with the probe's reason)."""

import pytest

from kgen.arch import hw

from kgen.guest import invariants
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot
from kgen.guest.elfinfo import ElfInfo

from conftest import needs_qemu, require_kvm, run_kgen

pytestmark = [pytest.mark.vm, needs_qemu]
# Accessed and dirty bits record what the CPU touched, which differs between TCG and KVM by design.
HISTORY_BITS = hw.PTE_A | hw.PTE_D


@pytest.fixture(scope="module")
def kernel(x86_64_build):
    return KernelUnderTest(x86_64_build.elf, ElfInfo.load(x86_64_build.elf), x86_64_build.kernel.layout)


@pytest.fixture(scope="module")
def kvm(x86_64_build):
    """Skipped where this host's KVM cannot run the kernel (conftest's probe, once per run)."""
    require_kvm(x86_64_build)


def state(kernel, accel: str):
    """Every invariant's findings and every kernel-half table entry (history bits masked), as seen under `accel`."""
    with boot(kernel, accel) as live:
        view = live.view()
        results = {check.__name__: check(view) for check in invariants.GENERIC_CHECKS + invariants.KGEN_CHECKS}
        walker = view.need_walker()
        size = walker.mode.entry_size
        tables = {}
        for path, frame in [((), walker.top)] + walker.page_tables():
            if path and path[0] < kernel.layout.asm_constants()["KERNEL_HALF_FIRST_SLOT"]:
                continue
            data = view.read_phys(frame, hw.PAGE_SIZE)
            tables[path] = [int.from_bytes(data[i:i + size], "little") & ~HISTORY_BITS
                            for i in range(0, hw.PAGE_SIZE, size)]
        return results, tables


def test_tcg_and_kvm_agree_on_invariants_and_kernel_tables(kernel, kvm):
    tcg_results, tcg_tables = state(kernel, "tcg")
    kvm_results, kvm_tables = state(kernel, "kvm")
    assert all(problems == [] for problems in tcg_results.values()), tcg_results
    assert kvm_results == tcg_results
    assert kvm_tables.keys() == tcg_tables.keys() and len(tcg_tables) > 3
    differ = [f"{path} [{i}]: TCG {a:#x}, KVM {b:#x}" for path in tcg_tables
              for i, (a, b) in enumerate(zip(tcg_tables[path], kvm_tables[path])) if a != b]
    assert not differ, "\n".join(differ[:20])


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_kgen_test_runs_the_suite_on_x86_64(accel, kernel, tmp_path, request):
    if accel == "kvm":
        request.getfixturevalue("kvm")
    run = run_kgen("test", "--arch", "x86_64", "--accel", accel, "--out", tmp_path, "-j", "1", "--", "-rs", "-v",
                   timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and " failed" not in run.stdout
    # The invariants ran (not skipped), and the CPU oracle's KVM leg with them.
    assert "test_each_page_table_is_referenced_once PASSED" in run.stdout, run.stdout[-3000:]
    assert "test_cpu_reads_what_the_walker_predicts[kvm] PASSED" in run.stdout, run.stdout[-3000:]


# ---- the same random operations under both accelerators --------------------------------------------------------
OPERATIONS = 120
USER_BASE = 0x0000_0040_0000_0000        # PML4[0]: empty after boot, so mappings there grow PDPT, PD and PT


def random_operations(seed: int) -> list[tuple]:
    """A fixed sequence of PMM, VMM and heap operations. Arguments name earlier results by index, so the sequence
    means the same on any run; what each call returns is the run's business."""
    import random
    rng = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(OPERATIONS):
        ops.append(rng.choice([
            ("pmm_alloc",), ("pmm_free_last",), ("map", rng.randrange(64) * 0x20_0000 + rng.randrange(4) * 0x1000),
            ("unmap_any", rng.randrange(1 << 16)), ("kmalloc", rng.choice((16, 64, 512, 4096))),
            ("kfree_any", rng.randrange(1 << 16)), ("lazy_touch", rng.randrange(1, 4)),
        ]))
    return ops


def run_operations(session, ops) -> list[int]:
    from kgen.arch import hw
    rw = hw.PTE_P | hw.PTE_RW
    frames, mapped, blocks, results = [], [], [], []
    for op in ops:
        kind = op[0]
        if kind == "pmm_alloc":
            frame = session.call("pmm_alloc")
            frames += [frame] if frame else []
            results.append(frame)
        elif kind == "pmm_free_last" and frames:
            results.append(session.call("pmm_free", frames.pop()))
        elif kind == "map" and frames:
            v = USER_BASE + op[1]
            ok = session.call("vmm_map", v, frames[-1], rw)
            if ok:
                mapped.append(v)
                frames.pop()
            results.append(ok)
        elif kind == "unmap_any" and mapped:
            results.append(session.call("vmm_unmap", mapped.pop(op[1] % len(mapped))))
        elif kind == "kmalloc":
            block = session.call("kmalloc", op[1])
            blocks += [block] if block else []
            results.append(block)
        elif kind == "kfree_any" and blocks:
            results.append(session.call("kfree", blocks.pop(op[1] % len(blocks))))
        elif kind == "lazy_touch":
            start = session.call("vmm_alloc", op[1], rw, 1)
            session.call("kmem_write32", start + (op[1] - 1) * 0x1000, 0x600D)
            results.append(session.call("kmem_read32", start + (op[1] - 1) * 0x1000))
            results.append(session.call("vmm_free", start))
    return results


def machine_state(session) -> tuple:
    """The free stack, the PMM counters and every page-table entry (history bits masked) of the stopped guest."""
    from kgen.arch import hw
    from kgen.guest.invariants import GuestView
    from kgen.guest.pmmview import PmmView
    view = PmmView.of(session)
    pmm = view.state()
    stack = view.free_stack(pmm)
    session.machine.stop()
    guest = GuestView.capture(session.machine, session.elf, session.layout)
    walker = guest.need_walker()
    size = walker.mode.entry_size
    tables = {}
    for path, frame in [((), walker.top)] + walker.page_tables():
        data = guest.read_phys(frame, hw.PAGE_SIZE)
        tables[path] = tuple(int.from_bytes(data[i:i + size], "little") & ~HISTORY_BITS
                             for i in range(0, hw.PAGE_SIZE, size))
    session.machine.cont()
    return pmm, tuple(stack), tables


def test_tcg_and_kvm_agree_after_the_same_random_operations(kernel, kvm):
    from kgen.harness.session import KernelSession
    ops = random_operations(seed=2026)
    outcome = {}
    for accel in ("tcg", "kvm"):
        with KernelSession(kernel.elf_path, kernel.layout, accel=accel, poison=0xA5) as s:
            results = run_operations(s, ops)
            outcome[accel] = (results, *machine_state(s))
    (tcg_results, tcg_pmm, tcg_stack, tcg_tables), (kvm_results, kvm_pmm, kvm_stack, kvm_tables) = \
        outcome["tcg"], outcome["kvm"]
    assert len(tcg_results) > OPERATIONS // 2 and any(tcg_stack), "the sequence exercised too little"
    assert any(path and path[0] == 0 for path in tcg_tables), "no user-half table was ever grown"
    assert kvm_results == tcg_results
    assert kvm_pmm == tcg_pmm
    assert kvm_stack == tcg_stack
    assert kvm_tables.keys() == tcg_tables.keys()
    differ = [f"{path} [{i}]: TCG {a:#x}, KVM {b:#x}" for path in tcg_tables
              for i, (a, b) in enumerate(zip(tcg_tables[path], kvm_tables[path])) if a != b]
    assert not differ, "\n".join(differ[:20])
