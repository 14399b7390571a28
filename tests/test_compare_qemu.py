"""The QEMU comparison's own parts (bench/compare_qemu.py): the guest assembles to one boot
sector, QEMU's trace is read as request-to-placed latencies, and the report judges the goals.
QEMU itself is not run here (minutes under TCG): docs/performance.md has a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from livemig.benchmark import qemu
from livemig.benchmark.qemu import Run, build_guest, report, request_to_placed_us

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
