"""What a user sees is right: every field of the JSON report checked against what the destination
observed or an independent count (precopy, postcopy, hints, recovery); the event stream of real
migrations (API and ``--events``) against the final report; the pictures of ``--plot`` exist, have
their panels and are not blank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from user_view_helpers import (
    SCENARIOS,
    Run,
    check_events,
    check_fields,
    json_paths,
    nonblank_fraction,
    run_scenario,
)

from livemig import migration, plot
from livemig.migration import MigrationResult
from livemig.migration.results import (
    BalloonReport,
    HintStats,
    LatencySummary,
    PostcopyStats,
    PostcopyTimeline,
    RoundStats,
    VerifyReport,
    WorkloadCheck,
    WorkloadInfo,
)

LIVEMIG = [sys.executable, "-m", "livemig"]
_RUNS: dict[str, Run] = {}


@pytest.fixture(params=sorted(SCENARIOS))
def run(request: pytest.FixtureRequest, kernel_tracking: None, postcopy: None) -> Run:
    """Each scenario migrated once per session (both tests read it)."""
    name = str(request.param)
    if name not in _RUNS:
        _RUNS[name] = run_scenario(name)
    return _RUNS[name]


@pytest.mark.timeout(120)
def test_every_json_field_matches_what_the_destination_saw(run: Run) -> None:
    checked = check_fields(run)
    missing = json_paths(run.result.to_json()) - checked
    assert not missing, f"fields of the report no check covers: {sorted(missing)}"


@pytest.mark.timeout(120)
def test_event_stream_tells_the_report(run: Run) -> None:
    check_events(run)
    if run.name == "recovery":
        kinds = [e.kind for e in run.events]
        assert kinds.index("paused") < kinds.index("resumed")
        [resumed] = [e.data for e in run.events if e.kind == "resumed"]
        assert resumed["recoveries"] == 1 and resumed["requeued_pages"] == run.result.requeued_pages


@pytest.mark.timeout(120)
def test_cli_events_stream_is_the_schema_and_ends_with_the_report(tmp_path: Path, kernel_tracking: None,
                                                                  postcopy: None) -> None:
    """``--events -``: one JSON object per line on stdout, each naming the schema; the last is the
    end, whose report is what ``--json`` would print; a progress event comes at least every second."""
    r = subprocess.run([*LIVEMIG, "migrate", "--size", "32M", "--workload", "random", "--dirty-rate", "20000",
                        "--postcopy", "--verify", "--quiet", "--events", "-"],
                       capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    evs = [json.loads(line) for line in lines]
    assert all(e["schema"] == migration.EVENTS_SCHEMA and e["side"] == "source" for e in evs)
    assert all(e["event"] in migration.events.KINDS for e in evs)
    assert evs[0]["event"] == "start" and evs[-1]["event"] == "end"
    report = evs[-1]["report"]
    assert evs[-1]["ok"] is True and report["ok"] is True and report["mode"] == "postcopy"
    assert [e for e in evs if e["event"] == "round_end"] == [
        {"schema": migration.EVENTS_SCHEMA, "event": "round_end", "side": "source", "t": e["t"], **x}
        for e, x in zip([e for e in evs if e["event"] == "round_end"], report["rounds"])]
    [sw] = [e for e in evs if e["event"] == "switchover"]
    assert sw["downtime_ms"] == report["downtime_ms"] and sw["switchover_pages"] == report["switchover_pages"]
    t_end = evs[-1]["t"]
    prog = [e["t"] for e in evs if e["event"] == "progress"]
    assert len(prog) >= int(t_end) - 1  # one a second while it runs
    both = subprocess.run([*LIVEMIG, "migrate", "--size", "16M", "--json", "--events", "-"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert both.returncode == 2 and "both write to stdout" in both.stderr and both.stdout == ""


def _api_events() -> list[migration.MigrationEvent]:
    """An EventStream iterated here while a precopy migration runs in another thread."""
    import threading

    from livemig.guest import GuestConfig
    from livemig.loopback import migrate_locally
    from livemig.workload import ModelGuest

    stream = migration.EventStream(timeout=60)
    box: dict[str, Any] = {}

    def go() -> None:
        cfg = migration.MigrationConfig(verify=True)
        w = ModelGuest(16 << 20, GuestConfig(seed=2))
        try:
            box["result"], _ = migrate_locally(w, cfg, events=stream)
        finally:
            w.stop()
            stream.close()

    t = threading.Thread(target=go)
    t.start()
    evs = list(stream)
    t.join(60)
    box["events"] = evs
    assert box["result"].ok
    assert evs[-1].data["report"] == box["result"].to_json()
    return evs


@pytest.mark.timeout(120)
def test_event_stream_iterates_to_the_end(kernel_tracking: None) -> None:
    evs = _api_events()
    assert [e.kind for e in evs][:3] == ["start", "phase", "phase"] and evs[-1].kind == "end"


# ---- pictures ----


def _plot_result(mode: str) -> MigrationResult:
    """A result with every panel's data (figures of a real postcopy run's shape)."""
    rounds = [RoundStats(i, d, d - 10, 10, d * 4096 + 9000, 0.2, (d * 4096 + 9000) / 0.2, rem,
                         dirtied_pages=rem, dirty_rate_pps=rem / 0.21, started_s=0.21 * i)
              for i, (d, rem) in enumerate([(16384, 3000), (3000, 1200), (1200, 900)])]
    hist = (0, 0, 0, 0, 0, 2, 9, 40, 25, 3, 1) + (0,) * 21
    return MigrationResult(
        ok=True, mode=mode, region_bytes=64 << 20, page_size=4096, total_ms=900.0, downtime_ms=4.5,  # type: ignore[arg-type]
        precopy_rounds=3, bytes_sent=80 << 20, pages_sent=20000, zero_pages=30,
        postcopy=PostcopyStats(requests=80, local_fills=3, fault_latency_us=LatencySummary(128, 512, 700.0),
                               histogram=hist, histogram_upper_us=tuple(float(2 ** k) if k else 1.0 for k in range(32)),
                               faults=81),
        hints=HintStats(), balloon=BalloonReport(1, True, 0), verify=VerifyReport(16384, 0, 0, 0, 0, (), True,
                                                                                WorkloadCheck(True, 16384)),
        rounds=rounds, workload=WorkloadInfo("model-guest"), throughput_bps=(80 << 20) / 0.9, switchover_pages=950,
        postcopy_pages_left=950, downtime_limit_ms=300.0,
        timeline=PostcopyTimeline(0.01, 0.7, requests=(5, 20, 30, 15, 10), request_pages=(5, 20, 30, 15, 10),
                                  push_pages=(300, 250, 200, 80, 0), left_pages=(640, 370, 140, 0, 0),
                                  left_at_start=950) if mode == "postcopy" else None)


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_pictures_have_their_panels_and_are_not_blank(mode: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    out = tmp_path / f"{mode}.png"
    names = plot.plot_migration(_plot_result(mode), str(out))
    want = [plot.PANEL_CONVERGENCE, plot.PANEL_RATES] + ([plot.PANEL_TIMELINE, plot.PANEL_LATENCY]
                                                         if mode == "postcopy" else [])
    assert names == want
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = len(names)
    for i in range(n):  # every panel's band holds a drawing, not just its frame
        band = (0.04 + 0.96 * i / n + 0.02, 0.04 + 0.96 * (i + 1) / n - 0.02)
        assert nonblank_fraction(str(out), band) > 0.02, (names[i], nonblank_fraction(str(out), band))


@pytest.mark.timeout(120)
def test_plot_of_a_real_postcopy_run(tmp_path: Path, kernel_tracking: None, postcopy: None) -> None:
    """The pictures of a real migration (the postcopy scenario): every panel, none blank."""
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    r = _RUNS.get("postcopy") or run_scenario("postcopy")
    out = tmp_path / "run.png"
    names = plot.plot_migration(r.result, str(out))
    assert names == [plot.PANEL_CONVERGENCE, plot.PANEL_RATES, plot.PANEL_TIMELINE, plot.PANEL_LATENCY]
    for i in range(4):
        band = (0.04 + 0.24 * i + 0.02, 0.04 + 0.24 * (i + 1) - 0.02)
        assert nonblank_fraction(str(out), band) > 0.02, names[i]


# ---- the small CLI items ----


def test_livemig_without_a_command_prints_its_help() -> None:
    r = subprocess.run(LIVEMIG, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0].startswith("Usage:") and len(lines) > 10  # the help as it is, not squashed into one line
    assert any(line.strip().startswith("migrate") for line in lines) and "error" not in r.stderr


@pytest.mark.timeout(60)
def test_listen_on_port_0_says_which_port_it_got() -> None:
    proc = subprocess.Popen([*LIVEMIG, "listen", "127.0.0.1:0", "--once"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("livemig: listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
    finally:
        proc.kill()
        proc.communicate()  # reads and closes its pipes


def test_plot_file_without_an_image_suffix_is_a_usage_error(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    r = subprocess.run([*LIVEMIG, "migrate", "--size", "16M", "--plot", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "no suffix" in r.stderr and ".png" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing migrated, nothing written
