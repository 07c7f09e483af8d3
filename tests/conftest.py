"""Shared fixtures: kernels built once per session from the layouts the tests then read."""
import shutil

import pytest

from kgen.build import build
from kgen.config import Config
from kgen.session import KernelSession

# Guest RAM starts as this byte everywhere the loader did not write, so a structure nobody cleared shows up.
POISON = 0xA5

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-i386") is None,
                                reason="qemu-system-i386 not installed (Debian package qemu-system-x86)")
needs_grub = pytest.mark.skipif(shutil.which("grub-mkrescue") is None,
                                reason="grub-mkrescue not installed (Debian packages grub-common grub-pc-bin)")


@pytest.fixture(scope="session")
def default_build(tmp_path_factory):
    """The default kernel: ELF and ISO."""
    return build(Config(), tmp_path_factory.mktemp("default"), iso=shutil.which("grub-mkrescue") is not None)


@pytest.fixture(scope="session")
def fault_build(tmp_path_factory):
    """A kernel that touches an unmapped page right after boot."""
    return build(Config(fault_at_boot=True), tmp_path_factory.mktemp("fault"), iso=False)


@pytest.fixture(scope="session")
def x86_64_build(tmp_path_factory):
    """The default x86_64 kernel: ELF64 and ISO."""
    return build(Config.for_arch("x86_64"), tmp_path_factory.mktemp("x86_64"),
                 iso=shutil.which("grub-mkrescue") is not None)


@pytest.fixture(scope="session")
def x86_64_fault_build(tmp_path_factory):
    """An x86_64 kernel whose kmain writes to the physical load address, unmapped once the boot stub is done."""
    return build(Config.for_arch("x86_64", fault_at_boot=True), tmp_path_factory.mktemp("x86_64_fault"), iso=False)


# Every architecture's default kernel and fault variant, by the fixture that builds it.
ARCH_BUILDS = {"i386": "default_build", "x86_64": "x86_64_build"}
ARCH_FAULT_BUILDS = {"i386": "fault_build", "x86_64": "x86_64_fault_build"}


@pytest.fixture(params=tuple(ARCH_BUILDS))
def arch_build(request):
    """The default kernel of each architecture in turn (test ids end in [i386] / [x86_64])."""
    return request.getfixturevalue(ARCH_BUILDS[request.param])


@pytest.fixture(params=tuple(ARCH_FAULT_BUILDS))
def arch_fault_build(request):
    """The fault_at_boot kernel of each architecture in turn."""
    return request.getfixturevalue(ARCH_FAULT_BUILDS[request.param])


@pytest.fixture
def session(default_build):
    """The default kernel booted to serve calls, on poisoned RAM; a fresh machine per test."""
    with KernelSession(default_build.elf, default_build.kernel.layout, poison=POISON) as s:
        yield s
