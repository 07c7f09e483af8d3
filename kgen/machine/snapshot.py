"""A fresh machine per test by restore: boot a kernel to its ready state once, save it, restore it for every test.

Each test of kgen's suite wants a machine exactly as a cold boot leaves it (registers, page tables, free-page stack,
COM1 text, call channel, QMP). A cold boot costs a QEMU start, firmware and the kernel's boot (≈0.1 s under TCG,
≈1.6 s under the kvm_pvm KVM here); a restore costs ≈20 ms. `MachinePool.fresh()` pays the boot once per kernel
and machine options in each process (each pytest-xdist worker has its own pool), then hands out restored machines.

How (the mechanism measured against the others, docs/benchmarks.md):
- CPU and device state: QEMU's internal snapshot (`savevm`/`loadvm`) in a small qcow2 image attached as a drive no
  device uses. `loadvm` in the QEMU that is already running takes ≈5 ms; starting a QEMU for it costs ≈40 ms more,
  so a machine given back by its test stays up, stopped, for the next one.
- RAM: the guest's RAM is the shared file the harness maps (machine/ram.py). With the migration capability
  `x-ignore-shared` QEMU leaves that file out of its snapshot, and the harness copies the saved bytes back itself
  (a memcpy, ≈12 ms for 128 MiB). Letting QEMU save RAM into the qcow2 works too, but a poisoned RAM has no zero
  pages to skip and `loadvm` then takes ≈0.3 s. `loadvm` resets the machine first, which copies the kernel's ELF
  segments back into RAM as at power-on, so RAM is put back after `loadvm`, never before.
- UEFI firmware state outside RAM (OVMF's variable store, a pflash drive): a qcow2 image kept beside the snapshot
  image, so `savevm`/`loadvm` snapshot and restore it like a disk (kgen/machine/firmware.py). The firmware's code
  pflash is read-only and not snapshotted.
- COM1 and COM2: the COM1 text and read cursor of the ready state are kept with the RAM; what the previous test
  left in either socket is dropped. A machine whose COM2 still holds bytes the guest has not taken is not reused
  (they would reach the next test's kernel), nor is one that exited, triple-faulted or stopped answering QMP: the
  next test then gets a new QEMU restored from the same image.

What isolation rests on: everything a test can change is either guest RAM (copied back whole), CPU and device state
(loaded by QEMU) or host-side buffers (replaced). One exception is documented on `Machine.write_phys`: under TCG,
code the host patched in RAM and the guest already ran may stay translated; kernel text is rewritten by the reset
in `loadvm`, which also drops its translations.

A failed restore is reported in one line (a `SnapshotWarning`) and the test gets a cold boot. `KGEN_COLD_BOOT=1`,
`--kgen-cold-boot` or `kgen test --cold-boot` turn restores off.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kgen.errors import MachineError
from kgen import scratch
from kgen.machine import process
from kgen.machine.firmware import QEMU_IMG, QEMU_IMG_PACKAGE, vars_beside
from kgen.machine.machine import DEFAULT_QEMU, Machine, MachineState

COLD_BOOT_ENV = "KGEN_COLD_BOOT"
MAX_RESTORE_MIB = 512      # above this the saved RAM copy costs more memory and time than a boot is worth
POOL_SIZE = 4              # kernels (with their machine options) kept restorable per process, least recent dropped


class SnapshotWarning(UserWarning):
    """A snapshot could not be made or restored; a cold boot was used instead."""


_cold_boot = os.environ.get(COLD_BOOT_ENV, "") not in ("", "0")


def set_cold_boot(cold: bool) -> None:
    """Make every `fresh()` in this process boot cold (True) or restore (False)."""
    global _cold_boot
    _cold_boot = cold


def cold_boot() -> bool:
    return _cold_boot


_file_digests: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        _file_digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _file_digests[key]


def snapshot_key(options: dict, ready: str) -> str:
    """What a snapshot depends on: the kernel's (or ISO's) bytes, every machine option, the QEMU binary, and how
    the ready state was recognised."""
    parts = []
    for name in sorted(options):
        value = options[name]
        if name in ("kernel", "iso", "disk") and value is not None:
            value = _file_digest(Path(value))
        parts.append((name, value))
    binary = shutil.which(options.get("qemu", DEFAULT_QEMU))
    qemu_id = (binary, os.stat(binary).st_mtime_ns) if binary else None
    return hashlib.sha256(repr((parts, qemu_id, ready, os.uname().release)).encode()).hexdigest()


@dataclass
class _Entry:
    key: str
    options: dict
    image: Path
    state: MachineState
    machine: Machine | None = None      # stopped and waiting for its next restore, or None
    leased: bool = False
    running: bool = True                # the ready state runs (False: stopped there, as `--ready-at` leaves it)


class MachinePool:
    def __init__(self):
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._dir: Path | None = None
        # How each fresh machine came about: "cold" (no snapshot wanted or possible), "saved" (booted, then
        # snapshotted), "restored", "relaunched" (restored into a new QEMU because the last one was gone).
        self.counts = {"cold": 0, "saved": 0, "restored": 0, "relaunched": 0}

    # --- the one entry point ---------------------------------------------------------------------------------

    def fresh(self, options: dict, boot: Callable[[Machine], None], ready: str, *,
              cold: bool | None = None) -> Machine:
        """A launched machine in the ready state `boot` brings it to; `ready` names that state for the key.

        `boot(machine)` is run on a cold boot only and must raise if the kernel does not get there (the machine is
        then shut down and the error propagates). Shut the machine down as usual when done: a pooled one is taken
        back for the next restore."""
        if cold is None:
            cold = _cold_boot
        if cold or not self.eligible(options):
            return self._cold(options, boot)
        key = snapshot_key(options, ready)
        entry = self._entries.get(key)
        if entry is not None and entry.leased:
            return self._cold(options, boot)   # the same kernel twice at once: the second boots on its own
        if entry is not None:
            machine = self._restore(entry)
            if machine is not None:
                return machine
        return self._boot_and_save(key, options, boot)

    @staticmethod
    def eligible(options: dict) -> bool:
        return options.get("ram_file", True) and options.get("memory_mib", 128) <= MAX_RESTORE_MIB

    # --- steps -----------------------------------------------------------------------------------------------

    def _cold(self, options: dict, boot, **extra) -> Machine:
        self.counts["saved" if extra else "cold"] += 1
        machine = Machine(**options, **extra)
        machine.launch()
        try:
            boot(machine)
        except BaseException:
            machine.shutdown()
            raise
        return machine

    def _boot_and_save(self, key: str, options: dict, boot) -> Machine:
        image = self._image_for(key)
        if image is None:
            return self._cold(options, boot)
        machine = self._cold(options, boot, snapshot_image=image)
        try:
            was_running = machine.status() == "running"
            state = machine.save_state()
            if was_running:
                machine.cont()
        except MachineError as err:
            warnings.warn(SnapshotWarning(f"kgen: cannot snapshot {self._name(options)} ({err}); "
                                          "each test boots it cold"), stacklevel=3)
            image.unlink(missing_ok=True)
            vars_beside(image).unlink(missing_ok=True)
            return machine
        entry = _Entry(key, dict(options), image, state, running=was_running)
        self._entries[key] = entry
        self._evict()
        self._lease(entry, machine)
        return machine

    def _restore(self, entry: _Entry) -> Machine | None:
        self._entries.move_to_end(entry.key)
        machine = entry.machine
        entry.machine = None
        try:
            if machine is None or not machine.alive:
                if machine is not None:
                    machine.quit()
                machine = Machine(**{**entry.options, "start_paused": True}, snapshot_image=entry.image)
                machine.launch()
                self.counts["relaunched"] += 1
            else:
                self.counts["restored"] += 1
            machine.restore_state(entry.state, run=entry.running)
        except MachineError as err:
            warnings.warn(SnapshotWarning(f"kgen: restoring {self._name(entry.options)} failed ({err}); "
                                          "booting it cold instead"), stacklevel=4)
            if machine is not None:
                machine.quit()
            self._drop(entry)
            return None
        self._lease(entry, machine)
        return machine

    def _lease(self, entry: _Entry, machine: Machine) -> None:
        entry.leased = True

        def give_back(m: Machine) -> bool:
            entry.leased = False
            if self._entries.get(entry.key) is not entry:
                return False                    # evicted meanwhile: just quit
            try:
                state = m.status() if m.alive else "exited"
                # "debug": stopped by the gdbstub (--ready-at); "prelaunch": a relaunched machine restored and
                # handed out stopped.
                reusable = state in ("running", "paused", "debug", "prelaunch") and m.com2_unread_by_guest() == 0
                if reusable and state == "running":
                    m.stop()
            except (MachineError, OSError):
                reusable = False
            if reusable:
                entry.machine = m
            return reusable

        machine.on_release = give_back

    def _evict(self) -> None:
        while len(self._entries) > POOL_SIZE:
            oldest = next(iter(self._entries.values()))
            if oldest.leased:
                self._entries.move_to_end(oldest.key)
                if all(e.leased for e in self._entries.values()):
                    return
                continue
            self._drop(oldest)

    def _drop(self, entry: _Entry) -> None:
        self._entries.pop(entry.key, None)
        if entry.machine is not None:
            entry.machine.quit()
            entry.machine = None
        entry.image.unlink(missing_ok=True)
        vars_beside(entry.image).unlink(missing_ok=True)

    def _image_for(self, key: str) -> Path | None:
        if self._dir is None:
            process.install_hooks()
            process.register(self)             # removed with the machines, whatever ends the process
            atexit.register(self.close)        # runs before the hooks' kill: idle machines quit properly
            self._dir = scratch.scratch_dir(process.MACHINE_DIR_KIND)     # swept by pid when the process is gone
        image = self._dir / f"{key[:24]}.qcow2"
        image.unlink(missing_ok=True)
        vars_beside(image).unlink(missing_ok=True)     # a UEFI machine's variable store from an earlier image
        tool = shutil.which(QEMU_IMG)
        if tool is None:
            warnings.warn(SnapshotWarning(f"kgen: {QEMU_IMG} not found (Debian package {QEMU_IMG_PACKAGE}): machines "
                                          "boot cold instead of restoring a snapshot"), stacklevel=4)
            return None
        result = subprocess.run([tool, "create", "-q", "-f", "qcow2", str(image), "1M"], capture_output=True,
                                text=True)
        if result.returncode != 0:
            warnings.warn(SnapshotWarning(f"kgen: qemu-img create failed ({result.stderr.strip()}): "
                                          "machines boot cold"), stacklevel=4)
            return None
        return image

    @staticmethod
    def _name(options: dict) -> str:
        target = options.get("kernel") or options.get("iso") or options.get("disk")
        return Path(target).name if target is not None else "the machine"

    # --- ending ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Quit every idle machine and remove the images (machines still leased quit when given back)."""
        for entry in list(self._entries.values()):
            self._drop(entry)
        self._kill_hard()

    def _kill_hard(self) -> bool:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        process.unregister(self)
        return False


POOL = MachinePool()


def fresh_machine(options: dict, boot: Callable[[Machine], None], ready: str, *, cold: bool | None = None) -> Machine:
    """`POOL.fresh`: the process's pool of restorable machines."""
    return POOL.fresh(options, boot, ready, cold=cold)
