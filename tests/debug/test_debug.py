"""`kgen debug`: gdb, driven in batch mode (and once through a terminal), stops the kernel in its boot stub, which
runs at physical addresses with paging off, and in the higher half, and reads the CPU there; the gdb helper's page
tables and free stack agree with kgen's walker over a dump QEMU writes itself and with the kernel's own report; no
QEMU is left behind, whichever way the session ends."""
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ARCH_BUILDS, KGEN, kgen_env, needs_grub, needs_qemu, run_kgen, start_kgen
from kgen import errors
from kgen.arch import hw
from kgen.guest.elfinfo import ElfInfo
from kgen.arch.paging import I386, X86_64
from kgen.guest.pagewalk import Walker
from kgen.guest.pmmview import parse_report

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb not installed (Debian package gdb)")
pytestmark = [pytest.mark.vm, needs_qemu, needs_gdb]

PID_LINE = re.compile(r"kgen: QEMU \(pid (\d+)\)")
STOP_LINE = re.compile(r"^(STUB|HIGH) pc=(0x[0-9a-f]+) cr0=(0x[0-9a-f]+)$", re.MULTILINE)
# The first instruction of the boot stub, and a function of the higher half that runs at boot.
STUB_SYMBOL, HIGH_SYMBOL = "_start", "kmain"


def debug(out: Path, arch: str, *gdb_args: str, boot="direct", cwd: Path, timeout=240) -> subprocess.CompletedProcess:
    """`kgen debug` on the kernel built in `out` (--direct, or its ISO through GRUB), gdb in batch mode (no
    ~/.gdbinit) running gdb_args."""
    return run_kgen("debug", *(["--direct"] if boot == "direct" else []), "--out", out, "--arch", arch,
                    "--", "-nx", "-batch", *gdb_args, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


def qemu_pid(stderr: str) -> int:
    found = PID_LINE.search(stderr)
    assert found, stderr
    return int(found.group(1))


def assert_gone(pid: int) -> None:
    """The QEMU `kgen debug` started has been reaped: no such process (not even a zombie)."""
    assert not Path(f"/proc/{pid}").exists(), f"QEMU pid {pid} outlived kgen debug"


def load_address(elf: ElfInfo, vaddr: int) -> int:
    """Where the loader puts the byte linked at `vaddr`: read from the ELF's program headers here, not from
    kgen.debug.symbols (the code under test)."""
    for seg in elf.segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
            return vaddr - seg.vaddr + seg.paddr
    raise AssertionError(f"{vaddr:#x} is in no segment")


def printf(tag: str) -> str:
    return f'printf "{tag} pc=%#lx cr0=%#lx\\n", $pc, $cr0'


@pytest.mark.parametrize("arch, boot", [("i386", "direct"), ("x86_64", "direct"),
                                        pytest.param("i386", "iso", marks=[needs_grub, pytest.mark.slow])])
def test_breaks_in_the_boot_stub_and_in_the_higher_half(request, tmp_path, arch, boot):
    """The ISO is the default: GRUB runs first, in real and protected mode, and must not trip the breakpoints."""
    build = request.getfixturevalue(ARCH_BUILDS[arch])
    elf = ElfInfo.load(build.elf)
    result = debug(build.elf.parent, arch,
                   "-ex", f"break {STUB_SYMBOL}", "-ex", f"break {HIGH_SYMBOL}",
                   "-ex", "continue", "-ex", printf("STUB"), "-ex", "info symbol $pc",
                   "-ex", "continue", "-ex", printf("HIGH"), "-ex", "info symbol $pc",
                   "-ex", "kill", boot=boot, cwd=tmp_path)
    assert result.returncode == errors.EXIT_OK, result.stdout + result.stderr
    stops = {tag: (int(pc, 16), int(cr0, 16)) for tag, pc, cr0 in STOP_LINE.findall(result.stdout)}
    assert set(stops) == {"STUB", "HIGH"}, result.stdout

    stub_pc, stub_cr0 = stops["STUB"]
    assert stub_pc == load_address(elf, elf.symbols[STUB_SYMBOL].value) != elf.symbols[STUB_SYMBOL].value
    assert not stub_cr0 & hw.CR0_PG
    high_pc, high_cr0 = stops["HIGH"]
    assert high_pc == elf.symbols[HIGH_SYMBOL].value
    assert high_cr0 & hw.CR0_PG
    # gdb names both stops: the stub through the second copy of the symbols.
    assert f"{STUB_SYMBOL} in section .text" in result.stdout
    assert f"{HIGH_SYMBOL} in section .text" in result.stdout
    assert_gone(qemu_pid(result.stderr))


def test_anyones_kernel_with_kernel(tmp_path):
    """A GNU-as higher-half kernel (tests/minikernels.py): the same two stops by its own symbols, kgen-pt walks its
    tables, kgen-free refuses in one line (no kgen layout) and the session goes on."""
    import minikernels
    elf_path = minikernels.build(tmp_path, "mini", minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS,
                                 WRITABLE_TEXT=0)
    elf = ElfInfo.load(elf_path)
    result = run_kgen("debug", "--kernel", elf_path, "--", "-nx", "-batch",
                      "-ex", "break _start", "-ex", "break higher_half",
                      "-ex", "continue", "-ex", printf("STUB"), "-ex", "continue", "-ex", printf("HIGH"),
                      "-ex", "kgen-pt higher_half", "-ex", "kgen-free", "-ex", "kill",
                      cwd=tmp_path, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == errors.EXIT_OK, result.stdout + result.stderr
    stops = {tag: (int(pc, 16), int(cr0, 16)) for tag, pc, cr0 in STOP_LINE.findall(result.stdout)}
    assert stops["STUB"][0] == load_address(elf, elf.symbols["_start"].value) and not stops["STUB"][1] & hw.CR0_PG
    assert stops["HIGH"][0] == elf.symbols["higher_half"].value and stops["HIGH"][1] & hw.CR0_PG
    high = elf.symbols["higher_half"].value
    assert re.search(rf"^{high:#x} -> {load_address(elf, high):#x} \(4 KiB page\)", result.stdout, re.MULTILINE)
    assert "kgen-free: not a kgen kernel" in result.stderr
    assert_gone(qemu_pid(result.stderr))


def test_under_kvm_hardware_breakpoints_stop_in_the_stub_and_the_higher_half(x86_64_build, tmp_path):
    """Under KVM gdb's software breakpoints are int3 bytes written at virtual addresses, impossible while an address
    is unmapped; hbreak uses the debug registers and stops in both places."""
    from conftest import require_kvm
    require_kvm(x86_64_build)
    elf = ElfInfo.load(x86_64_build.elf)
    result = run_kgen("debug", "--direct", "--accel", "kvm", "--arch", "x86_64", "--out",
                      x86_64_build.elf.parent, "--", "-nx", "-batch",
                      "-ex", f"hbreak {STUB_SYMBOL}", "-ex", "continue", "-ex", printf("STUB"), "-ex", "delete",
                      "-ex", f"hbreak {HIGH_SYMBOL}", "-ex", "continue", "-ex", printf("HIGH"), "-ex", "kill",
                      cwd=tmp_path, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == errors.EXIT_OK, result.stdout + result.stderr
    assert "use hbreak" in result.stderr
    stops = {tag: (int(pc, 16), int(cr0, 16)) for tag, pc, cr0 in STOP_LINE.findall(result.stdout)}
    assert stops["STUB"][0] == load_address(elf, elf.symbols[STUB_SYMBOL].value)
    assert not stops["STUB"][1] & hw.CR0_PG
    assert stops["HIGH"][0] == elf.symbols[HIGH_SYMBOL].value and stops["HIGH"][1] & hw.CR0_PG
    assert_gone(qemu_pid(result.stderr))


PT_RANGE = re.compile(r"^(0x[0-9a-f]+)-(0x[0-9a-f]+) -> (0x[0-9a-f]+) +(\d+) pages  (.+?)(  <.*>)?$", re.MULTILINE)


@pytest.mark.parametrize("arch", tuple(ARCH_BUILDS))
def test_the_gdb_helper_agrees_with_the_walker_and_the_kernel_report(request, tmp_path, arch):
    """Stopped in report_pmm (everything initialised, the report line not yet printed): kgen-pt's ranges equal the
    walker's over RAM that QEMU itself wrote out (HMP pmemsave, not the gdbstub the helper reads through);
    `kgen-pt 0x<recursive PD/PML4 page>` finds the top table; kgen-free's counts are those the kernel prints."""
    build = request.getfixturevalue(ARCH_BUILDS[arch])
    layout = build.kernel.layout
    dump = tmp_path / "ram.bin"
    top_self = layout.arch.recursive_window(layout.recursive_slot, 0)     # the top table's own page
    result = debug(build.elf.parent, arch,
                   "-ex", "break report_pmm", "-ex", "continue",
                   "-ex", 'printf "CR3=%#lx\\n", $cr3',
                   "-ex", f"monitor pmemsave 0 {layout.memory_mib << 20} \"{dump}\"",
                   "-ex", "echo PT-BEGIN\\n", "-ex", "kgen-pt", "-ex", "echo PT-END\\n",
                   "-ex", f"kgen-pt {top_self:#x}",
                   "-ex", "kgen-free", "-ex", "kgen-src", "-ex", "continue", cwd=tmp_path)
    # The last `continue` runs the kernel to its exit: gdb ends with "Remote connection closed", status 1.
    assert "kgen: exit success" in result.stdout, result.stdout + result.stderr
    assert result.returncode == errors.EXIT_INTERNAL and "gdb ended with status 1" in result.stderr
    assert_gone(qemu_pid(result.stderr))

    cr3 = int(re.search(r"^CR3=(0x[0-9a-f]+)$", result.stdout, re.MULTILINE).group(1), 16)
    ram = dump.read_bytes()
    walker = Walker(lambda addr, size: ram[addr:addr + size], cr3, X86_64 if arch == "x86_64" else I386,
                    nxe=arch == "x86_64")
    expected = [(m.vstart, m.vstart + m.size, m.pstart, m.size // hw.PAGE_SIZE, str(m.attrs))
                for m in walker.mappings()]
    listing = result.stdout.split("PT-BEGIN\n", 1)[1].split("PT-END\n", 1)[0]
    shown = [(int(v, 16), int(e, 16), int(p, 16), int(n), attrs) for v, e, p, n, attrs, _ in PT_RANGE.findall(listing)]
    assert expected and shown == expected

    translated = re.search(rf"^{top_self:#x} -> (0x[0-9a-f]+) \(4 KiB page\)", result.stdout, re.MULTILINE)
    assert translated and int(translated.group(1), 16) == cr3 & ~0xFFF

    # kgen-src: the function's template, found here by reading the templates directly.
    from kgen.build.resources import templates_dir
    defined = [(path, number) for path in sorted(templates_dir().rglob("*.s"))
               for number, line in enumerate(path.read_text().splitlines(), start=1) if line.startswith("report_pmm:")]
    assert len(defined) == 1
    path, number = defined[0]
    assert f"templates/{path.relative_to(templates_dir())}:{number}: report_pmm\n" in result.stdout
    assert re.search(rf"^ *{number}  report_pmm:$", result.stdout, re.MULTILINE)

    report = parse_report(result.stdout)
    free = re.search(r"^pmm: top=(0x[0-9a-f]+) on the stack=(\d+) untouched=(\d+) free=(\d+) total=(\d+) "
                     r"reserved=(\d+) frames$", result.stdout, re.MULTILINE)
    assert free, result.stdout
    assert (int(free.group(4)), int(free.group(5)), int(free.group(6))) == (report.free, report.total,
                                                                            report.reserved)


def test_a_busy_port_is_refused_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_kgen("debug", "--gdb-port", port, "--out", tmp_path / "out", cwd=tmp_path, timeout=60)
    assert result.returncode == errors.EXIT_USAGE
    assert result.stderr.count("\n") == 1 and f"--gdb-port {port}: port {port} on 127.0.0.1 is in use" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_kernel_qemu_refuses_is_one_line_and_no_qemu(tmp_path):
    not_multiboot = Path(shutil.which("true")).resolve()        # an ELF, but no Multiboot header
    result = run_kgen("debug", "--kernel", not_multiboot, "--", "-nx", "-batch", cwd=tmp_path, timeout=60)
    assert result.returncode == errors.EXIT_USAGE, result.stderr
    assert result.stderr.count("\n") == 1 and "no Multiboot header" in result.stderr
    assert "QEMU refused to boot it" in result.stderr


def test_a_missing_gdb_is_a_missing_tool(tmp_path):
    result = run_kgen("debug", "--gdb", tmp_path / "no-gdb", "--out", tmp_path / "out", cwd=tmp_path, timeout=60)
    assert result.returncode == errors.EXIT_TOOL_MISSING
    assert result.stderr.count("\n") == 1 and "install the Debian package gdb" in result.stderr


def _read_until(stream, pattern: re.Pattern, deadline: float, seen: str = "") -> str:
    """Text from a pipe or pty fd until `pattern` matches it."""
    while not pattern.search(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {pattern.pattern!r} in:\n{seen}"
        if select.select([stream], [], [], left)[0]:
            try:
                chunk = os.read(stream, 4096)
            except OSError:         # the pty's other side is gone
                chunk = b""
            assert chunk, f"end of output before {pattern.pattern!r} in:\n{seen}"
            seen += chunk.decode("utf-8", "replace")
    return seen


def test_no_gdb_prints_a_recipe_that_attaches(default_build, tmp_path):
    """--no-gdb waits with QEMU paused; the printed line, run as it is (plus batch commands), breaks in kmain;
    when that gdb kills the guest, kgen debug ends with 0 and QEMU is gone."""
    proc = start_kgen("debug", "--no-gdb", "--direct", "--out", default_build.elf.parent,
                      cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, text=False)
    try:
        seen = _read_until(proc.stderr.fileno(), re.compile(r"\n(\S*gdb .*target remote[^\n]*)\n"),
                           time.monotonic() + 120)
        recipe = re.search(r"\n(\S*gdb .*target remote[^\n]*)\n", seen).group(1)
        pid = qemu_pid(seen)
        attach = subprocess.run(f"{recipe} -nx -batch -ex 'break kmain' -ex continue "
                                "-ex 'printf \"HIGH pc=%#lx cr0=%#lx\\n\", $pc, $cr0' -ex kill",
                                shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert attach.returncode == 0, attach.stdout + attach.stderr
        (_, pc, cr0), = STOP_LINE.findall(attach.stdout)
        assert int(pc, 16) == ElfInfo.load(default_build.elf).symbols["kmain"].value
        assert proc.wait(30) == errors.EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_gone(pid)


def _processes_with(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def test_sigterm_to_kgen_ends_gdb_and_qemu(default_build, tmp_path):
    """kgen told to end while the guest runs under gdb: gdb and QEMU end with it, status 128 + SIGTERM."""
    proc = start_kgen("debug", "--direct", "--append", "kgen.serve", "--out", default_build.elf.parent,
                      "--", "-nx", "-batch", "-ex", "continue", cwd=tmp_path, stdin=subprocess.DEVNULL, text=False)
    try:
        _read_until(proc.stdout.fileno(), re.compile("kgen: serving calls"), time.monotonic() + 120)
        stub = re.compile(r"gdbstub on 127\.0\.0\.1:(\d+)")
        port = stub.search(_read_until(proc.stderr.fileno(), stub, time.monotonic() + 10)).group(1)
        gdbs = _processes_with(f"target remote 127.0.0.1:{port}")
        qemu = _processes_with(f"tcp:127.0.0.1:{port}")
        assert len(gdbs) == 1 and len(qemu) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _processes_with(f"127.0.0.1:{port}") == []


def test_ctrl_c_in_gdb_interrupts_the_guest_and_quitting_ends_qemu(default_build, tmp_path):
    """Through a terminal: Ctrl-C while the kernel runs (serving calls, idle) stops the guest in gdb instead of
    ending kgen or QEMU; then gdb goes on and its quit ends everything with status 0."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(tmp_path)
        os.execve(KGEN[0], [*KGEN, "debug", "--direct", "--append", "kgen.serve", "--out",
                            str(default_build.elf.parent), "--", "-nx"], kgen_env())
    try:
        deadline = time.monotonic() + 120
        seen = _read_until(fd, re.compile(r"\(gdb\) $"), deadline)
        qemu = qemu_pid(seen)
        os.write(fd, b"continue\n")
        seen = _read_until(fd, re.compile(r"kgen: boot ok"), deadline, seen)
        os.write(fd, b"\x03")
        seen = _read_until(fd, re.compile(r"received signal SIGINT.*\n.*\(gdb\) $", re.DOTALL), deadline, seen)
        assert Path(f"/proc/{qemu}").exists(), "Ctrl-C ended QEMU"
        os.write(fd, b'printf "HIGH pc=%#lx cr0=%#lx\\n", $pc, $cr0\n')
        stop = re.compile(r"HIGH pc=(0x[0-9a-f]+) cr0=(0x[0-9a-f]+)\r?\n")    # a terminal ends lines in CR LF
        seen = _read_until(fd, stop, deadline, seen)
        assert int(stop.search(seen).group(2), 16) & hw.CR0_PG
        os.write(fd, b"quit\n")
        seen = _read_until(fd, re.compile(r"\(y or n\) $"), deadline, seen)
        os.write(fd, b"y\n")
        _, status = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(status) == errors.EXIT_OK, seen
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert_gone(qemu)
