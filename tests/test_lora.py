"""LoRA on open_clip attention: the three modes agree, unmerge is exact, the flat layout round-trips."""

from __future__ import annotations

import pytest
import torch

from app.ml.lora import (
    LayoutMismatchError,
    LoRAConfig,
    inject_lora,
    layout_from_model_config,
    lora_modules,
    lora_parameters,
    lora_to_vector,
    merge_lora,
    no_lora,
    per_sample_lora,
    state_dict_to_vector,
    unmerge_lora,
    vector_to_lora,
    vector_to_state_dict,
)

BOTH = LoRAConfig(rank=2, alpha=4.0, towers=("vision", "text"))


def _inputs(backbone, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = backbone.tokenize([f"a photo of a {w} shape" for w in ["red", "blue", "green", "pink"][:n]])
    return images, tokens


def _encode(backbone, images, tokens):
    return backbone.encode_images(images), backbone.encode_text(tokens)


def _random_vector(layout, seed, scale=0.2):
    return torch.randn(layout.D, generator=torch.Generator().manual_seed(seed)) * scale


def test_b_zero_is_the_untouched_model_both_towers(tiny_backbone):
    images, tokens = _inputs(tiny_backbone)
    img_ref, txt_ref = _encode(tiny_backbone, images, tokens)
    inject_lora(tiny_backbone.model, BOTH)  # shared init: A random, B = 0
    assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in lora_modules(tiny_backbone.model))
    img, txt = _encode(tiny_backbone, images, tokens)
    torch.testing.assert_close(img, img_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(txt, txt_ref, atol=1e-6, rtol=0)


def test_merged_trainable_and_per_sample_agree_and_unmerge_is_exact(tiny_backbone):
    model = tiny_backbone.model
    images, tokens = _inputs(tiny_backbone)
    base_img, base_txt = _encode(tiny_backbone, images, tokens)
    layout = inject_lora(model, BOTH)
    vector = _random_vector(layout, seed=1)
    vector_to_lora(model, vector, layout)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    trainable = _encode(tiny_backbone, images, tokens)
    with per_sample_lora(layout, vector[None], torch.zeros(len(images), dtype=torch.long)):
        per_sample = _encode(tiny_backbone, images, tokens)
    merge_lora(model)
    merged = _encode(tiny_backbone, images, tokens)
    unmerge_lora(model)

    assert (trainable[0] - base_img).abs().max() > 1e-3, "the adapter must change the image embedding"
    assert (trainable[1] - base_txt).abs().max() > 1e-3, "the adapter must change the text embedding"
    for a, b in [(trainable, merged), (trainable, per_sample)]:
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, original[n]), f"unmerge did not restore {n} exactly"


def test_merge_moves_the_weights_and_per_sample_never_does(tiny_backbone):
    model = tiny_backbone.model
    layout = inject_lora(model, BOTH)
    vector_to_lora(model, _random_vector(layout, 2), layout)
    weight = lora_modules(model)[0].base.in_proj_weight
    before = weight.detach().clone()
    images, tokens = _inputs(tiny_backbone)
    with per_sample_lora(layout, _random_vector(layout, 3)[None], torch.zeros(3, dtype=torch.long)):
        _encode(tiny_backbone, images, tokens)
    assert torch.equal(weight, before)
    merge_lora(model)
    assert not torch.equal(weight, before)
    with pytest.raises(RuntimeError, match="merged"):
        with per_sample_lora(layout, _random_vector(layout, 3)[None], torch.zeros(3, dtype=torch.long)):
            _encode(tiny_backbone, images, tokens)


def test_a_batch_of_two_adapters_equals_two_single_sample_runs(tiny_backbone):
    model = tiny_backbone.model
    layout = inject_lora(model, BOTH)
    images, tokens = _inputs(tiny_backbone, n=2)
    bank = torch.stack([_random_vector(layout, 4), _random_vector(layout, 5)])  # [2, D]
    with per_sample_lora(layout, bank, torch.tensor([0, 1])):
        img_batch, txt_batch = _encode(tiny_backbone, images, tokens)
    for i in range(2):
        with per_sample_lora(layout, bank[i : i + 1], torch.tensor([0])):
            img_one, txt_one = _encode(tiny_backbone, images[i : i + 1], tokens[i : i + 1])
        torch.testing.assert_close(img_batch[i : i + 1], img_one, atol=1e-5, rtol=0)
        torch.testing.assert_close(txt_batch[i : i + 1], txt_one, atol=1e-5, rtol=0)
    assert (img_batch[0] - img_batch[1]).abs().max() > 0


def test_no_lora_gives_the_base_model_while_an_adapter_is_attached(tiny_backbone):
    images, tokens = _inputs(tiny_backbone)
    base = _encode(tiny_backbone, images, tokens)
    layout = inject_lora(tiny_backbone.model, BOTH)
    vector_to_lora(tiny_backbone.model, _random_vector(layout, 6), layout)
    with no_lora():
        routed = _encode(tiny_backbone, images, tokens)
    torch.testing.assert_close(routed[1], base[1], atol=1e-6, rtol=0)


def test_flat_vector_round_trips_exactly(tiny_backbone):
    layout = inject_lora(tiny_backbone.model, BOTH)
    vector = _random_vector(layout, 7)
    vector_to_lora(tiny_backbone.model, vector, layout)
    assert torch.equal(lora_to_vector(tiny_backbone.model), vector)
    assert torch.equal(state_dict_to_vector(layout, vector_to_state_dict(layout, vector)), vector)


def test_wrong_length_and_foreign_manifest_fail_naming_both(tiny_backbone):
    layout = inject_lora(tiny_backbone.model, BOTH)
    with pytest.raises(LayoutMismatchError, match=rf"D={layout.D}.*\[{layout.D - 1}\]"):
        vector_to_lora(tiny_backbone.model, torch.zeros(layout.D - 1))
    foreign = layout_from_model_config("ViT-B-16", LoRAConfig())
    with pytest.raises(LayoutMismatchError, match=r"expected ViT-B-16.*got tiny_clip"):
        vector_to_lora(tiny_backbone.model, torch.zeros(layout.D), foreign)
    other_rank = layout_from_model_config("tiny_clip", LoRAConfig(rank=4, towers=("vision", "text")))
    with pytest.raises(LayoutMismatchError, match=r"r=4.*r=2"):
        vector_to_lora(tiny_backbone.model, torch.zeros(layout.D), other_rank)


def test_layout_from_config_matches_the_model_and_vit_b16_size(tiny_backbone):
    assert layout_from_model_config("ViT-B-16", LoRAConfig(rank=2, towers=("vision",))).D == 110_592
    assert layout_from_model_config("tiny_clip", BOTH).hash == inject_lora(tiny_backbone.model, BOTH).hash


def test_manifest_round_trip_and_tamper_detection(tiny_backbone):
    from app.ml.lora import LoRALayout

    layout = inject_lora(tiny_backbone.model, BOTH)
    manifest = layout.to_manifest()
    assert LoRALayout.from_manifest(manifest).hash == layout.hash
    manifest["entries"][0]["shape"] = [1, 1]
    with pytest.raises(LayoutMismatchError, match="inconsistent"):
        LoRALayout.from_manifest(manifest)


def test_trainable_mode_one_step_changes_lora_factors_only(tiny_backbone):
    model = tiny_backbone.model
    inject_lora(model, BOTH)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.SGD(lora_parameters(model), lr=0.5)
    images, tokens = _inputs(tiny_backbone)
    img, txt = _encode(tiny_backbone, images, tokens)
    loss = -(img @ txt.T).diag().sum()
    loss.backward()
    optimiser.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".lora_B" in n:
            assert changed, f"{n} should move after one step"
        elif ".lora_A" not in n:
            assert not changed, f"frozen {n} moved"


@pytest.mark.parametrize("scaling,expected", [("standard", 4.0 / 2), ("rslora", 4.0 / 2**0.5)])
def test_scaling(scaling, expected):
    assert LoRAConfig(rank=2, alpha=4.0, scaling=scaling).scale == pytest.approx(expected)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="towers"):
        LoRAConfig(towers=("audio",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
