"""Every bad input found by trying livemig as a careless user would (issue 19): each is one clear
line on stderr and exit status 2 (usage: found before anything starts) or 1 (runtime), never a
traceback or a hang; the API's configs refuse what the command line refuses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from livemig import wire
from livemig.memory import system_page_size
from livemig.migration import DestinationConfig, MigrationConfig

from cli_helpers import one_error_line, run

PAGE = system_page_size()


def _usage_line(*args: str, timeout: float = 30) -> str:
    r = run(*args, timeout=timeout)
    line = one_error_line(r)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    return line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["migrate"], ["listen", "127.0.0.1:0", "--once"]], ids=["migrate", "listen"])
def test_postcopy_queue_past_its_maximum(command: list[str]) -> None:
    line = _usage_line(*command, "--postcopy-queue", "4G")
    assert "Invalid value for '--postcopy-queue'" in line
    assert "4294967296 bytes is past the maximum of 256 MiB" in line


@pytest.mark.timeout(60)
def test_negative_seed() -> None:
    line = _usage_line("migrate", "--seed", "-1")
    assert "seed must be in [0, 2**64), got -1" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["migrate"], ["listen", "127.0.0.1:0", "--once"]], ids=["migrate", "listen"])
def test_a_fifo_nobody_writes_to_as_secret_file_does_not_hang(tmp_path: Path, command: list[str]) -> None:
    fifo = tmp_path / "secret.fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    line = _usage_line(*command, "--secret-file", str(fifo))
    waited = time.monotonic() - t0
    assert f"nothing wrote a secret to {fifo} within {wire.secret.SECRET_READ_TIMEOUT_S:g} s" in line
    assert "Invalid value for '--secret-file'" in line
    assert waited < 25  # bounded by the read timeout (5 s), not by this test's


def test_a_fifo_with_a_writer_delivers_the_secret(tmp_path: Path) -> None:
    """The bounded read still takes a secret from a FIFO or a pipe (``--secret-file <(cmd)``)."""
    r, w = os.pipe()
    os.write(w, b"from-a-pipe\n")
    os.close(w)
    try:
        assert wire.load_secret(f"/proc/self/fd/{r}") == b"from-a-pipe"
    finally:
        os.close(r)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["migrate"], ["listen", "127.0.0.1:0", "--once"]], ids=["migrate", "listen"])
def test_a_whitespace_only_secret_is_refused(tmp_path: Path, command: list[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"  \t \n")
    line = _usage_line(*command, "--secret-file", str(secret))
    assert "the shared secret is only whitespace" in line
    with pytest.raises(ValueError, match="only whitespace"):
        wire.load_secret(secret)
    r = run(*command, env={"LIVEMIG_SECRET": "   "}, timeout=30)
    assert r.returncode == 2 and "the shared secret is only whitespace" in one_error_line(r)


@pytest.mark.timeout(60)
def test_control_on_an_existing_path_is_refused_before_anything_starts(tmp_path: Path) -> None:
    taken = tmp_path / "ctl.sock"
    taken.write_text("someone else's")
    line = _usage_line("migrate", "--size", "4M", "--control", str(taken), "--json")
    assert f"Invalid value for '--control': {taken} exists already" in line
    assert taken.read_text() == "someone else's"  # not removed, not replaced


def test_api_secret_as_str_is_a_clear_type_error() -> None:
    for cls in (MigrationConfig, DestinationConfig):
        with pytest.raises(TypeError, match=r"secret must be bytes \(e.g. secret.encode\(\)\), not str"):
            cls(secret="hunter2")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty or only whitespace"):
            cls(secret=b" \n")


@pytest.mark.parametrize("channels", [0, -1, 2 + wire.MAX_EXTRA_CHANNELS])
def test_api_channels_out_of_range_is_refused_like_the_cli(channels: int) -> None:
    with pytest.raises(ValueError, match=rf"channels must be in \[1, {1 + wire.MAX_EXTRA_CHANNELS}\], got {channels}"):
        MigrationConfig(channels=channels)
    r = run("migrate", "--channels", str(channels), timeout=30)
    assert r.returncode == 2 and "Invalid value for '--channels'" in one_error_line(r)


@pytest.mark.timeout(60)
def test_a_size_whose_double_does_not_fit_is_refused_without_a_destination() -> None:
    """Without --to the source and its own destination each hold the region: a size of 60% of
    physical memory fits once but not twice, and is refused before anything is allocated."""
    memory = wire.physical_memory_bytes()
    size = (memory * 6 // 10) // PAGE * PAGE
    line = _usage_line("migrate", "--size", str(size), "--json")
    assert f"Invalid value for '--size': {size} bytes twice (the guest and its copy in the embedded" in line
    assert f"more than this machine's memory ({memory} bytes)" in line
