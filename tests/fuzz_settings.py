"""Hypothesis settings shared by the hostile-input tier (tests/test_fuzz_*.py).

Every fuzz test feeds outside bytes to one parser and asserts only its documented
outcomes: a refusal with a reason from the documented set, or (for valid input) a
round trip. The tier must stay fast and reproducible in CI:

- ``derandomize=True``: the same examples on every run (a CI failure reproduces
  locally with the same command); no example database is written.
- ``deadline=None``: gevent switches and socketpairs make timings noisy on a shared
  2-core machine; each example that could hang is bounded by its own timeout instead.
- ``max_examples`` per test is set with :func:`examples` (about 100-300); export
  ``RG_FUZZ_SCALE=10`` to run ten times as many (a longer local hunt, still derandomized
  unless ``RG_FUZZ_RANDOM=1``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("RG_FUZZ_SCALE", "1") or "1"))
RANDOM = os.environ.get("RG_FUZZ_RANDOM") == "1"

settings.register_profile(
    "rg-fuzz",
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    print_blob=True,
)
FUZZ = settings.get_profile("rg-fuzz")


def examples(n: int, slow: bool = False) -> settings:
    """Settings for one fuzz test: ``n`` examples (times RG_FUZZ_SCALE); ``slow`` also
    suppresses the too_slow health check (for tests whose examples use sockets)."""
    kwargs = {}
    if slow:
        kwargs["suppress_health_check"] = [HealthCheck.too_slow]
    return settings(FUZZ, max_examples=n * SCALE, **kwargs)
