"""Build computations run with the config's thread count, whatever the calling process uses (offline/threads.py)."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from offline.engine import LocalEngine
from offline.threads import fixed_threads

from .engine_tasks import thread_counts


def test_fixed_threads_sets_torch_and_blas_threads_and_restores_them():
    before = torch.get_num_threads()
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert torch.get_num_threads() == before


def test_fixed_threads_restores_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), fixed_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_fixed_threads_refuses_zero():
    with pytest.raises(ValueError, match="threads"):
        with fixed_threads(0):
            pass


def test_an_engine_item_runs_with_the_threads_it_was_given():
    torch.set_num_threads(2)
    try:
        results = dict(LocalEngine().map(thread_counts, [("a", None), ("b", None)], progress=False, threads=1))
        assert all(r["torch"] == 1 for r in results.values())
        assert torch.get_num_threads() == 2  # the calling process keeps its own
    finally:
        torch.set_num_threads(2)
