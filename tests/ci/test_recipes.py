"""The CI recipes of examples/ci/ run, and have what GitHub Actions and GitLab CI require of them.

Each recipe's steps run in order, as its runner would, in a clean directory holding a small hobby project: the
higher-half zoo kernel of tests/minikernels.py (GNU as source), its linker script and a Makefile that builds
build/kernel.elf. Every job of the recipe's matrix runs (each share of `kgen test --shard`, in a directory of its
own), and the JUnit reports of the shares together hold every check of the suite exactly once.

Not run: the steps that install the Debian packages and kgen (apt-get, pip, the venv). This machine has the packages
(`make system-deps`) and runs kgen from this checkout through the test's own venv (its bin/ first on PATH, the
checkout on PYTHONPATH), which is what those steps give a runner. GitHub's `uses:` actions (checkout, cache, upload)
are not run either: the directory is the checkout, and the files an upload names must exist after the steps.
"""
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

import minikernels
from conftest import kgen_env, needs_qemu, suite_node_ids

ROOT = Path(__file__).resolve().parent.parent.parent
RECIPES = ROOT / "examples" / "ci"
GITHUB = RECIPES / "github-actions.yml"
GITLAB = RECIPES / "gitlab-ci.yml"
KERNEL = "build/kernel.elf"

# A line that installs something on the runner: substituted by this machine's packages and the test's venv.
INSTALLS = re.compile(r"apt-get |pip install|-m venv |GITHUB_PATH|^export PATH=|^mkdir -p \S*apt|^sudo chown ")

MAKEFILE = f"""{KERNEL}: kernel.S linker.ld
\tmkdir -p build
\tas --32 --defsym WRITABLE_TEXT=0 -o build/kernel.o kernel.S
\tld -m elf_i386 -T linker.ld -z max-page-size=0x1000 -o $@ build/kernel.o
"""


def hobby_project(where: Path) -> Path:
    """A clean checkout of a hobby kernel's repository: its source, linker script and Makefile."""
    if shutil.which("as") is None or shutil.which("make") is None:
        pytest.skip("GNU as/ld and make not installed (Debian packages binutils make)")
    where.mkdir(parents=True)
    (where / "kernel.S").write_text(minikernels.HIGHER_HALF)
    (where / "linker.ld").write_text(minikernels.HIGHER_HALF_LDS)
    (where / "Makefile").write_text(MAKEFILE)
    return where


def runner_env(variables: dict[str, str]) -> dict[str, str]:
    """The environment of a step: the recipe's variables, and kgen where the install steps would have put it."""
    env = kgen_env(**{name: str(value) for name, value in variables.items()})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def bash(script: str, cwd: Path, env: dict[str, str]) -> None:
    """One step as the runner runs it (GitHub's `shell: bash`; GitLab's shell stops at the first failing line)."""
    result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"step failed ({result.returncode}):\n{script}\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"


def installs_only(script: str) -> bool:
    lines = [line.strip() for line in script.replace("\\\n", " ").splitlines() if line.strip()]
    return all(INSTALLS.search(line) for line in lines)


def junit_ids(report: Path) -> list[str]:
    """The checks a JUnit report holds, as pytest node ids (classname test_invariants -> test_invariants.py)."""
    cases = ET.parse(report).getroot().iter("testcase")
    return [f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}" for case in cases]


def assert_every_check_once(reports: list[Path], kernel: Path) -> None:
    """The shares' reports merge into the whole suite: each check in exactly one of them."""
    merged = [check for report in reports for check in junit_ids(report)]
    assert sorted(merged) == sorted(suite_node_ids("--kernel", str(kernel)))
    assert all(junit_ids(report) for report in reports)     # no runner idle


# ---- GitHub Actions -----------------------------------------------------------------------------------------------

def github() -> dict:
    return yaml.safe_load(GITHUB.read_text())


def test_github_workflow_has_what_github_requires():
    flow = github()
    triggers = flow.get("on", flow.get(True))       # YAML 1.1 reads a bare `on` as true
    assert triggers and {"push", "pull_request"} <= set(triggers)
    (job,) = flow["jobs"].values()
    assert job["runs-on"] and isinstance(job["steps"], list)
    for step in job["steps"]:
        assert ("uses" in step) != ("run" in step), step              # exactly one of them
        if "uses" in step:
            assert re.fullmatch(r"[\w-]+/[\w-]+@v\d+", step["uses"]), step["uses"]    # pinned to a major version
    shards = job["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1)) and len(shards) >= 2
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert any(f"kgen test --kernel {KERNEL} --junitxml report.xml" in run
               and "--shard ${{ matrix.shard }}/${{ strategy.job-total }}" in run for run in runs)
    assert any(f"kgen inspect --kernel {KERNEL} --html kernel-map.html" in run for run in runs)
    (upload,) = [step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"] == "always()"                               # the report of a failed check most of all
    assert "${{ matrix.shard }}" in upload["with"]["name"]          # artifact names are unique per run (v4)
    assert set(upload["with"]["path"].split()) == {"report.xml", "kernel-map.html"}


def expand(text: str, contexts: dict[str, str]) -> str:
    """GitHub's ${{ expressions }}: those the recipe uses, from the job's matrix and strategy."""
    def value(match: re.Match) -> str:
        name = match.group(1).strip()
        assert name in contexts, f"${{{{ {name} }}}}: an expression this test does not know how to give"
        return contexts[name]
    return re.sub(r"\$\{\{(.*?)\}\}", value, text)


@needs_qemu
def test_github_workflow_runs_every_shard_and_the_reports_merge(tmp_path):
    flow = github()
    (job,) = flow["jobs"].values()
    shards = job["strategy"]["matrix"]["shard"]
    reports, skipped = [], set()
    for shard in shards:
        project = hobby_project(tmp_path / f"runner-{shard}")      # each job on a clean runner
        contexts = {"matrix.shard": str(shard), "strategy.job-total": str(len(shards))}
        env = runner_env({**flow.get("env", {}), "GITHUB_PATH": str(tmp_path / f"github-path-{shard}")})
        for step in job["steps"]:
            if "uses" in step:
                if step["uses"].startswith("actions/upload-artifact@"):
                    paths = expand(step["with"]["path"], contexts).split()
                    assert all((project / path).is_file() for path in paths), paths
                continue
            script = expand(step["run"], contexts)
            if installs_only(script):
                skipped.add(step["name"])
                continue
            bash(script, project, env)
        reports.append(project / "report.xml")
    assert skipped == {"Install QEMU and the build tools", "Install kgen"}
    assert_every_check_once(reports, tmp_path / "runner-1" / KERNEL)


# ---- GitLab CI ----------------------------------------------------------------------------------------------------

# The keywords of a GitLab CI job (docs.gitlab.com/ee/ci/yaml) this recipe may use.
GITLAB_JOB_KEYS = {"image", "parallel", "variables", "cache", "before_script", "script", "after_script", "artifacts",
                   "stage", "tags", "rules", "needs", "timeout", "retry", "interruptible"}


def gitlab() -> tuple[str, dict]:
    (name, job), = yaml.safe_load(GITLAB.read_text()).items()
    return name, job


def test_gitlab_job_has_what_gitlab_requires():
    name, job = gitlab()
    assert set(job) <= GITLAB_JOB_KEYS, set(job) - GITLAB_JOB_KEYS
    assert isinstance(job["script"], list) and all(isinstance(line, str) for line in job["script"])
    assert isinstance(job["parallel"], int) and 2 <= job["parallel"] <= 200
    assert any(f"kgen test --kernel {KERNEL} --junitxml report.xml" in line
               and "--shard $CI_NODE_INDEX/$CI_NODE_TOTAL" in line for line in job["script"])
    artifacts = job["artifacts"]
    assert artifacts["when"] == "always" and artifacts["reports"]["junit"] == "report.xml"
    assert set(artifacts["paths"]) == {"report.xml", "kernel-map.html"}
    # GitLab caches only what lies inside the project directory.
    assert all(not path.startswith(("/", "..")) for path in job["cache"]["paths"])
    assert all(installs_only(line) for line in job["before_script"])


@needs_qemu
def test_gitlab_job_runs_every_parallel_share_and_the_reports_merge(tmp_path):
    _, job = gitlab()
    reports = []
    for index in range(1, job["parallel"] + 1):
        project = hobby_project(tmp_path / f"runner-{index}")
        env = runner_env({**job["variables"], "CI_PROJECT_DIR": str(project), "CI_NODE_INDEX": str(index),
                          "CI_NODE_TOTAL": str(job["parallel"])})
        bash("\n".join(job["script"]), project, env)       # before_script: the installs, substituted
        assert all((project / path).is_file() for path in job["artifacts"]["paths"])
        reports.append(project / job["artifacts"]["reports"]["junit"])
    assert_every_check_once(reports, tmp_path / "runner-1" / KERNEL)
