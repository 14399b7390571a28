"""The workload conformance suite: every kind of workload (tests/workload_kits.py) passes these
unchanged. What a migration needs of a workload is what its protocol says; these tests check it
from the outside: the region is usable, a pause means no write, the state rebuilds the workload on
a destination, migrations in both modes verify page for page, and the memory is ordinary again
after (docs/design.md rules 9 and 10)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from workload_kits import Kit

from livemig import _core
from livemig.errors import WorkloadError
from livemig.loopback import migrate_locally
from livemig.memory import Region
from livemig.migration import MigrationConfig, MigrationFailed
from livemig.source import Source
from livemig.workload import StandardFactory, Workload

from guest_helpers import wait_until

pytestmark = pytest.mark.timeout(120)


def uffd_wp_pages(region: Region) -> int:
    """Pages of ``region`` the kernel still has write-protected for userfaultfd (pagemap bit 57), in
    the page tables of the process whose memory it is."""
    fd = os.open(region.pagemap_path, os.O_RDONLY)
    try:
        raw = os.pread(fd, region.pages * 8, region.kernel_address // region.page_size * 8)
    finally:
        os.close(fd)
    return int(((np.frombuffer(raw, dtype=np.uint64) >> np.uint64(57)) & np.uint64(1)).sum())


def test_a_workload_of_every_kind_meets_the_protocol(kit: Kit) -> None:
    w = kit.workload
    assert isinstance(w, Workload)
    assert isinstance(w.kind, str) and w.kind and isinstance(w.version, int)
    r = w.region
    assert r.nbytes == r.pages * r.page_size > 0 and r.address % r.page_size == 0
    assert r.tracking in ("kernel", "explicit")
    assert isinstance(w.stats(), dict)
    port = w.balloon
    if port is not None:
        assert port.status().pages_held >= 0 and port.device.pages == r.pages


def test_pause_means_no_write_and_resume_means_writes_again(kit: Kit) -> None:
    w = kit.workload
    w.start()
    wait_until(lambda: kit.writes() > 0, what="the writers' first writes")
    w.pause(5.0)
    before, digests = kit.writes(), _core.page_digests(w.region.buffer, w.region.page_size)
    t_end = time.monotonic() + 0.1  # an observation window, not synchronisation: writers had time
    while time.monotonic() < t_end:
        time.sleep(0.01)
    assert kit.writes() == before
    assert np.array_equal(_core.page_digests(w.region.buffer, w.region.page_size), digests)
    w.resume()
    wait_until(lambda: kit.writes() > before, what="writes after resume")


def test_the_device_state_rebuilds_the_workload_on_another_region(kit: Kit) -> None:
    w = kit.workload
    w.start()
    wait_until(lambda: kit.writes() > 0, what="the writers' first writes")
    w.pause(5.0)
    state = w.export_state()
    own = w.check()
    copy = Region.allocate(w.region.nbytes)
    copy.array[:] = w.region.array
    factory = StandardFactory()
    assert factory.accepts(w.kind, w.version) is None
    factory.prepare(copy)
    rebuilt = factory.build(w.kind, w.version, copy, state)
    try:
        assert (rebuilt.kind, rebuilt.version) == (w.kind, w.version)
        assert np.array_equal(rebuilt.region.array, w.region.array)
        assert (rebuilt.check() is None) == (own is None)
        if own is not None:
            c = rebuilt.check()
            assert own.ok and c is not None and c.ok and c.pages_checked == own.pages_checked
    finally:
        rebuilt.stop()
        w.resume()


def test_a_factory_refuses_other_kinds_and_versions(kit: Kit) -> None:
    w, factory = kit.workload, StandardFactory()
    assert "not 'no-such-kind'" in (factory.accepts("no-such-kind", 1) or "")
    assert "version" in (factory.accepts(w.kind, w.version + 1) or "")
    with pytest.raises(WorkloadError, match="no-such-kind"):
        factory.build("no-such-kind", 1, w.region, b"")


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_migrates_and_the_destination_holds_every_page(kit: Kit, postcopy: bool, request: pytest.FixtureRequest) -> None:
    if postcopy:
        request.getfixturevalue("postcopy")
    w = kit.workload
    w.start()
    wait_until(lambda: kit.writes() > 0, what="the writers' first writes")
    result, dest = migrate_locally(w, MigrationConfig(postcopy=postcopy, verify=True), settle_s=0.5)
    assert result.ok, (result.error, result.verify)
    v = result.verify
    assert v is not None and v.digests and v.mismatches == 0 and v.placed_twice == 0 and v.missing == 0, v
    assert v.pages_checked + v.excepted == w.region.pages
    assert (result.workload.kind, dest["workload_kind"]) == (w.kind, w.kind)
    assert result.mode == ("postcopy" if postcopy else "precopy") and dest["mode"] == result.mode
    # Rule 9: the source's memory is ordinary again (nothing write-protected, nothing tracked).
    assert uffd_wp_pages(w.region) == 0


def test_a_failed_migration_leaves_the_workload_running_and_its_memory_ordinary(kit: Kit) -> None:
    w = kit.workload
    w.start()
    # Tracking on: the kernel protects the pages (which proves the pagemap check sees the bit).
    probe = Source(w.region)
    assert (uffd_wp_pages(w.region) > 0) == (w.region.tracking == "kernel")
    probe.close()
    assert uffd_wp_pages(w.region) == 0
    from livemig.migration import migrate

    with pytest.raises(MigrationFailed) as ei:
        migrate("127.0.0.1:1", w, MigrationConfig(timeout=2.0))  # nobody listens there
    report = ei.value.source_workload
    assert report is not None and report.running
    assert uffd_wp_pages(w.region) == 0 and w.region._tracker is None  # explicit marks go nowhere
    before = kit.writes()
    wait_until(lambda: kit.writes() > before, what="writes after the failed migration")
