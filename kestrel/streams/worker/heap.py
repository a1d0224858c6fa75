"""The garbage collector set for a worker that allocates ~10^5 small containers per batch.

Two measured costs: full collections walked the millions of objects torch,
Faust and the models keep alive forever (half the worker's CPU, 259 -> 138 µs
per payment in process), and young collections ran every 700 allocations,
each walking everything a batch holds (head lists, vectors, documents): about
half the worker-side head arithmetic (72 -> 35-47 µs per payment). So what
lives at warm-up is frozen, and the young generation is collected every
50,000 allocations: cyclic garbage waits a little longer, nothing else changes.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Freeze what is alive now (call it once warmed up) and make young collections rare."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
