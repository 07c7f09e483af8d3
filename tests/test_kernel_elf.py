"""The default kernel's ELF read back with pyelftools and binutils: what GRUB, QEMU and gdb rely on."""
import shutil
import subprocess

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from kgen import hw
from kgen.elfinfo import ElfInfo


@pytest.fixture(scope="module")
def elf(default_build):
    with open(default_build.elf, "rb") as f:
        yield ELFFile(f), default_build


def loads(elffile):
    return [s for s in elffile.iter_segments() if s["p_type"] == "PT_LOAD"]


def test_entry_is_the_virtual_start_label(elf):
    elffile, out = elf
    assert elffile.header.e_entry == out.kernel.image.symbol("_start").value
    assert elffile.header.e_entry >= out.kernel.layout.kernel_virtual_start
    assert elffile.elfclass == 32 and elffile.header.e_machine == "EM_386"


def test_segments_are_higher_half_and_loaded_at_the_load_address(elf):
    elffile, out = elf
    layout = out.kernel.layout
    segments = loads(elffile)
    assert [s["p_flags"] for s in segments] == [P_FLAGS.PF_R | P_FLAGS.PF_X, P_FLAGS.PF_R,
                                                P_FLAGS.PF_R | P_FLAGS.PF_W]
    assert segments[0]["p_vaddr"] == layout.kernel_virtual_start
    assert segments[0]["p_paddr"] == layout.kernel_load_address
    for seg in segments:
        assert seg["p_vaddr"] - seg["p_paddr"] == layout.kernel_virtual_base
        assert seg["p_vaddr"] % hw.PAGE_SIZE == 0 and seg["p_offset"] % hw.PAGE_SIZE == 0
        assert seg["p_vaddr"] + seg["p_memsz"] <= layout.kernel_window.end


def test_sections_are_named_and_typed(elf):
    elffile, _ = elf
    by_name = {s.name: s for s in elffile.iter_sections()}
    assert by_name[".text"]["sh_type"] == "SHT_PROGBITS" and by_name[".text"]["sh_flags"] & 0x4
    assert by_name[".bss"]["sh_type"] == "SHT_NOBITS" and by_name[".bss"]["sh_flags"] & 0x1
    assert not by_name[".rodata"]["sh_flags"] & 0x1
    assert {".multiboot", ".text", ".rodata", ".data", ".bss", ".symtab", ".strtab"} <= set(by_name)


def test_every_global_label_is_in_the_symtab(elf):
    elffile, out = elf
    symtab = {s.name: s["st_value"] for s in elffile.get_section_by_name(".symtab").iter_symbols() if s.name}
    for sym in out.kernel.image.symbols:
        assert symtab.get(sym.name) == sym.value, sym.name
    for label in ("_start", "kmain", "boot_top_table", "exception_common", "serial_puts"):
        assert label in symtab


def test_multiboot_header_in_the_first_8k(elf):
    _, out = elf
    offset = ElfInfo.load(out.elf).multiboot_header_offset()
    assert offset is not None and offset + 12 <= hw.MULTIBOOT_HEADER_SEARCH_LIMIT
    header = out.elf.read_bytes()[offset:offset + 12]
    magic, flags, checksum = (int.from_bytes(header[i:i + 4], "little") for i in (0, 4, 8))
    assert flags & hw.MULTIBOOT_FLAG_PAGE_ALIGN and flags & hw.MULTIBOOT_FLAG_MEMORY_INFO
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0


@pytest.mark.skipif(shutil.which("grub-file") is None, reason="grub-file not installed (grub-common)")
def test_grub_file_accepts_it(elf):
    _, out = elf
    assert subprocess.run(["grub-file", "--is-x86-multiboot", str(out.elf)]).returncode == 0


def test_readelf_has_no_warnings(elf):
    _, out = elf
    result = subprocess.run(["readelf", "-lSs", "-W", str(out.elf)], capture_output=True, text=True)
    assert result.returncode == 0
    assert "warning" not in (result.stdout + result.stderr).lower()


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb not installed")
def test_gdb_names_the_entry(elf):
    _, out = elf
    entry = out.kernel.image.entry
    result = subprocess.run(["gdb", "-batch", "-nx", "-ex", f"info symbol {entry:#x}", str(out.elf)],
                            capture_output=True, text=True)
    assert result.stdout.split()[0] == "_start", result.stdout + result.stderr
