"""Reproducible builds: every computation of the offline job runs with one fixed number of CPU threads.

Float sums split across threads round differently, so an expert trained with 1 thread differs from one trained
with 2 (measured: 8e-4 to 1.6e-2 relative L2 on the tiny family). Left to the defaults, a store's bytes — and so
its version — would depend on the core count of the machine and on the engine (Ray gives a task one thread, the
local engine all of them). The build config names the count (`BuildConfig.threads`); this module is the one
place that applies it: torch's intra-op threads and the BLAS/OpenMP pools numpy and faiss use.

Same config, seed, library versions and CPU kind ⇒ the same bytes, whatever the engine, shard split or core count.
Across CPU kinds (other SIMD kernels) or torch builds bit-identity is not promised; the store records what it was
built with (`build_environment`).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

from threadpoolctl import threadpool_limits

# torch is imported inside the functions, so importing the engine (which imports this module) stays light.


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads (torch) and `n` BLAS/OpenMP threads; restore them after."""
    import torch

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def with_config_threads(step: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a pipeline step whose first argument has `.config.threads` (a BuildContext)."""

    @wraps(step)
    def pinned(ctx, *args, **kwargs):
        with fixed_threads(ctx.config.threads):
            return step(ctx, *args, **kwargs)

    return pinned


def build_environment(threads: int) -> dict:
    """What a store was built with (recorded in its manifest, outside the content hash that names its version)."""
    import faiss
    import numpy as np
    import open_clip
    import torch

    return {"threads": threads, "torch": torch.__version__, "numpy": np.__version__, "faiss": faiss.__version__,
            "open_clip": open_clip.__version__, "python": platform.python_version(), "machine": platform.machine()}
