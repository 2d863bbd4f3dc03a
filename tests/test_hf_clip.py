"""app.ml.hf_clip: the name/scale mapping round-trips, the open_clip -> Hugging Face CLIPModel converter, and a
PEFT folder exported for the converted model loaded by PEFT itself (equal to sglora's own injection)."""

from __future__ import annotations

import math
import warnings

import open_clip
import pytest
import torch

from app.ml.hf_clip import (
    from_hf_module,
    hf_base_model_name,
    hf_clip_config,
    open_clip_to_hf_state_dict,
    peft_adapter_files,
    peft_scale,
    peft_to_vector,
    to_hf_module,
    vector_to_peft_state_dict,
)
from app.ml.lora import LayoutMismatchError, LoRAConfig, inject_lora, layout_from_model_config, vector_to_lora
from tests.conftest import TINY

BOTH = LoRAConfig(rank=2, alpha=4.0, towers=("vision", "text"))


def random_vector(layout, seed=0, scale=0.05) -> torch.Tensor:
    return torch.randn(layout.D, generator=torch.Generator().manual_seed(seed)) * scale


def delta_weights(layout, config, vector) -> dict[str, torch.Tensor]:
    """{module: s·B·A} — what an adapter does to the model, whatever its rank or scale bookkeeping."""
    out = {}
    for e in layout.entries:
        if ".lora_B." in e.name:
            module = e.name.removesuffix(".lora_B.weight")
            b = vector[e.offset : e.offset + e.numel].reshape(e.shape)
            a_entry = next(x for x in layout.entries if x.name == module + ".lora_A.weight")
            a = vector[a_entry.offset : a_entry.offset + a_entry.numel].reshape(a_entry.shape)
            out[module] = config.scale * b @ a
    return out


# ------------------------------------------------------------------------------------------- pure mapping


def test_module_names_map_both_ways():
    ours = "visual.transformer.resblocks.11.attn.k_proj.lora_A.weight"
    assert to_hf_module(ours) == "vision_model.encoder.layers.11.self_attn.k_proj.lora_A.weight"
    assert to_hf_module("transformer.resblocks.0.attn.v_proj") == "text_model.encoder.layers.0.self_attn.v_proj"
    assert from_hf_module("base_model.model." + to_hf_module(ours)) == ours
    with pytest.raises(LayoutMismatchError, match="out_proj"):
        to_hf_module("visual.transformer.resblocks.0.attn.out_proj")
    assert hf_base_model_name("ViT-B-16", "openai") == "openai/clip-vit-base-patch16"
    assert hf_base_model_name(TINY, "/x/base_weights.safetensors") is None


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_peft_state_dict_round_trips_exactly(scaling):
    config = LoRAConfig(rank=2, alpha=4.0, towers=("vision", "text"), scaling=scaling)
    layout = layout_from_model_config(TINY, config)
    vector = random_vector(layout)
    files = peft_adapter_files(layout, config, vector, None)
    meta = {f"key{i}": str(i) for i in range(8)}  # several metadata keys: hash order must not leak into the bytes
    assert len({peft_adapter_files(layout, config, vector, None, meta)["adapter_model.safetensors"]
                for _ in range(5)}) == 1
    import json

    from safetensors.torch import load as load_bytes

    peft_config = json.loads(files["adapter_config.json"])
    assert peft_config["r"] == 2 and peft_config["lora_alpha"] == 4.0
    assert peft_config["use_rslora"] == (scaling == "rslora")
    assert math.isclose(peft_scale(peft_config), config.scale)
    state = load_bytes(files["adapter_model.safetensors"])
    assert all(k.startswith("base_model.model.") for k in state)
    assert len(peft_config["target_modules"]) == 3 * len(layout.blocks)
    assert torch.equal(peft_to_vector(state, peft_config, layout, config), vector)


def test_import_rescales_and_pads_to_the_store_layout():
    """A PEFT adapter with r=1, another alpha and rsLoRA imports with the same ΔW into an r=2 standard store."""
    store_cfg = BOTH
    layout = layout_from_model_config(TINY, store_cfg)
    peft_cfg = LoRAConfig(rank=1, alpha=3.0, towers=("vision", "text"), scaling="rslora")
    peft_layout = layout_from_model_config(TINY, peft_cfg)
    peft_vector = random_vector(peft_layout, seed=1)
    state = vector_to_peft_state_dict(peft_layout, peft_vector)
    # A raw model.state_dict() keeps the adapter name: accepted too.
    state = {k.replace(".lora_A.weight", ".lora_A.default.weight"): v for k, v in state.items()}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 3.0, "use_rslora": True}
    vector = peft_to_vector(state, config, layout, store_cfg)
    want, got = delta_weights(peft_layout, peft_cfg, peft_vector), delta_weights(layout, store_cfg, vector)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=1e-5)


def test_import_names_what_does_not_fit():
    layout = layout_from_model_config(TINY, LoRAConfig(rank=2, towers=("vision",)))
    both = layout_from_model_config(TINY, BOTH)
    state = vector_to_peft_state_dict(both, random_vector(both))
    cfg = {"r": 2, "lora_alpha": 4.0}
    with pytest.raises(LayoutMismatchError, match="text_model.encoder.layers"):  # a tower the store lacks
        peft_to_vector(state, cfg, layout, LoRAConfig(rank=2))
    vision_only = {k: v for k, v in state.items() if "vision_model" in k and "q_proj" not in k}
    with pytest.raises(LayoutMismatchError, match="lacks"):
        peft_to_vector(vision_only, cfg, layout, LoRAConfig(rank=2))
    partial = peft_to_vector(vision_only, cfg, layout, LoRAConfig(rank=2), strict=False)
    assert partial.abs().sum() > 0 and partial[:64 * 2 * 2].abs().sum() == 0  # q_proj of block 0 left at zero
    with pytest.raises(LayoutMismatchError, match="rank r=4"):
        peft_to_vector({}, {"r": 4}, layout, LoRAConfig(rank=2), strict=False)
    with pytest.raises(ValueError, match="use_dora"):
        peft_to_vector(state, cfg | {"use_dora": True}, layout, LoRAConfig(rank=2))


# --------------------------------------------------------------------------------- converter and PEFT (real)


@pytest.fixture
def tiny_pair():
    pytest.importorskip("transformers")
    from app.ml.backbone import load_backbone
    from app.ml.hf_clip import to_hf_clip_model

    torch.manual_seed(0)
    backbone = load_backbone(TINY, pretrained=None, device="cpu")
    hf = to_hf_clip_model(backbone.model, open_clip.get_model_config(TINY))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    tokens = backbone.tokenize(["a photo of a red circle", "a blue square", "a large green star at the top left"])
    return backbone, hf, pixels, tokens


def hf_features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected feature; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_converted_clip_model_computes_open_clips_embeddings(tiny_pair):
    backbone, hf, pixels, tokens = tiny_pair
    with torch.no_grad():
        torch.testing.assert_close(hf_features(hf.get_image_features(pixel_values=pixels)),
                                   backbone.model.encode_image(pixels), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hf_features(hf.get_text_features(input_ids=tokens)),
                                   backbone.model.encode_text(tokens), atol=1e-5, rtol=1e-4)
    assert hf.config.vision_config.hidden_act == "gelu"  # the tiny config has no QuickGELU


def test_converter_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="lora_A"):
        open_clip_to_hf_state_dict({"visual.transformer.resblocks.0.attn.lora_A": torch.zeros(1)})
    cfg = open_clip.get_model_config(TINY)
    with pytest.raises(ValueError, match="text_cfg.hf_model_name"):
        hf_clip_config(cfg | {"text_cfg": cfg["text_cfg"] | {"hf_model_name": "bert"}})


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_peft_loads_the_export_and_matches_sglora_injection(tiny_pair, tmp_path, scaling):
    """Must show: PeftModel.from_pretrained on the converted CLIPModel == sglora's injection (both towers), with
    either scaling rule (PEFT's use_rslora must reproduce alpha/sqrt(r))."""
    peft = pytest.importorskip("peft")
    backbone, hf, pixels, tokens = tiny_pair
    config = LoRAConfig(rank=2, alpha=4.0, towers=("vision", "text"), scaling=scaling)
    layout = inject_lora(backbone.model, config)
    vector = random_vector(layout, seed=2, scale=0.3)
    vector_to_lora(backbone.model, vector)
    for name, data in peft_adapter_files(layout, config, vector, None).items():
        (tmp_path / name).write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf, str(tmp_path))
    assert not [w for w in caught if "adapter keys" in str(w.message)]  # PEFT's warning for missing keys
    model.eval()
    check = model.load_adapter(str(tmp_path), adapter_name="check")
    assert list(check.missing_keys) == [] and list(check.unexpected_keys) == []
    model.set_adapter("default")
    with torch.no_grad():
        ours_img, ours_txt = backbone.model.encode_image(pixels), backbone.model.encode_text(tokens)
        base = model.get_base_model()
        peft_img = hf_features(base.get_image_features(pixel_values=pixels))
        peft_txt = hf_features(base.get_text_features(input_ids=tokens))
        with model.disable_adapter():
            plain_img = hf_features(base.get_image_features(pixel_values=pixels))
            plain_txt = hf_features(base.get_text_features(input_ids=tokens))
    assert (ours_img - plain_img).abs().max() > 1e-2 and (ours_txt - plain_txt).abs().max() > 1e-2  # not vacuous
    print("peft-vs-sglora max abs diff: image", float((peft_img - ours_img).abs().max()), "text",
          float((peft_txt - ours_txt).abs().max()), "adapter effect", float((ours_img - plain_img).abs().max()))
    assert (peft_img - ours_img).abs().max() < 1e-4
    assert (peft_txt - ours_txt).abs().max() < 1e-4


def test_vit_b16_converts_to_the_shapes_of_openai_clip_vit_base_patch16():
    """The production base: every converted key and shape is what CLIPModel(config) holds, and the config is that of
    openai/clip-vit-base-patch16 (values from its published config.json). On the meta device: no weights."""
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel

    from app.ml.hf_clip import uses_quick_gelu

    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", quick_gelu=True, device="meta")  # as pretrained="openai" does
        config = CLIPConfig(**hf_clip_config(open_clip.get_model_config("ViT-B-16"), uses_quick_gelu(model)))
        hf = CLIPModel(config)
    ours = {k: tuple(v.shape) for k, v in open_clip_to_hf_state_dict(model.state_dict()).items()}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size,
            v.image_size, v.hidden_act) == (768, 3072, 12, 12, 16, 224, "quick_gelu")
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.max_position_embeddings, t.hidden_act, config.projection_dim) == (512, 2048, 12, 8, 77, "quick_gelu", 512)
