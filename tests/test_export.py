"""Export formats on the tiny store: ?format=peft loads in PEFT on the converted Hugging Face CLIPModel and equals
sglora's own forward; ?format=open_clip-merged equals the per-sample LoRA forward; the light loader imports without
the server's dependencies."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from app.ml.lora import per_sample_lora
from tests.test_service_support import serving, settings_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tiny_build):
    with serving(settings_for(tiny_build.out)) as client:
        yield client, tiny_build


@pytest.fixture(scope="module")
def inputs(served):
    """Held-out images (preprocessed) and captions of an unseen task, and a generated adapter for it."""
    client, ctx = served
    task = ctx.split.unseen[0]
    pairs = ctx.split.test_pairs[task.name][:4]
    engine = client.app.state.engine
    pixels = engine.backbone.preprocess_images([p.image for p in pairs])
    tokens = engine.backbone.tokenize([p.caption for p in pairs])
    r = client.post("/generate-lora", json={"description": task.description, "seed": 1})
    assert r.status_code == 200, r.text
    return pixels, tokens, r.headers["x-adapter-id"], r.content


def sglora_forward(engine, adapter_bytes, pixels, tokens):
    """The service's own injection: per-sample LoRA on the shared model, unnormalised features."""
    from safetensors.torch import load as load_bytes

    from app.ml.lora import state_dict_to_vector

    vector = state_dict_to_vector(engine.layout, load_bytes(adapter_bytes))
    model = engine.backbone.model
    with torch.no_grad():
        with per_sample_lora(engine.layout, vector[None], torch.zeros(len(pixels), dtype=torch.long)):
            image = model.encode_image(pixels)
        with per_sample_lora(engine.layout, vector[None], torch.zeros(len(tokens), dtype=torch.long)):
            text = model.encode_text(tokens)
    return image, text


def test_peft_export_loads_in_peft_on_the_converted_clip_model(served, inputs, tmp_path):
    """Must show: exported PEFT folder -> PeftModel.from_pretrained on the tiny CLIPModel converted from the tiny
    open_clip weights -> image and text embeddings equal sglora's injection within 1e-4, both towers adapted."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from app.ml.backbone import load_backbone

    client, ctx = served
    pixels, tokens, adapter_id, data = inputs
    engine = client.app.state.engine
    assert engine.store.lora_config.towers == ("vision", "text")

    r = client.get(f"/adapters/{adapter_id}", params={"format": "peft"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == f'attachment; filename="{adapter_id}.peft.zip"'
    assert client.get(f"/adapters/{adapter_id}", params={"format": "peft"}).content == r.content  # deterministic
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert sorted(zf.namelist()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        zf.extractall(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # the tiny base has no Hugging Face checkpoint
    assert any(t.startswith("text_model.") for t in config["target_modules"])

    meta = engine.store.base_model
    plain = load_backbone(meta["name"], pretrained=engine.store.base_pretrained(), device="cpu")
    # The folder's README.md code, run as written (its two placeholders filled): it is what users will copy.
    readme = (tmp_path / "README.md").read_text()
    assert "from_pretrained(\"a CLIPModel" not in readme and "No Hugging Face checkpoint" in readme
    code = readme.split("```python\n")[-1].split("```")[0]
    namespace: dict = {}
    exec(code.replace("<this folder>", str(tmp_path)).replace("<store>", str(engine.store.path)), namespace)
    model = namespace["model"].eval()
    assert type(namespace["base"]).__name__ == "CLIPModel"
    check = model.load_adapter(str(tmp_path), adapter_name="check")
    assert list(check.missing_keys) == [] and list(check.unexpected_keys) == []
    model.set_adapter("default")
    base = model.get_base_model()
    with torch.no_grad():
        peft_image = base.get_image_features(pixel_values=pixels).pooler_output
        peft_text = base.get_text_features(input_ids=tokens).pooler_output
        plain_image, plain_text = plain.model.encode_image(pixels), plain.model.encode_text(tokens)
    ours_image, ours_text = sglora_forward(engine, data, pixels, tokens)
    assert (ours_image - plain_image).abs().max() > 1e-3 and (ours_text - plain_text).abs().max() > 1e-3
    print(f"PEFT vs sglora max |diff|: image {(peft_image - ours_image).abs().max():.2e}, "
          f"text {(peft_text - ours_text).abs().max():.2e}")
    assert (peft_image - ours_image).abs().max() < 1e-4
    assert (peft_text - ours_text).abs().max() < 1e-4


def test_merged_open_clip_export_equals_the_per_sample_forward(served, inputs, tmp_path):
    """Must show: the merged single file, loaded by open_clip by name, == per-sample LoRA forward within 1e-5."""
    from app.ml.backbone import load_backbone

    client, _ = served
    pixels, tokens, adapter_id, data = inputs
    r = client.post("/generate-lora", params={"format": "open_clip-merged"},
                    json={"description": meta_of(data)["description"], "seed": 1})
    assert r.status_code == 200, r.text
    assert r.headers["x-adapter-id"] == adapter_id  # the same adapter, another format
    assert r.headers["content-disposition"] == f'attachment; filename="{adapter_id}.open_clip-merged.safetensors"'
    path = tmp_path / "merged.safetensors"
    path.write_bytes(r.content)
    engine = client.app.state.engine
    merged = load_backbone(engine.store.base_model["name"], pretrained=str(path), device="cpu")
    with torch.no_grad():
        image, text = merged.model.encode_image(pixels), merged.model.encode_text(tokens)
    ours_image, ours_text = sglora_forward(engine, data, pixels, tokens)
    print(f"merged vs per-sample max |diff|: image {(image - ours_image).abs().max():.2e}, "
          f"text {(text - ours_text).abs().max():.2e}")
    assert (image - ours_image).abs().max() < 1e-5
    assert (text - ours_text).abs().max() < 1e-5


def meta_of(data: bytes) -> dict:
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]


def test_bad_format_and_unknown_id_are_4xx(served, inputs):
    client, _ = served
    _, _, adapter_id, _ = inputs
    r = client.get(f"/adapters/{adapter_id}", params={"format": "onnx"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "format", r.text
    r = client.get("/adapters/" + "0" * 64, params={"format": "peft"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "adapter_id"
    r = client.post("/generate-lora", json={"description": "a photo of a red circle"},
                    headers={"accept": "application/json"})
    downloads = r.json()["downloads"]
    assert sorted(downloads) == ["open_clip-merged", "peft", "safetensors"]
    assert downloads["peft"].endswith(f"/adapters/{r.json()['adapter_id']}?format=peft")


_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fastapi", "starlette", "redis", "faiss", "matplotlib", "uvicorn"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


def test_light_loader_needs_no_server_dependencies(served, inputs, tmp_path):
    """The README snippet, in a process where FastAPI, Redis, faiss and matplotlib cannot be imported."""
    client, _ = served
    pixels, tokens, _, data = inputs
    engine = client.app.state.engine
    (tmp_path / "adapter.safetensors").write_bytes(data)
    torch.save({"pixels": pixels, "tokens": tokens}, tmp_path / "inputs.pt")
    script = _BLOCKER + f"""
import torch
from safetensors.torch import save_file
from app.ml.adapter_loader import load_adapted_model

backbone = load_adapted_model({str(tmp_path / 'adapter.safetensors')!r}, pretrained={engine.store.base_pretrained()!r})
x = torch.load({str(tmp_path / 'inputs.pt')!r})
with torch.no_grad():
    save_file({{"image": backbone.model.encode_image(x["pixels"]), "text": backbone.model.encode_text(x["tokens"])}},
              {str(tmp_path / 'out.safetensors')!r})
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out.safetensors"))
    ours_image, ours_text = sglora_forward(engine, data, pixels, tokens)
    assert (out["image"] - ours_image).abs().max() < 1e-5 and (out["text"] - ours_text).abs().max() < 1e-5


def test_peft_readme_gives_the_hub_code_when_a_hub_checkpoint_holds_the_base():
    from types import SimpleNamespace

    from app.ml.hf_clip import hf_base_model_name
    from app.ml.lora import LoRAConfig
    from app.services.export import peft_readme
    from app.services.generator import AdapterFile

    store = SimpleNamespace(base_model={"name": "ViT-B-16", "pretrained": "openai"}, lora_config=LoRAConfig())
    readme = peft_readme(AdapterFile("a" * 64, b"", {"description": "a photo of a cat"}), store,
                         hf_base_model_name("ViT-B-16", "openai"))
    assert 'base = CLIPModel.from_pretrained("openai/clip-vit-base-patch16")' in readme
    assert 'load_backbone("ViT-B-16", "openai", device="cpu")' in readme  # and the converted route, always
    assert readme.count('PeftModel.from_pretrained(base, "<this folder>")') == 2
