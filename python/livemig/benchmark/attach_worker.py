"""The workload process of ``livemig bench``'s attach scenarios: another process whose whole memory
(a memfd, livemig.attach.client) livemig migrates. Run as

    python -m livemig.benchmark.attach_worker SOCKET [--role source|destination] [--size BYTES]
        [--rate PAGES_PER_S] [--seed N] [--retry SECONDS]

A source writes every page first (one word each, like the bench's in-process buffer), so no page
is a hole or a zero page. ``--rate``: a writer thread then writes that many random pages per second
(on a destination, once livemig resumed it: the postcopy faults). ``write STRIDE OFFSET`` lines on
stdin write pages OFFSET, OFFSET + STRIDE, ... at once (no migration running: the sync figure) and
are answered ``wrote N`` on stdout (after ``ready role=ROLE``, once attached). It ends on SIGTERM, or when its attachment ends (a source that
migrated away, a destination livemig detached).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import numpy as np
import numpy.typing as npt

from livemig.attach.client import AttachClient
from livemig.errors import LivemigError
from livemig.memory import system_page_size

WORD = 8


def _write_randomly(client: AttachClient, words: npt.NDArray[np.uint64], rate: float, seed: int,
                    stop: threading.Event) -> None:
    """``rate`` random pages per second in batches of 10 ms, parked at a checkpoint between batches."""
    rng = np.random.default_rng(seed)
    batch = max(1, int(rate / 100))
    with client.writer():
        due = time.monotonic()
        while not stop.is_set() and client.checkpoint():  # a destination waits here until it runs
            words[rng.integers(0, len(words), batch), 1] += np.uint64(1)
            due = max(due + batch / rate, time.monotonic() - 0.1)
            stop.wait(max(0.0, due - time.monotonic()))  # pacing only


def _serve_commands(words: npt.NDArray[np.uint64]) -> None:
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "write":
            stride, offset = int(parts[1]), int(parts[2])
            words[offset::stride, 2] += np.uint64(1)
            print(f"wrote {len(words[offset::stride])}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m livemig.benchmark.attach_worker")
    ap.add_argument("socket")
    ap.add_argument("--role", default="source", choices=["source", "destination"])
    ap.add_argument("--size", type=int, default=64 << 20)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--retry", type=float, default=0.0, help="seconds to retry connecting")
    args = ap.parse_args(argv)
    page = system_page_size()
    client = AttachClient(args.size, role=args.role, name="bench-worker")
    words = client.ndarray(np.uint64).reshape(-1, page // WORD)
    if args.role == "source":
        words[:, 0] = np.arange(1, len(words) + 1, dtype=np.uint64)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    give_up = time.monotonic() + args.retry
    while True:  # a destination's livemig may not listen yet
        try:
            client.connect(args.socket)
            break
        except LivemigError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)
    print(f"ready role={args.role}", flush=True)
    threads = [threading.Thread(target=_serve_commands, args=(words,), daemon=True)]
    if args.rate > 0:
        threads.append(threading.Thread(target=_write_randomly, args=(client, words, args.rate, args.seed, stop)))
    for t in threads:
        t.start()
    while not stop.is_set() and client.wait_lost(0.1) is None:
        pass
    stop.set()
    client.close()  # lets a writer out of its checkpoint
    for t in threads[1:]:
        t.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
