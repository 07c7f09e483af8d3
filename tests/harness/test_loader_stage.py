"""A loader stage that carries the real kernel (issue 21, `--symbols`): what boots through --kernel is a Multiboot
stage (tests/minikernels.py, LOADER_STAGE) that copies the higher-half kernel it embeds to 2 MiB and jumps to it.
Judged as the stage, the kernel that really runs is misjudged; with `--symbols real.elf` it is judged as when booted
on its own, and its symbols name addresses (--ready-at, the stop point of `kgen inspect`)."""
from __future__ import annotations

import pytest

from conftest import needs_qemu, run_kgen
from kgen.guest.elfinfo import ElfInfo, merged
from minikernels import HIGHER_HALF_READY, loader_stage, outcomes

SEGMENTS = "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"
BELOW = "test_nothing_is_mapped_below_the_kernel_base"
READY = HIGHER_HALF_READY.rstrip("\n")
INVARIANTS = "invariants or oracles"        # what a foreign kernel is checked for; the rest skips for one


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    stage, real = loader_stage(tmp_path_factory.mktemp("stage"))
    return {"stage": stage, "real": real}


@needs_qemu
def test_judged_as_the_stage_the_real_kernel_is_misjudged(zoo):
    # The stage's own segment (flat at 1 MiB) is what the checks compare with the tables the real kernel built:
    # none of its pages are mapped (a false finding), and the stage is not higher-half, so the check that the
    # low half is empty does not run at all.
    result = run_kgen("test", "--kernel", str(zoo["stage"]), "--ready", READY, "-j", "1", "-k", INVARIANTS,
                  "--", "-v", "-rs")
    assert result.returncode == 1, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen[SEGMENTS] == "FAILED" and seen[BELOW] == "SKIPPED", seen
    assert "page 0x00100000 (segment R-X, loaded at 0x100000): not mapped" in result.stdout, result.stdout
    assert "stage.elf is not a higher-half kernel" in result.stdout, result.stdout


@needs_qemu
def test_with_symbols_the_real_kernel_is_judged_as_when_it_boots_alone(zoo):
    alone = run_kgen("test", "--kernel", str(zoo["real"]), "--ready", READY, "-j", "1", "-k", INVARIANTS, "--", "-v")
    staged = run_kgen("test", "--kernel", str(zoo["stage"]), "--symbols", str(zoo["real"]), "--ready", READY,
                  "-j", "1", "-k", INVARIANTS, "--", "-v")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert staged.returncode == 0, staged.stdout + staged.stderr
    assert outcomes(staged.stdout) == outcomes(alone.stdout)
    assert outcomes(staged.stdout)[SEGMENTS] == outcomes(staged.stdout)[BELOW] == "PASSED"


@needs_qemu
def test_ready_at_a_symbol_of_the_real_kernel_from_the_config(zoo, tmp_path):
    # [foreign] symbols, relative to the config file, reach the suite (kgen test forwards --kgen-symbols).
    config = tmp_path / "kgen.toml"
    config.write_text(f'[foreign]\nkernel = "{zoo["stage"]}"\nsymbols = ["{zoo["real"].name}"]\n'
                      'ready_at = "higher_half"\n')
    (tmp_path / zoo["real"].name).write_bytes(zoo["real"].read_bytes())
    result = run_kgen("test", "--config", str(config), "-j", "1", "-k", "segments", "--", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result.stdout)[SEGMENTS] == "PASSED"
    inspected = run_kgen("inspect", "--kernel", str(zoo["stage"]), "--symbols", str(zoo["real"]), "--ready-at",
                     "higher_half")
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    assert "<higher_half>" in inspected.stdout.splitlines()[1], inspected.stdout


def test_ready_at_a_symbol_the_stage_lacks_is_refused_without_symbols(zoo):
    result = run_kgen("test", "--kernel", str(zoo["stage"]), "--ready-at", "higher_half")
    assert result.returncode == 2, result.stderr
    assert "no symbol 'higher_half'" in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("value, said", [
    ("{dir}/missing.elf", "--symbols {dir}/missing.elf: no such file"),
    ("{dir}/stage.S", "--symbols {dir}/stage.S: not a readable ELF file"),
    ("{dir}", "--symbols {dir}: not a file"),
    ("{real}@0xzz", "--symbols {real}@0xzz: '0xzz' is not an offset"),
    ("@0x1000", "--symbols @0x1000: no ELF before the @"),
])
def test_bad_symbols_are_one_line(zoo, value, said):
    where = dict(dir=zoo["stage"].parent, real=zoo["real"])
    result = run_kgen("test", "--kernel", str(zoo["stage"]), "--symbols", value.format(**where))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("kgen: error: " + said.format(**where)), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_bad_symbols_key_is_named(zoo, tmp_path):
    config = tmp_path / "kgen.toml"
    config.write_text(f'[foreign]\nkernel = "{zoo["stage"]}"\nsymbols = ["missing.elf"]\n')
    result = run_kgen("test", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"kgen: error: {config}: foreign.symbols = "), result.stderr
    assert "missing.elf: no such file" in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


def test_offset_moves_segments_and_symbols_and_merged_elves_number_on(zoo):
    real, stage = ElfInfo.load(zoo["real"]), ElfInfo.load(zoo["stage"])
    moved = real.relocated(0x1000)
    assert [s.vaddr for s in moved.segments] == [s.vaddr + 0x1000 for s in real.segments]
    assert [s.paddr for s in moved.segments] == [s.paddr for s in real.segments]
    assert moved.symbols["higher_half"].value == real.symbols["higher_half"].value + 0x1000
    assert moved.symbolize(real.symbols["higher_half"].value + 0x1000).endswith("<higher_half>")
    both = merged([moved, stage])
    assert both.path == real.path and both.entry == moved.entry
    assert [s.index for s in both.segments] == ([s.index for s in real.segments]
                                                + [len(real.program_headers) + s.index for s in stage.segments])
    assert both.program_headers == real.program_headers + stage.program_headers
    # A name both define (_start, puts) is the first ELF's; one only the second has is found too.
    assert both.symbols["_start"] == moved.symbols["_start"] and both.symbols["puts"] == moved.symbols["puts"]
    assert both.symbols["real_image"] == stage.symbols["real_image"]
    assert both.symbolize(stage.symbols["real_image"].value).endswith("<real_image>")
