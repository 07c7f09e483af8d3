"""The x86_64 kernel under both accelerators: the invariant suite through `kgen test` under TCG and under KVM, and
a differential test that boots the same kernel under each and requires the same invariant results and the same
kernel-half page tables (this host's /dev/kvm, kvm_pvm, runs long mode; where a probe boot shows KVM cannot run
the kernel the KVM half is skipped with the probe's reason)."""
import subprocess
import sys

import pytest

from kgen import hw, invariants
from kgen.testing import KernelUnderTest, boot, probe_kvm

from conftest import needs_qemu

pytestmark = [pytest.mark.vm, needs_qemu]
# Accessed and dirty bits record what the CPU touched, which differs between TCG and KVM by design.
HISTORY_BITS = hw.PTE_A | hw.PTE_D


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return KernelUnderTest.built(None, tmp_path_factory.mktemp("x86_64"), "x86_64")


@pytest.fixture(scope="module")
def kvm(kernel):
    usable, why = probe_kvm(kernel)
    if not usable:
        pytest.skip(f"KVM cannot run the x86_64 kernel here: {why}")
    return why


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
    run = subprocess.run([sys.executable, "-m", "kgen.cli", "test", "--arch", "x86_64", "--accel", accel,
                          "--out", str(tmp_path), "-j", "1", "--", "-rs", "-v"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and " failed" not in run.stdout
    # The invariants ran (not skipped), and the CPU oracle's KVM leg with them.
    assert "test_each_page_table_is_referenced_once PASSED" in run.stdout, run.stdout[-3000:]
    assert "test_cpu_reads_what_the_walker_predicts[kvm] PASSED" in run.stdout, run.stdout[-3000:]
