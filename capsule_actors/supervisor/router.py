"""Lock-key routing: which slot of a pool owns a key (rendezvous hashing).

Every slot scores every key with a hash of ``(slot, key)``; the highest score owns the key. Slots
are stable names (``w0``, ``w1``…, ``p0``…) that a restarted actor keeps, so a key's owner never
changes while the pool's size stays the same, and no table has to be shared or rebuilt to find it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _score(slot: str, key: str) -> bytes:
    return hashlib.blake2b(f"{slot}\x00{key}".encode(), digest_size=8).digest()


def owner(key: str, slots: Sequence[str]) -> str:
    """The slot that owns ``key`` among ``slots`` (a non-empty sequence of slot names)."""
    return max(slots, key=lambda slot: _score(slot, key))
