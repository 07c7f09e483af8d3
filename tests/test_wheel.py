"""The package as a user gets it: a wheel built from the checkout, installed into a clean venv elsewhere, builds
a kernel with the templates and GRUB tree it carries."""
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (path,) = out.glob("kgen-*.whl")
    return path


def test_wheel_carries_templates_boot_tree_and_suite(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (ROOT / "templates").glob("*.s"):
        assert f"kgen/_data/templates/{template.name}" in names
    assert "kgen/_data/boot/grub/grub.cfg" in names
    assert "kgen/harness/suite/test_invariants.py" in names
    pages = list((ROOT / "kgen" / "inspect" / "templates").glob("*.j2"))    # kgen inspect --html's page
    assert pages and all(f"kgen/inspect/templates/{page.name}" in names for page in pages)


def test_installed_outside_the_checkout_kgen_builds_and_tests(wheel, tmp_path):
    """A clean venv elsewhere, as `pip install 'kgen[test] @ URL'` gives a user (docs/install.md): its kgen finds
    the templates and GRUB tree inside the package, builds the kernel and ISO, and runs the packaged suite."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}     # nothing of the checkout
    pip = subprocess.run([env_dir / "bin" / "python", "-m", "pip", "install", "-q", f"kgen[test] @ {wheel.as_uri()}"],
                         capture_output=True, text=True, env=clean)
    assert pip.returncode == 0, pip.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*argv) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=work, capture_output=True, text=True, env=clean, timeout=300)
    where = run(env_dir / "bin" / "python", "-c",
                "import kgen.build.resources as r; print(r.templates_dir()); print(r.boot_dir())").stdout.split()
    assert len(where) == 2 and all(str(env_dir) in path for path in where), where
    kgen = env_dir / "bin" / "kgen"
    doctor = run(kgen, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    result = run(kgen, "build", "--out", "out")
    assert result.returncode == 0, result.stderr
    assert (work / "out" / "kernel.elf").stat().st_size > 0
    assert (work / "out" / "kernel.iso").stat().st_size > 0
    tested = run(kgen, "test", "--out", "out", "-k", "recursive", "-j", "1", "--junitxml", "report.xml")
    assert tested.returncode == 0, tested.stdout[-2000:] + tested.stderr
    assert str(env_dir) in tested.stdout            # the suite that ran is the installed one
    assert 'failures="0"' in (work / "report.xml").read_text() and " passed" in tested.stdout
