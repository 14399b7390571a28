"""The livemig command as a user runs it: a real process. Usage errors are one line, exit code 2,
no traceback, and are found before anything starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import livemig

from cli_helpers import LIVEMIG, one_error_line, run


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
    assert "migrate" in r.stdout and "listen" in r.stdout


@pytest.mark.timeout(90)
def test_unknown_command_is_one_clear_error() -> None:
    r = run("teleport")
    assert r.returncode == 2
    assert "No such command 'teleport'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("command", ["migrate", "listen"])
def test_subcommand_help_lists_the_contract_options(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0, r.stderr
    want = {
        "migrate": ["--to", "--size", "--workload", "--dirty-rate", "--free-fraction", "--churn",
                    "--postcopy", "--postcopy-after", "--hints / --no-hints", "--channels",
                    "--downtime-limit", "--disable-capability", "--verify", "--json", "--plot",
                    "--secret-file", "--seed", "--threads", "--timeout", "--postcopy-queue"],
        "listen": ["--once", "--announce", "--disable-capability", "--secret-file", "--max-size",
                   "--json", "--insecure", "--postcopy-queue"],
    }[command]
    for opt in want:
        assert opt in r.stdout, opt


USAGE_ERRORS = [
    # (arguments, what the one line must say)
    (["migrate", "--size", "12X"], "Invalid value for '--size': '12X' is not a size"),
    (["migrate", "--size", "1.5G"], "Invalid value for '--size': '1.5G' is not a size"),
    (["migrate", "--size", "-4096"], "Invalid value for '--size': '-4096' is not a size"),
    (["migrate", "--size", "0"], "Invalid value for '--size': '0': the size must be positive"),
    (["migrate", "--size", "0M"], "the size must be positive"),
    (["migrate", "--size", "1000"], "is not a multiple of the page size"),
    (["migrate", "--size", "4097"], "is not a multiple of the page size"),
    (["migrate", "--size", "1024T"], "is more than this machine's memory"),
    (["migrate", "--workload", "sleepy"], "Invalid value for '--workload': 'sleepy' is not one of"),
    (["migrate", "--disable-capability", "teleport"], "unknown capability 'teleport'; known: checksums,"),
    (["migrate", "--disable-capability", "src:teleport"], "unknown capability 'teleport'"),
    (["migrate", "--disable-capability", "both:local-fill"], "unknown side 'both'; use NAME, src:NAME or dst:NAME"),
    (["migrate", "--disable-capability", ":local-fill"], "unknown side ''"),
    (["migrate", "--dirty-rate", "-1"], "Invalid value for '--dirty-rate': -1 must be at least 0"),
    (["migrate", "--churn", "-0.5"], "Invalid value for '--churn': -0.5 must be at least 0"),
    (["migrate", "--dirty-rate", "inf"], "'inf' is not a finite number"),
    (["migrate", "--free-fraction", "1.01"],
     "Invalid value for '--free-fraction': 1.01 must be at least 0 and below 1"),
    (["migrate", "--free-fraction", "1"], "Invalid value for '--free-fraction': 1 must be at least 0 and below 1"),
    (["migrate", "--free-fraction", "-0.1"], "must be at least 0 and below 1"),
    (["migrate", "--churn", "5"], "--churn needs a workload other than increment"),
    (["migrate", "--workload", "increment", "--threads", "2"], "the increment workload runs one writer thread"),
    (["migrate", "--workload", "random", "--threads", "65"], "Invalid value for '--threads'"),
    (["migrate", "--free-fraction", "half"], "'half' is not a number"),
    (["migrate", "--downtime-limit", "0"], "Invalid value for '--downtime-limit': 0 must be greater than 0"),
    (["migrate", "--channels", "0"], "Invalid value for '--channels'"),
    (["migrate", "--postcopy-after", "2"], "--postcopy-after needs --postcopy"),
    (["migrate", "--postcopy-queue", "12x"], "Invalid value for '--postcopy-queue': '12x' is not a size"),
    (["listen", "127.0.0.1:0", "--postcopy-queue", "-1"], "Invalid value for '--postcopy-queue': '-1' is not a size"),
    (["migrate", "--postcopy-queue", "64K"], "65536 bytes is below the minimum of 256 KiB"),
    (["migrate", "--to", "nowhere"], "Invalid value for '--to': bad address 'nowhere'"),
    (["migrate", "--to", "127.0.0.1:1", "--disable-capability", "dst:local-fill"],
     "dst:NAME applies only to the embedded destination"),
    (["migrate", "--secret-file", "/nonexistent/secret"], "Invalid value for '--secret-file': cannot use the secret"),
    (["migrate", "--plot", "/nonexistent/dir/plot.png"], ""),  # no matplotlib, or no directory: both usage errors
    (["listen", "127.0.0.1:99999"], "port out of range"),
    (["listen", "127.0.0.1:0", "--disable-capability", "src:local-fill"], "src:NAME makes no sense on the destination"),
    (["listen", "127.0.0.1:0", "--max-size", "3K"], "Invalid value for '--max-size'"),
    (["listen"], "Missing argument 'ADDRESS'"),
    (["listen", "no-such-host.invalid:0"], "Invalid value for 'ADDRESS': cannot resolve 'no-such-host.invalid'"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_error_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    r = run(*args, timeout=30)
    line = one_error_line(r)
    assert message in line
    assert r.returncode == 2
    assert r.stdout == ""


@pytest.mark.timeout(60)
def test_usage_errors_come_before_json_output() -> None:
    r = run("migrate", "--json", "--size", "0", timeout=30)
    assert r.returncode == 2
    assert r.stdout == ""  # no JSON for a command line that never ran
    one_error_line(r)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_listen_beyond_loopback_without_secret_is_refused(host: str) -> None:
    r = run("listen", f"{host}:0", "--once", timeout=30, env={"LIVEMIG_SECRET": ""})
    line = one_error_line(r)
    # an empty LIVEMIG_SECRET is itself refused; without it, the loopback rule speaks
    env = {k: v for k, v in os.environ.items() if k != "LIVEMIG_SECRET"}
    r2 = subprocess.run([*LIVEMIG, "listen", f"{host}:0", "--once"], check=False, capture_output=True, text=True,
                        timeout=30, env=env)
    line2 = one_error_line(r2)
    assert "the shared secret is empty" in line
    assert f"refusing to listen on {host}:0 beyond loopback without a shared secret" in line2
    assert "--insecure" in line2
    assert r.returncode == r2.returncode == 2


@pytest.mark.timeout(60)
def test_listen_on_a_port_in_use_fails_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("listen", f"127.0.0.1:{port}", "--once", "--announce", timeout=30)
    line = one_error_line(r)
    assert line == f"livemig: error: cannot listen on 127.0.0.1:{port}: address already in use"
    assert r.returncode == 1
    assert r.stdout == ""  # nothing announced


@pytest.mark.timeout(60)
def test_plot_without_matplotlib_fails_before_migrating(tmp_path: Path) -> None:
    """matplotlib made unimportable for the child (whether or not it is installed here): one
    line, exit 2, and no destination was started (nothing announced, no JSON)."""
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib blocked by the test')\n")
    pythonpath = [str(tmp_path / "block"), *sys.path]
    r = run("migrate", "--size", "16M", "--json", "--plot", str(tmp_path / "out.png"), timeout=30,
            env={"PYTHONPATH": ":".join(p for p in pythonpath if p)})
    line = one_error_line(r)
    assert "--plot needs matplotlib, which is not installed" in line
    assert "pip install 'livemig[plot]'" in line
    assert r.returncode == 2
    assert r.stdout == ""
    assert not (tmp_path / "out.png").exists()
