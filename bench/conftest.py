"""Benchmark session hooks: print every engine figure beside its same-run baseline."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # bench_support, importable from every bench file


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    benchmarks = list(getattr(session, "benchmarks", []))
    with_goals = [b for b in benchmarks if b.extra_info.get("goals")]
    if with_goals:
        terminalreporter.section("goals (from the docstrings; measured in this run)")
        for b in with_goals:
            for g in b.extra_info["goals"]:
                terminalreporter.write_line(
                    f"{b.name:<55} {g['goal']:<48} measured {g['goal_measured']:.4g} vs {g['goal_target']:.4g}"
                    f"  ratio {g['goal_ratio']}  {'met' if g['goal_met'] else 'NOT MET'}")
    rows = [b for b in benchmarks if "time_ratio_vs_baseline" in b.extra_info]
    if not rows:
        return
    terminalreporter.section("engine vs baseline (same run; time ratio, < 1 is faster)")
    for b in rows:
        info = b.extra_info
        terminalreporter.write_line(
            f"{b.name:<55} {b.stats.median * 1e6:12.1f} us  vs {info['baseline']:<32}"
            f" {info['baseline_median_s'] * 1e6:12.1f} us  ratio {info['time_ratio_vs_baseline']:.3f}"
            + (f"  ({info['note']})" if "note" in info else "")
        )
