"""A short seeded fuzz run per protocol against the shared daemon (``tests/fuzz.py``; the long
run is ``bench/fuzz.py``): every input gets an error reply, a close or a normal reply, never
a traceback (conftest checks the log after each test), and the daemon still serves a
normal request of every protocol afterwards."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.fuzz import DRIVERS, check_alive, rng_for

SEED = 20261124
INPUTS = 250


@pytest.mark.parametrize("protocol", sorted(DRIVERS))
@pytest_twisted.ensureDeferred
async def test_fuzz(daemon, protocol):
    tally = await DRIVERS[protocol](daemon, rng_for(SEED, protocol), INPUTS)
    assert tally.sent >= INPUTS * 0.9, tally
    assert tally.errors > 0, tally  # the mutations did reach the parsers
    assert not [n for n in tally.notes if "HTTP 5" in n], tally
    await check_alive(daemon)
    # conftest checks that the daemon's log got no traceback during this test
