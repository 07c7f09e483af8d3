"""Every build variant (a kernel broken on purpose, `[variant]` in kgen.toml) turns `kgen test` red on each
architecture, through the real command line and under TCG; the unbroken kernel passes; a kernel kgen did not build
gets the exercise stages skipped, not failed.

The variants are read from their one list (kgen/build/variants.py), so a new one is covered here as soon as it exists. Under KVM (kvm_pvm) a
missing INVLPG may go unnoticed (docs/known-limits.md): these runs use TCG, QEMU's default here.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from kgen.build.config import PMM_KINDS, Config
from kgen.build.variants import VARIANTS as ALL_VARIANTS

import minikernels
from conftest import ARCH_BUILDS, needs_qemu, run_kgen

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vm, needs_qemu]

# Every build variant (kgen/build/variants.py), with the suite's stage meant for it (`-k` of the second run below):
# it must see the bug on its own, not only a neighbour that happens to trip over it.
VARIANTS = tuple(variant.name for variant in ALL_VARIANTS)
CAUGHT_BY = {variant.name: variant.caught_by for variant in ALL_VARIANTS}
PMM_KIND = {variant.name: variant.pmm_kind for variant in ALL_VARIANTS}


def kgen_test(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `kgen test`, in a subprocess, one machine at a time (the test run itself may be parallel)."""
    return run_kgen("test", "--out", out, "-j", "1", *args, timeout=600)


def stage_failed(stdout: str, keyword: str) -> bool:
    """Whether a test that `-k keyword` selects is among those pytest's short summary lists as FAILED (a plain word
    as the keyword: a substring of the test's id, as -k matches it)."""
    failed = [line.split()[1] for line in stdout.splitlines() if line.startswith("FAILED ")]
    return keyword.isidentifier() and any(keyword.lower() in nodeid.lower() for nodeid in failed)


def config_file(tmp_path: Path, variant: str | None) -> Path:
    """The variant's kgen.toml, with the frame allocator its bug lives in (Variant.pmm_kind) where it needs one."""
    path = tmp_path / "kgen.toml"
    kind = PMM_KIND.get(variant)
    path.write_text((f"[variant]\n{variant} = true\n" if variant else "")
                    + (f'[pmm]\nkind = "{kind}"\n' if kind else ""))
    return path


def test_every_variant_is_a_config_key_and_a_template_switch():
    """The list is the config's [variant] table, and every entry's constant guards code in some template: a
    variant no `.if` tests would build the correct kernel and its red run below would be a false alarm."""
    booleans = {f.name for f in fields(Config) if f.type in (bool, "bool")}
    assert booleans == set(VARIANTS)
    templates = "\n".join(p.read_text() for p in (ROOT / "templates").rglob("*.s"))
    switches = set(re.findall(r"^\.if (\w+)", templates, re.MULTILINE))
    assert [v.constant for v in ALL_VARIANTS if v.constant not in switches] == []


@pytest.mark.parametrize("pmm_kind", PMM_KINDS)
@pytest.mark.parametrize("arch", tuple(ARCH_BUILDS))
def test_the_unbroken_kernel_passes(tmp_path, arch, pmm_kind):
    """Each architecture with each frame allocator: the exercise stages (VMM, heap, address spaces, tasks) and the
    invariants run on the bitmap kernel as on the stack's."""
    config = tmp_path / "kgen.toml"
    config.write_text(f'[pmm]\nkind = "{pmm_kind}"\n')
    result = kgen_test(tmp_path / "out", "--config", str(config), "--arch", arch)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "error" not in summary, summary


# Each variant on every architecture whose kernel has the code it breaks (Variant.arch; both for most).
VARIANT_ARCHES = [pytest.param(v.name, arch, id=f"{v.name}-{arch}") for v in ALL_VARIANTS for arch in ARCH_BUILDS
                  if v.arch in (None, arch)]


@pytest.mark.parametrize("variant,arch", VARIANT_ARCHES)
def test_every_variant_turns_kgen_test_red(tmp_path, variant, arch):
    config = config_file(tmp_path, variant)
    # The whole suite, stopping at the first failure: `kgen test` as a user runs it goes red.
    result = kgen_test(tmp_path / "out", "--config", str(config), "--arch", arch, "-x")
    assert result.returncode == 1, (f"kgen test on the {variant} kernel exited {result.returncode}\n"
                                    + result.stdout[-3000:] + result.stderr)
    assert "FAILED" in result.stdout or "ERROR" in result.stdout, result.stdout[-3000:]
    if stage_failed(result.stdout, CAUGHT_BY[variant]):
        # The test that stopped the run is the stage's own: it saw the bug by itself, since no test of the suite
        # sees what another did (each gets a freshly booted machine, or looks at one nobody changes, kgen_idle); the
        # run below would show it again in another process.
        return
    stage = kgen_test(tmp_path / "out", "--config", str(config), "--arch", arch, "-k", CAUGHT_BY[variant])
    assert stage.returncode == 1, (f"kgen test -k {CAUGHT_BY[variant]} on the {variant} kernel exited "
                                   f"{stage.returncode}\n" + stage.stdout[-3000:] + stage.stderr)


def test_a_variant_of_one_architecture_is_refused_for_the_other(tmp_path):
    one_arch = next(v for v in ALL_VARIANTS if v.arch)
    other = next(arch for arch in ARCH_BUILDS if arch != one_arch.arch)
    result = run_kgen("build", "--no-iso", "--out", tmp_path / "out", "--arch", other,
                      "--config", config_file(tmp_path, one_arch.name))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and f"--arch {one_arch.arch}" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_exercise_stages_are_skipped_for_a_kernel_kgen_did_not_build(tmp_path):
    """--kernel: anyone's Multiboot ELF (here a higher-half kernel built with GNU as), no layout, no call channel.
    The stages skip, saying why."""
    elf = minikernels.build(tmp_path, "hobby", minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS, WRITABLE_TEXT=0)
    result = kgen_test(tmp_path / "out", "--kernel", str(elf), "-k", "test_exercise", "--", "-rs")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert "hobby.elf was not built by kgen: its layout and call channel are unknown" in result.stdout


# ---- the exercise checks themselves turn red ---------------------------------------------------------------------
@pytest.fixture
def exercise(arch_build):
    """The exercise stages' checker on a freshly booted default kernel (each architecture), at the start of a stage."""
    yield from exercise_on(arch_build)


def exercise_on(arch_build):
    from kgen.guest.elfinfo import ElfInfo
    from kgen.harness.suite.test_exercise import Exercise
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    kernel = KernelUnderTest(arch_build.elf, ElfInfo.load(arch_build.elf), arch_build.kernel.layout)
    with boot(kernel) as live:
        k = Exercise(live)
        k.begin("tampering")
        k.check("nothing done yet")         # green before the tampering
        yield k


def poke_word(k, name: str, value: int, index: int = 0, size: int | None = None) -> None:
    size = size or k.arch.word_size
    k.live.write_phys(k.elf.symbols[name].value - k.layout.kernel_virtual_base + index * size,
                      value.to_bytes(size, "little"))


def test_a_count_the_stack_does_not_hold_is_caught(exercise):
    k = exercise
    poke_word(k, "pmm_count", k.u32("pmm_count") + 1, size=4)
    with pytest.raises(pytest.fail.Exception, match=r"frames free, expected(.|\n)*pmm_count says"):
        k.check("pmm_count one too high")


def test_a_mapped_frame_on_the_free_stack_is_caught(exercise):
    k = exercise
    groups, _ = k.leaf_spans()
    frame = k.alloc_frame()
    k.map(groups[0][0], frame)
    k.check("a page mapped")
    # Push the mapped frame by hand, as a double free through another path would.
    k.live.write_phys(frame, k.word("pmm_top").to_bytes(k.arch.word_size, "little"))
    poke_word(k, "pmm_top", frame)
    poke_word(k, "pmm_count", k.u32("pmm_count") + 1, size=4)
    with pytest.raises(pytest.fail.Exception, match=f"frame {frame:#x} is on the free stack and mapped"):
        k.check("a mapped frame pushed")


@pytest.fixture(params=tuple(ARCH_BUILDS))
def bitmap_exercise(request, tmp_path_factory):
    """The same checker on a bitmap kernel (pmm.kind = "bitmap") of each architecture."""
    from conftest import shared_build
    out = shared_build(tmp_path_factory, Config.for_arch(request.param, pmm_kind="bitmap"))
    yield from exercise_on(out)


def test_a_mapped_frame_free_in_the_bitmap_is_caught(bitmap_exercise):
    """A bit cleared by hand under a mapped frame (as a free through another path would) and counted: the frame
    accounting reads the bitmap and names the frame."""
    from kgen.guest.pmmview import frames_in_bit_order
    k = bitmap_exercise
    groups, _ = k.leaf_spans()
    frame = k.alloc_frame()
    k.map(groups[0][0], frame)
    k.check("a page mapped")
    k.live.stop()
    state = k.pmm.state()
    bit = list(frames_in_bit_order(state.ranges)).index(frame)
    byte = state.reserved[-1][0] + bit // 8
    k.live.write_phys(byte, bytes([k.live.machine.read_phys(byte, 1)[0] & ~(1 << bit % 8)]))
    poke_word(k, "pmm_count", k.u32("pmm_count") + 1, size=4)
    with pytest.raises(pytest.fail.Exception, match=f"frame {frame:#x} is free in the bitmap and mapped"):
        k.check("a mapped frame's bit cleared")


def test_a_free_range_past_the_window_is_caught(exercise):
    k = exercise
    start, pages = k.free_ranges()[-1]
    poke_word(k, "vmm_free_ranges", pages + 1, index=2 * (len(k.free_ranges()) - 1) + 1)
    with pytest.raises(pytest.fail.Exception, match="is not a page range inside the vmm range window"):
        k.check("the last free range one page too long")


def test_a_new_table_holding_poison_is_caught(exercise):
    k = exercise
    groups, _ = k.leaf_spans()
    frame = k.alloc_frame()
    k.map(groups[0][0], frame)
    k.check("a page mapped, its table made")
    table = k.live.view().walker.translate(groups[0][0]).chain[-1].addr & ~0xFFF
    k.live.write_phys(table + 0x800, b"\xcc" * 0x800)        # what an uncleared table's upper half would hold
    with pytest.raises(pytest.fail.Exception, match=f"the table at {table:#x} .* still hold the poison"):
        k.check("half the new table poisoned")


def test_a_stage_is_seen_failing_only_by_its_own_tests():
    summary = ("FAILED kgen/harness/suite/test_exercise.py::test_unmapped_and_freed_pages_leave_the_tlb - assert\n"
               "ERROR kgen/harness/suite/test_exercise.py::test_heap_blocks_are_whole_and_given_back - boot\n")
    assert stage_failed(summary, "tlb") and stage_failed(summary, "TLB")
    assert not stage_failed(summary, "heap"), "an error is not the stage's check failing"
    assert not stage_failed(summary, "page_tables") and not stage_failed(summary, "tlb or heap")
    assert not stage_failed("tlb FAILED", "tlb")
