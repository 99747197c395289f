"""One switch for the fast paths, so tests can run the reference path beside them.

Every fast path (the complex-dtype LRU scan, the fused output-layer cross-entropy,
the per-head VQ search) computes the same function as its reference path, up to float
rounding; `reference_paths()` turns them all off for the duration of a `with` block
(tests compare the two). Each fast path also has a CPU implementation, so CI runs it.

Two speed-ups are not behind this switch, because both paths must share them for the
comparison to hold: the CPU dropout masks (`metarec.models.dropout`; the same masks for
the same seed in both paths) and the fused Adam/AdamW kernel (`metarec.optimizer`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def enabled() -> bool:
    """True unless inside `reference_paths()` (per thread)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def reference_paths(reference: bool = True) -> Iterator[None]:
    """Run the block on the reference implementations (`reference=False`: fast paths)."""
    before = enabled()
    _state.enabled = not reference
    try:
        yield
    finally:
        _state.enabled = before
