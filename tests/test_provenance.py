"""``provenance.git_commit``: the commit a run records, and when it says ``+dirty``."""

import subprocess

import pytest

from umarvel_lib.provenance import git_commit


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    if subprocess.run(["git", "--version"], capture_output=True).returncode:
        pytest.skip("no git")
    repo = tmp_path / "kit"
    (repo / "umarvel_lib").mkdir(parents=True)
    (repo / "results" / "cpu").mkdir(parents=True)
    (repo / "umarvel_lib" / "code.py").write_text("x = 1\n")
    (repo / "results" / "cpu" / "metrics.json").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    return repo, head


def test_a_clean_checkout_records_its_commit(checkout):
    repo, head = checkout
    assert git_commit(repo / "umarvel_lib") == head


def test_rewritten_results_do_not_make_a_checkout_dirty(checkout):
    # a run of `umarvel reproduce` overwrites committed results: the kit itself did not change
    repo, head = checkout
    (repo / "results" / "cpu" / "metrics.json").write_text('{"ok": 1}\n')
    (repo / "results" / "cpu" / "new.json").write_text("{}\n")
    assert git_commit(repo / "umarvel_lib") == head


def test_a_changed_source_file_makes_it_dirty_from_any_directory(checkout):
    repo, head = checkout
    (repo / "umarvel_lib" / "code.py").write_text("x = 2\n")
    assert git_commit(repo / "umarvel_lib") == head + "+dirty"
    assert git_commit(repo / "results" / "cpu") == head + "+dirty"
    assert git_commit(repo) == head + "+dirty"


def test_outside_git_there_is_no_commit(tmp_path):
    assert git_commit(tmp_path) is None
