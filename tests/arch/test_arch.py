"""The architecture record: a foreign kernel's architecture is judged by what its code does (Arch.for_elf), not by
its ELF class alone, since a Multiboot kernel always enters in 32-bit mode and a 64-bit one may come as an ELF32."""
import pytest

import minikernels
from kgen.arch import I386, X86_64, Arch, named
from kgen.guest.elfinfo import ElfInfo
from kgen.harness.jsonreport import foreign_kernel_record

# An i386 PAE kernel turning NX on: it writes EFER too (mov ecx, 0xC0000080; wrmsr), but has no 64-bit code
# descriptor, so it never enters long mode.
PAE_NX = r"""
.set FLAGS, 0x00000003
.text
.code32
.globl _start
.align 4
    .long 0x1BADB002, FLAGS, -(0x1BADB002 + FLAGS)
_start:
    mov $0xC0000080, %ecx               /* EFER.NXE */
    rdmsr
    or $0x800, %eax
    wrmsr
    lgdt gdtr
1:  cli
    hlt
    jmp 1b
.data
.align 8
gdt:  .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
gdtr: .word 3 * 8 - 1
      .long gdt
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("arch")
    return {
        "mb64": minikernels.elf64_multiboot(out),
        # The same long-mode kernel linked as an ELF32, as GRUB and QEMU's Multiboot loader take it as is.
        "mb64-in-elf32": minikernels.build(out, "mb64-elf32", minikernels.ELF64_MULTIBOOT, minikernels.ELF64_LDS),
        "pae-nx": minikernels.build(out, "pae-nx", PAE_NX),
    }


@pytest.mark.parametrize("name, arch", [("mb64", X86_64), ("mb64-in-elf32", X86_64), ("pae-nx", I386)])
def test_a_foreign_kernel_is_judged_by_its_code(kernels, name, arch):
    elf = ElfInfo.load(kernels[name])
    assert Arch.for_elf(elf) is arch
    assert foreign_kernel_record(kernels[name])["arch"] == arch.name


def test_an_elf32_long_mode_kernel_is_an_elf32(kernels):
    """What the judgement is for: the class alone would call it i386 and boot it in qemu-system-i386."""
    assert ElfInfo.load(kernels["mb64-in-elf32"]).bits == 32


def test_kgen_kernels_are_their_own_architecture(default_build, x86_64_build):
    for out in (default_build, x86_64_build):
        assert Arch.for_elf(ElfInfo.load(out.elf)) is out.kernel.layout.arch


def test_names_map_to_records():
    assert named("i386") is I386 and named("x86_64") is X86_64 and str(X86_64) == "x86_64"
