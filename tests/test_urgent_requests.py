"""The fault path's capabilities. urgent-requests: in postcopy the destination's page requests
travel on the urgent socket's other direction (never behind the bulk stream on main), and on the
return path without it; a resumed connection sends them on main. Seen by the relay, which counts
each connection's bytes both ways. postcopy-next: the source announces the last precopy round."""

from __future__ import annotations

import pytest
from tls_helpers import SECRET

from livemig.destination import postcopy_unsupported_reason
from livemig.guest import GuestConfig
from livemig.migration import DestinationConfig, MigrationConfig

from recovery_helpers import assert_completed, run_through_relay

GUEST = GuestConfig(workload="increment", rate=20000.0, seed=5)
SLOW_LINK = 40e6  # bytes/s: the guest dirties the region again during the first round
REQUEST_BYTES = 24  # one REQUEST frame (header only)
HANDSHAKE_MAX = 1024  # what a channel's destination sends back before any frame, and more


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("urgent_requests", "encrypt"), [(True, False), (False, False), (True, True)])
def test_requests_travel_on_the_urgent_socket_exactly_when_negotiated(urgent_requests: bool, encrypt: bool) -> None:
    if (why := postcopy_unsupported_reason()) is not None:
        pytest.skip(why)
    off = frozenset() if urgent_requests else frozenset({"urgent-requests"})
    secret = SECRET if encrypt else None  # encrypted: the urgent channel's TLS session carries them
    config = MigrationConfig(postcopy=True, hints=False, verify=True, disable_capabilities=off, secret=secret,
                             encrypt=encrypt)
    dest = DestinationConfig(timeout=10, resume_deadline_s=10, secret=secret, encrypt=encrypt)
    out = run_through_relay(GUEST, config, rate_bps=SLOW_LINK, dest=dest)
    assert_completed(out)
    r = out.result
    assert r is not None and ("urgent-requests" in r.capabilities) == urgent_requests
    assert r.tls.enabled == encrypt
    assert "urgent-channel" in r.capabilities
    requests = r.postcopy.requests
    assert requests >= 10, r.postcopy  # the guest faulted on pages still on the source
    main, *others = out.per_connection
    busiest = max(c["to_source"] for c in others)
    if urgent_requests:  # one other connection (the urgent one) carried every request back
        assert busiest >= REQUEST_BYTES * requests, (out.per_connection, requests)
    else:  # requests went back on main; the others only answered their handshakes
        assert busiest <= HANDSHAKE_MAX, out.per_connection
        assert main["to_source"] >= REQUEST_BYTES * requests, (out.per_connection, requests)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("postcopy_next", [True, False])
def test_postcopy_next_on_three_channels_is_negotiated_and_the_migration_completes(postcopy_next: bool) -> None:
    """COMMAND 5 (capability postcopy-next) starts the last precopy round on main while the extra
    page channels still carry that round's pages; the migration completes and verifies with and
    without it (the TCP counter test checks it drops nothing)."""
    if (why := postcopy_unsupported_reason()) is not None:
        pytest.skip(why)
    off = frozenset() if postcopy_next else frozenset({"postcopy-next"})
    config = MigrationConfig(postcopy=True, postcopy_after=2, channels=3, hints=False, verify=True,
                             disable_capabilities=off)
    out = run_through_relay(GUEST, config, rate_bps=SLOW_LINK)
    assert_completed(out)
    r = out.result
    assert r is not None and ("postcopy-next" in r.capabilities) == postcopy_next
    assert r.precopy_rounds == 2 and r.mode == "postcopy" and "multichannel" in r.capabilities
