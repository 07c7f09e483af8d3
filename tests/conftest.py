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


@pytest.fixture
def session(default_build):
    """The default kernel booted to serve calls, on poisoned RAM; a fresh machine per test."""
    with KernelSession(default_build.elf, default_build.kernel.layout, poison=POISON) as s:
        yield s
