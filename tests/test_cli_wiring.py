"""The CLI's wiring, in process: options become exactly these MigrationConfig / GuestConfig /
DestinationConfig values, and results and failures become exit codes, JSON and one error line.
The orchestrator is replaced by a recorder here (its own tests and test_cli_e2e.py run it for
real); nothing of the kernel is faked."""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from typing import Any

import pytest
from click.testing import CliRunner

from livemig import cli, migration, wire
from livemig.errors import MigrationError, UnsupportedError
from livemig.guest import GuestConfig


@dataclass
class Recorder:
    result: migration.MigrationResult | None = None
    error: BaseException | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def migrate(self, address: str, workload: Any, config: migration.MigrationConfig,
                progress: migration.Progress | None = None, control: Any = None,
                events: Any = None) -> migration.MigrationResult:
        region_bytes = workload.region.nbytes
        self.calls.append((address, region_bytes, workload.guest.config, config))
        assert progress is not None and events is not None
        progress.phase("precopy")
        progress.update(round=1, remaining_pages=10, total_pages=region_bytes // mmap.PAGESIZE, bandwidth_bps=1e9)
        events(migration.MigrationEvent("phase", "source", 0.0, {"phase": "precopy"}))
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(migration, "migrate", rec.migrate)
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    return rec


def _ok(**kw: Any) -> migration.MigrationResult:
    return migration.MigrationResult(ok=True, mode="precopy", region_bytes=16 << 20, page_size=mmap.PAGESIZE, **kw)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def test_every_option_reaches_the_configs(recorder: Recorder, tmp_path: Any) -> None:
    secret = tmp_path / "s"
    secret.write_text("hunter2\n")
    recorder.result = _ok()
    r = invoke("migrate", "--to", "[::1]:4567", "--size", "16M", "--workload", "hotset", "--dirty-rate", "1500",
               "--free-fraction", "0.25", "--churn", "30", "--fill", "zero", "--threads", "2", "--seed", "7",
               "--postcopy", "--postcopy-after", "3", "--max-rounds", "9", "--no-hints", "--channels", "4",
               "--downtime-limit", "50", "--disable-capability", "checksums",
               "--disable-capability", "src:local-fill", "--verify", "--secret-file", str(secret),
               "--timeout", "12", "--postcopy-queue", "1M", "--quiet", "--no-progress")
    assert r.exit_code == 0, r.output
    [(address, size, guest, config)] = recorder.calls
    assert address == "[::1]:4567"
    assert size == 16 << 20
    assert guest == GuestConfig(workload="hotset", page_size=mmap.PAGESIZE, rate=1500.0, free_fraction=0.25,
                                churn=30.0, seed=7, fill="zero", threads=2)
    assert config == migration.MigrationConfig(
        postcopy=True, postcopy_after=3, max_rounds=9, downtime_limit_ms=50.0, hints=False, channels=4,
        disable_capabilities=frozenset({"checksums", "local-fill"}), secret=b"hunter2", verify=True, timeout=12.0,
        postcopy_queue_bytes=1 << 20,
    )


def test_defaults_are_precopy_with_the_library_defaults(recorder: Recorder) -> None:
    recorder.result = _ok()
    r = invoke("migrate", "--to", "127.0.0.1:1", "--quiet")
    assert r.exit_code == 0, r.output
    [(_, size, guest, config)] = recorder.calls
    assert size == 256 << 20
    assert guest == GuestConfig(workload="increment", page_size=mmap.PAGESIZE)
    assert config == migration.MigrationConfig()
    assert r.stdout == ""


def test_json_is_exactly_one_object_on_stdout(recorder: Recorder) -> None:
    recorder.result = _ok(rounds=[migration.RoundStats(1, 5, 5, 0, 20480, 0.0, float("inf"), 0)])
    r = invoke("migrate", "--to", "127.0.0.1:1", "--json", "--progress")
    assert r.exit_code == 0
    [line] = r.stdout.splitlines()
    obj = json.loads(line)
    assert obj["ok"] is True and obj["rounds"][0]["bandwidth_bps"] is None
    assert "livemig: phase precopy" in r.stderr  # progress and summary go to stderr
    assert "livemig migrate: ok" in r.stderr


def test_failure_with_json_prints_ok_false_and_exits_1(recorder: Recorder) -> None:
    cause = ConnectionRefusedError(111, "Connection refused")
    err = MigrationError("connect to 127.0.0.1:1")
    err.__cause__ = cause
    recorder.error = err
    r = invoke("migrate", "--to", "127.0.0.1:1", "--json", "--postcopy", "--quiet", "--size", "8M")
    assert r.exit_code == 1
    obj = json.loads(r.stdout)
    # mode: what happened (a connect failure is before any postcopy start command), not what was asked
    assert obj == {**obj, "ok": False, "mode": "precopy", "region_bytes": 8 << 20,
                   "error": "connect to 127.0.0.1:1: [Errno 111] Connection refused"}
    assert r.stderr == "livemig: error: migration failed: connect to 127.0.0.1:1: [Errno 111] Connection refused\n"


def test_unsupported_kernel_is_one_line(recorder: Recorder) -> None:
    recorder.error = UnsupportedError("userfaultfd is not available: /dev/userfaultfd missing", feature="userfaultfd")
    r = invoke("migrate", "--to", "127.0.0.1:1", "--postcopy", "--quiet")
    assert r.exit_code == 1
    assert r.stderr == ("livemig: error: migration failed: userfaultfd is not available:"
                        " /dev/userfaultfd missing\n")


def test_a_result_not_ok_exits_1_and_says_why(recorder: Recorder) -> None:
    recorder.result = _ok(verify=migration.VerifyReport(10, 2, 0))
    recorder.result.ok = False
    recorder.result.error = "verify: 2 mismatches"
    r = invoke("migrate", "--to", "127.0.0.1:1")
    assert r.exit_code == 1
    assert "livemig migrate: FAILED" in r.stderr
    assert r.stderr.endswith("livemig: error: migration failed: verify: 2 mismatches\n")


@dataclass
class ServeRecorder:
    calls: list[migration.DestinationConfig] = field(default_factory=list)
    summary: migration.DestinationSummary | None = None

    def serve(self, listener: wire.Listener, config: migration.DestinationConfig,
              progress: migration.Progress | None = None, factory: object = None,
              events: Any = None) -> migration.DestinationSummary:
        self.calls.append(config)
        assert self.summary is not None
        return self.summary


def test_listen_options_reach_the_destination_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    rec = ServeRecorder(summary=migration.DestinationSummary(ok=True, mode="postcopy", region_bytes=1 << 20))
    monkeypatch.setattr(migration, "serve", rec.serve)
    secret = tmp_path / "s"
    secret.write_text("k")
    r = invoke("listen", f"unix:{tmp_path / 'sock'}", "--once", "--announce", "--json", "--quiet",
               "--disable-capability", "local-fill", "--disable-capability", "dst:checksums",
               "--secret-file", str(secret), "--max-size", "1G", "--timeout", "5", "--postcopy-queue", "0",
               "--no-prefault")
    assert r.exit_code == 0, r.output
    assert rec.calls == [migration.DestinationConfig(
        disable_capabilities=frozenset({"local-fill", "checksums"}), secret=b"k", max_region_bytes=1 << 30,
        timeout=5.0, postcopy_queue_bytes=0, prefault=False)]
    announce, summary = r.stdout.splitlines()
    assert announce == f"listening on unix:{tmp_path / 'sock'}"
    assert json.loads(summary)["ok"] is True
    assert not (tmp_path / "sock").exists()  # the listener cleaned up


def test_listen_beyond_loopback_with_insecure_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = ServeRecorder(summary=migration.DestinationSummary(ok=False, mode="precopy", region_bytes=0, error="x"))
    monkeypatch.setattr(migration, "serve", rec.serve)
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    r = invoke("listen", "0.0.0.0:0", "--once", "--insecure", "--quiet", "--announce")
    assert r.exit_code == 1  # the (recorded) migration failed
    assert r.stdout.startswith("listening on 0.0.0.0:")
    assert r.stderr.splitlines() == [
        ("livemig: warning: --insecure: any source that reaches 0.0.0.0:0 may migrate memory into this host,"
        " unauthenticated and in clear unless it asks for encryption itself"),
        "livemig: error: migration failed: x"]


def test_embedded_destination_args_and_its_errors_are_relayed(recorder: Recorder, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Any) -> None:
    """Without --to: the destination gets the dst: capabilities, the size limit and the timeout;
    when the migration fails, the destination's own error line follows ours."""
    import sys

    from livemig import local

    seen: list[list[str]] = []
    real = local.local_destination
    child = [sys.executable, "-c", ("import sys; print('listening on 127.0.0.1:5', flush=True);"
             " sys.stdin.read(); print('livemig: error: boom', file=sys.stderr); sys.exit(1)")]

    def fake(args: list[str], *, deadline: float) -> Any:
        seen.append(list(args))
        return real(args, deadline=deadline, command=child)  # a real child that fails like listen

    monkeypatch.setattr(local, "local_destination", fake)
    recorder.error = MigrationError("precopy: the destination went away")
    r = invoke("migrate", "--size", "8M", "--quiet", "--timeout", "7", "--disable-capability", "dst:local-fill",
               "--disable-capability", "checksums")
    assert seen == [["--no-progress", "--quiet", "--max-size", str(8 << 20), "--timeout", "7",
                     "--postcopy-queue", str(wire.POSTCOPY_QUEUE_BYTES), "--keepalive-idle", "3",
                     "--keepalive-interval", "1", "--keepalive-count", "3",
                     "--disable-capability", "checksums", "--disable-capability", "local-fill"]]
    [(address, _, _, config)] = recorder.calls
    assert address == "127.0.0.1:5"
    assert config.disable_capabilities == {"checksums"}
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        "livemig: error: migration failed: precopy: the destination went away",
        "livemig: destination: error: boom",
    ]
