"""A listener strangers cannot block (issue 19): stalled unauthenticated connections and a
connect/close flood while authenticated migrations run; per-address limits; a forged or duplicate
channel refused alone while its session goes on; refusals logged rate-limited. Loopback only,
bounded in count and time (the full figure: bench/listener_attack.py)."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from livemig import local, migration, wire
from livemig.benchmark.attack import STALL_PREFIX, Attack
from livemig.errors import AuthenticationError, ConnectionLost
from livemig.guest import GuestConfig
from livemig.workload import ModelGuest

PAGE = 4096
SECRET = b"gate-test-secret"


def _opts(secret: bytes | None = SECRET, **kw: Any) -> wire.WireOptions:
    args: dict[str, Any] = {"page_size": PAGE, "region_bytes": 1 << 20, "secret": secret, "timeout": 5.0,
                            "capabilities": wire.Capabilities(wire.ALL_CAPABILITIES, 2)}
    return wire.WireOptions(**{**args, **kw})


class _Accepting:
    """Listener.accept in a thread."""

    def __init__(self, listener: wire.Listener, opts: wire.WireOptions, wait: float = 10.0) -> None:
        self.out: list[Any] = []
        self.thread = threading.Thread(target=self._run, args=(listener, opts, wait))
        self.thread.start()

    def _run(self, listener: wire.Listener, opts: wire.WireOptions, wait: float) -> None:
        try:
            self.out.append(listener.accept(opts, wait=wait))
        except BaseException as e:  # handed to the test
            self.out.append(e)

    def result(self) -> wire.Connection:
        self.thread.join(20)
        assert not self.thread.is_alive()
        if isinstance(self.out[0], BaseException):
            raise self.out[0]
        assert isinstance(self.out[0], wire.Connection)
        return self.out[0]


def _stall(host: str, port: int, source: str, data: bytes = STALL_PREFIX) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect((host, port))
    s.sendall(data)
    return s


@pytest.mark.timeout(60)
def test_stalled_strangers_do_not_delay_a_real_source_and_are_cut_at_the_deadline() -> None:
    """40 connections from the source's own address send a valid prefix and stall; the real
    source's four channels are accepted at once, and the strangers are closed at the deadline."""
    limits = wire.GateLimits(handshake_s=2.0, log_interval_s=0)
    lines: list[str] = []
    with wire.Listener("127.0.0.1:0", limits=limits, log=lines.append) as lst:
        host, port = lst.address.host, lst.address.port
        assert host is not None and port is not None
        stalled = [_stall(host, port, "127.0.0.1") for _ in range(40)]
        acc = _Accepting(lst, _opts())
        t0 = time.monotonic()
        with wire.connect(str(lst.address), _opts()) as src, acc.result() as dst:
            took = time.monotonic() - t0
            assert len(src.channels()) == len(dst.channels()) == 4
            assert dst.session == src.session
        assert took < limits.handshake_s, f"the real source waited {took:.2f} s behind the strangers"
        # The strangers are still pending (nobody accepts between calls); the next accept cuts them.
        with pytest.raises(ConnectionLost, match="no source connected"):
            lst.accept(_opts(), wait=2.5)
        for s in stalled:  # each was closed by the listener: EOF or reset
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            s.close()
        cut = [ln for ln in lines if "no whole HELLO within the handshake's 2.0 s (got 0 of 76 bytes)" in ln]
        assert len(cut) == 40, lines[:3]
        assert lst.refusals.by_cause == {"stalled": 40}


@pytest.mark.timeout(60)
def test_one_address_cannot_take_more_than_its_share() -> None:
    """Past the per-address bound, a stranger's connections are reset at once; a source from
    another address is served."""
    limits = wire.GateLimits(handshake_s=2.0, max_pending=8, max_pending_per_peer=4, log_interval_s=0)
    with wire.Listener("127.0.0.1:0", limits=limits) as lst:
        host, port = lst.address.host, lst.address.port
        assert host is not None and port is not None
        strangers = [_stall(host, port, "127.0.0.2") for _ in range(6)]
        acc = _Accepting(lst, _opts())
        with wire.connect(str(lst.address), _opts()) as src, acc.result() as dst:
            assert dst.session == src.session
        reset = 0
        for s in strangers[4:]:  # the two past the bound: refused (reset) without waiting for the deadline
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                reset += 1
            s.close()
        assert reset == 2
        assert lst.refusals.by_cause["limit"] == 2
        for s in strangers[:4]:
            s.close()



@pytest.mark.timeout(60)
@pytest.mark.parametrize("forger", ["wrong-secret", "no-secret", "duplicate"])
def test_a_forged_or_duplicate_channel_is_refused_alone_and_the_session_goes_on(forger: str) -> None:
    """A channel naming a live session (its id known to the forger) but without the secret is
    refused at authentication; a duplicate from a peer with the secret is refused as unwanted. Either
    way the real channels join and the session is whole, its urgent channel the real source's."""
    lines: list[str] = []
    with wire.Listener("127.0.0.1:0", limits=wire.GateLimits(log_interval_s=0), log=lines.append) as lst:
        acc = _Accepting(lst, _opts())
        addr = (lst.address.host, lst.address.port)
        main = socket.create_connection(addr)  # type: ignore[arg-type]
        res = wire.handshake_source(main, _opts(), "main")
        urgent = socket.create_connection(addr)  # type: ignore[arg-type]
        wire.handshake_source(urgent, _opts(), "urgent", 0, res.session)
        forged = socket.create_connection(addr)  # type: ignore[arg-type]
        if forger == "duplicate":  # an urgent channel again, with the secret: its handshake passes...
            wire.handshake_source(forged, _opts(), "urgent", 0, res.session)
            forged.settimeout(5)
            assert forged.recv(1) == b""  # ...then it is dropped: its session has its urgent channel
        else:
            with pytest.raises(AuthenticationError):
                wire.handshake_source(forged, _opts(secret=b"guess" if forger == "wrong-secret" else None),
                                      "urgent", 0, res.session)
        pages = []
        for i in range(2):
            s = socket.create_connection(addr)  # type: ignore[arg-type]
            wire.handshake_source(s, _opts(), "pages", i, res.session)
            pages.append(s)
        with acc.result() as dst:
            assert dst.session == res.session
            assert dst.urgent is not None
            assert dst.urgent.sock.getpeername() == urgent.getsockname()  # the real one
            assert [ch.sock.getpeername() for ch in dst.pages] == [s.getsockname() for s in pages]
        for s in (main, urgent, forged, *pages):
            s.close()
    assert lst.refusals.by_cause == {"refused": 1}, lines
    want = "not wanted by its session" if forger == "duplicate" else "authentication|shared secret"
    assert any(re.search(want, ln) for ln in lines), lines


def test_refusals_are_logged_rate_limited() -> None:
    """The first refusal in full, the rest summed up in one line when the interval ends."""
    lines: list[str] = []
    r = wire.Refusals(lines.append, interval=60.0)
    r.refuse("10.0.0.1:1000", "stalled", "the first")
    for i in range(1000):
        r.refuse(f"10.0.0.{2 + i % 50}:{i}", "closed" if i % 4 else "refused", f"reason {i}")
    assert lines == ["refused 10.0.0.1:1000: the first"]
    r.flush(force=True)
    assert lines[1] == ("refused 1,000 more connections from 50 peers in the last 60 s: 750 closed before their"
                        " HELLO, 250 refused by the handshake; last: 10.0.0.51:999: reason 999")
    assert r.total == 1001 and r.by_cause == {"stalled": 1, "closed": 750, "refused": 250}
    r.flush(force=True)  # nothing held: no line, and the next refusal is told in full again
    r.refuse("10.0.0.9:9", "limit", "again")
    assert lines[2:] == ["refused 10.0.0.9:9: again"]


@pytest.fixture
def listen_process(tmp_path: Any) -> Iterator[local.LocalDestination]:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    argv = [sys.executable, "-m", "livemig", "listen", "127.0.0.1:0", "--announce", "--quiet",  # (no --json: nobody reads it)
            "--no-progress", "--secret-file", str(secret_file), "--handshake-deadline", "1",
            "--refusal-log-interval", "1"]
    with local.local_destination(command=argv) as dest:
        yield dest


@pytest.mark.timeout(120)
def test_migrations_succeed_through_stalled_strangers_and_a_connect_close_flood(
        listen_process: local.LocalDestination) -> None:
    """``livemig listen`` with a secret: 100 stalled connections held from the sources' own address
    and a 300/s connect/close flood from another, while authenticated ``channels=4`` postcopy
    migrations run one after another for 2.5 s (at least three): each succeeds, verified; the
    strangers were really there (held, cut at the deadline and opened again, flooding, refused)
    and the listener's log stays a few lines."""
    host, port = listen_process.address.rsplit(":", 1)
    cfg = migration.MigrationConfig(secret=SECRET, channels=4, postcopy=True, verify=True, timeout=10.0)
    attack = Attack(host, int(port), stalled=100, flood_per_s=300, stall_from="127.0.0.1", flood_from="127.0.0.2")
    with attack:
        assert attack.wait_held(100, 20), "the stalled connections were not all opened"
        t_end, done = time.monotonic() + 2.5, 0
        while done < 3 or (time.monotonic() < t_end and done < 100):  # past the 1 s deadline, twice
            done += 1
            r = migration.migrate(listen_process.address, ModelGuest(8 << 20, GuestConfig(workload="increment")), cfg)
            assert r.ok and r.verify is not None and r.verify.mismatches == 0, r.error
            assert r.mode == "postcopy"
        held_during = attack.held()
    stats = attack.stats
    assert held_during >= 90, held_during  # they were held while the migrations ran
    assert stats.flood_connections >= 300, stats
    assert stats.stalled_closed_by_listener > 0, stats  # cut at the deadline (and opened again)
    log = listen_process.stderr_text().splitlines()
    refusals = [ln for ln in log if ln.startswith("livemig: refused ")]
    # One line in full, then one summary per 1 s interval (and one at the end): bounded by the time.
    assert 1 <= len(refusals) <= stats.seconds / 1.0 + 4, refusals
    assert any("closed before their HELLO" in ln for ln in refusals), refusals
    assert not [ln for ln in log if "error" in ln], log[:5]
