"""The repeated-runs script's own parts (bench/postcopy_runs.py): one run reads a real migration's
three latency measures and the TCP counters around it; the summary judges the goals against the
floor of the same runs."""

from __future__ import annotations

import pytest

from livemig.benchmark.repeated import RunFigures, one_run, read_counters, summary
from livemig.destination import postcopy_unsupported_reason


def _run(p50: float, p99: float, top: float, retrans: int = 0) -> RunFigures:
    lat = {"p50": p50, "p99": p99, "max": top, "over_1ms": float(top > 1000), "count": 100.0}
    return RunFigures(20.0, 30.0, {"fault": lat, "request": dict(lat), "blocked": dict(lat)},
                      {"Tcp.RetransSegs": retrans} if retrans else {})


def test_the_summary_judges_each_goal_on_the_medians_and_the_worst_run() -> None:
    lines: list[str] = []
    assert summary([_run(25, 35, 400), _run(26, 38, 900), _run(40, 90, 950)], lines.append)
    assert "met: no fault above 1 ms (worst 950.0 us)" in "\n".join(lines)
    # Over 30 us and over 1.3x the floor (20 us): p50 not met; one slow fault anywhere: max not met.
    lines.clear()
    assert not summary([_run(27, 35, 400), _run(28, 38, 1500, retrans=2), _run(40, 90, 950)], lines.append)
    text = "\n".join(lines)
    assert "NOT met: no fault above 1 ms (worst 1,500.0 us)" in text
    assert "met: fault p50 28.0 us" in text and "NOT met: 0 retransmitted segments (2;" in text


@pytest.mark.timeout(60)
def test_one_run_reads_a_migrations_latencies_and_the_counters_around_it() -> None:
    if (why := postcopy_unsupported_reason()) is not None:
        pytest.skip(why)
    assert read_counters()["Tcp.RetransSegs"] >= 0
    r = one_run(["--size", "16M", "--workload", "increment", "--postcopy", "--postcopy-after", "1"],
                lambda: (12.0, 15.0), timeout=50)
    assert r.ok and (r.floor_p50_us, r.floor_p99_us) == (12.0, 15.0) and r.total_ms > 0
    assert set(r.latency) == {"fault", "request", "blocked"}
    fault = r.latency["fault"]  # the push may win every race: then no fault at all, and zeros
    assert 0 <= fault["p50"] <= fault["p99"] <= fault["max"] and (fault["max"] > 0) == (fault["count"] > 0)
    assert r.latency["blocked"]["count"] >= fault["count"]
