"""The README and docs/ stay true: every `kgen` command in their ```sh blocks names a command and options that
`kgen <command> --help` lists, every relative link leads to a file, and the README stays a first read."""
from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import ROOT, run_kgen

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 160


def sh_commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line number, words) of each `kgen ...` line inside the page's ```sh blocks, comments dropped."""
    found, in_sh = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_sh = not in_sh and line.strip() == "```sh"
            continue
        if in_sh and line.lstrip().startswith("kgen "):
            words = shlex.split(line, comments=True)
            found.append((number, words))
    return found


@lru_cache(maxsize=None)
def help_text(command: str) -> str:
    result = run_kgen(command, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def example_commands():
    return [pytest.param(page, number, words, id=f"{page.name}:{number}")
            for page in PAGES for number, words in sh_commands(page)]


@pytest.mark.parametrize("page, number, words", example_commands())
def test_every_example_command_uses_options_its_help_lists(page, number, words):
    command = words[1]
    text = help_text(command)
    for word in words[2:]:
        if word == "--":
            break
        if word.startswith("-") and word not in ("-", "-j"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
                f"{page.name}:{number}: kgen {command} has no option {option}"


def test_the_readme_has_examples_to_check():
    assert len(sh_commands(ROOT / "README.md")) >= 8


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: link to {target}, which is not there"


def test_the_readme_is_a_first_read():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
