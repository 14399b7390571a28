"""livemig beside QEMU on the same postcopy (or, --mode precopy, precopy) work, on this machine
(docs/performance.md, "Against QEMU"). Needs qemu-system-x86_64 (Debian: qemu-system-x86) and
binutils; installs nothing, and says so and exits 0 when they are missing. Run from a checkout
with livemig importable:

    python bench/compare_qemu.py --size 256M --runs 3
    python bench/compare_qemu.py --mode precopy --size 1G,4G --runs 3 --accel kvm   # issue 21's goals

Exit code: 0 when every goal is met (or the comparison was skipped), 1 when one is not, 2 for a
bad argument."""

from livemig.benchmark.qemu import main

if __name__ == "__main__":
    raise SystemExit(main())
