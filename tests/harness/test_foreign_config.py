"""The [foreign] table of kgen.toml (a kernel kgen did not build and its --kernel options, the command line winning),
boot-only segments named by program-header index, and a CPU spinning on a jump to itself with interrupts off taken
as final at once. The kernels are tests/minikernels.py `init_spin`: a higher-half kernel that unmaps its own `init`
segment (linked high, so the default boot-segment rule does not cover it) and ends in `hlt` or `jmp .`."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import minikernels
from conftest import needs_qemu, run_kgen
from minikernels import outcomes



def boots(test):
    """A test that boots kernels in QEMU."""
    return pytest.mark.vm(needs_qemu(test))

READY = minikernels.INIT_SPIN_READY.strip()
SEGMENTS = "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("config-zoo")
    return {"big": minikernels.init_spin(out, "big", needs_mib=256), "init": minikernels.init_spin(out, "init"),
            "spin": minikernels.init_spin(out, "spin", spin=1),
            "spin-near": minikernels.init_spin(out, "spin-near", spin=2)}


def init_index(elf_path: Path) -> int:
    """The init segment's program-header index as `readelf -l` numbers it: the header whose p_vaddr is
    __init_start, read with pyelftools (not with kgen's ELF reader)."""
    from elftools.elf.elffile import ELFFile
    with open(elf_path, "rb") as stream:
        elf = ELFFile(stream)
        start = elf.get_section_by_name(".symtab").get_symbol_by_name("__init_start")[0]["st_value"]
        return next(i for i, seg in enumerate(elf.iter_segments())
                    if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] == start)



def write_config(directory: Path, kernel: Path | None, *lines: str) -> Path:
    """directory/kgen.toml with a [foreign] table: `kernel` relative to the file (through ..), then `lines`."""
    directory.mkdir(parents=True, exist_ok=True)
    body = ["[foreign]"]
    if kernel is not None:
        body.append(f'kernel = "{os.path.relpath(kernel, directory)}"')
    path = directory / "kgen.toml"
    path.write_text("\n".join(body + list(lines)) + "\n")
    return path


@pytest.fixture
def project(zoo, tmp_path):
    """A config naming the kernel that needs 256 MiB, with its ready text, memory and boot-only init segment; kgen
    is run from elsewhere (tmp_path), so the kernel path must be taken relative to the config file."""
    return write_config(tmp_path / "proj", zoo["big"], f'ready = "{READY}"', "memory = 256",
                        f"boot_only_segments = [{init_index(zoo['big'])}]")


def one_error_line(result, *parts: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("kgen: error: ") and "Traceback" not in result.stderr, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# --- the [foreign] table --------------------------------------------------------------------------------------------

@boots
def test_the_table_boots_its_kernel_with_its_memory_and_boot_only_segment(project, tmp_path):
    result = run_kgen("test", "--config", str(project), "-j", "1", "--", "-v", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen[SEGMENTS] == "PASSED" and seen["test_paging_and_write_protect_are_on"] == "PASSED", result.stdout


@boots
def test_the_tables_ready_text_is_what_is_waited_for(zoo, tmp_path):
    config = write_config(tmp_path / "proj", zoo["big"], 'ready = "not printed"', "memory = 256")
    result = run_kgen("test", "--config", str(config), "-j", "1", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("halted with interrupts off (for good, paging on) before 'not printed' appeared on COM1"
            in result.stderr.splitlines()[-1]), result.stderr


@boots
def test_the_command_line_overrides_the_table(zoo, project, tmp_path):
    ready = run_kgen("test", "--config", str(project), "-j", "1", "--ready", "never printed", cwd=tmp_path)
    assert ready.returncode == 1 and "before 'never printed' appeared on COM1" in ready.stderr.splitlines()[-1], \
        ready.stderr
    memory = run_kgen("test", "--config", str(project), "-j", "1", "--memory", "128", cwd=tmp_path)
    assert memory.returncode == 1 and "triple fault" in memory.stderr.splitlines()[-1], memory.stderr
    kernel = run_kgen("test", "--config", str(project), "-j", "1", "--kernel", str(zoo["spin"]), "--ready", "never",
                      cwd=tmp_path)
    assert kernel.returncode == 1, kernel.stderr
    assert kernel.stderr.splitlines()[-1].startswith("kgen: error: --kernel spin.elf did not boot"), kernel.stderr


@boots
def test_config_with_kernel_takes_the_tables_options(zoo, tmp_path):
    config = write_config(tmp_path / "proj", None, "memory = 256")
    result = run_kgen("test", "--kernel", str(zoo["big"]), "--config", str(config), "-j", "1", "-k", "paging_and_write",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@boots
def test_kgen_run_and_inspect_take_the_table(zoo, project, tmp_path):
    run = run_kgen("run", "--config", str(project), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"kgen: ready: the kernel printed '{READY}'" in run.stderr and READY in run.stdout, run.stderr
    inspect = run_kgen("inspect", "--config", str(project), "--json", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    doc = json.loads(inspect.stdout)
    assert Path(doc["kernel"]["elf"]).name == "big.elf"
    assert {c["name"]: c["outcome"] for c in doc["invariants"]}["check_segments"] == "passed", doc["invariants"]


@pytest.mark.parametrize("line, expected", [
    ('readyy = "x"', "unknown key foreign.readyy; known keys of [foreign]: kernel, ready,"),
    ('memory = "lots"', "kgen.toml: foreign.memory = 'lots': must be an integer"),
    ("ready_after = -1", "foreign.ready_after = -1: must be a finite number of seconds above 0"),
    ("boot_only_segments = [9]", "foreign.boot_only_segments = [9]: 9: out of range: the ELF has 4 program headers"),
    ('ready_symbol = "nowhere"', "foreign.ready_symbol = 'nowhere': big.elf has no such symbol"),
    ('modules = ["absent.bin"]', "foreign.modules = ["),
    ('qemu_args = "-smp 2"', "foreign.qemu_args = '-smp 2': must be an array of strings"),
])
def test_a_bad_key_or_value_is_one_line_naming_the_key(zoo, tmp_path, line, expected):
    config = write_config(tmp_path / "proj", zoo["big"], line)
    one_error_line(run_kgen("test", "--config", str(config), cwd=tmp_path), expected)


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_run_and_inspect_read_the_table_too(zoo, tmp_path, command):
    config = write_config(tmp_path / "proj", zoo["big"], "memory = 0")
    one_error_line(run_kgen(command, "--config", str(config), cwd=tmp_path), "foreign.memory = 0: must be above 0")
    missing = write_config(tmp_path / "other", tmp_path / "absent.elf")
    one_error_line(run_kgen(command, "--config", str(missing), cwd=tmp_path), "foreign.kernel = ", "no such file")


def test_a_boot_only_segment_out_of_range_is_one_line(zoo, tmp_path):
    one_error_line(run_kgen("test", "--kernel", str(zoo["init"]), "--boot-only-segment", "9", cwd=tmp_path),
                   "--boot-only-segment 9: out of range: the ELF has 4 program headers, numbered 0 to 3")
    one_error_line(run_kgen("test", "--boot-only-segment", "1", cwd=tmp_path),
                   "--boot-only-segment is for a kernel given with --kernel")
    one_error_line(run_kgen("test", "--kernel", str(zoo["init"]), "--boot-only-segment", "-1", cwd=tmp_path),
                   "--boot-only-segment")


# --- boot-only segments -----------------------------------------------------------------------------------------------

@boots
def test_a_boot_only_segment_named_by_index_is_not_reported(zoo, tmp_path):
    kernel, index = str(zoo["init"]), init_index(zoo["init"])
    found = run_kgen("test", "--kernel", kernel, "-j", "1", "-k", "elf_segments", "--", "-v", cwd=tmp_path)
    assert outcomes(found.stdout)[SEGMENTS] == "FAILED", found.stdout      # the default rule does not cover it
    assert "<init_once> (segment R-X, loaded at 0x101000): not mapped" in found.stdout, found.stdout
    named = run_kgen("test", "--kernel", kernel, "-j", "1", "-k", "elf_segments", "--boot-only-segment", str(index),
                     "--", "-v", cwd=tmp_path)
    assert named.returncode == 0 and outcomes(named.stdout)[SEGMENTS] == "PASSED", named.stdout + named.stderr


# --- a CPU spinning on a jump to itself with interrupts off -------------------------------------------------------

@boots
@pytest.mark.parametrize("name", ["spin", "spin-near"])
def test_a_spin_with_interrupts_off_is_final_at_once(zoo, tmp_path, name):
    # --boot-timeout 600 with a subprocess limit far below it: only a spin seen as final gets an answer in time.
    test = run_kgen("test", "--kernel", str(zoo[name]), "--ready", "never printed", "--boot-timeout", "600", "-j", "1",
                    cwd=tmp_path, timeout=240)
    assert test.returncode == 1, test.stderr
    assert ("the kernel is spinning on a jump to itself with interrupts off at 0xc01000d2 <spin_here> (for good, "
            "paging on) before 'never printed' appeared on COM1") in test.stderr.splitlines()[-1], test.stderr
    run = run_kgen("run", "--kernel", str(zoo[name]), "--boot-timeout", "600", cwd=tmp_path, timeout=240)
    assert run.returncode == 0, run.stderr
    assert ("kgen: halted: the kernel is spinning on a jump to itself with interrupts off at 0xc01000d2 <spin_here>, "
            "paging on") in run.stderr, run.stderr


class FakeMachine:
    """Physical memory from a dict of address -> bytes, counting reads."""

    def __init__(self, code: dict[int, bytes]):
        self.code, self.reads = code, 0

    def read_phys(self, addr: int, size: int) -> bytes:
        self.reads += 1
        for start, data in self.code.items():
            if start <= addr < start + len(data):
                return data[addr - start:addr - start + size].ljust(size, b"\0")
        return b"\0" * size


def cpu(eip: int, *, halted: bool = False, interrupts: bool = False, ring: int = 0):
    from kgen.arch import Arch
    return SimpleNamespace(eip=eip, cr3=0, cr0=0x11, halted=halted, eflags=0x202 if interrupts else 0x2,
                           long_mode=False, mode=Arch.for_cpu(False), cpl=ring, cs=0x1b if ring else 0x08)


@pytest.mark.parametrize("code, spins", [
    (b"\xeb\xfe", True),                       # jmp . (short)
    (b"\xe9\xfb\xff\xff\xff", True),           # jmp . (near: -5 from the end of its 5 bytes)
    (b"\xe9\xfe\xff\xff\xff", False),          # jumps 3 bytes in, into its own displacement
    (b"\xeb\xfd", False),
    (b"\xf3\x90\xeb\xfc", False),               # pause; jmp back: a spin-wait that interrupts may end
    (b"\x90\xeb\xfd", True),                   # nop; jmp .-1: gcc -O0's for(;;);
    (b"\x90\x90\xe9\xf9\xff\xff\xff", True),   # nops; a near jump back to the first
    (b"\x90\xeb\xfe", False),                  # a nop, then jmp .: passed once, the spin is on the jump
    (b"\x90\xeb\xfb", False),                  # a jump back past the nop, to what is no nop
    (b"\x90\x01\xeb\xfc", False),              # an instruction in the loop: not a spin on nothing
])
def test_only_a_jump_to_itself_counts(code, spins):
    from kgen.harness.ready import jumps_to_itself
    assert jumps_to_itself(FakeMachine({0x100000: code}), cpu(0x100000)) is spins


def test_a_jump_back_over_nops_counts_wherever_eip_is_in_the_loop():
    """Under KVM a sample may find EIP on the jump of `nop; jmp .-1` as well as on the nop."""
    from kgen.harness.ready import jumps_to_itself
    machine = FakeMachine({0x100000: b"\x00\x90\x90\xeb\xfc"})
    assert [jumps_to_itself(machine, cpu(eip)) for eip in range(0x100000, 0x100005)] == \
        [False, True, True, True, False]


def test_code_is_read_only_when_eip_stays_put_with_interrupts_off():
    from kgen.harness.ready import SelfJumpWatch
    machine = FakeMachine({0x100000: b"\xeb\xfe"})
    watch = SelfJumpWatch(machine, None)
    for eip in (0x100010, 0x100020, 0x100000, 0x100030):
        assert watch.sample(cpu(eip)) is None              # moving on: nothing read
    assert watch.sample(cpu(0x100000, interrupts=True)) is None
    assert watch.sample(cpu(0x100000, interrupts=True)) is None     # interrupts on: not final, nothing read
    assert watch.sample(cpu(0x100000, halted=True)) is None
    assert watch.sample(cpu(0x100000, ring=3)) is None
    assert watch.sample(cpu(0x100000, ring=3)) is None         # a process spinning: the kernel lost control, a hang
    assert machine.reads == 0
    assert watch.sample(cpu(0x100000)) is None
    assert watch.sample(cpu(0x100000)) == "spinning on a jump to itself with interrupts off at 0x00100000"
    assert machine.reads == 1


def test_a_named_boot_only_segment_is_not_the_kernel_base(zoo):
    """A boot-only segment linked high at another offset (0x80000000 here) neither sets the kernel base nor is
    left to the default rule; without the option it sets the base, and the default rule names no segment."""
    import dataclasses
    from kgen.guest.elfinfo import ElfInfo
    from kgen.guest.invariants import GuestView
    elf = ElfInfo.load(zoo["init"])
    index = init_index(zoo["init"])
    segments = tuple(dataclasses.replace(seg, vaddr=seg.paddr + 0x80000000) if seg.index == index else seg
                     for seg in elf.segments)
    elf = dataclasses.replace(elf, segments=segments)
    default = GuestView(None, None, elf)
    assert default.kernel_base == 0x80000000 and default.boot_segments == ()
    named = GuestView(None, None, elf, boot_only=(index,))
    assert named.kernel_base == 0xC0000000
    assert [seg.vaddr for seg in named.boot_segments] == [0x80101000]
