"""The livemig command as a user runs it: a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest

import livemig


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livemig", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(90)
def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"livemig, version {livemig.__version__}"


@pytest.mark.timeout(90)
def test_help_describes_the_tool() -> None:
    r = run("--help")
    assert r.returncode == 0
    assert "Live-migrate memory regions" in r.stdout


@pytest.mark.timeout(90)
def test_unknown_command_is_one_clear_error() -> None:
    r = run("teleport")
    assert r.returncode == 2
    assert "No such command 'teleport'" in r.stderr
    assert "Traceback" not in r.stderr
