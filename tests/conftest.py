"""Shared fixtures. The whole suite runs on the tiny open_clip config (tests/assets/tiny_clip.json), CPU only."""

from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
open_clip.add_model_config(ASSETS / "tiny_clip.json")
TINY = "tiny_clip"

torch.set_num_threads(2)


@pytest.fixture
def tiny_backbone():
    from app.ml.backbone import load_backbone

    torch.manual_seed(0)  # random-init weights, fixed so failures reproduce
    return load_backbone(TINY, pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """The `--tiny` store, built once per test session (pretrained tiny base, 40 experts, CVAE).

    Returns the pipeline's BuildContext; `ctx.out` is the store. Shared by the offline, service and evaluation
    tests, because building it is the slowest thing the suite does.
    """
    import os

    from offline import pipeline
    from offline.config import TINY

    # For quick local iterations: SGLORA_TEST_STORE=<dir> reuses (or first builds) a store there. CI leaves it
    # unset and builds from scratch.
    reuse = os.environ.get("SGLORA_TEST_STORE")
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("store") / "tiny"
    ctx = pipeline.make_context(TINY, out)
    if not (reuse and (out / "manifest.json").exists() and (out / "cvae.safetensors").exists()):
        pipeline.build(TINY, out, progress=False)
    return ctx


def copy_tiny_store(tiny_build, dest: Path) -> Path:
    """A writable copy of the session's `--tiny` store at `dest` (tests that import, remove or republish)."""
    from app.ml.store import migrate_store, read_manifest

    shutil.copytree(tiny_build.out, dest)
    if read_manifest(dest)["format_version"] == 1:  # a store reused from before format 2 (SGLORA_TEST_STORE)
        migrate_store(dest)
    return dest
