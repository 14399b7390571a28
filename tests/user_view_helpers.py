"""Real migrations for the user-view tests (a 16 MiB model guest through a relay to a destination
in a child process: precopy, postcopy, postcopy with hints, postcopy with a recovery), with their
events, and the check of every field of the JSON report against what the destination observed or
an independent count (the relay's bytes, the guest's own counters, the core's bucket bounds, the
source's timeline)."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from livemig.guest import GuestConfig
from livemig.migration import DestinationConfig, MigrationConfig, MigrationEvent, MigrationResult
from livemig.migration.results import POWER_OF_TWO_UPPER_US, LatencyBuckets

from fault_relay import FaultRelay
from recovery_helpers import Outcome, PhaseHook, assert_completed, run_through_relay

MIB = 1 << 20
SIZE = 16 * MIB
SLOW_LINK = 40e6  # bytes/s: rounds long enough for the guest to dirty pages meanwhile
#: Bytes the source sends beside its page passes: handshake, device state, commands, discards,
#: local-fill and END frames (a 16 MiB region: a few KiB; generous).
CONTROL_BYTES = 256 * 1024
SECRET = b"user-view secret"


def _cut_in_postcopy(relay: FaultRelay, _proc: Any) -> PhaseHook:
    def on_phase(name: str) -> None:
        if name == "postcopy" and relay.cuts_done == 0:
            relay.arm_cut_after("to_source", 24 * 8)  # the ACK and a few requests, then the cut

    return PhaseHook(on_phase)


@dataclass(frozen=True)
class Scenario:
    guest: GuestConfig
    config: MigrationConfig
    rate_bps: float = 0.0
    progress: Callable[[FaultRelay, Any], PhaseHook] | None = None
    dest: DestinationConfig | None = None


SCENARIOS = {
    # Three rounds (the downtime limit is never met), then forced switchover.
    "precopy": Scenario(GuestConfig(workload="random", rate=20000.0, seed=3),
                        MigrationConfig(verify=True, hints=False, downtime_limit_ms=0.001, max_rounds=3),
                        rate_bps=4 * SLOW_LINK),
    "postcopy": Scenario(GuestConfig(workload="random", rate=20000.0, seed=4),
                         MigrationConfig(postcopy=True, verify=True, hints=False), rate_bps=SLOW_LINK),
    "hints": Scenario(GuestConfig(workload="random", rate=5000.0, free_fraction=0.5, seed=5),
                      MigrationConfig(postcopy=True, verify=True, hints=True), rate_bps=SLOW_LINK),
    # Encrypted (TLS 1.3 keyed by the shared secret): the resumed connection runs a fresh handshake.
    "recovery": Scenario(GuestConfig(workload="increment", rate=20000.0, free_fraction=0.5, seed=7),
                         MigrationConfig(postcopy=True, hints=True, verify=True, reconnect_deadline_s=20, timeout=10,
                                         secret=SECRET, encrypt=True),
                         rate_bps=SLOW_LINK, progress=_cut_in_postcopy,
                         dest=DestinationConfig(timeout=10, resume_deadline_s=10, secret=SECRET, encrypt=True)),
}


@dataclass
class Run:
    name: str
    scenario: Scenario
    out: Outcome
    events: list[MigrationEvent] = field(default_factory=list)
    wall_ms: float = 0.0

    @property
    def result(self) -> MigrationResult:
        assert self.out.result is not None, self.out.error
        return self.out.result

    @property
    def dest(self) -> dict[str, Any]:
        assert isinstance(self.out.dest, dict), self.out.dest
        return self.out.dest


def run_scenario(name: str) -> Run:
    sc = SCENARIOS[name]
    events: list[MigrationEvent] = []
    t0 = time.perf_counter()
    out = run_through_relay(sc.guest, sc.config, size=SIZE, dest=sc.dest, rate_bps=sc.rate_bps,
                            progress=sc.progress, events=events.append)
    run = Run(name, sc, out, events, (time.perf_counter() - t0) * 1e3)
    assert_completed(out)
    return run


def json_paths(obj: Any, prefix: str = "") -> set[str]:
    """The leaf paths of a JSON object: ``a.b``; ``rounds[].x`` for lists of objects."""
    paths: set[str] = set()
    for k, v in obj.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict) and p not in ("workload.stats",):
            paths |= json_paths(v, p + ".")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                paths |= json_paths(item, p + "[].")
        else:
            paths.add(p)
    return paths


def _quantile_mid(buckets: dict[str, list[float]], q: float, mx: float) -> float:
    """The destination's quantile rule, recomputed here: the middle of the log-linear bucket holding
    the q-th sample (its lower bound plus half its width less a nanosecond), capped at the maximum."""
    counts = buckets["counts"]
    target = max(1, int(q * sum(counts) + 0.999999))
    cum = 0
    for lo, hi, c in zip(buckets["lower_us"], buckets["upper_us"], counts, strict=True):
        cum += c
        if cum >= target:
            return min(lo + (hi - lo - 1e-3) / 2, mx)
    raise AssertionError("unreachable")


def _check_latency(ok: Callable[..., None], path: str, lat: dict[str, Any], bpath: str,
                   fine: dict[str, list[float]]) -> None:
    """One latency measure against its own buckets: contiguous log-linear buckets (each at most
    1/64 of its lower bound wide), the quantiles by the destination's rule, max in the top bucket,
    the counts over 1 ms and 10 ms between what the buckets allow."""
    lo, hi, counts = fine["lower_us"], fine["upper_us"], fine["counts"]
    ok(f"{bpath}.counts", len(counts) == len(lo) == len(hi) and all(n > 0 for n in counts) and sum(counts) == lat["count"])
    ok(f"{bpath}.lower_us", all(a < b for a, b in itertools.pairwise(lo)), lo)
    ok(f"{bpath}.upper_us", all(0 < h - x <= max(x / 64, 1e-3) + 1e-9 for x, h in zip(lo, hi, strict=True)), (lo, hi))
    ok(f"{path}.count", lat["count"] >= 0)
    if not counts:
        for key in ("p50", "p90", "p99", "p99_9", "max", "over_1ms", "over_10ms"):
            ok(f"{path}.{key}", lat[key] == 0)
        return
    ok(f"{path}.max", lo[-1] <= lat["max"] < hi[-1] + 1e-3, (lat, lo[-1], hi[-1]))
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99_9")):
        ok(f"{path}.{key}", math.isclose(lat[key], _quantile_mid(fine, q, lat["max"])), (lat, key))
    for key, limit in (("over_1ms", 1000.0), ("over_10ms", 10_000.0)):
        surely = sum(n for n, x in zip(counts, lo, strict=True) if x > limit)
        maybe = sum(n for n, h in zip(counts, hi, strict=True) if h > limit)
        ok(f"{path}.{key}", surely <= lat[key] <= maybe, (lat, key))


def _check_prefault(ok: Callable[..., None], p: dict[str, Any], dest: dict[str, Any], pages: int,
                    postcopy: bool) -> None:
    """The destination's prefault (on by default): its own summary's, and consistent in itself."""
    ok("prefault.threads", p == json.loads(json.dumps(dest)) and 1 <= p["threads"] <= 8, (p, dest))
    ok("prefault.added_threads", 0 <= p["threads"] + p["added_threads"] <= 8)
    ok("prefault.tried", not p["tried"] or (p["tried"][0] == 1 and p["threads"] in p["tried"]))
    ok("prefault.tried_gbps", len(p["tried_gbps"]) == len(p["tried"]) and all(g > 0 for g in p["tried_gbps"]))
    ok("prefault.populated_pages", 0 <= p["populated_pages"] <= pages)
    # Dropped only at a postcopy switchover (pages of the chunks it touched, not received).
    ok("prefault.dropped_pages", p["dropped_pages"] <= pages and (postcopy or p["dropped_pages"] == 0))
    ok("prefault.jumps", p["jumps"] >= 0)
    ok("prefault.seconds", p["seconds"] > 0)
    ok("prefault.finished", isinstance(p["finished"], bool))
    ok("prefault.failed", p["failed"] is False)


def check_fields(run: Run) -> set[str]:
    """Asserts every field of the run's JSON report against an independent figure; returns the
    paths it checked (the caller compares them with the report's)."""
    r, d, sc, out = run.result, run.dest, run.scenario, run.out
    j = json.loads(json.dumps(r.to_json()))  # as --json prints it
    seen: set[str] = set()

    def ok(path: str, cond: bool, why: object = "") -> None:
        seen.add(path)
        assert cond, f"{run.name}: {path}: {why or j.get(path.split('.')[0])}"

    cfg = sc.config
    pages = SIZE // r.page_size
    ok("ok", j["ok"] is True and d["ok"] is True)
    ok("mode", j["mode"] == ("postcopy" if cfg.postcopy else "precopy") == d["mode"])
    ok("outcome", j["outcome"] == "completed" and "interrupt" not in j)  # no interrupt, nothing failed
    ok("region_bytes", j["region_bytes"] == SIZE == d["region_bytes"])
    ok("page_size", j["page_size"] == 4096)
    ok("total_ms", 0 < j["total_ms"] <= run.wall_ms, (j["total_ms"], run.wall_ms))
    ok("downtime_ms", 0 < j["downtime_ms"] < j["total_ms"])
    ok("downtime_limit_ms", j["downtime_limit_ms"] == cfg.downtime_limit_ms)
    split = j["downtime_split"]
    for step, ms in split.items():  # the steps add up to the downtime
        ok(f"downtime_split.{step}", 0 <= ms <= j["downtime_ms"]
           and sum(split.values()) == pytest.approx(j["downtime_ms"]), j["downtime_split"])
    # The destination's own part of the resume step, on its clock: what its report says, and less
    # than the step the source timed around it (the frames and the round trip are in that too).
    own = j["destination_resume_ms"]
    ok("destination_resume_ms", 0 < own < split["resume_ms"] and own == d["resume_ms"], (own, split, d["resume_ms"]))
    _check_prefault(ok, j["prefault"], d["prefault"], pages, cfg.postcopy)
    if "drain" in j:  # precopy-drain: sent before the pause, plus the final dirty set, is everything
        dr = j["drain"]
        ok("drain.sent_pages", not cfg.postcopy and not out.cuts
           and dr["sent_pages"] + j["switchover_pages"] == j["pages_sent"] + j["zero_pages"], (dr, j["pages_sent"]))
        ok("drain.received_pages", dr["received_pages"] == dr["sent_pages"], dr)
        ok("drain.ms", 0 < dr["ms"] < j["total_ms"] - j["downtime_ms"], dr)
    else:
        ok("drain", cfg.postcopy, "a precopy run without its drain")
    want_rounds = cfg.postcopy_after if cfg.postcopy else cfg.max_rounds
    ok("precopy_rounds", j["precopy_rounds"] == len(j["rounds"]) == want_rounds, j["precopy_rounds"])
    # The relay saw every byte: the page passes plus a little control traffic (no cut lost any here).
    if not out.cuts:
        ok("bytes_sent", j["bytes_sent"] <= out.to_destination <= j["bytes_sent"] + CONTROL_BYTES,
           (j["bytes_sent"], out.to_destination))
    else:  # bytes sent into a connection that was cut may never have reached the relay
        ok("bytes_sent", out.to_destination <= j["bytes_sent"] + (1 + out.cuts) * CONTROL_BYTES
           and j["bytes_sent"] >= j["pages_sent"] * r.page_size, (j["bytes_sent"], out.to_destination))
        # every page went (once or more) or was hinted free and resolved without being sent
        ok("pages_sent", j["pages_sent"] + j["zero_pages"] + j["hints"]["pages_hinted"] >= pages)
    sent = j["pages_sent"] + j["zero_pages"]
    if not out.cuts:  # exactly what the destination read
        ok("pages_sent", sent == d["pages_received"], (sent, d["pages_received"]))
    else:  # what a cut lost in flight was requeued and sent again
        ok("pages_sent", d["pages_received"] <= sent <= d["pages_received"] + j["requeued_pages"],
           (sent, d["pages_received"], j["requeued_pages"]))
    ok("zero_pages", j["zero_pages"] == 0 or sc.guest.free_fraction > 0 or sc.guest.fill == "zero")
    ok("throughput_bps", j["throughput_bps"] == pytest.approx(j["bytes_sent"] / (j["total_ms"] / 1e3)))
    # Rounds: each one's remaining is the next one's dirty set, figures add up to the totals.
    rounds = j["rounds"]
    for i, x in enumerate(rounds):
        ok("rounds[].index", x["index"] == i)
        first = pages - (j["hints"]["pages_hinted"] if cfg.hints else 0)  # D starts full; hints clear some
        ok("rounds[].dirty_pages", 0 < x["dirty_pages"] <= pages and (i > 0 or x["dirty_pages"] >= first))
        ok("rounds[].pages_sent", x["pages_sent"] + x["zero_pages"] <= x["dirty_pages"])
        ok("rounds[].zero_pages", x["zero_pages"] >= 0)
        ok("rounds[].bytes_sent", x["bytes_sent"] >= x["pages_sent"] * r.page_size)
        ok("rounds[].seconds", 0 < x["seconds"] < j["total_ms"] / 1e3)
        ok("rounds[].bandwidth_bps", x["bandwidth_bps"] == pytest.approx(x["bytes_sent"] / x["seconds"]))
        nxt = rounds[i + 1]["dirty_pages"] if i + 1 < len(rounds) else None
        ok("rounds[].remaining_pages", nxt is None or x["remaining_pages"] == nxt, (x, nxt))
        ok("rounds[].dirtied_pages", x["remaining_pages"] >= x["dirtied_pages"] - 0 if not cfg.hints else True)
        ok("rounds[].dirty_rate_pps", 0 < x["dirty_rate_pps"] <= 1.5 * sc.guest.rate, x["dirty_rate_pps"])
        ok("rounds[].started_s", x["started_s"] >= 0 and (i == 0 or x["started_s"] > rounds[i - 1]["started_s"]))
    ok("rounds[].pages_sent", sum(x["pages_sent"] + x["zero_pages"] for x in rounds) <= sent)
    ok("rounds[].bytes_sent", sum(x["bytes_sent"] for x in rounds) <= j["bytes_sent"])
    if not cfg.hints:  # nothing clears D but sending: what the last round left is still dirty at the pause
        ok("switchover_pages", j["switchover_pages"] >= rounds[-1]["remaining_pages"] > 0)
    ok("switchover_pages", 0 <= j["switchover_pages"] <= pages)
    # Postcopy: the destination's counts, checked against the source's timeline and the core.
    pc = j["postcopy"]
    ok("postcopy.outstanding_requests", pc["outstanding_requests"] == 0)
    ok("postcopy.histogram_upper_us", not cfg.postcopy or tuple(pc["histogram_upper_us"]) == POWER_OF_TWO_UPPER_US)
    hist = pc["histogram"]
    ok("postcopy.histogram", sum(hist) <= max(pc["faults"], 0) and (sum(hist) > 0) == (pc["faults"] > 0))
    fine = pc["fault_buckets"]
    ok("postcopy.histogram", not cfg.postcopy or sum(hist) == pc["fault_latency_us"]["count"]
       and list(LatencyBuckets(**{k: tuple(v) for k, v in fine.items()}).power_of_two()) == hist)
    for measure, bk in (("fault_latency_us", "fault_buckets"), ("request_latency_us", "request_buckets"),
                        ("blocked_us", "blocked_buckets")):
        _check_latency(ok, f"postcopy.{measure}", pc[measure], f"postcopy.{bk}", pc[bk])
    # Independent counts: a fault event blocks one thread (timed once); a fault waits on one page.
    ok("postcopy.blocked_us.count", pc["blocked_us"]["count"] == pc["faults"], (pc["blocked_us"], pc["faults"]))
    ok("postcopy.fault_latency_us.count", pc["fault_latency_us"]["count"] <= pc["faults"])
    ok("postcopy.request_latency_us.count",
       (pc["request_latency_us"]["count"] > 0) == (pc["requests"] > 0) and pc["request_latency_us"]["count"] <= pc["faults"])
    blocked = pc["blocked_buckets"]
    ok("postcopy.blocked_total_ms",
       sum(n * lo for n, lo in zip(blocked["counts"], blocked["lower_us"], strict=True)) / 1e3 - 1e-9
       <= pc["blocked_total_ms"] <= sum(n * hi for n, hi in zip(blocked["counts"], blocked["upper_us"], strict=True)) / 1e3,
       pc["blocked_total_ms"])
    tl = j.get("timeline")
    if cfg.postcopy:
        assert tl is not None
        ok("postcopy.requests", pc["requests"] == sum(tl["requests"]) or out.cuts > 0,
           (pc["requests"], sum(tl["requests"])))
        ok("postcopy.faults", pc["faults"] >= pc["requests"] and (pc["faults"] > 0 or cfg.hints))
        ok("postcopy.local_fills", pc["local_fills"] <= pc["faults"])
        ok("postcopy.local_fill_pages", pc["local_fill_pages"] <= j["hints"]["pages_hinted"] or not cfg.hints)
        ok("postcopy_pages_left", j["postcopy_pages_left"] == tl["left_at_start"] > 0)
        # Every page left at the start went once, by push or on request (a cut requeues some).
        moved = sum(tl["push_pages"]) + sum(tl["request_pages"])
        ok("timeline.push_pages", moved == j["postcopy_pages_left"] + (j["requeued_pages"] if out.cuts else 0)
           or (out.cuts > 0 and moved >= j["postcopy_pages_left"]), (moved, j["postcopy_pages_left"]))
        ok("timeline.request_pages", sum(tl["request_pages"]) <= moved)
        ok("timeline.requests", len(tl["requests"]) >= 1)
        ok("timeline.left_pages", all(0 <= v <= tl["left_at_start"] + j["requeued_pages"] for v in tl["left_pages"]))
        ok("timeline.left_at_start", tl["left_at_start"] <= pages)
        ok("timeline.bin_seconds", tl["bin_seconds"] == pytest.approx(0.01))
        ok("timeline.start_s", 0 < tl["start_s"] < j["total_ms"] / 1e3)
        ok("push_bytes", 0 < j["push_bytes"] <= j["bytes_sent"])
        ok("push_seconds", 0 < j["push_seconds"] < j["total_ms"] / 1e3)
    else:
        assert tl is None
        for path in ("postcopy.requests", "postcopy.faults", "postcopy.local_fills", "postcopy.local_fill_pages",
                     "postcopy_pages_left", "push_bytes", "push_seconds"):
            ok(path, j[path.split(".")[0]] == 0 if "." not in path else pc[path.split(".")[1]] == 0)
    # Hints: the device's counts against the guest driver's own.
    h, ws = j["hints"], j["workload"]["stats"]
    ok("hints.pages_hinted", h["pages_hinted"] == ws["pages_hinted"] if cfg.hints else h["pages_hinted"] == 0,
       (h, ws))
    ok("hints.rounds", h["rounds"] >= 1 if cfg.hints and sc.guest.free_fraction > 0 else True)
    ok("hints.stale_dropped", 0 <= h["stale_dropped"] <= max(h["pages_hinted"], 0) + ws["pages_hinted"])
    b = j["balloon"]
    ok("balloon.last_cmd_id", b == d["balloon"] and b["last_cmd_id"] in (0, 1))
    ok("balloon.done_delivered", b["done_delivered"] is True)
    ok("balloon.held_pages_after", b["held_pages_after"] == 0)
    v = j["verify"]
    ok("verify.pages_checked", v["pages_checked"] + v["excepted"] == pages)
    ok("verify.mismatches", v["mismatches"] == 0 and v["missing"] == 0)
    ok("verify.missing", v["missing"] <= v["mismatches"])
    ok("verify.placed_twice", v["placed_twice"] == 0 == d["placed_twice"])
    ok("verify.excepted", v["excepted"] >= 0 and (v["excepted"] == 0 or cfg.hints))
    ok("verify.first_mismatches", v["first_mismatches"] == [])
    ok("verify.digests", v["digests"] is True)
    wl = v["workload"]
    ok("verify.workload.ok", wl["ok"] is True and wl == d["verify"]["workload"])
    ok("verify.workload.pages_checked", wl["pages_checked"] > 0)
    ok("verify.workload.mismatches", wl["mismatches"] == 0)
    ok("verify.workload.detail", isinstance(wl["detail"], str))
    ok("capabilities", set(j["capabilities"]) >= {"digests", "hints-postcopy"})
    ok("error", j["error"] is None)
    ok("recoveries", j["recoveries"] == out.cuts == d["recoveries"], (j["recoveries"], out.cuts, d["recoveries"]))
    ok("requeued_pages", (j["requeued_pages"] > 0) == (out.cuts > 0) and j["requeued_pages"] <= pages)
    ok("workload.kind", j["workload"]["kind"] == d["workload_kind"] == "model-guest")
    ok("workload.stats", ws["pages_written"] > 0)
    _check_tls(ok, j["tls"], d["tls"], cfg.encrypt is True)
    return seen


def _check_tls(ok: Callable[..., None], t: dict[str, Any], dt: dict[str, Any], encrypted: bool) -> None:
    """The report's ``tls`` against the destination's: the same session seen from both ends."""
    for key in ("enabled", "keying", "cipher", "channels"):
        ok(f"tls.{key}", t[key] == dt[key], (t, dt))
    ok("tls.enabled", t["enabled"] is encrypted)
    ok("tls.keying", t["keying"] == ("psk" if encrypted else ""))
    ok("tls.cipher", t["cipher"].startswith("TLS_") if encrypted else t["cipher"] == "")
    ok("tls.channels", t["channels"] >= 2 if encrypted else t["channels"] == 0)  # main + return path at least
    ok("tls.peer", t["peer"] == ("psk:livemig-v1" if encrypted else "") == dt["peer"])
    ok("tls.handshake_ms", (t["handshake_ms"] > 0) == encrypted and (dt["handshake_ms"] > 0) == encrypted)
    paths = set(t["record_path"].replace("+", ",").split(",")) if encrypted else {""}
    ok("tls.record_path", paths <= ({"userspace", "openssl", "ktls"} if encrypted else {""}), t["record_path"])
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            kernel_tls = "tls" in f.read().split()
    except OSError:
        kernel_tls = False
    ok("tls.ktls", t["ktls"] is (encrypted and "ktls" in paths) and (not t["ktls"] or kernel_tls))
    ok("tls.ktls_unavailable", bool(t["ktls_unavailable"]) == (encrypted and not t["ktls"]), t["ktls_unavailable"])


ROUND_FIELDS = {"index", "dirty_pages", "pages_sent", "zero_pages", "bytes_sent", "seconds", "bandwidth_bps",
                "remaining_pages", "dirtied_pages", "dirty_rate_pps", "started_s"}
#: The source's events and their fields as docs/cli.md documents them (schema livemig.events/1).
SCHEMA_FIELDS = {
    "start": {"address", "mode", "region_bytes", "page_size", "pages", "workload", "config"},
    "phase": {"phase"},
    "round_begin": {"round", "dirty_pages"},
    "round_end": ROUND_FIELDS,
    "switchover": {"mode", "downtime_ms", "switchover_pages"},
    "progress": {"phase", "round", "total_pages", "bytes_sent", "pages_sent", "rate_bps", "pages_per_s",
                 "dirty_rate_pps", "remaining_pages", "round_pages", "round_pages_left", "round_eta_s",
                 "faults_per_s", "faults", "push_pages", "downtime_ms", "recoveries", "attempts", "paused_cause"},
    "faults": {"faults_per_s", "threshold_per_s", "faults"},
    "paused": {"cause", "recoveries"},
    "resume_attempt": {"attempt", "error"},
    "resumed": {"recoveries", "attempts", "requeued_pages"},
    "end": {"ok", "error", "report"},
}


def check_events(run: Run) -> None:
    """The run's event stream tells the same story as its report, in the documented schema."""
    evs, r = run.events, run.result
    for e in evs:
        assert set(e.data) == SCHEMA_FIELDS[e.kind], (e.kind, sorted(e.data))
        line = e.to_json()
        assert line["schema"] == "livemig.events/1" and line["event"] == e.kind and json.loads(json.dumps(line))
    kinds = [e.kind for e in evs]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("end") == 1, kinds
    assert all(e.side == "source" for e in evs)
    ts = [e.t for e in evs]
    assert ts == sorted(ts)
    j = r.to_json()
    end = evs[-1].data
    assert end["ok"] is True and end["error"] is None
    assert end["report"]["rounds"] == j["rounds"] and end["report"]["bytes_sent"] == j["bytes_sent"]
    ends = [e.data for e in evs if e.kind == "round_end"]
    begins = [e.data for e in evs if e.kind == "round_begin"]
    assert ends == j["rounds"]  # the same figures, field by field
    assert [b["round"] for b in begins] == [x["index"] for x in j["rounds"]]
    assert [b["dirty_pages"] for b in begins] == [x["dirty_pages"] for x in j["rounds"]]
    [sw] = [e.data for e in evs if e.kind == "switchover"]
    assert sw == {"mode": r.mode, "downtime_ms": r.downtime_ms, "switchover_pages": r.switchover_pages}
    phases = [e.data["phase"] for e in evs if e.kind == "phase"]
    want = ["connect", "precopy", "switchover"] + (["postcopy"] if r.mode == "postcopy" else []) + ["complete"]
    assert [p for p in phases if p not in ("paused",)][: len(want)] == want or run.out.cuts, phases
    assert kinds.count("paused") == kinds.count("resumed") == r.recoveries
    for e in evs:
        if e.kind == "progress":
            assert 0 <= e.data["bytes_sent"] <= r.bytes_sent and 0 <= e.data["remaining_pages"] <= r.region_bytes
    prog = [e.data for e in evs if e.kind == "progress"]
    assert [p["bytes_sent"] for p in prog] == sorted(p["bytes_sent"] for p in prog)  # cumulative


def nonblank_fraction(png: str, rows: tuple[float, float]) -> float:
    """The share of pixels in the band of rows (fractions of the height) that are not background."""
    import matplotlib.image as mpimg

    img = np.asarray(mpimg.imread(png))[..., :3]
    h = img.shape[0]
    band = img[int(rows[0] * h): int(rows[1] * h)]
    return float((band.min(axis=2) < 0.9).mean())


__all__ = ["SCENARIOS", "Run", "check_events", "check_fields", "json_paths", "nonblank_fraction", "run_scenario"]
