"""A kgen kernel booted to serve calls: the machine, the layout that built it, its ELF symbols, the call channel.

    with KernelSession(kernel) as s:      # kernel: a build.BuildOutput
        frame = s.call("pmm_alloc")
        s.machine.read_phys(frame, 4)
"""
from __future__ import annotations

from pathlib import Path

from kgen import protocol
from kgen.build.layout import Layout
from kgen.errors import MachineError
from kgen.guest.calls import CallChannel, CallResult
from kgen.guest.diagnose import RunFailed, explain
from kgen.guest.elfinfo import ElfInfo
from kgen.harness.bootpath import serving_boot
from kgen.machine.snapshot import fresh_machine

BOOT_TIMEOUT = 60.0


class KernelSession:
    def __init__(self, elf_path, layout: Layout, *, accel: str = "tcg", poison=None, memory_mib: int | None = None,
                 icount: bool = False, echo_serial: bool = False, extra_args=(), ram_file: bool = True,
                 cold: bool | None = None, firmware: str = "bios", gdbstub: bool = False):
        # firmware "uefi": booted through GRUB under OVMF (bootpath.serving_boot), the same ELF and serve token.
        # gdbstub: QEMU's gdbstub listens too (breakpoints while calls run: kgen/harness/checkat.py).
        self.elf_path = elf_path
        self.layout = layout
        self.elf = ElfInfo.load(elf_path)
        boot = serving_boot(memory_mib or layout.memory_mib, firmware)
        self.options = dict(boot.machine_options(Path(elf_path), qemu=layout.arch.qemu, accel=accel, poison=poison),
                            icount=icount, ram_file=ram_file, echo_serial=echo_serial, extra_args=tuple(extra_args),
                            **({"gdbstub": True} if gdbstub else {}))
        self.cold = cold        # None: the process's choice (kgen.machine.snapshot); True: always boot cold
        self.machine = None
        self.channel: CallChannel | None = None

    def __enter__(self) -> "KernelSession":
        def serve(machine) -> None:
            try:
                machine.wait_for(protocol.SERVING, BOOT_TIMEOUT)
                # Ready means idle in the call loop's hlt (templates/calls.s), not just "the marker was seen": the
                # kernel is then still printing the line's end on its way there, for milliseconds on a busy host.
                # At the hlt every session starts at the same instruction, booted or restored (its snapshot is
                # saved there), and an idle kernel changes no memory while a test reads it.
                machine.wait_halted(BOOT_TIMEOUT)
            except MachineError as err:
                raise RunFailed(explain(machine, self.elf, err)) from err

        # Booted once per kernel and options, restored for every later session (kgen/machine/snapshot.py).
        self.machine = fresh_machine(self.options, serve, f"serving: {protocol.SERVING}", cold=self.cold)
        self.channel = CallChannel(self.machine, self.elf, self.layout)
        return self

    def __exit__(self, *exc):
        if self.machine is not None:
            self.machine.shutdown()

    def symbol(self, name: str) -> int:
        return self.elf.symbols[name].value

    def call(self, routine, *args, timeout: float | None = None) -> int:
        return self.call_full(routine, *args, timeout=timeout).eax

    def call_full(self, routine, *args, timeout: float | None = None) -> CallResult:
        kwargs = {} if timeout is None else {"timeout": timeout}
        return self.channel.call_full(routine, *args, **kwargs)

    @property
    def word_size(self) -> int:
        """Bytes in the kernel's words (pointers, physical addresses): 4 on i386, 8 on x86_64."""
        return self.layout.arch.word_size

    def read(self, vaddr_in_kernel_image: int, size: int) -> int:
        """`size` bytes of the kernel image, little-endian, read from physical memory (the image is mapped at a
        fixed offset)."""
        phys = vaddr_in_kernel_image - self.layout.kernel_virtual_base
        return int.from_bytes(self.machine.read_phys(phys, size), "little")

    def read_u32(self, vaddr_in_kernel_image: int) -> int:
        """A dword kernel variable (a count), read from physical memory."""
        return self.read(vaddr_in_kernel_image, 4)

    def read_word(self, vaddr_in_kernel_image: int) -> int:
        """A word-sized kernel variable (a pointer, a physical address): 4 bytes on i386, 8 on x86_64."""
        return self.read(vaddr_in_kernel_image, self.word_size)

    def variable(self, name: str, size: int | None = None) -> int:
        """The kernel variable `name`: a word unless `size` says otherwise (pass 4 for a dword counter; on i386 the
        two are the same)."""
        return self.read(self.symbol(name), size or self.word_size)
