"""The CLI's pure parts against plain Python models: sizes, capability specs, JSON, the summary."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from livemig import cli, display, plot, wire
from livemig.migration import (
    BalloonReport,
    DestinationSummary,
    HintStats,
    LatencySummary,
    MigrationEvent,
    MigrationResult,
    PostcopyStats,
    RoundStats,
    Snapshot,
    VerifyReport,
)

PAGE_SIZES = st.sampled_from([4096, 16384, 65536])
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@st.composite
def size_texts(draw: st.DrawFn) -> tuple[str, int]:
    """A well-formed size and the bytes it means (model: binary units, any case, B/iB suffix)."""
    n = draw(st.integers(0, 1 << 22))
    unit = draw(st.sampled_from(sorted(UNITS)))
    upper = draw(st.booleans())
    suffix = draw(st.sampled_from(["", "B", "iB", "ib", "b"])) if unit else ""
    space = draw(st.sampled_from(["", " "])) if unit else ""
    text = f"{n}{space}{unit.upper() if upper else unit}{suffix}"
    return draw(st.sampled_from(["", " "])) + text + draw(st.sampled_from(["", "\t"])), n * UNITS[unit]


@given(size_texts(), PAGE_SIZES)
def test_parse_size_matches_the_model(case: tuple[str, int], page_size: int) -> None:
    text, nbytes = case
    if nbytes == 0:
        with pytest.raises(ValueError, match="the size must be positive"):
            cli.parse_size(text, page_size)
    elif nbytes % page_size:
        with pytest.raises(ValueError, match=f"not a multiple of the page size \\({page_size} bytes\\)"):
            cli.parse_size(text, page_size)
    else:
        assert cli.parse_size(text, page_size) == nbytes


@given(st.text(max_size=12), PAGE_SIZES)
def test_parse_size_rejects_anything_not_of_the_form(text: str, page_size: int) -> None:
    # model of the accepted language, written independently of the parser's regex
    body = text.strip()
    digits = len(body) - len(body.lstrip("0123456789"))
    rest = body[digits:].lstrip(" ")
    suffixes = ("", "b", "B", "ib", "iB", "Ib", "IB")
    well_formed = digits > 0 and body[:digits].isascii() and (
        rest == "" or (rest[0] in "kmgtKMGT" and rest[1:] in suffixes)
    )
    if well_formed:
        return  # covered by the model test above
    with pytest.raises(ValueError, match="is not a size"):
        cli.parse_size(text, page_size)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("256M", 256 << 20), ("1G", 1 << 30), ("4096K", 4 << 20), ("65536", 65536), ("2GiB", 2 << 30),
     ("16 MB", 16 << 20), ("1t", 1 << 40)],
)
def test_parse_size_examples(text: str, nbytes: int) -> None:
    assert cli.parse_size(text, 4096) == nbytes


@pytest.mark.parametrize("text", ["1.5G", "-1M", "1e9", "0x1000", "M", "", "1 G B", "10MiBs", "１２K",
                                  "1\tK", "1\u212a", "1\u212aB", "1 \u212a"])  # U+212A: Kelvin sign
def test_parse_size_rejects_examples(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        cli.parse_size(text, 4096)


CAPS = sorted(wire.ALL_CAPABILITIES)
SIDES = {"": "both", "src:": "src", "dst:": "dst"}


@given(st.sampled_from(sorted(SIDES)), st.sampled_from(CAPS))
def test_capability_spec_known_names(prefix: str, name: str) -> None:
    assert cli.parse_capability_spec(prefix + name) == (SIDES[prefix], name)


@given(st.sampled_from(sorted(SIDES)), st.text(max_size=20).filter(lambda s: s not in wire.ALL_CAPABILITIES))
def test_capability_spec_unknown_name(prefix: str, name: str) -> None:
    spec = prefix + name
    if prefix == "" and ":" in name:
        return  # then the text before ':' is a side: covered below
    with pytest.raises(ValueError, match="unknown capability"):
        cli.parse_capability_spec(spec)


@given(st.text(max_size=8).filter(lambda s: s not in ("src", "dst") and ":" not in s), st.sampled_from(CAPS))
def test_capability_spec_unknown_side(side: str, name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown side {re.escape(repr(side))}; use NAME, src:NAME or dst:NAME"):
        cli.parse_capability_spec(f"{side}:{name}")


@given(st.lists(st.tuples(st.sampled_from(["both", "src", "dst"]), st.sampled_from(CAPS)), max_size=12))
def test_split_capabilities_matches_the_model(specs: list[tuple[cli.Side, str]]) -> None:
    src, dst = cli.split_capabilities(specs)
    assert src == {n for s, n in specs if s != "dst"}
    assert dst == {n for s, n in specs if s != "src"}


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:0", True), ("127.1.2.3:9", True), ("[::1]:0", True), ("localhost:0", True),
     ("unix:/tmp/x.sock", True), ("0.0.0.0:0", False), ("[::]:0", False), ("10.1.2.3:7", False),
     ("no-such-host.invalid:1", False)],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert wire.is_loopback(wire.parse_address(address)) is loopback


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=20,
))
def test_json_ready_is_always_valid_json(obj: object) -> None:
    text = json.dumps(display.json_ready(obj), allow_nan=False)

    def model(o: object) -> object:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, list):
            return [model(v) for v in o]
        if isinstance(o, dict):
            return {k: model(v) for k, v in o.items()}
        return o

    assert json.loads(text) == model(obj)


def _result(**kw: object) -> MigrationResult:
    base: dict[str, object] = {
        "ok": True, "mode": "postcopy", "region_bytes": 16 << 20, "page_size": 4096, "total_ms": 812.5, "downtime_ms": 3.25,
        "precopy_rounds": 2, "bytes_sent": 15 << 20, "pages_sent": 3840, "zero_pages": 256,
        "postcopy": PostcopyStats(requests=17, local_fills=900,
                                  fault_latency_us=LatencySummary(64, 512, 900, p90=120, p99_9=800, count=17,
                                                                  over_1ms=0),
                                  request_latency_us=LatencySummary(40, 300, 700, p90=90, p99_9=650, count=17),
                                  blocked_us=LatencySummary(60, 510, 2500, p90=118, p99_9=2400, count=917,
                                                            over_1ms=2, over_10ms=0),
                                  histogram=(0, 0, 3, 9, 5)),
        "hints": HintStats(rounds=2, pages_hinted=2048, stale_dropped=4),
        "balloon": BalloonReport(last_cmd_id=1, done_delivered=True, held_pages_after=0),
        "verify": VerifyReport(pages_checked=4096, mismatches=0, placed_twice=0),
        "rounds": [RoundStats(1, 4096, 4000, 96, 16 << 20, 0.5, float("inf"), 300)],
        "capabilities": ["local-fill", "hints-postcopy"],
    }
    base.update(kw)
    return MigrationResult(**base)  # type: ignore[arg-type]


def _render(table: object) -> str:
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(table)
    return out.getvalue()


def test_summary_table_shows_what_happened() -> None:
    text = _render(display.summary_table(_result()))
    for want in ["livemig migrate: ok", "postcopy", "16.0 MiB (4,096 pages of 4096 B)", "812.5 ms", "3.2 ms",
                 "15.0 MiB (3,840 pages, 256 zero)", "17 requests, 900 local fills",
                 ("fault to placed: p50 64.0 / p90 120.0 / p99 512.0 / p99.9 800.0 / max 900.0 us;"
                  " 0 over 1 ms, 0 over 10 ms"),
                 "request to placed: p50 40.0 / p90 90.0 / p99 300.0 / p99.9 650.0 / max 700.0 us",
                 ("thread blocked: p50 60.0 / p90 118.0 / p99 510.0 / p99.9 2,400.0 / max 2,500.0 us;"
                  " 2 over 1 ms, 0 over 10 ms"),
                 "2 rounds, 2,048 pages hinted, 4 stale dropped",
                 "DONE delivered, 0 pages held after", "4,096 pages checked, 0 mismatches, 0 placed twice",
                 "hints-postcopy, local-fill"]:
        assert want in text, (want, text)


def test_summary_table_of_a_postcopy_without_faults_says_so() -> None:
    r = MigrationResult(ok=True, mode="postcopy", region_bytes=1 << 20, page_size=4096,
                        push_bytes=1 << 20, push_seconds=0.001)
    text = _render(display.summary_table(r))
    assert "none: the guest touched no missing page" in text
    assert "p50 0 us" not in text
    assert "1.0 MiB in 1.0 ms" in text  # the postcopy push


def test_summary_table_of_a_failure_says_why() -> None:
    r = MigrationResult(ok=False, mode="precopy", region_bytes=1 << 20, page_size=4096, error="connect: refused")
    text = _render(display.summary_table(r))
    assert "livemig migrate: FAILED" in text
    assert "connect: refused" in text
    assert "fault latency" not in text  # precopy: no postcopy rows


def test_destination_table() -> None:
    s = DestinationSummary(ok=True, mode="precopy", region_bytes=1 << 30)
    text = _render(display.destination_table(s))
    assert "livemig listen: ok" in text and "1.0 GiB" in text


def test_result_json_has_the_contract_keys_and_is_valid() -> None:
    obj = json.loads(json.dumps(display.json_ready(_result().to_json()), allow_nan=False))
    assert obj["rounds"][0]["bandwidth_bps"] is None  # inf is not JSON
    assert obj["postcopy"]["fault_latency_us"] == {"p50": 64, "p99": 512, "max": 900, "p90": 120, "p99_9": 800,
                                                   "count": 17, "over_1ms": 0, "over_10ms": 0}
    assert set(obj["postcopy"]) >= {"request_latency_us", "blocked_us", "fault_buckets", "request_buckets",
                                    "blocked_buckets", "blocked_total_ms", "histogram"}
    assert obj["postcopy"]["fault_buckets"] == {"lower_us": [], "upper_us": [], "counts": []}
    assert set(obj) >= {"ok", "mode", "region_bytes", "page_size", "total_ms", "downtime_ms", "precopy_rounds",
                        "bytes_sent", "pages_sent", "zero_pages", "postcopy", "hints", "balloon", "verify"}


def _snap(**kw: Any) -> Snapshot:
    base: dict[str, Any] = {
        "side": "source", "t": 1.5, "phase": "precopy", "round": 1, "total_pages": 4096, "bytes_sent": 8 << 20,
        "pages_sent": 2048, "rate_bps": 2 * 2**30, "pages_per_s": 5e5, "dirty_rate_pps": 1234.0,
        "remaining_pages": 100, "round_pages": 1000, "round_pages_left": 100, "round_eta_s": 0.25,
        "faults_per_s": 0.0, "faults": 0, "push_pages": 0, "downtime_ms": None, "recoveries": 0, "attempts": 0,
        "paused_cause": ""}
    base.update(kw)
    return Snapshot(**base)


def test_line_progress_prints_phases_rounds_and_live_figures_once_a_second() -> None:
    out = io.StringIO()
    p = display.LineProgress(out)
    p.phase("precopy")
    p.snapshot(_snap(t=1.5))
    p.snapshot(_snap(t=1.9, round_pages_left=50))  # within a second of the last: not printed
    p.event(MigrationEvent("round_end", "source", 2.0, asdict(RoundStats(
        1, 1000, 990, 10, 4 << 20, 0.5, 8 << 20, 300, dirtied_pages=300, dirty_rate_pps=600.0))))
    p.event(MigrationEvent("progress", "source", 2.0, {}))  # the live figures print it: no line of its own
    p.phase("switchover")
    assert out.getvalue().splitlines() == [
        "livemig: phase precopy",
        ("livemig: precopy round 1: 900 of 1,000 pages · ETA 0:00.2 · 2.0 GiB/s over the last second"
         " · sent 8.0 MiB (2,048 pages) · tracker: 1,234 pages/s dirtied · 100 dirty left · 0:01.5"),
        ("livemig: 0:02.0 round 1: sent 1,000 of 1,000 dirty pages (4.0 MiB) in 0.50 s at 8.0 MiB/s;"
         " 300 dirtied meanwhile (600 pages/s); 300 left"),
        "livemig: phase switchover",
    ]


def test_snapshot_lines_say_each_phase() -> None:
    head, tail, done = display.snapshot_lines(_snap(phase="postcopy", remaining_pages=96, faults_per_s=40.0,
                                                    faults=12, push_pages=4000, downtime_ms=3.25, recoveries=1))
    assert head == "postcopy: 4,000 of 4,096 pages sent · 96 still on the source · 40 faults/s (12 in all)"
    assert "downtime 3.2 ms" in tail and "1 recovery" in tail and done == 4000 / 4096
    head, tail, done = display.snapshot_lines(_snap(phase="paused", attempts=2, paused_cause="connection reset"))
    assert head == "paused for recovery (attempt 3): connection reset" and done is None
    head, _, _ = display.snapshot_lines(_snap(side="destination", phase="postcopy", remaining_pages=96,
                                              faults_per_s=7.0, faults=9))
    assert head == "postcopy: 4,000 of 4,096 pages here"


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 << 30, "3.0 GiB")])
def test_format_bytes(n: int, text: str) -> None:
    assert display.format_bytes(n) == text


def test_plot_writes_a_png(tmp_path: object) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    from pathlib import Path

    out = Path(str(tmp_path)) / "m.png"
    assert plot.plot_migration(_result(), str(out)) == [plot.PANEL_CONVERGENCE, plot.PANEL_RATES,
                                                         plot.PANEL_TIMELINE, plot.PANEL_LATENCY]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.plot_migration(_result(rounds=[], postcopy=PostcopyStats()), str(out))  # empty data still plots
    assert out.stat().st_size > 0
    with pytest.raises(ValueError, match="no suffix"):
        plot.plot_migration(_result(), str(Path(str(tmp_path)) / "m"))


def test_the_report_carries_the_three_latency_measures_and_their_buckets() -> None:
    from livemig.migration.results import (
        DestinationSummary,
        LatencyBuckets,
        decode_report,
        encode_report,
    )

    buckets = LatencyBuckets(lower_us=(9.984, 10.112), upper_us=(10.112, 10.240), counts=(3, 1))
    pc = PostcopyStats(requests=4, fault_latency_us=LatencySummary(10.0, 10.2, 10.2, p90=10.2, p99_9=10.2, count=4),
                       request_latency_us=LatencySummary(8.0, 9.0, 9.5, count=4),
                       blocked_us=LatencySummary(10.0, 12.0, 1500.0, count=6, over_1ms=1), fault_buckets=buckets,
                       blocked_total_ms=1.56, histogram=buckets.power_of_two())
    summary, digests = decode_report(encode_report(DestinationSummary(ok=True, mode="postcopy", region_bytes=1 << 20,
                                                                      postcopy=pc), None))
    assert summary.postcopy == pc and digests is None
    assert pc.histogram[4] == 4 and sum(pc.histogram) == 4  # both buckets lie in [8, 16) us
