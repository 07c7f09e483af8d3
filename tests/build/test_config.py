"""Config and layout rules: each rule broken once, each error one line naming the key, the value and the rule."""
import pytest

from conftest import run_kgen
from kgen.arch import hw
from kgen.build.config import Config, from_mapping, load
from kgen.errors import ConfigError
from kgen.build.layout import compute


def error_of(**values) -> str:
    with pytest.raises(ConfigError) as info:
        compute(Config(**values))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_give_the_documented_layout():
    layout = compute(Config())
    assert layout.kernel_virtual_start == Config().kernel_virtual_base + Config().kernel_load_address
    assert layout.recursive_pd == (layout.recursive_slot << 22) | (layout.recursive_slot << 12)
    assert layout.tempmap_pde_index == Config().tempmap_base >> 22


@pytest.mark.parametrize("values, key, rule", [
    (dict(kernel_virtual_base=0xC0001000), "kernel.virtual_base", "aligned to 4 MiB"),
    (dict(kernel_virtual_base=0), "kernel.virtual_base", "above 0"),
    (dict(kernel_virtual_base=0x3FC00000), "kernel.virtual_base", "must be at least 0x40000000: the user half"),
    (dict(kernel_virtual_base=0xFFC00000), "kernel.virtual_base", "beyond 4 GiB"),
    (dict(kernel_load_address=0x100800), "kernel.load_address", "aligned to a page"),
    (dict(kernel_load_address=0x80000), "kernel.load_address", "at or above 0x100000"),
    (dict(kernel_load_address=0xBFF00000), "kernel.load_address", "must end below kernel.virtual_base"),
    (dict(kernel_max_size=0x1234), "kernel.max_size", "aligned to a page"),
    (dict(kernel_max_size=0), "kernel.max_size", "at least one page"),
    (dict(kernel_stack_size=0x800), "kernel.stack_size", "aligned to a page"),
    (dict(kernel_stack_size=0), "kernel.stack_size", "at least one page"),
    (dict(kernel_stack_size=0x400000), "kernel.stack_size", "smaller than kernel.max_size"),
    (dict(paging_recursive_slot=1024), "paging.recursive_slot", "0..1023"),
    (dict(paging_recursive_slot=768), "paging.recursive_slot", "overlaps kernel image window"),
    (dict(paging_recursive_slot=0), "paging.recursive_slot", "kernel half"),
    (dict(tempmap_base=0xFF800800), "tempmap.base", "aligned to a page"),
    (dict(tempmap_base=0xFFC00000), "tempmap.base", "overlaps recursive window"),
    (dict(tempmap_base=0xC0200000), "tempmap.base", "overlaps kernel image window"),
    (dict(tempmap_base=0x00400000), "tempmap.base", "kernel half"),
    (dict(tempmap_base=0xFFBFF000, tempmap_slots=2), "tempmap.base", "within one 4 MiB page table"),
    (dict(tempmap_slots=0), "tempmap.slots", "1..1024"),
    (dict(tempmap_slots=1025), "tempmap.slots", "1..1024"),
    (dict(machine_memory_mib=8), "machine.memory_mib", "16..3072"),
    (dict(machine_memory_mib=4096), "machine.memory_mib", "16..3072"),
    (dict(kernel_load_address=0x1000000, kernel_max_size=0x400000, machine_memory_mib=16),
     "machine.memory_mib", "guest RAM must reach 0x1800000 (24 MiB)"),
])
def test_each_rule(values, key, rule):
    message = error_of(**values)
    assert key in message and rule in message
    shown = values[next(f for f in values if Config.key_of(f) == key)]
    assert (f"{shown:#x}" in message) or (f"= {shown}:" in message)


@pytest.mark.parametrize("doc, fragment", [
    ({"kernel": {"virtual_bass": 1}}, "unknown key kernel.virtual_bass"),
    ({"colour": "red"}, "unknown key colour"),
    ({"kernal": {"x": 1}}, "unknown table [kernal]"),
    ({"kernel": {"virtual_base": "0xC0000000"}}, "kernel.virtual_base = '0xC0000000': must be an integer"),
    ({"kernel": {"stack_size": True}}, "kernel.stack_size = true: must be an integer"),
    ({"kernel": {"stack_size": -4096}}, "must not be negative"),
    ({"arch": "arm"}, "arch = 'arm': must be one of i386"),
    ({"variant": {"fault_at_boot": 1}}, "variant.fault_at_boot = 1: must be true or false"),
])
def test_bad_documents(doc, fragment):
    with pytest.raises(ConfigError) as info:
        from_mapping(doc, where="kgen.toml")
    assert fragment in str(info.value) and str(info.value).startswith("kgen.toml: ")


@pytest.mark.parametrize("arch, window", [("i386", (0xFFBE8000, 0xFFC00000)),
                                          ("x86_64", (0xFFFFFE8000180000, 0xFFFFFE8000200000))])
def test_the_bitmap_window_ends_the_temp_map_page_table_and_is_refused_where_it_overlaps(arch, window):
    """pmm.kind = "bitmap": a region of the layout (a bit per frame of the most RAM the architecture takes), at the
    end of the temp-map window's page table; a temp-map window reaching it is refused, naming the bitmap's key."""
    config = Config.for_arch(arch, pmm_kind="bitmap")
    layout = compute(config)
    assert (layout.pmm_bitmap_window.start, layout.pmm_bitmap_window.end) == window
    assert layout.pmm_bitmap_window in layout.regions() and layout.pmm_unit == "pmm_bitmap"
    assert layout.asm_constants()["PMM_BITMAP_BASE"] == window[0]
    assert compute(Config.for_arch(arch)).pmm_unit == "pmm"
    with pytest.raises(ConfigError, match=r"pmm.kind = 'bitmap': pmm bitmap window .* overlaps temp-map window"):
        compute(config.with_values(tempmap_slots=layout.arch.entries_per_table))


def test_file_values_reach_the_layout(tmp_path):
    path = tmp_path / "kgen.toml"
    path.write_text("[paging]\nrecursive_slot = 1000\n[tempmap]\nslots = 4\n")
    layout = compute(load(path))
    assert layout.recursive_slot == 1000 and layout.tempmap_slots == 4
    assert layout.asm_constants()["RECURSIVE_PD"] == (1000 << 22) | (1000 << 12)


def test_no_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(None) == Config()


def test_asm_constants_take_hardware_facts_from_hw():
    consts = compute(Config()).asm_constants()
    assert consts["PTE_RW"] == hw.PTE_RW and consts["CR0_WP"] == hw.CR0_WP
    checksum = (consts["MULTIBOOT_HEADER_MAGIC"] + consts["MULTIBOOT_HEADER_FLAGS"]
                + consts["MULTIBOOT_HEADER_CHECKSUM"]) & 0xFFFFFFFF
    assert checksum == 0


@pytest.mark.parametrize("text, fragment", [
    ("[kernel]\nvirtual_base = 0xC0001000\n", "kernel.virtual_base = 0xc0001000: must be aligned to 4 MiB"),
    ("[paging]\nrecursive_slot = 768\n", "paging.recursive_slot = 768"),
    ("[kernel\n", "not valid TOML"),
    ('[pmm]\nkind = "buddy"\n', "pmm.kind = 'buddy': must be one of 'stack', 'bitmap'"),
    ("[variant]\npmm_bitmap_free_keeps_bit = true\n", "variant.pmm_bitmap_free_keeps_bit = true: seeds its bug in "
     "the bitmap allocator: set pmm.kind = 'bitmap' too"),
])
def test_cli_bad_config_is_one_line_exit_2(tmp_path, text, fragment):
    path = tmp_path / "kgen.toml"
    path.write_text(text)
    out = tmp_path / "out"
    result = run_kgen("build", "--config", path, "--out", out)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr
    assert not (out / "kernel.elf").exists()


# ---- x86_64 ---------------------------------------------------------------------------------------------------------
def error_of_x86_64(**values) -> str:
    with pytest.raises(ConfigError) as info:
        compute(Config.for_arch("x86_64", **values))
    message = str(info.value)
    assert "\n" not in message
    return message


def sign_extend_48(vaddr: int) -> int:
    return vaddr | (0xFFFF << 48) if vaddr & (1 << 47) else vaddr


def recursive_address(slot: int, times: int) -> int:
    """The address whose first `times` of the four 9-bit indices (PML4 first) are `slot` and the rest 0."""
    return sign_extend_48(sum(slot << (39 - 9 * i) for i in range(times)))


def test_x86_64_defaults_give_the_documented_layout():
    layout = compute(Config.for_arch("x86_64"))
    assert layout.arch.name == "x86_64" and layout.arch.levels == 4
    assert layout.kernel_virtual_base == 0xFFFFFFFF80000000 and layout.kernel_load_address == 0x100000
    assert layout.kernel_virtual_start == 0xFFFFFFFF80000000 + 0x100000
    assert layout.recursive_slot == 510
    # PML4[510] -> PML4: the slot's window, and the PML4 itself where all four indices are the slot.
    assert layout.recursive_base == recursive_address(510, 1) == 0xFFFFFF0000000000
    assert layout.recursive_top == recursive_address(510, 4) == 0xFFFFFF7FBFDFE000
    assert layout.level_window(1) == recursive_address(510, 3) == 0xFFFFFF7FBFC00000
    assert layout.level_window(2) == recursive_address(510, 2) == 0xFFFFFF7F80000000
    assert layout.recursive_pd == layout.recursive_top
    consts = layout.asm_constants()
    assert consts["RECURSIVE_TOP"] == 0xFFFFFF7FBFDFE000 and consts["WORD_SIZE"] == 8
    assert consts["MULTIBOOT_HEADER_FLAGS"] & hw.MULTIBOOT_FLAG_ADDRESSES
    # The temp-map window's page table, reached through the slot: the PTE of tempmap_base's 2 MiB-aligned address.
    table_vaddr = layout.tempmap_base & ~((1 << 21) - 1)
    assert layout.tempmap_pt == recursive_address(510, 1) + ((table_vaddr & ((1 << 48) - 1)) >> 12) * 8


def test_x86_64_from_a_file_and_from_the_command_line(tmp_path):
    """`arch = "x86_64"` in the file and `--arch x86_64` over an i386-less file give the same defaults; keys the
    file sets stay as set."""
    path = tmp_path / "kgen.toml"
    path.write_text('arch = "x86_64"\n[paging]\nrecursive_slot = 509\n[tempmap]\nbase = 0xFFFFFE0080000000\n')
    from_file = compute(load(path))
    other = tmp_path / "other.toml"
    other.write_text("[paging]\nrecursive_slot = 509\n[tempmap]\nbase = 0xFFFFFE0080000000\n")
    from_flag = compute(load(other, arch="x86_64"))
    assert from_file == from_flag
    assert from_file.recursive_slot == 509 and from_file.tempmap_base == 0xFFFFFE0080000000
    assert from_file.kernel_virtual_base == 0xFFFFFFFF80000000 and from_file.vmm_base == 0xFFFFFE0000000000
    assert from_file.recursive_top == recursive_address(509, 4)


@pytest.mark.parametrize("values, key, rule", [
    (dict(tempmap_base=0x0000800000000000), "tempmap.base", "is not canonical"),
    (dict(vmm_base=0xFFFF700000000000), "vmm.base", "is not canonical"),
    (dict(kernel_virtual_base=0x8000000000000000), "kernel.virtual_base", "is not canonical"),
    (dict(kernel_virtual_base=0x0000800000000000), "kernel.virtual_base", "is not canonical"),
    (dict(kernel_virtual_base=1 << 64), "kernel.virtual_base", "must be a x86_64 virtual address"),
    (dict(kernel_virtual_base=0xFFFFFFFF00000000), "kernel.virtual_base", "must lie in the top 2 GiB"),
    (dict(kernel_virtual_base=0xFFFF800000000000), "kernel.virtual_base", "must lie in the top 2 GiB"),
    (dict(kernel_virtual_base=0xFFFFFFFF7FEFF000), "kernel.virtual_base", "must lie in the top 2 GiB"),  # a page under
    (dict(kernel_virtual_base=0xFFFFFFFFFFC00000), "kernel.virtual_base", "must lie in the top 2 GiB"),
    (dict(kernel_virtual_base=0xFFFFFFFF80000800), "kernel.virtual_base", "aligned to a page"),
    (dict(paging_recursive_slot=512), "paging.recursive_slot", "PML4 index in 0..511"),
    (dict(paging_recursive_slot=0), "paging.recursive_slot", "kernel half"),
    (dict(paging_recursive_slot=511), "paging.recursive_slot", "overlaps kernel image window"),
    (dict(tempmap_base=0xFFFFFE80001FF000, tempmap_slots=2), "tempmap.base", "within one 2 MiB page table"),
    (dict(tempmap_slots=513), "tempmap.slots", "1..512"),
    (dict(tempmap_base=0x1000), "tempmap.base", "kernel half"),
    (dict(vmm_size=1 << 56), "vmm.size", "must end within the canonical half"),
    # The recursive window over the vmm window, moved either way: the key the user set is named, and the other's.
    (dict(paging_recursive_slot=508), "paging.recursive_slot", "overlaps vmm range window"),
    (dict(vmm_base=0xFFFFFF0000000000), "vmm.base", "overlaps recursive window"),
    (dict(vmm_base=0xFFFFFF7FFFF00000), "vmm.base", "overlaps recursive window"),
])
def test_each_x86_64_rule(values, key, rule):
    message = error_of_x86_64(**values)
    assert message.startswith("defaults: ") and f" {key} = " in message and rule in message, message
    if rule.startswith("overlaps recursive"):
        assert "(set by paging.recursive_slot)" in message
    if rule.startswith("overlaps vmm"):
        assert "(set by vmm.base, vmm.size)" in message
    shown = values.get(next((f for f in values if Config.key_of(f) == key), None))
    if shown is not None:
        assert (f"{shown:#x}" in message) or (f"= {shown}:" in message)


def test_x86_64_windows_just_inside_the_rules_are_accepted():
    """The boundaries of the rules above, on the accepted side."""
    compute(Config.for_arch("x86_64", kernel_virtual_base=0xFFFFFFFF80000000 - 0x100000))  # image starts at -2 GiB
    compute(Config.for_arch("x86_64", tempmap_base=0xFFFFFE80001FF000, tempmap_slots=1))
    compute(Config.for_arch("x86_64", tempmap_slots=512))
    compute(Config.for_arch("x86_64", vmm_base=0xFFFFFF8000000000 - 0x10000000 - 0x8000000000))
    compute(Config.for_arch("x86_64", paging_recursive_slot=256, vmm_base=0xFFFFFE0000000000))


def test_cli_build_x86_64_writes_an_elf64(tmp_path):
    out = tmp_path / "out"
    result = run_kgen("build", "--arch", "x86_64", "--no-iso", "--out", out)
    assert result.returncode == 0, result.stderr
    head = (out / "kernel.elf").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2           # EI_CLASS: ELFCLASS64
    assert int.from_bytes(head[18:20], "little") == 62      # e_machine: EM_X86_64
    assert not (out / "kernel.iso").exists()


@pytest.mark.parametrize("text, fragment", [
    ("[paging]\nrecursive_slot = 512\n", "paging.recursive_slot = 512: must be a PML4 index in 0..511"),
    ("[tempmap]\nbase = 0x0000800000000000\n", "tempmap.base = 0x800000000000: is not canonical"),
    ("[kernel]\nvirtual_base = 0xFFFFFFFF00000000\n", "kernel.virtual_base = 0xffffffff00000000: the image window"),
])
def test_cli_bad_x86_64_config_is_one_line_exit_2(tmp_path, text, fragment):
    path = tmp_path / "kgen.toml"
    path.write_text(text)
    out = tmp_path / "out"
    result = run_kgen("build", "--arch", "x86_64", "--config", path, "--out", out)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"kgen: error: {path}: ")
    assert not (out / "kernel.elf").exists()


@pytest.mark.parametrize("arch, largest", [("i386", 3072), ("x86_64", 16384)])
def test_guest_ram_limit_follows_the_architecture(arch, largest):
    """i386 stays below QEMU pc's PCI hole; x86_64 may have RAM above 4 GiB, which its PMM uses."""
    assert compute(Config.for_arch(arch, machine_memory_mib=largest)).memory_mib == largest
    with pytest.raises(ConfigError) as err:
        compute(Config.for_arch(arch, machine_memory_mib=largest + 1))
    assert f"machine.memory_mib = {largest + 1}: must be in 16..{largest} (" in str(err.value)
    assert "\n" not in str(err.value)


# ---- issue 15: configs the rules accepted whose kernel then failed -------------------------------------------------
# Each is now either refused, in one line naming the key and the rule, or built, booted and used.
@pytest.mark.parametrize("arch, values, key, rule", [
    # The heap reserves its slab window from the vmm window at boot ("heap: no room in the vmm window" panic).
    ("i386", dict(vmm_size=0x1000), "vmm.size", "must be at least 0xc00000: the heap reserves 0x400000"),
    ("i386", dict(vmm_size=0x3FF000), "vmm.size", "must be at least 0xc00000"),
    ("x86_64", dict(vmm_size=0x400000), "vmm.size", "must be at least 0x800000"),
    # A vmm window ending at the top of the address space: its end, VMM_END, is no word (keystone refused it).
    ("i386", dict(paging_recursive_slot=1000, tempmap_base=0xF9800000, vmm_base=0xFC000000, vmm_size=0x4000000),
     "vmm.size", "[0xfc000000, 0x100000000) must end below 4 GiB"),
    ("x86_64", dict(vmm_base=0xFFFFFFFFF0000000, vmm_size=0x10000000, kernel_virtual_base=0xFFFFFFFF70000000),
     "vmm.size", "below 2**64"),
    # RAM that ends where the image window ends: no frame above it for tables, heap or the suite's round trips.
    ("i386", dict(machine_memory_mib=16, kernel_load_address=0xC00000), "machine.memory_mib",
     "guest RAM must reach 0x1400000 (20 MiB): the image window [0xc00000, 0x1000000)"),
    ("x86_64", dict(machine_memory_mib=16, kernel_load_address=0xA00000), "machine.memory_mib",
     "page tables made at boot and 4 MiB above it"),
])
def test_issue_15_configs_that_broke_the_kernel_are_refused(arch, values, key, rule):
    message = error_of_arch(arch, **values)
    assert f": {key} = " in message and rule in message, message


def error_of_arch(arch: str, **values) -> str:
    with pytest.raises(ConfigError) as info:
        compute(Config.for_arch(arch, **values))
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize("arch, values", [
    ("i386", dict(tempmap_base=0xC0000000)),              # in the image's page table, below the image
    ("i386", dict(tempmap_base=0xC0500000)),              # in the image window's second page table, after it
    ("i386", dict(tempmap_base=0xFF810000)),              # not 4 MiB aligned
    ("i386", dict(tempmap_base=0xFFBFF000, tempmap_slots=1)),   # the last PTE of its table
    ("x86_64", dict(tempmap_base=0xFFFFFFFF80000000)),    # in the image's page table
    ("x86_64", dict(tempmap_base=0xFFFFFE8000110000, tempmap_slots=200)),   # not 2 MiB aligned
], ids=lambda v: f"{v:#x}" if isinstance(v, int) else None)
def test_issue_15_temp_map_windows_the_rules_accept_work(tmp_path_factory, arch, values):
    """The kernel boots and every slot maps the frame it was given: the slot's PTE is found from tempmap.base, not
    from the start of its table, and a window inside the image's table shares it instead of replacing it."""
    from conftest import open_session, shared_build
    config = Config.for_arch(arch, **values)
    out = shared_build(tmp_path_factory, config)
    layout = out.kernel.layout
    with open_session(out) as s:
        count = min(layout.tempmap_slots, 16)
        # Frames above the image window, where the RAM rule guarantees room.
        frames = [layout.kernel_load_address + layout.kernel_max_size + i * hw.PAGE_SIZE for i in range(count)]
        for i, frame in enumerate(frames):
            s.machine.write_phys(frame + 0x124, (0x7E570000 + i).to_bytes(4, "little"))
        slots = [s.call("temp_map", frame) for frame in frames]
        assert slots == [layout.tempmap_slot_address(i) for i in range(count)]
        seen = [s.call("peek32", slot + 0x124) for slot in slots]
        for slot in reversed(slots):
            s.call("temp_unmap", slot)
        assert seen == [0x7E570000 + i for i in range(count)]
        assert s.call("pmm_alloc") != 0          # and the kernel is still whole after using every slot


# ---- issue 15: every refusal names the key whose value is wrong ------------------------------------------------
@pytest.mark.parametrize("arch, values, key", [
    ("i386", dict(kernel_max_size=2 ** 64), "kernel.max_size"),
    ("x86_64", dict(kernel_max_size=2 ** 64), "kernel.max_size"),
    ("i386", dict(vmm_size=0x100000000), "vmm.size"),
    ("i386", dict(vmm_base=0xF8000000), "vmm.base"),                       # the default size ends it at 4 GiB
    ("x86_64", dict(vmm_size=1 << 64), "vmm.size"),
    ("i386", dict(kernel_max_size=0x2000), "kernel.max_size"),             # smaller than the default stack
    ("i386", dict(kernel_load_address=0x10000000), "kernel.load_address"),  # image over the vmm window
    ("i386", dict(kernel_virtual_base=0xD0000000), "kernel.virtual_base"),  # image over the vmm window
    ("i386", dict(kernel_virtual_base=0xE0000000), "kernel.virtual_base"),  # vmm window below the kernel half
    ("i386", dict(kernel_load_address=0x7C00000), "kernel.load_address"),  # RAM: the default 128 MiB is short
    ("i386", dict(kernel_max_size=0x8000000), "kernel.max_size"),          # the same, by size
    ("x86_64", dict(kernel_max_size=0x7FF00000), "kernel.max_size"),
    ("x86_64", dict(kernel_virtual_base=0xFFFFFFFFFFC00000), "kernel.virtual_base"),
    ("x86_64", dict(kernel_max_size=0x7FF00000, kernel_virtual_base=0xFFFFFFFF80000000), "kernel.max_size"),
    ("i386", dict(tempmap_slots=1024, tempmap_base=0xFF801000), "tempmap.base"),
    ("i386", dict(tempmap_slots=1024), None),                              # accepted: the default base is aligned
    ("i386", dict(paging_recursive_slot=1021), "paging.recursive_slot"),   # the default foreign slot
    ("i386", dict(paging_foreign_slot=1023), "paging.foreign_slot"),       # the default recursive slot
    ("x86_64", dict(paging_recursive_slot=509), "paging.recursive_slot"),  # over the default temp-map window
])
def test_a_refusal_names_the_key_the_user_set(arch, values, key):
    """One key set (or two), the rest defaults: the message names that key, as `<key> = <its value>`."""
    config = Config.for_arch(arch, **values)
    if key is None:
        compute(config)
        return
    message = error_of_arch(arch, **values)
    field = next(f for f in values if Config.key_of(f) == key)
    shown = f"{values[field]:#x}" if key not in ("paging.recursive_slot", "paging.foreign_slot") else values[field]
    assert f"defaults: {key} = {shown}: " in message, message


# ---- issue 15: config files that are not what they should be: one line, exit 2 -----------------------------------
@pytest.mark.parametrize("content, fragment", [
    (b'arch = "i386"\n# caf\xe9\n', "line 2: byte 0xe9 is not UTF-8"),
    (b"[kernel]\nmax_size = " + b"1" * 5000 + b"\n", "kernel.max_size = 11111111…11111111 (5000 digits)"),
    (b"[kernel]\nmax_size = 0x" + b"f" * 5000 + b"\n", "kernel.max_size = 0xffffffff…ffffffff (5000 hex digits)"),
    (b'[kernel]\n"max\\nsize" = 1\n', "unknown key kernel.'max\\nsize'"),
    (b'["ker\\nnel"]\nx = 1\n', "unknown table ['ker\\nnel']"),
    (b'arch = "' + b"x" * 5000 + b'"\n', "(5000 characters): must be one of"),
    (b'arch = "a\\u2028b"\n', "arch = 'a\\u2028b': must be one of"),
    (b"kernel = 5\n", "kernel = 5: must be a table"),
    (b"[kernel]\nmax_size = [" + b"[" * 2000 + b"]" * 2000 + b"]\n", "nested too deeply"),
])
def test_unreadable_or_odd_config_files_get_one_line(tmp_path, content, fragment):
    path = tmp_path / "kgen.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        compute(load(path))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and len(message) < 700, message
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("content, fragment", [
    (b"[vmm]\nsize = 0x1000\n", "vmm.size = 0x1000: must be at least"),
    (b"\xff\xfe[\x00k\x00", "is not UTF-8"),
    (b"[kernel]\nload_address = " + b"9" * 4400 + b"\n", "kernel.load_address = 99999999"),
])
def test_cli_odd_config_is_one_line_exit_2(tmp_path, content, fragment):
    path = tmp_path / "kgen.toml"
    path.write_bytes(content)
    out = tmp_path / "out"
    result = run_kgen("build", "--config", path, "--out", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (out / "kernel.elf").exists()


def test_long_values_are_abbreviated_not_echoed():
    """A value is shown by its first and last digits and how many it has."""
    huge = int("7" + "0" * 300 + "1", 16)
    message = error_of_arch("i386", kernel_load_address=huge)
    assert "kernel.load_address = 0x70000000…00000001 (302 hex digits): " in message, message
    assert len(message) < 400


def test_a_value_set_on_the_command_line_is_the_one_named():
    """`kgen run --memory` sets machine.memory_mib over a file that moved the image: a shortfall names the memory."""
    config = Config.for_arch("i386", kernel_load_address=0x900000)
    compute(config)
    with pytest.raises(ConfigError) as info:
        compute(config.with_values(machine_memory_mib=16, source="kgen.toml with --memory"))
    assert str(info.value).startswith("kgen.toml with --memory: machine.memory_mib = 16: guest RAM must reach")
