"""The generic oracle (docs/design.md rule 10), for any workload: with the workload paused at
switchover, the destination's region equals the source's byte for byte, and no page was placed
twice. Both sides digest pages in C++ (the destination as it places them, so its workload may run
on; the source from its frozen memory after the switchover), the source compares the tables, and
the destination counts placements where they happen. Nothing here runs per page in Python."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.errors import ProtocolError
from livemig.memory import Region
from livemig.migration.results import DestinationSummary, VerifyReport, WorkloadCheck


def region_digests(region: Region) -> npt.NDArray[np.uint64]:
    """A digest of every page of ``region`` (C++, GIL released; an attached process's memfd holes
    are not read)."""
    return region.page_digests()


def free_pages(hinted: _core.PageBitmap, dirty: _core.PageBitmap,
               into: _core.PageBitmap | None = None) -> _core.PageBitmap:
    """What the comparison skips, taken at the final sync: the pages the workload declared free
    (hinted, H) and did not write since (not dirty, D). Their content is the workload's to forget:
    a hint drops the write tracking of the page (rule 5), so the destination may hold any older
    version of it, or its fill value. Word operations in C++, into ``into`` when given (a bitmap
    made before the pause: a fresh one is memory touched for the first time inside the downtime)."""
    bm = into if into is not None else _core.PageBitmap(hinted.size)
    bm.reset()
    bm.or_(hinted)
    bm.and_not(dirty)
    return bm


def compare(
    expected: npt.NDArray[np.uint64],
    got: npt.NDArray[np.uint64],
    excepted: _core.PageBitmap | None,
    placed_twice: int,
    workload: WorkloadCheck | None,
) -> VerifyReport:
    """The verdict of the source's digests against the destination's."""
    c = _core.compare_digests(expected, got, excepted)
    return VerifyReport(
        pages_checked=int(c.compared), mismatches=int(c.mismatches), placed_twice=placed_twice,
        excepted=int(c.excepted), missing=int(c.missing), first_mismatches=tuple(int(p) for p in c.first_mismatches),
        digests=True, workload=workload)


def without_digests(placed_twice: int, workload: WorkloadCheck | None) -> VerifyReport:
    """The verdict when the peer keeps no digests: the placement count and the workload's own check."""
    return VerifyReport(
        pages_checked=workload.pages_checked if workload else 0,
        mismatches=workload.mismatches if workload else 0,
        placed_twice=placed_twice, digests=False, workload=workload)



def judge(summary: DestinationSummary, expected: npt.NDArray[np.uint64], got: npt.NDArray[np.uint64] | None,
          excepted: _core.PageBitmap | None) -> None:
    """The source's verdict on a destination's report: its digests against ``expected`` (the
    source's, at switchover), into ``summary.verify`` and ``summary.ok``."""
    if got is None:
        raise ProtocolError("the destination negotiated digests but sent none with its report")
    workload = summary.verify.workload if summary.verify is not None else None
    summary.verify = compare(expected, got, excepted, summary.placed_twice, workload)
    summary.ok = summary.ok and summary.verify.ok


__all__ = ["compare", "free_pages", "judge", "region_digests", "without_digests"]
