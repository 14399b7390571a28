"""The README's postcopy command run many times, each run beside the raw floor of a fault measured
just before it, with the kernel's TCP counters around it (docs/performance.md, "Postcopy faults").
Run from a checkout with livemig importable (root: the runs get a network namespace of their own):

    python bench/postcopy_runs.py --runs 20 [--json FILE] [-- MIGRATE ARGS...]

Exit code: 0 when every goal is met, 1 when one is not, 2 for a bad argument."""

from livemig.benchmark.repeated import main

if __name__ == "__main__":
    raise SystemExit(main())
