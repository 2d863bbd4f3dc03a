"""What an engine loads is out of the garbage collector's reach (app/core/heap.py): a full collection walks every
object in the generations it collects, and walking the loaded model stopped the event loop for ~170 ms each time."""

from __future__ import annotations

import gc
import shutil

from app.ml.store import migrate_store, read_manifest
from offline.import_experts import remove_experts


def _walked_by_collections(obj) -> bool:
    """Whether `obj` is in a generation the collector walks (not frozen into the permanent one)."""
    return any(o is obj for generation in range(3) for o in gc.get_objects(generation))


def test_a_loaded_or_reloaded_store_and_its_model_are_frozen_out_of_collections(tiny_build, tmp_path):
    from app.services.engine import Engine

    store = tmp_path / "store"
    shutil.copytree(tiny_build.out, store)
    if read_manifest(store)["format_version"] == 1:  # a store reused from before format 2 (SGLORA_TEST_STORE)
        migrate_store(store)
    engine = Engine(store, "cpu")
    engine.load()
    loaded = [engine.store, engine.store.bank, engine.backbone.model, *engine.backbone.model.modules()]
    assert gc.isenabled()  # collections still run: only what was loaded is skipped
    assert not any(_walked_by_collections(o) for o in loaded)
    assert gc.get_freeze_count() >= len(loaded)

    remove_experts(store, [read_manifest(store)["experts"][0]["id"]])
    assert engine.reload_if_changed()["changed"] is True
    assert not _walked_by_collections(engine.store) and not _walked_by_collections(engine.store.bank)
    assert _walked_by_collections([])  # the check itself sees an object made after the freeze
