"""A Python program whose whole state is a memfd-backed numpy array, attached to livemig with
livemig.attach.client (the tests migrate it; docs/attach.md shows its core).

State: ``counts[0]`` is the number of operations done, n; operation i adds 1 to the word at the
start of page 1 + i % (pages - 1). So every page's word is a function of n alone, which the check
verifies page by page (a lost, stale or zeroed page fails it). Usage:

    attach_py_program.py SOCKET [--role source|destination] [--size BYTES] [--rate OPS_PER_S]

Status lines on stdout: ``ready pid=P memfd=FD``, ``started n=N`` (a destination, when livemig
resumed it), ``check n=N failures=F`` (SIGUSR1), ``exit n=N failures=F`` (SIGTERM), ``migrated
away n=N`` (a source whose memory went to the destination), ``lost ...``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import numpy as np

from livemig.attach.client import AttachClient

WORDS_PER_PAGE = 4096 // 8


def expected(n: int, slots: int) -> np.ndarray:
    """What each slot's word holds after n operations."""
    base = np.full(slots, n // slots, dtype=np.uint64)
    base[: n % slots] += 1
    return base


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--role", default="source", choices=["source", "destination"])
    ap.add_argument("--size", type=int, default=4 << 20)
    ap.add_argument("--rate", type=float, default=20000.0)
    args = ap.parse_args()
    stop = threading.Event()

    def check() -> tuple[int, int, str]:
        n = int(counts[0])
        got = counts[WORDS_PER_PAGE::WORDS_PER_PAGE]
        bad = np.flatnonzero(got != expected(n, len(got)))
        text = "" if not len(bad) else f"page {bad[0] + 1} holds {got[bad[0]]}, n={n} wants {expected(n, len(got))[bad[0]]}"
        return len(got) + 1, len(bad), text

    client = AttachClient(args.size, role=args.role, name="py-counter", check=check)
    counts = client.ndarray(np.uint64)
    slots = client.nbytes // 4096 - 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: print(f"check n={int(counts[0])} failures={check()[1]}", flush=True))
    client.connect(args.socket)
    print(f"ready pid={os.getpid()} memfd={client.memfd} role={args.role}", flush=True)
    batch = max(1, int(args.rate / 100))
    with client.writer():
        if args.role == "destination":
            if not client.checkpoint():  # holds until livemig resumes it with its memory
                print(f"lost before it ran: {client.lost.why if client.lost else '?'}", flush=True)
                client.close()
                return 3
            print(f"started n={int(counts[0])}", flush=True)
        while not stop.is_set():
            for _ in range(batch):
                if not client.checkpoint():
                    break
                n = int(counts[0])
                counts[WORDS_PER_PAGE * (1 + n % slots)] += 1
                counts[0] = n + 1
            else:
                time.sleep(0.01)  # about --rate operations per second
                continue
            break
    if client.migrated_away:
        pages = os.fstat(client.memfd).st_blocks * 512 // 4096  # what its memfd holds (read untouched)
        print(f"migrated away n={int(counts[0])} memfd_pages={pages}", flush=True)
        client.close()
        return 0
    client.close()  # detach: the memory is ordinary again, the program's own
    _, failures, text = check()
    print(f"exit n={int(counts[0])} failures={failures} {text}".rstrip(), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
