"""The complete C example of docs/attach.md (cpp/attach/examples/minimal.c) built the way its users
build it, against the installed header and library with one pkg-config line, then migrated by
``livemig migrate --attach`` into another process while its worker thread keeps counting; the
generic oracle checks every page."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from attach_helpers import Proc, migrate_pair, reaped

from livemig import _core
from livemig.attach import install_prefix

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kernel_tracking")]
REPO = Path(__file__).resolve().parent.parent
MINIMAL_BYTES = 64 << 20  # minimal.c's cfg.len


def attach_prefix(tmp: Path) -> Path:
    """The installed attach tree: the package's (a wheel), else this checkout's build installed."""
    prefix = install_prefix()
    if prefix is not None:
        return prefix
    build = Path(_core.__file__).resolve().parent
    if not (build / "cmake_install.cmake").exists():
        pytest.skip(f"no installed attach tree beside {_core.__file__} and no build tree to install")
    subprocess.run(["cmake", "--install", str(build), "--prefix", str(tmp / "prefix")], check=True,
                   capture_output=True, timeout=60)
    return tmp / "prefix"


def build_minimal(tmp: Path) -> Path:
    """cc minimal.c $(pkg-config --cflags --libs livemig_attach), as docs/attach.md says."""
    for tool in ("cc", "pkg-config"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} to build the C example with")
    pcs = sorted(attach_prefix(tmp).rglob("livemig_attach.pc"))
    assert pcs, "the installed tree has no livemig_attach.pc"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "livemig_attach"], check=True, capture_output=True,
                           text=True, env={"PKG_CONFIG_PATH": str(pcs[0].parent), "PATH": "/usr/bin:/bin"}).stdout
    out = tmp / "minimal"
    subprocess.run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", str(REPO / "cpp/attach/examples/minimal.c"),
                    *flags.split(), "-o", str(out)], check=True, capture_output=True, timeout=60)
    return out


def test_the_documented_c_example_builds_installed_and_migrates(tmp_path: Path) -> None:
    minimal = build_minimal(tmp_path)

    def start(sock: Path, role: str, netns: str | None) -> Proc:
        if role == "source":  # the example prints nothing: say it started, then become it
            return Proc(["sh", "-c", 'echo "ready role=source"; exec "$0" "$1"', str(minimal), str(sock)])
        # The destination: a process of the same size that only holds the memory (no check of its own).
        return Proc([sys.executable, "-m", "livemig.benchmark.attach_worker", str(sock), "--role", role,
                     "--size", str(MINIMAL_BYTES)])

    source, dest, src, dst = migrate_pair(tmp_path, start=start)
    with reaped(src, dst):
        assert source["ok"] and source["workload"]["kind"] == "attach", source
        assert source["workload"]["process"]["name"] == "minimal" and source["workload"]["process"]["pid"] == src.p.pid
        v = source["verify"]
        assert v["digests"] and v["mismatches"] == 0 and v["pages_checked"] + v["excepted"] == MINIMAL_BYTES // 4096, v
        assert source["rounds"][0]["pages_sent"] > 0  # its counters went (the rest are holes: ZERO runs)
        assert dest["ok"] and dest["workload_process"]["name"] == "bench-worker"
        src.signal(signal.SIGINT)  # handed off: it detaches and exits 0
        assert src.wait(30) == 0
