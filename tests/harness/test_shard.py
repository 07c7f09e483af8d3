"""`kgen test --shard K/N`: the N shares of a CI matrix hold every check exactly once, whatever order the checks
are collected in; a bad K/N is one line and status 2."""
import random

import pytest

from kgen.cli import main
from kgen.errors import EXIT_USAGE
from kgen.harness.shard import Shard, ShardError

from conftest import run_kgen, suite_node_ids


@pytest.mark.parametrize("count", range(1, 6))
def test_shares_of_any_list_cover_it_once_and_are_even(count):
    rng = random.Random(count)
    for size in range(0, 31):
        ids = [f"test_{rng.randrange(10 ** 6)}.py::t[{i}]" for i in range(size)]
        shares = [Shard(k, count).take(rng.sample(ids, len(ids))) for k in range(1, count + 1)]   # any order
        assert sum(len(share) for share in shares) == size, (size, shares)                      # disjoint...
        assert set().union(*shares) == set(ids)                                                 # ...and complete
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def suite_ids(tmp_path, *options: str) -> list[str]:
    return suite_node_ids("--out", str(tmp_path / "out"), *options)


def test_kgen_test_shares_cover_the_suite_once_for_1_to_5_machines(tmp_path, capsys):
    everything = suite_ids(tmp_path)
    assert len(everything) >= 5
    for count in range(1, 6):
        shares = [suite_ids(tmp_path, "--shard", f"{k}/{count}") for k in range(1, count + 1)]
        assert sorted(sum(shares, [])) == sorted(everything), count      # each check in exactly one share
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    capsys.readouterr()     # pytest's collection listings


def test_shares_are_taken_after_k(tmp_path, capsys):
    selected = suite_ids(tmp_path, "-k", "tcg")
    shares = [suite_ids(tmp_path, "-k", "tcg", "--shard", f"{k}/3") for k in (1, 2, 3)]
    assert sorted(sum(shares, [])) == sorted(selected)
    capsys.readouterr()


def test_the_kgen_command_takes_the_share_pytest_would(tmp_path):
    """The whole path once, in a process of its own: kgen test's option, the plugin, pytest's deselection."""
    result = run_kgen("test", "-j", "1", "--out", tmp_path / "out", "--shard", "2/3", "--", "--collect-only", "-q",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = [line for line in result.stdout.splitlines() if "::" in line]
    assert got == suite_ids(tmp_path, "--shard", "2/3")
    assert got and len(got) < len(suite_ids(tmp_path))


@pytest.mark.parametrize("bad", ["0/3", "4/3", "1/0", "3", "a/b", "1/2/3", "-1/2", "", " 1/2", "١/٢"])
def test_a_bad_shard_is_one_line_and_status_2(bad, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["test", "--shard", bad])
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kgen: error: kgen test: argument --shard: "), err
    with pytest.raises(ShardError):
        Shard.parse(bad)


def test_an_empty_share_says_so(tmp_path):
    only_one = "test_recursive_slot_maps_the_pd_supervisor_only"
    result = run_kgen("test", "-j", "1", "--out", tmp_path / "out", "-k", only_one, "--shard", "1/2", cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines()[-1] == (
        f"kgen: error: share 1/2 of the checks is empty: fewer checks were selected by -k '{only_one}' than there "
        "are shares; use fewer shares (`kgen test -- --collect-only -q` lists the checks)")
