"""Fairness between operators on one agent (issue 10, item 8).

Two limits keep one operator key from starving the others:

- a *share* of ``remote.max_session``: the sessions one operator holds, running or
  waiting for a slot, are capped by :func:`operator_share`; one more is refused
  ``operator_limit`` at once (it would otherwise take a slot, or a place in the queue,
  that another operator is waiting for);
- a *request rate*: a token bucket per operator (``remote.operator_rate`` requests per
  minute, ``remote.operator_burst`` at once); a request without a token is refused
  ``operator_rate_limited``.

Both count only requests that passed every trust check (trusted signer, valid
signature, fresh, not replayed), so nobody can use up another operator's allowance.
Memory: one small bucket per trusted operator that asked recently; a full bucket is
forgotten (it is the state of an operator that never asked), so the table is bounded by
the operators active within the time a bucket takes to refill, and by MAX_BUCKETS.
"""

import time
from typing import Any, Dict, Optional, Tuple

MAX_BUCKETS = 4096  # operators remembered at once (a full bucket is dropped first)


def operator_share(cfg: Any, trusted_count: int) -> Optional[int]:
    """Sessions one operator may hold (running + waiting) under ``cfg``; None: no cap.

    ``remote.max_session_per_operator`` when set; 0 means half of ``max_session`` (at
    least 1) when more than one operator is trusted, and no cap when only one is (there
    is nobody else to protect, and its requests beyond max_session queue as before).
    """
    r = cfg.remote
    configured = r.max_session_per_operator
    if configured > 0:
        return configured
    if trusted_count <= 1:
        return None
    return max(1, int(r.max_session) // 2)


class OperatorRates:
    """Token buckets by operator fingerprint. Not greenlet-switching: safe under gevent."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._buckets: Dict[str, Tuple[float, float]] = {}  # fp -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, operator: str, per_minute: int, burst: int,
             now: Optional[float] = None) -> bool:
        """Spend one token of ``operator``'s bucket; False if there is none.

        ``per_minute`` 0 disables the limit. The settings are read at every call, so a
        reload applies at once (a smaller burst caps the tokens already saved)."""
        if per_minute <= 0:
            return True
        if now is None:
            now = self._clock()
        burst = max(1, int(burst))
        rate = per_minute / 60.0
        tokens, at = self._buckets.get(operator, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - at) * rate)
        if tokens < 1.0:
            self._buckets[operator] = (tokens, now)
            return False
        self._buckets[operator] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._prune(now, rate, burst)
        return True

    def _prune(self, now: float, rate: float, burst: int) -> None:
        full = [fp for fp, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * rate >= burst]
        for fp in full:
            del self._buckets[fp]
        while len(self._buckets) > MAX_BUCKETS:  # all busy: forget the oldest entries
            del self._buckets[next(iter(self._buckets))]
