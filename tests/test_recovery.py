"""Failures and postcopy recovery, end to end: real processes, sockets (through a cutting relay),
userfaultfd and dirty tracking. A precopy failure cancels (the source guest runs on, intact, and
got DONE); a postcopy break pauses both sides and resumes with no page lost or placed twice."""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from livemig import wire
from livemig.errors import ProtocolError
from livemig.guest import GuestConfig
from livemig.migration import DestinationConfig, MigrationConfig, MigrationControl

from cli_helpers import LIVEMIG
from fault_relay import FaultRelay
from recovery_helpers import (
    PhaseHook,
    assert_cancelled_intact,
    assert_completed,
    run_through_relay,
    start_destination,
)

INCREMENT = GuestConfig(workload="increment", rate=20000.0, free_fraction=0.5, seed=7)
SLOW_LINK = 40e6  # bytes/s: a 16 MiB round takes long enough for the guest to dirty it all again


def cut_in_postcopy(after_bytes_to_source: int):  # type: ignore[no-untyped-def]
    """Arms a cut once the destination said that much after postcopy began (its ACK, then requests)."""

    def make(relay: FaultRelay, _proc: Any) -> PhaseHook:
        def on_phase(name: str) -> None:
            if name == "postcopy" and relay.cuts_done == 0:
                relay.arm_cut_after("to_source", after_bytes_to_source)

        return PhaseHook(on_phase)

    return make


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
def test_postcopy_cut_pauses_and_resumes_automatically(hints: bool) -> None:
    config = MigrationConfig(postcopy=True, hints=hints, verify=True, reconnect_deadline_s=20, timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=cut_in_postcopy(24 * 8))
    assert out.cuts == 1
    assert_completed(out)
    assert out.result is not None
    assert out.result.recoveries == 1
    assert isinstance(out.dest, dict) and out.dest["recoveries"] == 1
    assert out.connections >= 2 * 2  # main + urgent, twice


# ---- precopy failures: cancel, the source guest runs on ----


@pytest.mark.timeout(120)
def test_precopy_connection_cut_cancels_and_the_source_guest_runs_on() -> None:
    # 64 MiB, half of it hinted free: the first round alone (32 MiB) is more than the socket
    # buffers on both sides of the relay hold (a few MiB each), so the cut at 2 MiB finds the
    # source still sending its first round. With 16 MiB the buffers could take the whole round,
    # and the source learned of the cut only when it waited for the switchover's ack.
    out = run_through_relay(INCREMENT, MigrationConfig(verify=True), size=64 << 20, cuts=[2 << 20])
    assert out.cuts == 1
    assert_cancelled_intact(out)
    assert str(out.error).startswith("precopy: ")
    assert "connection" in str(out.error)
    # The destination failed and said why: a FIN mid-frame ("closed the connection in the middle
    # of ...") or a reset, whichever the cut delivered first.
    assert isinstance(out.dest, str) and ("closed" in out.dest or "connection lost" in out.dest), out.dest


@pytest.mark.timeout(120)
def test_destination_killed_in_precopy_cancels() -> None:
    def make(_relay: FaultRelay, proc: Any) -> PhaseHook:
        return PhaseHook(lambda name: proc.kill() if name == "precopy" else None)

    out = run_through_relay(INCREMENT, MigrationConfig(verify=True), rate_bps=SLOW_LINK, progress=make)
    assert_cancelled_intact(out)
    assert (out.dest_kind, out.dest) == ("killed", -9)


@pytest.mark.timeout(120)
def test_destination_that_refuses_cancels_with_its_reason() -> None:
    out = run_through_relay(INCREMENT, MigrationConfig(verify=True),
                            dest=DestinationConfig(timeout=10, max_region_bytes=8 << 20))
    assert_cancelled_intact(out, hinting_started=False)  # refused in the handshake, before any round
    assert str(out.error).startswith("connect: ")
    assert "larger than the local region" in str(out.error)
    assert isinstance(out.dest, str) and "larger than the local region" in out.dest


# ---- postcopy: a destination gone for good ----


@pytest.mark.timeout(120)
def test_destination_killed_in_postcopy_source_keeps_its_stale_guest_paused() -> None:
    def make(relay: FaultRelay, proc: Any) -> PhaseHook:
        def on_phase(name: str) -> None:
            if name == "paused":  # the destination guest ran (it acked), then the link broke: it dies
                proc.kill()
                proc.join()
            elif name == "postcopy":
                relay.arm_cut_after("to_source", 24 * 8)

        return PhaseHook(on_phase)

    config = MigrationConfig(postcopy=True, verify=True, reconnect_deadline_s=1.5, timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=make)
    assert out.error is not None, out.result
    assert "stale" in str(out.error) and "not resumed within 1.5 s" in str(out.error)
    g = out.error.source_workload
    assert g is not None and not g.running  # never resumed: the destination guest had run
    assert g.check is not None and g.check.ok  # its memory untouched all the same
    assert (out.dest_kind, out.dest) == ("killed", -9)


@pytest.mark.timeout(120)
def test_restarted_destination_refuses_the_resume_and_the_source_says_why() -> None:
    """A destination restarted after its predecessor ran the guest has no such session: the
    source is refused at once and keeps its (stale) guest paused."""
    ctx = mp.get_context("spawn")
    q2 = ctx.Queue()
    fresh: list[Any] = []

    def make(relay: FaultRelay, proc: Any) -> PhaseHook:
        def on_phase(name: str) -> None:
            if name == "paused":
                proc.kill()
                proc.join()
                fresh.append(start_destination(ctx, q2, DestinationConfig(timeout=10)))
                _, address = q2.get(timeout=30)
                relay.retarget(address)
            elif name == "postcopy":
                relay.arm_cut_after("to_source", 24 * 8)

        return PhaseHook(on_phase)

    config = MigrationConfig(postcopy=True, verify=True, reconnect_deadline_s=60, timeout=10)
    try:
        out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=make)
        assert out.error is not None, out.result
        text = str(out.error)
        assert "resume refused" in text and "no paused migration with session" in text and "stale" in text
        assert out.error.source_workload is not None and not out.error.source_workload.running
        kind, why = q2.get(timeout=30)
        assert kind == "error" and "no paused migration" in why
    finally:
        for p in fresh:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        q2.close()
        q2.join_thread()


# ---- postcopy: manual resume, and a break during switchover ----


@pytest.mark.timeout(120)
def test_manual_resume_waits_for_the_command() -> None:
    control = MigrationControl()
    seen: dict[str, Any] = {}

    def make(relay: FaultRelay, _proc: Any) -> PhaseHook:
        def resumer() -> None:
            seen["paused"] = control.wait_paused(30)
            seen["cause"] = control.paused
            seen["connections"] = relay.connections  # nobody reconnected by itself
            control.resume()

        def on_phase(name: str) -> None:
            if name == "postcopy" and "thread" not in seen:
                relay.arm_cut_after("to_source", 24 * 8)
                seen["thread"] = t = threading.Thread(target=resumer)
                t.start()

        return PhaseHook(on_phase)

    config = MigrationConfig(postcopy=True, verify=True, auto_reconnect=False, reconnect_deadline_s=30, timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=make, control=control)
    seen["thread"].join()
    assert seen["paused"] and seen["cause"]
    assert seen["connections"] == 2  # main + urgent of the first connection only
    assert_completed(out)
    assert out.result is not None and out.result.recoveries == 1
    assert control.paused is None


@pytest.mark.timeout(120)
def test_break_during_switchover_before_the_guest_ran_cancels_cleanly() -> None:
    """The start command left the source but never reached the destination: the source cannot
    know, so it resumes; the destination answers that its guest never ran, and the source guest
    runs on."""

    def make(relay: FaultRelay, _proc: Any) -> PhaseHook:
        def on_phase(name: str) -> None:
            if name == "switchover":
                relay.hold("to_destination")  # the start command will not arrive
            elif name == "postcopy":
                relay.cut()

        return PhaseHook(on_phase)

    config = MigrationConfig(postcopy=True, verify=True, reconnect_deadline_s=20, timeout=10)
    out = run_through_relay(INCREMENT, config, progress=make)
    assert_cancelled_intact(out)
    assert "never ran" in str(out.error)
    assert isinstance(out.dest, str) and "before the workload ran here" in out.dest


# ---- the CLI: migrate --manual-resume --control PATH, livemig resume PATH ----


@pytest.mark.timeout(120)
def test_cli_manual_resume(tmp_path: Path) -> None:
    """`livemig migrate --manual-resume --control PATH` pauses when its postcopy connection is cut
    and completes after `livemig resume PATH`; `livemig listen` waits for it meanwhile."""
    ctl = str(tmp_path / "ctl.sock")
    listen = subprocess.Popen([*LIVEMIG, "listen", "127.0.0.1:0", "--once", "--announce", "-q", "--no-progress",
                               "--timeout", "10", "--resume-deadline", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    migrate: subprocess.Popen[str] | None = None
    try:
        assert listen.stdout is not None
        first = listen.stdout.readline()
        assert first.startswith("listening on "), first
        with FaultRelay(first.removeprefix("listening on ").strip(), rate_bps=SLOW_LINK) as relay:
            migrate = subprocess.Popen(
                [*LIVEMIG, "migrate", "--to", relay.address, "--size", "16M", "--postcopy", "--verify", "--json",
                 "--progress", "-q", "--dirty-rate", "20000", "--free-fraction", "0.5", "--timeout", "10",
                 "--manual-resume", "--control", ctl, "--reconnect-deadline", "30"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
            lines: queue.Queue[str] = queue.Queue()
            reader = threading.Thread(target=lambda: [lines.put(ln) for ln in migrate.stderr], daemon=True)  # type: ignore[union-attr]
            reader.start()
            answer = ""
            while True:
                line = lines.get(timeout=60)
                if "phase postcopy" in line and relay.cuts_done == 0:
                    relay.arm_cut_after("to_source", 24 * 8)
                elif "phase paused" in line:
                    r = subprocess.run([*LIVEMIG, "resume", ctl], check=False, capture_output=True, text=True, timeout=30)
                    assert r.returncode == 0, r.stderr
                    answer = r.stdout
                    break
            out, _ = migrate.communicate(timeout=60)
            reader.join(10)
        assert answer.startswith("resuming (paused: "), answer
        assert migrate.returncode == 0
        obj = json.loads(out)
        assert obj["ok"] and obj["recoveries"] == 1, obj
        assert obj["verify"]["mismatches"] == 0 and obj["verify"]["placed_twice"] == 0
        assert listen.wait(30) == 0
    finally:
        for p in (migrate, listen):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for p in (migrate, listen):
            if p is not None:
                for f in (p.stdout, p.stderr):
                    if f is not None:
                        f.close()


def test_cli_resume_without_a_migration_is_one_error_line(tmp_path: Path) -> None:
    r = subprocess.run([*LIVEMIG, "resume", str(tmp_path / "none.sock")], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith("livemig: error: no migration at ") and len(r.stderr.splitlines()) == 1


def test_cli_manual_resume_needs_a_control_socket() -> None:
    r = subprocess.run([*LIVEMIG, "migrate", "--postcopy", "--manual-resume"], check=False, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "--manual-resume needs --control PATH" in r.stderr


# ---- the resume handshake: only the paused session gets in ----


def _accept_in_thread(lst: wire.Listener, opts: wire.WireOptions, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            got["conn"] = lst.accept(opts, wait=10, **kw)
        except Exception as e:  # checked by the test
            got["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, got


def _opts(extra: int = 0, caps: frozenset[str] = wire.ALL_CAPABILITIES, secret: bytes | None = None) -> wire.WireOptions:
    return wire.WireOptions(page_size=4096, region_bytes=1 << 20, capabilities=wire.Capabilities(caps, extra),
                            secret=secret, timeout=5)


SESSION = bytes(range(16))


@pytest.mark.parametrize("secret", [None, b"s3cret"], ids=["no-secret", "secret"])
def test_resume_handshake_accepts_the_paused_session(secret: bytes | None) -> None:
    with wire.Listener("127.0.0.1:0") as lst:
        paused = wire.Negotiated(wire.ALL_CAPABILITIES, 2)
        t, got = _accept_in_thread(lst, _opts(64, secret=secret), resume=(SESSION, paused))
        conn = wire.connect(str(lst.address), _opts(0, secret=secret), resume=SESSION)
        t.join()
        assert "error" not in got, got
        with conn, got["conn"] as dconn:
            assert conn.session == dconn.session == SESSION
            assert conn.urgent is not None and dconn.urgent is not None and conn.pages == dconn.pages == []
            assert dconn.negotiated.capabilities == paused.capabilities


def test_a_new_migration_is_refused_while_paused() -> None:
    with wire.Listener("127.0.0.1:0", strict=True) as lst:
        t, got = _accept_in_thread(lst, _opts(), resume=(SESSION, wire.Negotiated(wire.ALL_CAPABILITIES)))
        with pytest.raises(ProtocolError, match="this destination is paused, waiting to resume session"):
            wire.connect(str(lst.address), _opts())
        t.join()
        assert isinstance(got["error"], ProtocolError)


@pytest.mark.parametrize("case", ["other-session", "not-paused", "other-capabilities"])
def test_a_resume_that_does_not_match_is_refused(case: str) -> None:
    with wire.Listener("127.0.0.1:0", strict=True) as lst:
        paused = wire.Negotiated(wire.ALL_CAPABILITIES)
        kw = {} if case == "not-paused" else {"resume": (SESSION, paused)}
        t, got = _accept_in_thread(lst, _opts(), **kw)
        session = bytes(16) if case == "other-session" else SESSION
        caps = wire.ALL_CAPABILITIES - {"checksums"} if case == "other-capabilities" else wire.ALL_CAPABILITIES
        want = "capabilities that differ" if case == "other-capabilities" else "no paused migration with session"
        with pytest.raises(ProtocolError, match=want):
            wire.connect(str(lst.address), _opts(caps=caps), resume=session)
        t.join()
        assert isinstance(got["error"], ProtocolError)


@pytest.mark.timeout(120)
def test_postcopy_cut_resumes_with_extra_channels_and_checksums() -> None:
    """The first connection had page channels and CRCs; the resumed one keeps the CRCs and has no
    page channels (postcopy does not use them)."""
    config = MigrationConfig(postcopy=True, channels=3, checksums=True, verify=True, reconnect_deadline_s=20,
                             timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=cut_in_postcopy(24 * 8))
    assert_completed(out)
    assert out.result is not None and out.result.recoveries == 1
    assert "checksums" in out.result.capabilities and "multichannel" in out.result.capabilities
    assert out.connections == 4 + 2  # main, urgent, 2 page channels; then main and urgent again
