"""Config and layout rules: each rule broken once, each error one line naming the key, the value and the rule."""
import subprocess
import sys

import pytest

from kgen import hw
from kgen.config import Config, from_mapping, load
from kgen.errors import ConfigError
from kgen.layout import compute


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
     "machine.memory_mib", "beyond guest RAM"),
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
    ({"kernel": {"stack_size": True}}, "kernel.stack_size = True: must be an integer"),
    ({"kernel": {"stack_size": -4096}}, "must not be negative"),
    ({"arch": "arm"}, "arch = 'arm': must be one of i386"),
    ({"variant": {"fault_at_boot": 1}}, "variant.fault_at_boot = 1: must be true or false"),
])
def test_bad_documents(doc, fragment):
    with pytest.raises(ConfigError) as info:
        from_mapping(doc, where="kgen.toml")
    assert fragment in str(info.value) and str(info.value).startswith("kgen.toml: ")


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
])
def test_cli_bad_config_is_one_line_exit_2(tmp_path, text, fragment):
    path = tmp_path / "kgen.toml"
    path.write_text(text)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "kgen.cli", "build", "--config", str(path), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr
    assert not (out / "kernel.elf").exists()
