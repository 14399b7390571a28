"""The raw baselines of ``livemig bench``: C++ loops (``livemig._core._bench``) and numpy. Each call
measures once more and keeps the sample under its key, so a scenario can interleave baseline and
engine runs in one run; :meth:`Baselines.figures` summarises every key."""

from __future__ import annotations

import mmap
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from livemig import _core
from livemig.benchmark.figures import MIB, PAGE, Better, Figure, Stat, baseline_figure
from livemig.benchmark.scenarios import size_label
from livemig.benchmark.sockets import parallel, tcp_pairs, warm

#: Bytes of one request and of its answer on the wire (header + page), for the ping-pong baseline.
REQUEST_BYTES = 24
REPLY_BYTES = 24 + PAGE


class Baselines:
    """The raw baselines. Each call measures once more and keeps the sample under its key, so a
    scenario can interleave baseline and engine runs; :meth:`figures` summarises every key."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.units: dict[str, tuple[str, Better, str]] = {}
        self.pingpong_p99 = 0.0  #: the p99 of the last pingpong_us() run

    def _keep(self, key: str, unit: str, better: Better, how: str, value: float) -> float:
        self.samples.setdefault(key, []).append(value)
        self.units[key] = (unit, better, how)
        return value

    def socket_copy_gbps(self, nbytes: int, channels: int = 1) -> float:
        """GB/s moving nbytes from a warm buffer over ``channels`` loopback TCP streams (1 MiB
        sendmsg / MSG_WAITALL recv calls, in C++) into a freshly mapped buffer: like a migration's
        destination, the receiver pays the first touch of every page."""
        src = warm(nbytes)
        dst = mmap.mmap(-1, nbytes)
        view = memoryview(dst)
        source = src.data
        outs, ins = tcp_pairs(channels)
        bounds = [nbytes * i // channels // PAGE * PAGE for i in range(channels)] + [nbytes]
        jobs: list[Callable[[], object]] = []

        def send(fd: int, v: memoryview) -> Callable[[], object]:
            return lambda: _core._bench.wire_raw_send(fd, v)

        def recv(fd: int, v: memoryview) -> Callable[[], object]:
            return lambda: _core._bench.wire_raw_recv(fd, v)

        for i in range(channels):
            a, b = bounds[i], bounds[i + 1]
            jobs.append(send(outs[i].fileno(), source[a:b]))
            jobs.append(recv(ins[i].fileno(), view[a:b]))
        try:
            secs = parallel(jobs)
            if dst[nbytes - 1] != 0x5A:
                raise RuntimeError("raw socket copy: the last byte did not arrive")
        finally:
            for s in outs + ins:
                s.close()
            jobs.clear()  # the lambdas hold slices of the view
            view.release()
            dst.close()
        how = f"{channels} loopback TCP stream(s), warm source, fresh destination"
        return self._keep(
            f"raw socket copy x{channels} {size_label(nbytes)}",
            "GB/s",
            "higher",
            how,
            nbytes / secs / 1e9,
        )

    def socket_copy_warm_gbps(self, nbytes: int) -> float:
        """Like socket_copy_gbps with one stream, into a warm destination buffer."""
        src, dst = warm(nbytes), warm(nbytes, 0)
        outs, ins = tcp_pairs(1)
        try:
            secs = parallel(
                [
                    lambda: _core._bench.wire_raw_send(outs[0].fileno(), src.data),
                    lambda: _core._bench.wire_raw_recv(ins[0].fileno(), dst.data),
                ]
            )
        finally:
            for s in outs + ins:
                s.close()
        return self._keep(
            f"raw socket copy, warm destination {size_label(nbytes)}",
            "GB/s",
            "higher",
            "1 loopback TCP stream, both buffers warm",
            nbytes / secs / 1e9,
        )

    def memcpy_gbps(self, nbytes: int) -> float:
        """GB/s of a memcpy between two warm buffers (numpy.copyto)."""
        src, dst = warm(nbytes), warm(nbytes, 0)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        secs = time.perf_counter() - t0
        return self._keep(
            f"memcpy {size_label(nbytes)}",
            "GB/s",
            "higher",
            "numpy.copyto, warm buffers",
            nbytes / secs / 1e9,
        )

    def first_touch_gbps(self, nbytes: int) -> float:
        """GB/s writing a freshly mapped buffer (every page faulted in): what warming avoids."""
        m = mmap.mmap(-1, nbytes)
        a = np.frombuffer(m, dtype=np.uint8)
        t0 = time.perf_counter()
        a.fill(1)
        secs = time.perf_counter() - t0
        del a
        m.close()
        return self._keep(
            f"first touch {size_label(nbytes)}",
            "GB/s",
            "higher",
            "numpy fill of a fresh mapping",
            nbytes / secs / 1e9,
        )

    def read_gbps(self, nbytes: int) -> float:
        """GB/s reading a warm buffer (C++ loop, _bench.source_read_bandwidth)."""
        a = warm(nbytes)
        t0 = time.perf_counter()
        _core._bench.source_read_bandwidth(a.ctypes.data, nbytes)
        secs = time.perf_counter() - t0
        return self._keep(
            f"memory read {size_label(nbytes)}",
            "GB/s",
            "higher",
            "C++ read loop, warm buffer",
            nbytes / secs / 1e9,
        )

    def uffd_copy_us(self, nbytes: int = 64 * MIB) -> float:
        """Microseconds per page of a bare UFFDIO_COPY loop, one page per ioctl, warm source."""
        raw = _core._bench.DestRawCopy(nbytes)
        raw.run(1)  # warm-up: page tables, allocator
        secs = raw.run(1)
        return self._keep(
            "raw UFFDIO_COPY, 1 page",
            "us",
            "lower",
            "bare userfaultfd, one page per ioctl, warm source",
            secs / (nbytes // PAGE) * 1e6,
        )

    def pingpong_us(self, iters: int = 2000) -> float:
        """p50 microseconds of a raw loopback TCP ping-pong: 24 bytes out, a header and a page
        back."""
        outs, ins = tcp_pairs(1)
        box: list[int] = []
        server = threading.Thread(
            target=lambda: box.append(
                _core._bench.wire_raw_pingpong_server(ins[0].fileno(), REQUEST_BYTES, REPLY_BYTES)
            )
        )
        server.start()
        try:
            rtts = _core._bench.wire_raw_pingpong_client(
                outs[0].fileno(), REQUEST_BYTES, REPLY_BYTES, iters
            )
        finally:
            outs[0].shutdown(socket.SHUT_WR)
            server.join()
            for s in outs + ins:
                s.close()
        p50, p99 = (float(x) / 1e3 for x in np.percentile(rtts, [50, 99]))
        how = f"loopback TCP, {REQUEST_BYTES} B out, {REPLY_BYTES} B back, {iters} round trips"
        self._keep("raw socket ping-pong p50", "us", "lower", how, p50)
        self.pingpong_p99 = self._keep("raw socket ping-pong p99", "us", "lower", how, p99)
        return p50

    def figures(self) -> list[Figure]:
        out = []
        for key, xs in self.samples.items():
            unit, better, how = self.units[key]
            out.append(baseline_figure(key, unit, better, Stat.of(xs), how=how))
        return out


__all__ = ["REPLY_BYTES", "REQUEST_BYTES", "Baselines"]
