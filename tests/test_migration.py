"""Migrations end to end: real processes, sockets, userfaultfd and dirty tracking. Every run
checks the design's oracle (increment) or every page's generation (the other workloads)."""

from __future__ import annotations

import pytest

from livemig.guest import GuestConfig
from livemig.loopback import migrate_locally as run_migration
from livemig.migration import DestinationConfig, MigrationConfig

from recovery_helpers import assert_completed, run_through_relay

WORKLOADS = ["increment", "random", "hotset", "idle"]


def guest_for(workload: str, free_fraction: float = 0.5, churn: float = 2000.0) -> GuestConfig:
    rate = 0.0 if workload == "idle" else 20000.0
    churn = 0.0 if workload == "increment" else churn  # increment is the oracle writer alone
    return GuestConfig(workload=workload, rate=rate, free_fraction=free_fraction, churn=churn, seed=7)


def assert_intact(result, summary) -> None:  # type: ignore[no-untyped-def]
    assert result.ok, result.error
    assert summary["ok"], summary
    assert result.verify is not None
    assert result.verify.mismatches == 0
    assert result.verify.placed_twice == 0
    assert result.verify.pages_checked > 0
    assert result.balloon.done_delivered
    assert result.balloon.held_pages_after == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_precopy(workload: str, hints: bool) -> None:
    result, summary = run_migration(guest_for(workload), MigrationConfig(hints=hints, verify=True))
    assert_intact(result, summary)
    assert result.mode == summary["mode"] == "precopy"  # (the result's mode is the destination's report)
    assert result.precopy_rounds >= 1
    if hints:
        assert result.hints.pages_hinted > 0
        # Hinted free pages are not sent: a guest half free sends well under the whole region.
        assert result.pages_sent + result.zero_pages < result.region_bytes // result.page_size
    else:
        assert result.hints.rounds == 0 and result.hints.pages_hinted == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_postcopy(workload: str, hints: bool) -> None:
    result, summary = run_migration(guest_for(workload), MigrationConfig(postcopy=True, hints=hints, verify=True))
    assert_intact(result, summary)
    assert result.mode == summary["mode"] == "postcopy"  # what happened, not what the config asked
    assert result.postcopy.outstanding_requests == 0


@pytest.mark.timeout(120)
def test_postcopy_with_hints_delivers_done_and_frees_held_pages() -> None:
    """Background failure (1): under postcopy the destination guest still gets DONE, frees the pages
    it held, and none stay held."""
    result, _ = run_migration(guest_for("random", free_fraction=0.6), MigrationConfig(postcopy=True, verify=True))
    assert result.hints.pages_hinted > 0
    assert result.balloon.last_cmd_id == 1  # DONE
    assert result.balloon.done_delivered
    assert result.balloon.held_pages_after == 0


@pytest.mark.timeout(120)
def test_hinted_pages_reused_in_postcopy_resolve_locally() -> None:
    """Background failure (2): once postcopy starts the guest reuses and writes every page it had
    hinted; each resolves locally (never requested from the source) and none stalls.

    A stall (QEMU's bug) is a fault on a hinted page that nobody serves until the background push
    reaches it. To tell one from success the push must last: no precopy round (every page comes
    in postcopy) over a link paced to 8 MB/s, so the push takes about a second, and a stalled
    fault would wait a good part of it, while a local fill takes microseconds and a page asked
    from the source a few milliseconds."""
    guest = GuestConfig(workload="idle", free_fraction=0.5, churn=50000.0, seed=3)
    out = run_through_relay(guest, MigrationConfig(postcopy=True, postcopy_after=0, verify=True), size=16 << 20,
                            rate_bps=8e6, settle_s=10.0, await_reuse=True)
    assert_completed(out)
    result = out.result
    assert result is not None and result.mode == "postcopy" and out.dest["mode"] == "postcopy"
    pc = result.postcopy
    assert pc.local_fill_pages > 0
    # Every hinted page was written, and each fault on one was resolved here: a hinted page that
    # had been requested instead would be missing from local_fills. (Requests themselves happen:
    # the churn also touches pages that are not free, which the push had not brought yet.)
    assert pc.local_fills == pc.local_fill_pages
    # The push lasted long enough for a stall to show, and no fault waited half as long.
    assert result.push_seconds > 0.5, result.push_seconds
    assert pc.fault_latency_us.max < result.push_seconds * 1e6 / 2, (pc.fault_latency_us, result.push_seconds)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefault", [True, False], ids=["prefault", "no-prefault"])
def test_prefaulted_pages_not_received_fault_in_postcopy(prefault: bool) -> None:
    """The destination's prefault made pages present that precopy never sent (hinted free pages):
    at the switchover they are missing again, so when the guest reuses each one it faults and is
    filled here once (never read as the prefault's zero page without a fault, never placed twice),
    and every page sent reads as the source's."""
    guest = GuestConfig(workload="idle", free_fraction=0.5, churn=50000.0, seed=5)
    for _attempt in range(3):
        # The prefault is best effort: on a loaded machine its threads may get no CPU before this
        # small precopy ends, and then there is nothing to drop. Up to three tries for one that did.
        result, summary = run_migration(guest, MigrationConfig(postcopy=True, verify=True),
                                        dest=DestinationConfig(timeout=20, prefault=prefault),
                                        settle_s=10.0, await_reuse=True)
        if not prefault or (result.prefault.dropped_pages > 0 and result.prefault.tried):
            break
    pf = result.prefault
    if prefault:
        assert pf.threads >= 1 and pf.tried and not pf.failed
        assert pf.populated_pages > 0
        assert pf.dropped_pages > 0  # populated, never received: dropped before postcopy
    else:
        assert pf.threads == 0 and pf.populated_pages == 0 and pf.dropped_pages == 0
    assert summary["prefault"]["dropped_pages"] == pf.dropped_pages
    pc = result.postcopy
    assert pc.local_fill_pages > 0
    assert pc.local_fills == pc.local_fill_pages  # each hinted page faulted, and resolved here
    assert pc.outstanding_requests == 0
    assert_intact(result, summary)


@pytest.mark.timeout(120)
def test_destination_without_hints_postcopy_disables_hinting_under_postcopy() -> None:
    dest = DestinationConfig(timeout=20, disable_capabilities=frozenset({"hints-postcopy"}))
    result, _ = run_migration(guest_for("random"), MigrationConfig(postcopy=True, verify=True), dest=dest)
    assert "hints-postcopy" not in result.capabilities
    assert result.hints.rounds == 0 and result.hints.pages_hinted == 0
    assert result.verify is not None and result.verify.mismatches == 0
    assert result.balloon.done_delivered


@pytest.mark.timeout(120)
def test_without_local_fill_hinted_pages_are_requested_and_served() -> None:
    guest = GuestConfig(workload="idle", free_fraction=0.5, churn=50000.0, seed=3)
    result, _ = run_migration(guest, MigrationConfig(postcopy=True, verify=True,
                                                     disable_capabilities=frozenset({"local-fill"})))
    assert "local-fill" not in result.capabilities
    assert result.postcopy.local_fills == 0 and result.postcopy.local_fill_pages == 0
    assert result.verify is not None and result.verify.mismatches == 0
    assert result.balloon.held_pages_after == 0


@pytest.mark.timeout(120)
def test_extra_page_channels_precopy() -> None:
    result, _ = run_migration(guest_for("random"), MigrationConfig(channels=3, verify=True))
    assert "multichannel" in result.capabilities
    assert result.verify is not None and result.verify.mismatches == 0


@pytest.mark.timeout(120)
def test_extra_page_channels_postcopy() -> None:
    """The extra channels end before the discard ahead of switchover, so no page still in flight
    on one can land after it."""
    result, summary = run_migration(guest_for("random"), MigrationConfig(postcopy=True, channels=3, verify=True))
    assert "multichannel" in result.capabilities
    assert_intact(result, summary)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("queue", [MigrationConfig().postcopy_queue_bytes, 0], ids=["bounded-queue", "kernel-queue"])
def test_pure_postcopy_sends_every_page_once_after_the_switchover(queue: int) -> None:
    """postcopy_after=0: no precopy round. The source guest is stopped from the switchover on, so
    the push and the served requests together send each page exactly once, with the main
    channel's kernel queue bounded (the default) or left to the kernel."""
    result, summary = run_migration(guest_for("increment"),
                                    MigrationConfig(postcopy=True, postcopy_after=0, hints=False, verify=True,
                                                    postcopy_queue_bytes=queue),
                                    dest=DestinationConfig(timeout=20, postcopy_queue_bytes=queue))
    assert_intact(result, summary)
    assert result.mode == "postcopy" and result.precopy_rounds == 0 and result.rounds == []
    assert result.pages_sent + result.zero_pages == result.region_bytes // result.page_size
    # bytes_sent is everything the channels carried: the push's pages plus the control frames
    # (device state, commands, END), a few KiB.
    assert result.push_bytes <= result.bytes_sent <= result.push_bytes + 64 * 1024 and result.push_seconds > 0


@pytest.mark.timeout(120)
def test_the_old_call_form_still_migrates_and_says_it_is_deprecated() -> None:
    """migrate(address, region_bytes, GuestConfig, config) from before workloads: a model guest,
    with a DeprecationWarning that names the new form."""
    from livemig import migration, wire

    with wire.Listener("127.0.0.1:0") as lst:
        import threading

        box: list[object] = []
        t = threading.Thread(target=lambda: box.append(migration.serve(lst, wait=30, settle_s=0.1)))
        t.start()
        with pytest.warns(DeprecationWarning, match=r"pass a workload, e.g. migrate\(address, ModelGuest"):
            r = migration.migrate(str(lst.address), 4 << 20, GuestConfig(workload="idle"), MigrationConfig(verify=True))
        t.join(30)
    assert r.ok and r.workload.kind == "model-guest" and r.verify is not None and r.verify.mismatches == 0
