"""Helpers for the destination tests: run anything that may block on a userfaultfd fault in a
forked child with a deadline (killed if it overruns), and skip when userfaultfd is unavailable."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from livemig.destination import postcopy_unsupported_reason

PAGE = os.sysconf("SC_PAGE_SIZE")


_REASON = postcopy_unsupported_reason()
needs_uffd = pytest.mark.skipif(_REASON is not None, reason=f"userfaultfd unavailable: {_REASON}")


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # report everything, including assertion failures
        conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_in_child(fn: Callable[..., Any], *args: Any, deadline: float = 30.0) -> Any:
    """Run fn(*args) in a forked child; return its (picklable) result. Fails the test when the child
    raises, dies, or runs past `deadline` seconds (then it is killed)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args), daemon=True)
    p.start()
    child.close()
    try:
        if not parent.poll(deadline):
            p.kill()
            p.join()
            pytest.fail(f"child did not finish within {deadline} s (a fault never resolved?)")
        try:
            status, value = parent.recv()
        except EOFError:
            p.join()
            pytest.fail(f"child died without a result (exit code {p.exitcode})")
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
        parent.close()
    if status != "ok":
        pytest.fail(f"child failed:\n{value}")
    return value
