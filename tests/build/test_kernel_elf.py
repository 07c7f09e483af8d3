"""Every architecture's default kernel ELF read back with pyelftools and binutils: what GRUB, QEMU and gdb rely on."""
import re
import shutil
import subprocess

import pytest
from elftools.elf.constants import P_FLAGS, SH_FLAGS
from elftools.elf.elffile import ELFFile

from kgen.arch import hw
from kgen.arch import ARCHES
from kgen.guest.elfinfo import ElfInfo

from conftest import ARCH_BUILDS

# What each architecture's ELF must say, written out here rather than read from kgen: (ELF class, e_machine as
# pyelftools names it, readelf's Class and Machine lines).
EXPECTED = {
    "i386": (32, "EM_386", "ELF32", "Intel 80386"),
    "x86_64": (64, "EM_X86_64", "ELF64", "Advanced Micro Devices X86-64"),
}
TOP_2_GIB = 2**64 - 2**31


@pytest.fixture(scope="module", params=tuple(ARCH_BUILDS))
def elf(request):
    out = request.getfixturevalue(ARCH_BUILDS[request.param])
    with open(out.elf, "rb") as f:
        yield ELFFile(f), out


def loads(elffile):
    return [s for s in elffile.iter_segments() if s["p_type"] == "PT_LOAD"]


def symtab(elffile) -> dict[str, int]:
    return {s.name: s["st_value"] for s in elffile.get_section_by_name(".symtab").iter_symbols() if s.name}


def test_both_architectures_are_checked():
    assert set(ARCH_BUILDS) == set(EXPECTED) == set(ARCHES) == {"i386", "x86_64"}


def test_entry_is_the_virtual_start_label(elf):
    elffile, out = elf
    bits, machine, _, _ = EXPECTED[out.kernel.layout.arch.name]
    assert elffile.header.e_entry == out.kernel.image.symbol("_start").value == symtab(elffile)["_start"]
    assert elffile.header.e_entry >= out.kernel.layout.kernel_virtual_start
    assert elffile.elfclass == bits and elffile.header.e_machine == machine


def test_readelf_names_class_and_machine(elf):
    _, out = elf
    _, _, elf_class, machine = EXPECTED[out.kernel.layout.arch.name]
    header = subprocess.run(["readelf", "-h", "-W", str(out.elf)], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"^\s*Class:\s+{elf_class}$", header, re.MULTILINE), header
    assert re.search(rf"^\s*Machine:\s+{machine}$", header, re.MULTILINE), header
    assert re.search(rf"^\s*Entry point address:\s+0x0*{out.kernel.image.entry:x}$",
                     header, re.MULTILINE), header


def test_segments_are_higher_half_and_loaded_at_the_load_address(elf):
    elffile, out = elf
    layout = out.kernel.layout
    segments = loads(elffile)
    assert [s["p_flags"] for s in segments] == [P_FLAGS.PF_R | P_FLAGS.PF_X, P_FLAGS.PF_R,
                                                P_FLAGS.PF_R | P_FLAGS.PF_W]
    assert segments[0]["p_vaddr"] == layout.kernel_virtual_start
    assert segments[0]["p_paddr"] == layout.kernel_load_address == 0x100000
    for seg in segments:
        assert seg["p_vaddr"] - seg["p_paddr"] == layout.kernel_virtual_base
        assert seg["p_vaddr"] % hw.PAGE_SIZE == 0 and seg["p_offset"] % hw.PAGE_SIZE == 0
        assert seg["p_vaddr"] + seg["p_memsz"] <= layout.kernel_window.end
        if elffile.elfclass == 64:
            # mcmodel=kernel: every address of the image is a sign-extended 32-bit value.
            assert TOP_2_GIB <= seg["p_vaddr"] and seg["p_vaddr"] + seg["p_memsz"] <= 2**64
            assert seg["p_paddr"] + seg["p_memsz"] <= 2**32


def test_segment_flags_match_their_sections(elf):
    """R-X holds the code, R the read-only data, RW the data and bss: each allocated section sits in the segment
    whose permissions are its own, and readelf prints them so."""
    elffile, out = elf
    segments = loads(elffile)
    for section in elffile.iter_sections():
        if not section["sh_flags"] & SH_FLAGS.SHF_ALLOC:
            continue
        holders = [s for s in segments if s.section_in_segment(section)]
        assert len(holders) == 1, section.name
        flags = holders[0]["p_flags"]
        assert bool(flags & P_FLAGS.PF_X) == bool(section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR), section.name
        assert bool(flags & P_FLAGS.PF_W) == bool(section["sh_flags"] & SH_FLAGS.SHF_WRITE), section.name
    contents = [[sec.name for sec in elffile.iter_sections() if seg.section_in_segment(sec) and sec.name]
                for seg in segments]
    assert contents == [[".multiboot", ".text"], [".rodata"], [".data", ".bss"]]
    listing = subprocess.run(["readelf", "-l", "-W", str(out.elf)], capture_output=True, text=True,
                             check=True).stdout
    assert re.findall(r"^\s*LOAD\s.*\s(R E|R  |RW )\s+0x1000$", listing, re.MULTILINE) == ["R E", "R  ", "RW "]


def test_sections_are_named_and_typed(elf):
    elffile, _ = elf
    by_name = {s.name: s for s in elffile.iter_sections()}
    assert by_name[".text"]["sh_type"] == "SHT_PROGBITS" and by_name[".text"]["sh_flags"] & 0x4
    assert by_name[".bss"]["sh_type"] == "SHT_NOBITS" and by_name[".bss"]["sh_flags"] & 0x1
    assert not by_name[".rodata"]["sh_flags"] & 0x1
    assert {".multiboot", ".text", ".rodata", ".data", ".bss", ".symtab", ".strtab"} <= set(by_name)


def test_every_global_label_is_in_the_symtab(elf):
    elffile, out = elf
    table = symtab(elffile)
    for sym in out.kernel.image.symbols:
        assert table.get(sym.name) == sym.value, sym.name
    for label in ("_start", "kmain", "boot_top_table", "exception_common", "serial_puts"):
        assert label in table


def multiboot_header(out) -> tuple[int, list[int]]:
    """The header's file offset and its words (magic, flags, checksum and, with flag 16, the address fields)."""
    offset = ElfInfo.load(out.elf).multiboot_header_offset()
    assert offset is not None and offset + 12 <= hw.MULTIBOOT_HEADER_SEARCH_LIMIT
    data = out.elf.read_bytes()[offset:offset + 32]
    return offset, [int.from_bytes(data[i:i + 4], "little") for i in range(0, 32, 4)]


def test_multiboot_header_in_the_first_8k(elf):
    _, out = elf
    _, (magic, flags, checksum, *_) = multiboot_header(out)
    assert magic == hw.MULTIBOOT_HEADER_MAGIC
    assert flags & hw.MULTIBOOT_FLAG_PAGE_ALIGN and flags & hw.MULTIBOOT_FLAG_MEMORY_INFO
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    # The ELF32 kernel is loaded from its program headers; the ELF64 one through the header's address fields,
    # the only way QEMU's -kernel takes a 64-bit ELF.
    assert bool(flags & hw.MULTIBOOT_FLAG_ADDRESSES) == (out.kernel.layout.arch.name == "x86_64")
    assert hw.MULTIBOOT_FLAG_ADDRESSES == 1 << 16


def test_multiboot_address_fields_match_the_elf(x86_64_build):
    """header_addr, load_addr, load_end_addr, bss_end_addr and entry_addr are the physical addresses of the header,
    the first segment, the end of .data, __kernel_end and _start; and loading the file as those fields say puts
    the same bytes in memory as loading the ELF segments."""
    out = x86_64_build
    offset, (_, flags, _, header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr) = multiboot_header(out)
    assert flags & hw.MULTIBOOT_FLAG_ADDRESSES
    base = out.kernel.layout.kernel_virtual_base
    with open(out.elf, "rb") as f:
        elffile = ELFFile(f)
        table = symtab(elffile)
        segments = [(s["p_paddr"], s["p_offset"], s["p_filesz"], s["p_memsz"], s.data()) for s in loads(elffile)]
        data = elffile.get_section_by_name(".data")
        data_end = data["sh_addr"] + data["sh_size"]
        entry = elffile.header.e_entry
    assert header_addr == table["multiboot_header"] - base
    assert load_addr == segments[0][0] == 0x100000
    assert load_end_addr == data_end - base
    assert bss_end_addr == table["__kernel_end"] - base
    assert entry_addr == table["_start"] - base == entry - base
    assert load_addr <= header_addr < load_end_addr <= bss_end_addr
    # The header's place in the file agrees with its physical address.
    assert offset == segments[0][1] + header_addr - segments[0][0]

    # Memory as an a.out-kludge loader fills it: the file from (header offset - (header_addr - load_addr)) up to
    # load_end_addr, then zeros up to bss_end_addr.
    image = out.elf.read_bytes()
    start = offset - (header_addr - load_addr)
    kludge = image[start:start + load_end_addr - load_addr] + bytes(bss_end_addr - load_end_addr)
    for paddr, _, filesz, memsz, content in segments:
        lo = paddr - load_addr
        assert kludge[lo:lo + filesz] == content, hex(paddr)
        assert not any(kludge[lo + filesz:lo + memsz]), hex(paddr)
    last = segments[-1]
    assert last[0] + last[3] == bss_end_addr


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
