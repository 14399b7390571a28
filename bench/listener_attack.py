"""The listener under attack (issue 19's figure): authenticated migrations to ``livemig listen``
while strangers hold stalled connections and flood it with connect/close, each timed beside a
quiet run in the same session (alternated: quiet, attacked, quiet, ...).

Goal: with 200 stalled unauthenticated connections held and a 1,000/s connect/close flood, 20
authenticated migrations in a row all succeed, each within 1.5x of the quiet runs' median.

    PYTHONPATH=python python bench/listener_attack.py                       # the goal's figure
    PYTHONPATH=python python bench/listener_attack.py --migrations 5 --stalled 50 --flood 300
    PYTHONPATH=python python bench/listener_attack.py --listener-pythonpath /other/checkout/python \\
        --no-gate-flags                                                      # an older listener

Loopback only. Prints one line per run and a summary; ``--json FILE`` writes them too."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livemig import local, migration
from livemig.errors import LivemigError
from livemig.guest import GuestConfig
from livemig.workload import ModelGuest

SECRET = b"listener-attack-bench-secret"
GOAL_RATIO = 1.5


def _one(address: str, cfg: migration.MigrationConfig, size: int) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    try:
        r = migration.migrate(address, ModelGuest(size, GuestConfig(workload="increment")), cfg)
        ok, why = r.ok and (r.verify is None or r.verify.mismatches == 0), r.error or ""
    except LivemigError as e:
        ok, why = False, str(e)
    return ok, time.perf_counter() - t0, why


def _attacker(host: str, port: int, a: argparse.Namespace) -> subprocess.Popen[str]:
    """The strangers, in a process of their own (no interpreter shared with the measured source)."""
    return subprocess.Popen([sys.executable, "-m", "livemig.benchmark.attack", host, str(port), "--stalled",
                             str(a.stalled), "--flood", str(a.flood), "--stall-from", a.stall_from,
                             "--flood-from", a.flood_from], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read_held(p: subprocess.Popen[str]) -> int:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("held "):
        raise RuntimeError(f"the attacker did not start: {line!r}")
    return int(line.split()[1])


def _stop_attacker(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = p.communicate(timeout=60)
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=20)
    ap.add_argument("--stalled", type=int, default=200)
    ap.add_argument("--flood", type=float, default=1000.0, help="connect/close per second")
    ap.add_argument("--size", type=int, default=64 << 20, help="guest bytes")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--precopy", action="store_true", help="precopy (default: postcopy)")
    ap.add_argument("--stall-from", default="127.0.0.1", help="the stalled connections' address")
    ap.add_argument("--flood-from", default="127.0.0.2", help="the flood's address")
    ap.add_argument("--handshake-deadline", type=float, default=3.0)
    ap.add_argument("--listener-pythonpath", default=None, help="PYTHONPATH of the listener (another checkout)")
    ap.add_argument("--no-gate-flags", action="store_true", help="a listener without the gate's options")
    ap.add_argument("--json", default=None, help="write the runs and the summary here")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        secret_file = Path(tmp) / "secret"
        secret_file.write_bytes(SECRET)
        cmd = [sys.executable, "-m", "livemig", "listen", "127.0.0.1:0", "--announce", "--quiet",
               "--no-progress", "--secret-file", str(secret_file), "--timeout", "10"]
        if not a.no_gate_flags:
            cmd += ["--handshake-deadline", str(a.handshake_deadline), "--refusal-log-interval", "10"]
        env_before = os.environ.get("PYTHONPATH")
        if a.listener_pythonpath:
            os.environ["PYTHONPATH"] = a.listener_pythonpath
        try:
            ctx = local.local_destination(command=cmd)
            dest = ctx.__enter__()
        finally:
            if a.listener_pythonpath:
                if env_before is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = env_before
        try:
            return _run(a, dest)
        finally:
            ctx.__exit__(None, None, None)


def _run(a: argparse.Namespace, dest: local.LocalDestination) -> int:
    host, port = dest.address.rsplit(":", 1)
    cfg = migration.MigrationConfig(secret=SECRET, channels=a.channels, postcopy=not a.precopy, verify=True,
                                    timeout=10.0)
    runs: list[dict[str, Any]] = []
    print(f"# {a.migrations} pairs, {a.size >> 20} MiB, channels {a.channels},"
          f" {'precopy' if a.precopy else 'postcopy'}; attack: {a.stalled} stalled from {a.stall_from},"
          f" {a.flood:g}/s connect/close from {a.flood_from}; load {os.getloadavg()[0]:.2f}")
    for i in range(a.migrations):
        ok_q, t_q, why_q = _one(dest.address, cfg, a.size)
        attacker = _attacker(host, int(port), a)
        held = _read_held(attacker)
        ok_a, t_a, why_a = _one(dest.address, cfg, a.size)
        st = _stop_attacker(attacker)
        run = {"index": i, "quiet_s": t_q, "quiet_ok": ok_q, "attacked_s": t_a, "attacked_ok": ok_a,
               "stalled_held_at_start": held, "stalled_held_at_end": st["held_at_end"],
               "flood_per_s": st["flood_connections"] / st["seconds"] if st["seconds"] else 0.0,
               "error": why_a or why_q}
        held_after = st["held_at_end"]
        runs.append(run)
        print(f"{i:3d} quiet {t_q * 1e3:8.1f} ms {'ok' if ok_q else 'FAILED'}   attacked {t_a * 1e3:8.1f} ms"
              f" {'ok' if ok_a else 'FAILED'}  (held {held_after}/{a.stalled}, flood {run['flood_per_s']:.0f}/s)"
              + (f"  {run['error']}" if run["error"] else ""), flush=True)
    quiet = [r["quiet_s"] for r in runs if r["quiet_ok"]]
    base = statistics.median(quiet) if quiet else float("nan")
    ratios = [r["attacked_s"] / base for r in runs]
    all_ok = all(r["attacked_ok"] for r in runs)
    met = all_ok and max(ratios) <= GOAL_RATIO
    log = dest.stderr_text().splitlines()
    summary = {"goal": f"all {a.migrations} attacked migrations succeed, each within {GOAL_RATIO}x of the quiet median",
               "quiet_median_s": base, "quiet_range_s": [min(quiet, default=0), max(quiet, default=0)],
               "attacked_ok": sum(r["attacked_ok"] for r in runs), "ratio_max": max(ratios),
               "ratio_median": statistics.median(ratios), "met": met,
               "listener_log_lines": len(log), "listener_refusal_lines": sum("refused" in ln for ln in log),
               "load_after": os.getloadavg()[0]}
    print(f"# quiet median {base * 1e3:.1f} ms (range {summary['quiet_range_s'][0] * 1e3:.1f}-"
          f"{summary['quiet_range_s'][1] * 1e3:.1f}); attacked: {summary['attacked_ok']}/{a.migrations} ok,"
          f" ratio to the quiet median {min(ratios):.2f}-{max(ratios):.2f} (median {summary['ratio_median']:.2f});"
          f" goal {'met' if met else 'NOT met'}; listener log {len(log)} lines"
          f" ({summary['listener_refusal_lines']} about refusals)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs, "summary": summary}, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
