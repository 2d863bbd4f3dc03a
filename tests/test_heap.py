"""What an engine loads is out of the garbage collector's reach (app/core/heap.py): a full collection walks every
object in the generations it collects, and walking the loaded model stopped the event loop for ~170 ms each time."""

from __future__ import annotations

import gc

from app.ml.store import read_manifest
from offline.import_experts import remove_experts
from tests.conftest import copy_tiny_store


def _walked_by_collections(*objs) -> list[bool]:
    """For each of `objs`: whether it is in a generation the collector walks (not frozen into the permanent one).
    One scan of the tracked objects for all of them (ids are safe: the caller holds every obj)."""
    walked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    return [id(o) in walked for o in objs]


def test_a_loaded_or_reloaded_store_and_its_model_are_frozen_out_of_collections(tiny_build, tmp_path):
    from app.services.engine import Engine

    store = copy_tiny_store(tiny_build, tmp_path / "store")
    engine = Engine(store, "cpu")
    engine.load()
    loaded = [engine.store, engine.store.bank, engine.backbone.model, *engine.backbone.model.modules()]
    assert gc.isenabled()  # collections still run: only what was loaded is skipped
    assert not any(_walked_by_collections(*loaded))
    assert gc.get_freeze_count() >= len(loaded)

    remove_experts(store, [read_manifest(store)["experts"][0]["id"]])
    assert engine.reload_if_changed()["changed"] is True
    assert _walked_by_collections(engine.store, engine.store.bank, []) == [False, False, True]  # [] made after
