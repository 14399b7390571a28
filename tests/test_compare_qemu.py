"""The QEMU comparison's own parts (bench/compare_qemu.py): the guests assemble to one boot
sector, QEMU's trace is read as request-to-placed latencies, and the reports judge the goals.
QEMU itself is not run here (minutes under TCG): docs/performance.md has a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from livemig.benchmark import qemu, qemu_precopy
from livemig.benchmark.qemu import Run, build_guest, report, request_to_placed_us
from livemig.benchmark.qemu_precopy_guest import (
    LOW_LIMIT,
    MAX_TICK_HZ,
    PACE_OFFSET,
    PIT_HZ,
    build_precopy_guest,
    pace_for,
    ram_layout,
    set_pace,
)

TRACE = """\
100@1700000000.000100:postcopy_place_page host=0x7f0000001000
100@1700000000.000200:postcopy_ram_fault_thread_request Request for HVA=0x7f0000002abc rb=pc.ram offset=0x2000 pid=7
100@1700000000.000210:postcopy_ram_fault_thread_request Request for HVA=0x7f0000002ff0 rb=pc.ram offset=0x2000 pid=8
100@1700000000.000230:postcopy_place_page host=0x7f0000003000
100@1700000000.000250:postcopy_place_page host=0x7f0000002000
100@1700000000.000300:postcopy_ram_fault_thread_request Request for HVA=0x7f0000005000 rb=pc.ram offset=0x5000 pid=7
100@1700000001.000000:postcopy_place_page_zero host=0x7f0000005000
100@1700000001.000100:postcopy_ram_fault_thread_request Request for HVA=0x7f0000009000 rb=pc.ram offset=0x9000 pid=7
"""


def test_the_trace_gives_each_request_the_time_to_its_pages_placement() -> None:
    # Page 2: requested twice (timed from the first), placed 50 us later; page 5: placed as a zero
    # page after 999700 us; page 9: never placed (not counted); pages placed unasked: ignored.
    assert request_to_placed_us(TRACE) == [50.0, 999700.0]
    assert request_to_placed_us("garbage\n" + TRACE.replace("Request", "Rquest")) == []


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None, reason="binutils (as, ld) not installed")
def test_the_guest_assembles_to_one_boot_sector(tmp_path: Path) -> None:
    img = build_guest(tmp_path, 256 << 20).read_bytes()
    assert len(img) == 1 << 20
    assert img[510:512] == b"\x55\xaa"
    assert (256 << 20).to_bytes(4, "little") in img[:510]  # MEM_END, the loop's bound


def _run(p50: float, p99: float, mx: float) -> Run:
    return Run(total_ms=1000, downtime_ms=10, blocktime_ms=5, requests=100, request_p50_us=p50, request_p99_us=p99,
               request_max_us=mx)


def test_the_report_judges_each_goal_as_a_ratio_to_qemu() -> None:
    lines: list[str] = []
    q = [_run(30, 200, 40000), _run(26, 236, 10000)]
    assert report(q, [_run(10, 50, 1000), _run(14, 70, 4000)], lines.append)  # 4000 / 40000 = 0.1
    text = "\n".join(lines)
    assert "request to placed p50 (us)" in text and text.count("met") == 3 and "NOT" not in text
    lines.clear()
    assert not report(q, [_run(10, 50, 5000), _run(14, 70, 4000)], lines.append)  # max 5000 / 40000 > 0.1
    assert sum("NOT met" in ln for ln in lines) == 1


def test_without_qemu_it_says_so_and_exits_0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert qemu.main(["--size", "64M", "--runs", "1"]) == 0
    assert "skipped: qemu-system-x86_64 is not installed" in capsys.readouterr().out


def test_bad_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as e:
        qemu.main(["--size", "64"])
    assert e.value.code == 2


# --- --mode precopy (livemig.benchmark.qemu_precopy): its pure parts and its refusals.


def test_precopy_sizes_parse_as_mib_or_gib_and_refuse_the_rest() -> None:
    assert qemu_precopy.parse_sizes("1G, 4096M") == [1 << 30, 4 << 30]
    for bad in ("1T", "0G", "2M", "9G", "1.5G", ""):
        with pytest.raises(ValueError):
            qemu_precopy.parse_sizes(bad)


def test_precopy_guest_ram_is_split_at_the_low_limit_and_continues_at_4_gib() -> None:
    assert ram_layout(1 << 30) == (1 << 30, 1 << 30, 1 << 30)  # all below 4 GiB: nothing high
    assert ram_layout(LOW_LIMIT) == (LOW_LIMIT, LOW_LIMIT, LOW_LIMIT)
    assert ram_layout(4 << 30) == (LOW_LIMIT, 4 << 30, (4 << 30) + (4 << 30) - LOW_LIMIT)


def test_the_writer_pace_gives_the_rate_at_no_more_than_1000_ticks() -> None:
    for rate in (100.0, 999.0, 2000.0, 5000.0):
        divisor, ppt = pace_for(rate)
        assert PIT_HZ / divisor <= MAX_TICK_HZ * 1.01
        assert abs(PIT_HZ / divisor * ppt / rate - 1) < 0.01
    assert pace_for(2000.0) == (1193, 2)
    for bad in (0.0, -1.0, 10.0, 1e9):
        with pytest.raises(ValueError):
            pace_for(bad)


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None, reason="binutils (as, ld) not installed")
def test_the_precopy_guest_is_one_boot_sector_with_its_pace_and_layout(tmp_path: Path) -> None:
    image = build_precopy_guest(tmp_path, 4 << 30)
    img = image.read_bytes()
    assert len(img) == 1 << 20 and img[510:512] == b"\x55\xaa"
    assert img[PACE_OFFSET:PACE_OFFSET + 4] == bytes(4)  # idle until a pace is set
    low, high_start, high_end = ram_layout(4 << 30)
    for bound in (low, high_start, high_end):  # the movabs operands of the walk
        assert bound.to_bytes(8, "little") in img[:PACE_OFFSET]
    set_pace(image, 1193, 2)
    assert image.read_bytes()[PACE_OFFSET:PACE_OFFSET + 4] == (1193).to_bytes(2, "little") + b"\x02\x00"


def _case(mem: int, qemu_ms: list[float], livemig_ms: list[float]) -> qemu_precopy.Case:
    c = qemu_precopy.Case(mem, writer=False)
    c.qemu = [qemu_precopy.PrecopyRun(total_ms=t, downtime_ms=200, resumed_ms=t) for t in qemu_ms]
    c.livemig = [qemu_precopy.PrecopyRun(total_ms=t, downtime_ms=5, resumed_ms=0.8 * t) for t in livemig_ms]
    return c


def test_the_precopy_report_judges_the_median_totals_against_each_sizes_goal() -> None:
    lines: list[str] = []
    one = _case(1 << 30, [2400, 2000, 9000], [480, 300, 100])  # medians 2400 and 300: 0.125 <= 0.2
    one.fresh_ms, one.warm_ms = [900, 700, 800], [300, 250, 400]
    assert qemu_precopy.report_precopy([one, _case(256 << 20, [100], [900])], lines.append)
    text = "\n".join(lines)
    assert "<= 0.2: met" in text and "NOT" not in text and "no goal at this size" in text
    row = next(ln for ln in lines if ln.startswith("1G idle") and "met" in ln).split()
    # total, resumed (livemig's own), downtime ratios; 0.2 x 2400 ms; the raw copies' medians
    assert row[2:9] == ["0.125", "0.100", "0.025", "480", "800", "/", "300"]
    lines.clear()
    four = _case(4 << 30, [10000, 10000, 10000], [2600, 2400, 3000])  # 2600 / 10000 > 0.25
    assert not qemu_precopy.report_precopy([one, four], lines.append)
    assert [ln.split()[0] for ln in lines if "NOT met" in ln] == ["4G"]
    assert "0.260" in "\n".join(lines)


def test_precopy_without_qemu_says_so_and_exits_0(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert qemu.main(["--mode", "precopy", "--size", "64M", "--runs", "1"]) == 0
    assert "skipped: qemu-system-x86_64 is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--size", "3T"], ["--guest", "busy"], ["--rate", "1e9"], ["--runs", "0"],
                                  ["--downtime-limit", "0"]])
def test_bad_precopy_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        qemu.main(["--mode", "precopy", *args])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_livemig_report_gives_its_rounds_rate_and_when_the_destination_resumed() -> None:
    r = qemu_precopy.livemig_run({
        "total_ms": 650.0, "downtime_ms": 2.5, "precopy_rounds": 2, "bytes_sent": 1 << 30,
        "rounds": [{"started_s": 0.025, "seconds": 0.4, "dirty_rate_pps": 2001.0},
                   {"started_s": 0.425, "seconds": 0.01, "dirty_rate_pps": 1990.0}]})
    assert r.total_ms == 650.0 and r.downtime_ms == 2.5 and r.rate == 1995.5
    assert r.resumed_ms == pytest.approx(437.5)  # the last round's end, then the downtime
    assert r.extra["rounds"] == 2
    idle = qemu_precopy.livemig_run({"total_ms": 10.0, "downtime_ms": 1.0, "rounds": []})
    assert idle.rate == 0.0 and idle.resumed_ms == 0.0
