"""A run that fails is reported as what it is - kernel exception, triple fault or hang - with EIP named from the
ELF, never as a bare timeout: `diagnose.explain` on the machine, `kgen run`, and a KernelSession that never
comes up to serve."""
import re

import pytest

import minikernels
from kgen.guest.diagnose import RunFailed, explain
from kgen.guest.elfinfo import ElfInfo
from kgen.errors import MachineError
from kgen.machine import Machine
from kgen.harness.session import KernelSession
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot

from conftest import needs_qemu, run_kgen

pytestmark = [pytest.mark.vm, needs_qemu]


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    out = tmp_path_factory.mktemp("flat")
    return {name: minikernels.build(out, name, minikernels.FLAT, FAILURE=failure)
            for failure, name in enumerate(("triple", "hang"))}


def failed_run(elf, wait) -> tuple:
    with Machine(kernel=elf) as machine:
        with pytest.raises(MachineError) as seen:
            wait(machine)
        return explain(machine, ElfInfo.load(elf), seen.value), machine


def test_a_triple_fault_is_named_with_eip_symbolised(flat):
    failure, _ = failed_run(flat["triple"], lambda m: m.wait_for("never printed", 30))
    assert failure.kind == "triple fault"
    assert re.fullmatch(r"triple fault \(vector unknown: .*\): EIP=0x[0-9a-f]{8} <crash\+0x[0-9a-f]+> "
                        r"CR2=0x[0-9a-f]{8}", failure.summary), failure.summary
    assert "flat: hello" in failure.details and "registers: EIP=" in failure.details


def test_a_hang_is_named_with_where_the_cpu_spins(flat):
    # Past its greeting first, so a loaded host's slow firmware is not what the 0.5 s catches.
    failure, machine = failed_run(flat["hang"], lambda m: (m.wait_for("flat: hello", 30),
                                                           m.wait_for("never printed", 0.5)))
    assert failure.kind == "hang"
    assert re.fullmatch(r"hang: wait: 'never printed' did not appear on COM1 within 0.5 s \(runstate running\); "
                        r"CPU running at EIP=0x[0-9a-f]{8} <spin_forever>", failure.summary), failure.summary
    assert "flat: hello" in failure.details


def test_a_kernel_exception_is_named_from_its_own_report(fault_build):
    with Machine(kernel=fault_build.elf) as machine:
        status = machine.wait_exit(30)
        failure = explain(machine, ElfInfo.load(fault_build.elf), f"exit status {status}")
    assert failure.kind == "exception"
    assert re.fullmatch(r"kernel exception: #PF page fault \(vector 14\) .* EIP=0x[0-9a-f]{8} <kmain(\+0x[0-9a-f]+)?>",
                        failure.summary), failure.summary


def test_kgen_run_reports_a_triple_fault_in_one_line(flat):
    result = run_kgen("run", "--kernel", flat["triple"], timeout=120)
    assert result.returncode == 4          # the kernel failed (kgen/errors.py)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kgen: error: triple fault") and "<crash+0x" in last, result.stderr
    assert "Traceback" not in result.stderr


def test_a_session_that_never_serves_says_why(fault_build):
    with pytest.raises(RunFailed) as failed:
        with KernelSession(fault_build.elf, fault_build.kernel.layout):
            pass
    assert failed.value.failure.kind == "exception"
    assert re.search(r"EIP=0x[0-9a-f]{8} <kmain(\+0x[0-9a-f]+)?>", str(failed.value))


def test_a_call_that_never_returns_is_a_hang_named_where_the_kernel_waits(default_build):
    kernel = KernelUnderTest(default_build.elf, ElfInfo.load(default_build.elf), default_build.kernel.layout)
    with boot(kernel) as live:
        with pytest.raises(RunFailed) as failed:
            live.call("com2_get_byte", timeout=0.5)       # waits for a byte the host never sends
    assert failed.value.failure.kind == "hang"
    assert re.fullmatch(r"hang: call com2_get_byte: no reply within 0.5 s; CPU halted at "
                        r"EIP=0x[0-9a-f]{8} <com2_get_byte\+0x[0-9a-f]+>", str(failed.value)), str(failed.value)
