"""The encryption scenarios of ``livemig bench`` (docs/performance.md, "Encryption"): every
encrypted figure beside the same measurement in plaintext, or beside the bare AEAD loop, taken in
the same run and alternated run by run (the machine is shared and noisy). Loopback: both ends, and
so encryption, decryption and both socket copies, share this machine's CPUs."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from livemig import _core, wire
from livemig.benchmark.figures import (
    MIB,
    Figure,
    Stat,
    engine_figure,
    first_round_gbps,
    histogram_quantile_us,
)
from livemig.benchmark.scenarios import Scenario
from livemig.guest import GuestConfig
from livemig.memory import Region
from livemig.migration.config import DestinationConfig, MigrationConfig
from livemig.migration.results import MigrationResult
from livemig.workload.factory import StandardFactory

if TYPE_CHECKING:
    from livemig.benchmark.runner import Bench

#: The shared secret the encrypted runs are keyed with (both ends of a loopback benchmark).
BENCH_SECRET = b"livemig-bench-tls-secret"


class WarmFactory(StandardFactory):
    """The standard factory with destination memory written before the first page arrives: the
    migration then measures the wire and the cipher, not the kernel's first touch of fresh pages."""

    def memory(self, nbytes: int, page_size: int) -> Region | None:
        region = Region.allocate(nbytes, page_size=page_size)
        region.array[::page_size] = 1
        return region


def _pair(config: MigrationConfig) -> tuple[tuple[MigrationConfig, DestinationConfig], ...]:
    """(plaintext, encrypted) configs for both ends: the same options, only encryption differs."""
    src = replace(config, secret=BENCH_SECRET)
    return ((replace(src, encrypt=None), DestinationConfig(secret=BENCH_SECRET)),
            (replace(src, encrypt=True), DestinationConfig(secret=BENCH_SECRET, encrypt=True)))


def _check_tls(r: MigrationResult, encrypted: bool) -> None:
    if r.tls.enabled != encrypted:
        raise RuntimeError(f"the migration ran with TLS {'off' if encrypted else 'on'}: {r.tls}")


def run_tls_precopy(b: Bench, sc: Scenario) -> list[Figure]:
    """An idle guest's precopy, encrypted against plaintext with the same channels: the first
    round's rate (every page goes in it), runs alternated."""
    size, channels, warm = int(sc.arg("size")), int(sc.arg("channels")), bool(sc.arg("warm"))
    guest = GuestConfig(workload="idle", seed=1)
    factory = WarmFactory if warm else None
    rates: dict[bool, list[float]] = {False: [], True: []}
    last: dict[bool, MigrationResult] = {}
    for _ in range(b.repeat):
        for encrypted, (config, dest) in enumerate(_pair(MigrationConfig(hints=False, verify=True,
                                                                           channels=channels))):
            r = b.migrate(size, guest, config, dest=dest, factory=factory)
            _check_tls(r, bool(encrypted))
            rates[bool(encrypted)].append(first_round_gbps(r))
            last[bool(encrypted)] = r
    tls = last[True].tls
    return [engine_figure(
        f"{sc.name} first round", "tls", "GB/s", "higher", Stat.of(rates[True]), Stat.of(rates[False]),
        f"the same precopy in plaintext, {channels} channel{'s' * (channels > 1)}",
        "encrypted >= 50% of plaintext", 0.5,
        region_bytes=size, channels=channels, destination_memory="warm" if warm else "fresh",
        cipher=tls.cipher, record_path=tls.record_path, ktls_unavailable=tls.ktls_unavailable,
        handshake_ms=tls.handshake_ms, total_ms_tls=last[True].total_ms, total_ms_plaintext=last[False].total_ms)]


@contextmanager
def _one_cpu() -> Iterator[None]:
    """This thread, and the threads it starts, on one CPU: a thread's CPU time on a shared 2-vCPU
    guest stretches with whatever runs on the other one; taking turns on one CPU it repeats."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_tls_channel_cost(b: Bench, sc: Scenario) -> list[Figure]:
    """A sending channel's encryption cost: its CPU per byte with TLS minus in plaintext (the
    channel's writer into a socket pair whose other end only drains), against the bare EVP AEAD
    loop sealing the same bytes in the same record size from a region-sized source (its CPU time
    too: on a busy machine wall time would count other processes' turns)."""
    total, region = int(sc.arg("bytes")), 64 * MIB
    cost, evp, sender = [], [], []
    cipher = ""
    with _one_cpu():
        for _ in range(b.micro):
            plain = _core._bench.tls_socketpair_throughput(tls=False, drain_only=True, region_bytes=region,
                                                           total_bytes=total)
            enc = _core._bench.tls_socketpair_throughput(tls=True, drain_only=True, region_bytes=region,
                                                         total_bytes=total)
            cipher = str(enc["cipher"])
            evp_cipher = _core._bench.tls_evp_cipher_of_suite(cipher)
            t0 = time.thread_time()  # the loop runs on this thread: its CPU time, as the senders' is
            base = _core._bench.tls_evp_seal_loop(evp_cipher, 16384, total, region)
            evp.append((time.thread_time() - t0) / base["bytes"] * 1e9)
            sender.append(enc["sender_cpu"] / enc["bytes"] * 1e9)
            cost.append(sender[-1] - plain["sender_cpu"] / plain["bytes"] * 1e9)
    return [engine_figure(
        f"{sc.name} per byte", "tls", "ns/B", "lower", Stat.of(cost), Stat.of(evp),
        "bare EVP seal of the same bytes, 16 KiB records", "within 1.2x of the bare EVP loop", 1.2,
        bytes=total, cipher=cipher, sender_tls_ns_per_byte=statistics.median(sender), record_layer="userspace",
        pinned="one CPU")]


def run_tls_faults(b: Bench, sc: Scenario) -> list[Figure]:
    """Postcopy fault latency, encrypted against plaintext in the same run (sequential faults,
    urgent channel); and the fault path on the wire alone (a REQUEST and its page back over
    loopback TCP), whose p50 is exact where the migration's comes from power-of-two buckets."""
    size = int(sc.arg("size"))
    guest = GuestConfig(workload="increment", rate=0.0, seed=3)
    p50: dict[bool, list[float]] = {False: [], True: []}
    wire_p50: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(b.repeat):
        for encrypted, (config, dest) in enumerate(_pair(MigrationConfig(postcopy=True, hints=False, verify=True))):
            r = b.migrate(size, guest, config, dest=dest)
            _check_tls(r, bool(encrypted))
            if not r.postcopy.requests:
                raise RuntimeError("no postcopy faults were requested: nothing to measure")
            p50[bool(encrypted)].append(histogram_quantile_us(r.postcopy.histogram, 0.5))
            rt = _core._bench.tls_request_round_trips(tls=bool(encrypted), iters=2000)
            wire_p50[bool(encrypted)].append(float(np.median(rt)) / 1e3)
    figs = []
    for name, got, how in ((f"{sc.name} fault p50", p50, "the same postcopy in plaintext"),
                           ("tls-request-round-trip p50", wire_p50, "the same round trip in plaintext")):
        base = Stat.of(got[False])
        figs.append(engine_figure(
            name, "tls", "us", "lower", Stat.of(got[True]), base, how, "at most 10 us above plaintext",
            (base.median + 10.0) / base.median if base.median else None, region_bytes=size,
            added_us=statistics.median(got[True]) - base.median))
    return figs


def _connect_ms(src: wire.WireOptions, dst: wire.WireOptions, n: int) -> list[float]:
    """Milliseconds of n connects to a listener here: every channel's handshake, and its TLS
    handshake with the server's acceptance when encrypted (the listener's side in a thread)."""
    out: list[float] = []
    with wire.Listener("127.0.0.1:0") as lst:
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                for _ in range(n):
                    lst.accept(dst).close()
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                errors.append(e)

        t = threading.Thread(target=serve)
        t.start()
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                wire.connect(str(lst.address), src).close()
                out.append((time.perf_counter() - t0) * 1e3)
        finally:
            t.join(60)
        if errors:
            raise errors[0]
    return out


def run_tls_handshake(b: Bench, sc: Scenario) -> list[Figure]:
    """What the handshake adds to a migration: connecting main and urgent channels (the default)
    encrypted against plaintext, alternated; PSK and x509 keying."""
    n, page = 20, 4096
    caps = wire.Capabilities.default(int(sc.arg("extra", 0)))
    plain = wire.WireOptions(page_size=page, region_bytes=page * 256, capabilities=caps, secret=BENCH_SECRET)
    dplain = wire.WireOptions(page_size=page, region_bytes=0, capabilities=wire.Capabilities.all(8), secret=BENCH_SECRET)
    figs = []
    with tempfile.TemporaryDirectory() as pki:
        _core._bench.tls_write_test_pki(pki, "localhost")
        keyed = {
            "psk": (replace(plain, encrypt=True), replace(dplain, encrypt=True)),
            "x509": (replace(plain, secret=None, tls=wire.TlsSettings(directory=pki, peer_name="localhost")),
                     replace(dplain, secret=None, tls=wire.TlsSettings(directory=pki))),
        }
        for keying, (src, dst) in keyed.items():
            base: list[float] = []
            enc: list[float] = []
            for _ in range(b.micro):
                base += _connect_ms(plain, dplain, n)
                enc += _connect_ms(src, dst, n)
            bs = Stat.of(base)
            figs.append(engine_figure(
                f"{sc.name} {keying}", "tls", "ms", "lower", Stat.of(enc), bs,
                "the same connect in plaintext", "adds at most 5 ms", (bs.median + 5.0) / bs.median,
                channels=2 + int(sc.arg("extra", 0)), keying=keying, added_ms=statistics.median(enc) - bs.median))
    return figs


__all__ = ["BENCH_SECRET", "WarmFactory", "run_tls_channel_cost", "run_tls_faults", "run_tls_handshake",
           "run_tls_precopy"]
