"""`kgen test --kernel` and `kgen run --kernel` on kernels kgen did not build, shaped like the hobby kernels people
write: the OSDev "Higher Half Bare Bones" layout (a boot segment identity-loaded at 1 MiB, the rest linked at
0xC0000000 + 1 MiB), a kernel that waits for a timer tick in `hlt` during its boot and then idles with interrupts
on, one that halts with paging off, one with a page-directory entry whose reserved bits are set, 4 MiB pages seen
through a recursive slot, and ELFs QEMU refuses. Each is built here with GNU as/ld (tests/minikernels.py)."""
import os
import re
from pathlib import Path

import pytest

import minikernels
from conftest import needs_qemu, run_kgen
from minikernels import (BOOT_SEGMENT_ENTRY, CLEAR_PD_PT, FLAT_ENTRY, FLAT_GDT, FLUSH_TLB, IDLE, LOAD_GDT,
                         NEEDS_MIB_CHECK, PAGE_TABLES, SERIAL_PUTS, SETUP_TIMER, STACK, boot_segment_lds,
                         descriptor_pointer, halt_loop, map_image, map_low_and_high, outcomes,
                         paging_on_and_jump_high, timer_tick, unmap_identity)

pytestmark = [pytest.mark.vm, needs_qemu]

KBASE = 0xC0000000
READY = "hhbb: ready\n"

# The Higher Half Bare Bones layout: `.multiboot.*` linked and loaded at 1 MiB (paging is off there), everything
# else linked at 0xC0000000 above its load address. The boot code maps the first 4 MiB twice through one page table
# (identity and at 0xC0000000; text and rodata read-only), turns paging on with CR0.WP, jumps high, drops the
# identity entry (and with it the boot segment), prints READY and halts with interrupts off.
# RECURSIVE=1: PD[1023] maps the PD (supervisor). LARGE=1: CR4.PSE and PD[769] a 4 MiB page. BAD_PDE=1: CR4.PSE
# and PD[770] a 4 MiB entry with reserved bit 13 set (as when code follows a short page directory).
# TICK_WAIT=1: before dropping the identity entry, wait in `hlt` (interrupts on) for two timer ticks; at the end,
# idle in `hlt` with interrupts on instead of halting with them off.
# NEEDS_MIB=n: triple-fault unless Multiboot reports about n MiB of RAM (at least n - 1 MiB above 1 MiB).
# BOOT_INFO=1: print the command line and each module's command line first.
# BUSY=1 (with TICK_WAIT=1): end in a busy loop `spin` with interrupts on.
HHBB = rf"""
{BOOT_SEGMENT_ENTRY}
{NEEDS_MIB_CHECK}
.if BOOT_INFO                           /* print the command line and each module's string from Multiboot */
    mov 16(%ebx), %esi
    call boot_puts
    mov 20(%ebx), %ecx
    mov 24(%ebx), %edi
2:  test %ecx, %ecx
    jz 3f
    mov 8(%edi), %esi
    call boot_puts
    add $16, %edi
    dec %ecx
    jmp 2b
boot_puts:
    lodsb
    test %al, %al
    jz 4f
    mov $0x3F8, %dx
    out %al, %dx
    jmp boot_puts
4:  mov $0x3F8, %dx
    mov $'\n', %al
    out %al, %dx
    ret
3:
.endif
{CLEAR_PD_PT}
{map_image(boot_segment=True)}
{map_low_and_high()}
.if RECURSIVE
    mov $(pd - KBASE + 3), %eax
    mov %eax, pd - KBASE + 1023 * 4
.endif
.if LARGE | BAD_PDE
    mov %cr4, %eax
    or $0x10, %eax                      /* PSE */
    mov %eax, %cr4
.endif
.if LARGE
    movl $0x00400083, pd - KBASE + 769 * 4
.endif
.if BAD_PDE
    movl $0x00802083, pd - KBASE + 770 * 4
.endif
{paging_on_and_jump_high()}

.text
higher_half:
    mov $stack_top, %esp
.if TICK_WAIT
{LOAD_GDT}
    call setup_timer
    sti
    hlt                                 /* two ticks of the BIOS's PIT, ~110 ms: not idle yet */
    hlt
.endif
{unmap_identity()}
    mov $ready, %esi
    call puts
.if BUSY
    sti
spin:                                   /* idles busily, interrupts on: only --ready-symbol/--ready tell */
    pause
    jmp spin
.elseif TICK_WAIT
{IDLE}
.else
    cli
{halt_loop()}
.endif
{SERIAL_PUTS}
.if TICK_WAIT
{SETUP_TIMER}
{timer_tick(counted=False)}
.endif
.section .rodata
ready: .asciz "hhbb: ready\n"
{descriptor_pointer("idtr", "idt", "8 * 9")}
{descriptor_pointer("gdtr", "gdt", "3 * 8")}
.data
counter: .long 0
{FLAT_GDT}
{PAGE_TABLES}
idt: .skip 8 * 9
.align 16
{STACK}
"""

HHBB_LDS = boot_segment_lds(after_text="  __text_phys_end = . - 0xC0000000;\n")

# Paging never turned on: print, halt with interrupts off.
PAGING_OFF = rf"""
{FLAT_ENTRY}
    mov $0x3F8, %dx
    mov $'p', %al
    out %al, %dx
{halt_loop()}
"""

NO_MULTIBOOT = r"""
.text
.globl _start
_start:
    cli
    hlt
"""


def hhbb(out: Path, name: str, source: str = HHBB, **flags: int) -> Path:
    """HHBB (or `source`, a variant of it) built with its flags (0 unless given)."""
    values = {"RECURSIVE": 0, "LARGE": 0, "BAD_PDE": 0, "TICK_WAIT": 0, "NEEDS_MIB": 0, "BOOT_INFO": 0, "BUSY": 0,
              **flags}
    return minikernels.build(out, name, source, HHBB_LDS, **values)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("foreign")
    built = {
        "hhbb": hhbb(out, "hhbb"),
        "recursive-large": hhbb(out, "recursive-large", RECURSIVE=1, LARGE=1),
        "bad-pde": hhbb(out, "bad-pde", BAD_PDE=1),
        "tick-wait": hhbb(out, "tick-wait", TICK_WAIT=1),
        "busy": hhbb(out, "busy", TICK_WAIT=1, BUSY=1),
        "needs-256": hhbb(out, "needs-256", NEEDS_MIB=256),
        "boot-info": hhbb(out, "boot-info", BOOT_INFO=1),
        "paging-off": minikernels.build(out, "paging-off", PAGING_OFF),
        "no-multiboot": minikernels.build(out, "no-multiboot", NO_MULTIBOOT),
    }
    built["elf64"] = minikernels.build(out, "elf64", NO_MULTIBOOT, bits=64)
    built["mb64"] = minikernels.elf64_multiboot(out)
    return built


def test_higher_half_bare_bones_layout_is_judged_by_its_higher_half(kernels):
    result = run_kgen("test", "--kernel", str(kernels["hhbb"]), "-j", "1", "--", "-v", "-rs")
    assert result.returncode == 0, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    # The kernel base comes from the higher-half segments, so the check applies (and holds: PD[0] is dropped) ...
    assert seen["test_nothing_is_mapped_below_the_kernel_base"] == "PASSED", result.stdout
    # ... the boot segment it dropped on purpose is not "not mapped" ...
    assert seen["test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"] == "PASSED", result.stdout
    # ... and a kernel with no recursive slot does not pass the recursive-slot check.
    assert seen["test_recursive_slot_maps_the_pd_supervisor_only"] == "SKIPPED", result.stdout
    assert "this kernel has no recursive slot" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_kept_boot_identity_map_is_still_found(kernels, tmp_path):
    # The same kernel without the line that drops PD[0]: the boot segment's identity map must be reported.
    elf = hhbb(tmp_path, "kept", source=HHBB.replace(unmap_identity(), FLUSH_TLB))
    result = run_kgen("test", "--kernel", str(elf), "-j", "1", "-k", "below_the_kernel_base")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is identity-mapped" in result.stdout and "below the kernel base 0xc0000000" in result.stdout


def test_stopping_at_the_first_failure_is_a_failed_check_not_an_interruption(kernels, tmp_path):
    # -x with parallel machines: pytest-xdist stops the run by raising its own KeyboardInterrupt, which pytest reports
    # as "interrupted"; kgen must still say "checks failed" (1), not 130, or a CI job reads a failing kernel as a
    # cancelled one.
    elf = hhbb(tmp_path, "kept", source=HHBB.replace(unmap_identity(), FLUSH_TLB))
    result = run_kgen("test", "--kernel", str(elf), "-j", "2", "-x")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr
    assert "stopping after 1 failures" in result.stdout and "interrupted" not in result.stderr


def test_a_reserved_bit_in_a_pde_is_one_finding_and_the_rest_is_judged(kernels):
    # PD[770], a 4 MiB PDE with bit 13 set: reserved on QEMU's qemu32 CPU (MAXPHYADDR 32, so no PSE-36 address
    # bits). One finding, naming the entry, its bits and its range; the kernel's own mappings are judged as they
    # are (all correct), and the oracles compare the rest with QEMU.
    result = run_kgen("test", "--kernel", str(kernels["bad-pde"]), "-j", "1", "--", "-v", "-rs")
    assert result.returncode == 1, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen.pop("test_page_table_entries_are_well_formed") == "FAILED", result.stdout
    assert re.search(r"PD\[770\] @ 0x[0-9a-f]+ = 0x802083: reserved bits 0x2000 set \(0x2000: reserved in a 4 MiB PD "
                     r"entry with MAXPHYADDR 32\); 0xc0800000-0xc0c00000 is not mapped: any access there is a page "
                     r"fault with error code RSVD", result.stdout), result.stdout
    for holds in ("test_paging_and_write_protect_are_on", "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags",
                  "test_nothing_is_mapped_below_the_kernel_base", "test_no_kernel_page_is_user_accessible",
                  "test_each_page_table_is_referenced_once", "test_page_tables_hold_no_poison",
                  "test_walker_agrees_with_qemu_gva2gpa", "test_walker_agrees_with_qemu_info_tlb"):
        assert seen[holds] == "PASSED", (holds, result.stdout)
    assert "FAILED" not in seen.values() and "ERROR" not in seen.values(), result.stdout
    assert "cannot be walked" not in result.stdout and "Traceback" not in result.stdout, result.stdout


def test_info_tlb_oracle_agrees_on_4mib_pages_seen_through_a_recursive_slot(kernels):
    result = run_kgen("test", "--kernel", str(kernels["recursive-large"]), "-j", "1", "--", "-v", "-rs")
    assert result.returncode == 0, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen["test_walker_agrees_with_qemu_info_tlb"] == "PASSED"
    assert seen["test_recursive_slot_maps_the_pd_supervisor_only"] == "PASSED"


def test_a_kernel_halted_with_paging_off_is_judged_at_once(kernels):
    # A boot timeout far above the time this takes: reaching it would mean the final state was not recognised.
    result = run_kgen("test", "--kernel", str(kernels["paging-off"]), "-j", "1", "--boot-timeout", "240",
                      "--", "-v", "-rs")
    assert result.returncode == 1, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen.pop("test_paging_and_write_protect_are_on") == "FAILED"
    assert "CR0.PG is clear (paging is off)" in result.stdout
    assert set(seen.values()) == {"SKIPPED"}, result.stdout      # the oracles too: no AttributeError
    assert "Traceback" not in result.stdout + result.stderr


def test_a_transient_hlt_with_interrupts_on_is_not_taken_for_idle(kernels):
    # Caught in its two-tick wait the kernel still has its identity map; only the idle loop after it is the
    # booted state.
    result = run_kgen("test", "--kernel", str(kernels["tick-wait"]), "-j", "1", "--", "-v", "-rs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result.stdout)["test_nothing_is_mapped_below_the_kernel_base"] == "PASSED"


def test_ready_text_is_an_option(kernels):
    result = run_kgen("test", "--kernel", str(kernels["tick-wait"]), "--ready", READY.strip(), "-j", "1",
                      "-k", "below_the_kernel_base")
    assert result.returncode == 0, result.stdout + result.stderr
    missing = run_kgen("test", "--kernel", str(kernels["hhbb"]), "--ready", "never printed", "-j", "1",
                       "-k", "paging_and_write")
    assert missing.returncode == 1
    assert "halted with interrupts off (for good, paging on) before 'never printed' appeared" in missing.stderr


def test_ready_symbol_or_settle_time_for_a_kernel_that_idles_busily(kernels):
    kernel = str(kernels["busy"])
    never = run_kgen("test", "--kernel", kernel, "-j", "1", "--boot-timeout", "3")
    assert never.returncode == 1, never.stdout + never.stderr
    assert "neither halted with interrupts off nor sat idle in hlt" in never.stderr, never.stderr
    found = run_kgen("test", "--kernel", kernel, "-j", "1", "--ready-symbol", "spin", "--", "-v")
    assert found.returncode == 0, found.stdout + found.stderr
    assert outcomes(found.stdout)["test_nothing_is_mapped_below_the_kernel_base"] == "PASSED"
    settled = run_kgen("test", "--kernel", kernel, "-j", "1", "--ready-after", "0.5", "-k", "below_the_kernel_base")
    assert settled.returncode == 0, settled.stdout + settled.stderr
    run = run_kgen("run", "--kernel", kernel, "--ready-after", "0.5")
    assert run.returncode == 0 and "kgen: ready: the kernel settled: paging on, page tables unchanged for 0.5 s" \
        in run.stderr, run.stderr
    run = run_kgen("run", "--kernel", kernel, "--ready-symbol", "spin")
    assert run.returncode == 0 and "kgen: ready: the kernel stayed in spin, paging on" in run.stderr, run.stderr
    unknown = run_kgen("test", "--kernel", kernel, "--ready-symbol", "no_such_function")
    assert unknown.returncode == 2 and "no symbol 'no_such_function'" in unknown.stderr, unknown.stderr


@pytest.mark.parametrize("name, why", [
    ("no-multiboot", "an ELF32 with no Multiboot header"),
    ("elf64", "an ELF64 with no Multiboot header"),
])
def test_an_elf_qemu_refuses_is_one_line_with_qemus_reason(kernels, name, why):
    for command in (["test", "-j", "1"], ["run"]):
        result = run_kgen(*command, "--kernel", str(kernels[name]))
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], result.stderr
        assert "QEMU refused to boot it: qemu-system-" in lines[0], lines[0]
        assert "Error loading uncompressed kernel without PVH ELF Note" in lines[0] or name == "elf64", lines[0]


def test_an_elf64_with_multiboot_address_fields_is_checked_in_long_mode(kernels):
    run = run_kgen("run", "--kernel", str(kernels["mb64"]))
    assert run.returncode == 0 and run.stdout == "x64: ready\n", run.stdout + run.stderr
    assert "paging on, at RIP=0x0000000000100" in run.stderr, run.stderr
    result = run_kgen("test", "--kernel", str(kernels["mb64"]), "-j", "1", "--", "-v", "-rP")
    assert result.returncode == 1, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen["test_paging_and_write_protect_are_on"] == "PASSED"
    assert seen["test_recursive_slot_maps_the_pd_supervisor_only"] == "PASSED"        # PML4[511]
    assert seen["test_walker_agrees_with_qemu_gva2gpa"] == "PASSED"
    assert seen["test_walker_agrees_with_qemu_at_every_offset"] == "PASSED"          # its 2 MiB page, offset bits 0-20
    # The one 2 MiB page is writable, so the text and rodata in it are: one finding for that page, named by its
    # PML4 path.
    assert seen["test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"] == "FAILED"
    (found,) = [line for line in result.stdout.splitlines() if "no writable segment lies there" in line]
    assert found.startswith("  2 pages of the 2 MiB page at 0x0, ") and "PML4[0]" in found, found
    assert "(segment R-X, loaded at 0x100000), " in found and ": writable (" in found, found
    # Linked low, its image lies in x86-64's user half: its identity map there is the kernel's own, information.
    assert seen["test_nothing_is_mapped_below_the_kernel_base"] == "PASSED"
    assert "mb64.elf is not linked in the higher half" in result.stdout, result.stdout
    assert "note: 0x00000000-0x00200000 is identity-mapped, supervisor-only" in result.stdout, result.stdout


def test_kgen_run_calls_a_clean_halt_halted(kernels):
    result = run_kgen("run", "--kernel", str(kernels["hhbb"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hhbb: ready" in result.stdout
    halted = "kgen: halted: the kernel halted with interrupts off, paging on, at EIP=0xc01"
    assert halted in result.stderr, result.stderr
    ready = run_kgen("run", "--kernel", str(kernels["tick-wait"]), "--ready", "hhbb: ready")
    assert ready.returncode == 0 and "kgen: ready: the kernel printed 'hhbb: ready'" in ready.stderr, ready.stderr


def test_kgen_run_reports_start_on_their_own_line_and_show_com1_once(kernels):
    # The kernel prints "p" with no newline, then halts with paging off (a clean stop for kgen run) ...
    halted = run_kgen("run", "--kernel", str(kernels["paging-off"]))
    assert halted.returncode == 0 and halted.stdout == "p\n", halted.stdout
    assert "paging off" in halted.stderr, halted.stderr
    # ... and one that never prints its ready text is a hang, its COM1 tail shown once.
    hung = run_kgen("run", "--kernel", str(kernels["busy"]), "--ready", "never printed", "--timeout", "2")
    assert hung.returncode == 4, hung.stdout + hung.stderr
    assert hung.stdout.endswith("hhbb: ready\n")
    assert hung.stderr.count("--- COM1 (tail) ---") == 1, hung.stderr
    assert hung.stderr.strip().splitlines()[-1].startswith("kgen: error: hang: "), hung.stderr


def test_a_diagnosis_shows_com1_once(kernels):
    from kgen.errors import MachineError
    from kgen.guest.diagnose import explain
    from kgen.guest.elfinfo import ElfInfo
    from kgen.machine import Machine
    with Machine(kernel=kernels["busy"]) as machine:
        machine.wait_for("hhbb: ready", 60)
        with pytest.raises(MachineError) as seen:
            machine.wait_for("never printed", 0.5)       # a machine step's error: its details hold COM1 too
        failure = explain(machine, ElfInfo.load(kernels["busy"]), seen.value)
    assert failure.details.count("--- COM1 (tail) ---") == 1, failure.details
    assert "hhbb: ready" in failure.details and "command line: " in failure.details


def test_boot_options_reach_the_machine(kernels, tmp_path):
    module = tmp_path / "mod.bin"
    module.write_bytes(b"module")
    shown = run_kgen("run", "--kernel", str(kernels["boot-info"]), "--append", "root=/dev/x quiet",
                     "--module", f"{module},init=1,two", "--module", str(module))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    # QEMU puts the kernel's path in front of its command line.
    assert shown.stdout.splitlines()[:3] == [f"{kernels['boot-info'].resolve()} root=/dev/x quiet",
                                             f"{module} init=1,two", str(module)], shown.stdout
    # QEMU refuses an unknown option in one line: proof the --qemu-arg reached it.
    result = run_kgen("test", "--kernel", str(kernels["hhbb"]), "-j", "1", "--qemu-arg", "-no-such-option 1")
    assert result.returncode == 2 and "-no-such-option" in result.stderr, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    ok = run_kgen("test", "--kernel", str(kernels["hhbb"]), "-j", "1", "--append", "a=b", "--module", f"{module},x=1",
                  "--qemu-arg", "-smp 2", "-k", "paging_and_write")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = run_kgen("test", "--kernel", str(kernels["hhbb"]), "--module", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    built = run_kgen("test", "--memory", "256")
    assert built.returncode == 2 and "--memory is for a kernel given with --kernel" in built.stderr


def test_memory_from_the_option_or_the_config(kernels, tmp_path):
    kernel = str(kernels["needs-256"])
    # A kernel that cannot boot is reported once, before the suite: its diagnosis, then one line.
    short = run_kgen("test", "--kernel", kernel, "-j", "1")
    assert short.returncode == 1, short.stdout + short.stderr
    last = short.stderr.strip().splitlines()[-1]
    assert last.startswith("kgen: error: --kernel needs-256.elf did not boot to a state the checks can look at: "
                           "triple fault"), short.stderr
    assert short.stderr.count("--- COM1 (tail) ---") == 1 and "passed" not in short.stdout, short.stdout
    assert "During handling" not in short.stderr and "direct cause" not in short.stderr, short.stderr
    given = run_kgen("test", "--kernel", kernel, "-j", "1", "--memory", "256", "-k", "paging_and_write")
    assert given.returncode == 0, given.stdout + given.stderr
    config = tmp_path / "kgen.toml"
    config.write_text("[machine]\nmemory_mib = 256\n")
    configured = run_kgen("test", "--kernel", kernel, "-j", "1", "--config", str(config), "-k", "paging_and_write")
    assert configured.returncode == 0, configured.stdout + configured.stderr


def test_accel_kvm_that_cannot_run_the_kernel_is_one_line_and_status_3(kernels):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm here")
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.kvmprobe import probe_kvm
    usable, _ = probe_kvm(KernelUnderTest.foreign(kernels["hhbb"]))
    if usable:
        pytest.skip("this host's KVM runs 32-bit paging: nothing to refuse")
    result = run_kgen("test", "--kernel", str(kernels["hhbb"]), "-j", "1", "--accel", "kvm")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.startswith("kgen: error: --accel kvm: KVM cannot run hhbb.elf on this host")
    assert len(result.stderr.strip().splitlines()) == 1 and "passed" not in result.stdout


def test_a_size_zero_symbol_names_no_address_outside_its_section(kernels):
    from kgen.guest.elfinfo import ElfInfo
    elf = ElfInfo.load(kernels["hhbb"])
    mark = elf.symbols["__text_phys_end"]
    assert mark.value < KBASE <= elf.symbols["higher_half"].value
    assert "__text_phys_end" not in elf.symbolize(mark.value + 0x10)
    assert "__text_phys_end" not in elf.symbolize(elf.symbols["ready"].value)


def test_a_disk_image_stays_the_users_under_parallel_machines_and_snapshots(kernels, tmp_path):
    """`--qemu-arg '-drive file=fs.img,...'` (xv6 boots this way) under kgen test: every disk is opened snapshot=on,
    so two machines hold the image at once (QEMU refuses a second writer otherwise), the booted machine can be
    saved for restores (a raw image cannot hold a snapshot) and what the guest writes never reaches the file."""
    import warnings
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    from kgen.machine.snapshot import SnapshotWarning
    disk = tmp_path / "fs.img"
    original = bytes(range(256)) * 4096
    disk.write_bytes(original)
    kernel = KernelUnderTest.foreign(kernels["hhbb"], qemu_args=(
        "-drive", f"file={disk},index=1,media=disk,format=raw", "-hdc", str(disk)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SnapshotWarning)
        with boot(kernel, cold=False) as saved, boot(kernel, cold=True) as other:
            for live in (saved, other):
                for device in ("ide0-hd1", "ide1-hd0"):
                    live.machine.hmp(f'qemu-io {device} "write -P 0x5a 0 4096"')
                # qemu-io reports on QEMU's stdout, which the machine logs.
                log = (live.machine.tmpdir / "qemu.log").read_text()
                assert log.count("wrote 4096/4096 bytes") == 2, log
    assert disk.read_bytes() == original
