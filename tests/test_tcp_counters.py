"""Loopback migrations of every mode lose no segment: the kernel's TCP counters of a network
namespace that only the migration uses show no prune, no receive-queue drop, no retransmission
timeout, and no retransmission that repaired a loss (docs/protocol.md, the postcopy queue bound).

A retransmission the receiver already had (it answers with a D-SACK and counts a duplicate) is a
timing artefact of a busy host, not a loss: a tail-loss probe fired because the receiving thread
was off the CPU longer than the probe timeout, or segments sent from two CPUs were delivered out
of order by the two CPUs' backlogs (a fast retransmit the SACKs asked for). With no drop counter
moved, nothing was lost; the retransmissions are reported, and must all be probes, fast
retransmits or duplicates the receiver saw, never a timeout's. (The issue's goal of none at all is
not met on this busy 2-vCPU machine: docs/performance.md.)"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

import pytest
from tcp_counters import (
    DROPS,
    DUPLICATES,
    FAST,
    PROBES,
    RETRANS,
    counters_in_private_netns,
    read_counters,
)

from livemig.guest import GuestConfig
from livemig.loopback import migrate_locally
from livemig.migration import DestinationConfig, MigrationConfig

from recovery_helpers import PhaseHook, assert_completed, run_through_relay

GUEST = GuestConfig(workload="increment", rate=20000.0, seed=3)
HINTED = GuestConfig(workload="random", rate=20000.0, free_fraction=0.5, churn=2000.0, seed=3)
SIZE = 32 << 20


def _check(result: object, summary: dict[str, object]) -> None:
    assert getattr(result, "ok", False), result
    assert summary["ok"], summary


def run_precopy() -> None:
    _check(*migrate_locally(GUEST, MigrationConfig(verify=True), size=SIZE))


def run_postcopy() -> None:
    _check(*migrate_locally(GUEST, MigrationConfig(postcopy=True, verify=True), size=SIZE))


def run_hints() -> None:
    cfg = MigrationConfig(postcopy=True, hints=True, verify=True)
    _check(*migrate_locally(HINTED, cfg, size=SIZE))


def run_channels() -> None:
    _check(*migrate_locally(GUEST, MigrationConfig(channels=3, verify=True), size=SIZE))


def run_postcopy_channels() -> None:
    """Postcopy after two rounds on three channels: COMMAND 5 (postcopy-next) bounds the queue
    at the second round's start, while the extra channels still carry pages."""
    cfg = MigrationConfig(postcopy=True, postcopy_after=2, channels=3, verify=True)
    result, summary = migrate_locally(GUEST, cfg, size=SIZE)
    _check(result, summary)
    assert "postcopy-next" in getattr(result, "capabilities", ()), result


def run_recovery_resume() -> None:
    def cut_in_postcopy(relay, proc):  # type: ignore[no-untyped-def]
        def on_phase(name: str) -> None:
            if name == "postcopy" and relay.cuts_done == 0:
                relay.arm_cut_after("to_source", 24 * 8)

        return PhaseHook(on_phase)

    config = MigrationConfig(postcopy=True, verify=True, reconnect_deadline_s=20, timeout=10)
    out = run_through_relay(GUEST, config, rate_bps=64e6, progress=cut_in_postcopy,
                            dest=DestinationConfig(timeout=10, resume_deadline_s=10))
    assert out.cuts == 1
    assert_completed(out)
    assert out.result is not None and out.result.recoveries == 1


MODES = [("precopy", run_precopy), ("postcopy", run_postcopy), ("hints", run_hints),
         ("channels", run_channels), ("postcopy-channels", run_postcopy_channels),
         ("recovery-resume", run_recovery_resume)]


@pytest.mark.timeout(240)
def test_loopback_migrations_of_every_mode_lose_no_segment() -> None:
    why, results = counters_in_private_netns(MODES, deadline_s=200)
    if why is not None:
        pytest.skip(f"no private network namespace to count in: {why}")
    assert [name for name, _, _ in results] == [name for name, _ in MODES]
    for name, err, moved in results:
        assert err == "", f"{name}: {err}"
        for c in DROPS:
            assert moved.get(c, 0) == 0, f"{name}: {c} moved: {moved}"
        # No receiver dropped anything (above), so no retransmission repaired a loss: each was a
        # tail-loss probe or a fast retransmit on reordering (the SACK/duplicate counts show which),
        # never a timeout's.
        timely = sum(moved.get(c, 0) for c in (*DUPLICATES, PROBES, FAST))
        assert moved.get(RETRANS, 0) <= timely, f"{name}: {moved}"


# ---- the failure these counters catch ----


def shrink_or_clamp(how: str) -> None:
    """A stream that first runs flat out (the receiver's window grows to megabytes), then the
    receiver stops reading and bounds its queue (``how``: "shrink" SO_RCVBUF, the old bound, or
    "clamp" TCP_WINDOW_CLAMP) while the sender goes on into the window it was told about."""
    start = read_counters()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        tx = socket.create_connection(srv.getsockname())
        rx, _ = srv.accept()
        with tx, rx:
            chunk = bytes(1 << 20)
            bounded = threading.Event()
            sent_error: list[BaseException] = []

            def send() -> None:
                try:
                    for _ in range(64):  # 64 MiB while the receiver reads
                        tx.sendall(chunk)
                    bounded.wait(10)
                    for _ in range(16):  # then into the window it advertised
                        tx.sendall(chunk)
                    tx.shutdown(socket.SHUT_WR)
                except BaseException as e:
                    sent_error.append(e)

            t = threading.Thread(target=send)
            t.start()
            got = 0
            buf = bytearray(1 << 20)
            while got < 64 << 20:
                got += rx.recv_into(buf, min(len(buf), (64 << 20) - got))
            if how == "shrink":
                rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            else:
                rx.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, 128 << 10)
            bounded.set()

            def settled() -> bool:
                # A drop happened, or the sender put a megabyte into the queue unread.
                moved = read_counters()
                dropped = any(moved.get(c, 0) != start.get(c, 0) for c in DROPS)
                queued = struct.unpack("i", fcntl.ioctl(rx, termios.FIONREAD, b"\0" * 4))[0]
                return dropped or queued >= 1 << 20

            end = time.monotonic() + 5
            while not settled() and time.monotonic() < end:
                time.sleep(0.001)  # polled: the kernel tells nobody of either
            while (n := rx.recv_into(buf)) > 0:
                got += n
            t.join(10)
            assert not sent_error, sent_error
            assert got == 80 << 20


def _shrink() -> None:
    shrink_or_clamp("shrink")


def _clamp() -> None:
    shrink_or_clamp("clamp")


@pytest.mark.timeout(120)
def test_shrinking_the_receive_buffer_under_an_advertised_window_drops_segments_and_the_clamp_does_not() -> None:
    """The counters above see the failure the postcopy bound used to cause, and the bound now used
    avoids it."""
    why, results = counters_in_private_netns([("shrink", _shrink), ("clamp", _clamp)], deadline_s=100)
    if why is not None:
        pytest.skip(f"no private network namespace to count in: {why}")
    (_, err_s, shrink), (_, err_c, clamp) = results
    assert err_s == "" and err_c == "", (err_s, err_c)
    assert shrink.get("TcpExt.RcvPruned", 0) + shrink.get("TcpExt.TCPRcvQDrop", 0) > 0, shrink
    assert shrink.get(RETRANS, 0) > 0, shrink
    for c in DROPS:
        assert clamp.get(c, 0) == 0, clamp
