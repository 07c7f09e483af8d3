"""The KVM probe keeps only lasting answers (kgen/machine/kvm.py, kgen/harness/kvmprobe.py): a probe whose time ran
out on a loaded host is asked again next run, and `--accel kvm` is not refused for ever after; a vCPU KVM stopped
running (kvm_pvm and 32-bit paging) is a lasting "no", told apart from a vCPU the host is too loaded to run."""
import json
import os
import time

import pytest

from conftest import needs_qemu
from kgen.guest.elfinfo import ElfInfo
from kgen.harness import kvmprobe
from kgen.harness.kernel import KernelUnderTest
from kgen.machine import kvm
from kgen.machine.kvm import VCPU_FROZEN_FOR, KvmProbe, VcpuSample, VcpuWatch, probe_kvm_boot


class FakeMachine:
    """What VcpuWatch asks of a Machine: the vCPU's thread id, its registers, KVM's exit count."""

    def __init__(self):
        self.pid, self.pc, self.exits, self.halted = 4242, 0x10013D, 100, False

    def qmp(self, command, arguments=None, step=""):
        if command == "query-cpus-fast":
            return [{"thread-id": 7}]
        return [{"provider": "kvm", "stats": [{"name": "exits", "value": self.exits}]}]

    def registers(self):
        return type("Regs", (), {"eip": self.pc, "halted": self.halted})()


def watch_over(states, machine=None, step=0.6):
    """Feed VcpuWatch a thread state per sample, 0.6 s apart; the first verdict that says stopped, or None."""
    machine = machine or FakeMachine()
    at = iter(states)
    clock = [1000.0]
    watch = VcpuWatch(machine, thread=lambda pid, tid: next(at))
    real = time.monotonic
    try:
        time.monotonic = lambda: clock[0]
        for _ in states:
            verdict = watch.stopped(watch.sample())
            if verdict:
                return verdict
            clock[0] += step
    finally:
        time.monotonic = real
    return None


FROZEN_SAMPLES = int(VCPU_FROZEN_FOR / 0.6) + 2


def test_a_vcpu_asleep_with_no_exit_and_no_cpu_time_is_stopped_for_good():
    verdict = watch_over([("S", 340)] * FROZEN_SAMPLES)
    assert verdict and "KVM stopped running the CPU at 0x10013d" in verdict, verdict


def test_a_vcpu_the_host_is_too_loaded_to_run_is_not_stopped():
    # runnable (R) but given no time: the same counters, and still no verdict
    assert watch_over([("R", 340)] * (FROZEN_SAMPLES * 2)) is None


def test_a_vcpu_that_moves_or_halts_is_not_stopped():
    assert watch_over([("S", 340 + i) for i in range(FROZEN_SAMPLES * 2)]) is None     # CPU time used
    halted = FakeMachine()
    halted.halted = True                                        # hlt: QEMU's vCPU thread sleeps too
    assert watch_over([("S", 340)] * (FROZEN_SAMPLES * 2), halted) is None
    # asleep between two stretches of work: the frozen stretch starts again
    assert watch_over([("S", 340)] * (FROZEN_SAMPLES - 2) + [("R", 341)] + [("S", 341)] * (FROZEN_SAMPLES - 2)) is None


@pytest.fixture
def kernel(default_build):
    return KernelUnderTest(default_build.elf, ElfInfo.load(default_build.elf), default_build.kernel.layout)


def probes_with(monkeypatch, answers):
    """probe_kvm with the boot replaced by `answers`, one per call; returns the list of calls made."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        return answers[len(calls) - 1]
    monkeypatch.setattr(kvmprobe, "probe_kvm_boot", fake)
    return calls


def test_a_probe_that_ran_out_of_time_is_not_kept(monkeypatch, kernel, tmp_path):
    slow = KvmProbe(False, "KVM boot did not reach it within 10 s (not kept: a loaded host can be this slow)", False)
    calls = probes_with(monkeypatch, [slow, KvmProbe(True, "KVM boot reached it in 3.1 s", True)])
    assert kvmprobe.probe_kvm(kernel, tmp_path) == (False, slow.why)
    assert not (tmp_path / kvmprobe.KVM_PROBE_CACHE).exists()
    assert kvmprobe.probe_kvm(kernel, tmp_path) == (True, "KVM boot reached it in 3.1 s")     # the load is gone
    assert len(calls) == 2
    usable, why = kvmprobe.probe_kvm(kernel, tmp_path)                                        # kept now
    assert usable and "probed earlier" in why and len(calls) == 2


def test_a_lasting_no_is_kept_and_an_older_kgens_answer_is_asked_again(monkeypatch, kernel, tmp_path):
    calls = probes_with(monkeypatch, [KvmProbe(False, "KVM stopped running the CPU at 0x10013d", True)] * 3)
    assert kvmprobe.probe_kvm(kernel, tmp_path)[0] is False
    kept = json.loads((tmp_path / kvmprobe.KVM_PROBE_CACHE).read_text())
    assert kept["lasting"] is True and kvmprobe.probe_kvm(kernel, tmp_path)[0] is False and len(calls) == 1
    # what kgen kept before it told lasting answers apart: a timeout under load, refusing --accel kvm for ever
    del kept["lasting"]
    (tmp_path / kvmprobe.KVM_PROBE_CACHE).write_text(json.dumps(kept))
    kvmprobe.probe_kvm(kernel, tmp_path)
    assert len(calls) == 2


def test_a_probe_out_of_time_does_not_refuse_accel_kvm_next_time(monkeypatch, kernel, tmp_path):
    probes_with(monkeypatch, [KvmProbe(False, "within 10 s (not kept)", False), KvmProbe(True, "in 3 s", True)])
    with pytest.raises(kvmprobe.ToolMissing, match="not kept"):
        kvmprobe.require_kvm_for(kernel, tmp_path)
    kvmprobe.require_kvm_for(kernel, tmp_path)      # refused no more


@needs_qemu
@pytest.mark.vm
@pytest.mark.skipif(not kvm.kvm_accessible(), reason="no usable /dev/kvm")
def test_a_real_probe_out_of_time_says_so_and_is_not_lasting(x86_64_build):
    """Real KVM, a bound too short for any boot: a "no" that says it is not kept."""
    short = probe_kvm_boot(x86_64_build.elf, "kgen: boot ok", timeout=0.2, qemu="qemu-system-x86_64")
    assert not short.usable and not short.lasting and "not kept" in short.why, short
