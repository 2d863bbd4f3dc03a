"""THE mapping between this project's open_clip names / flat LoRA layout and Hugging Face `CLIPModel` + PEFT.

One owner: the PEFT export (GET /adapters/{id}?format=peft) and the PEFT import of adapters into the library use
these functions and nothing else. Pure functions on dicts and tensors; `transformers` is imported only by
`to_hf_clip_model` (the export of a PEFT folder needs safetensors + json only).

Names
-----
open_clip (the store's layout, `app.ml.lora`)             Hugging Face CLIPModel (PEFT module names)
  visual.transformer.resblocks.{i}.attn.{q,k,v}_proj  <->   vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj
  transformer.resblocks.{i}.attn.{q,k,v}_proj         <->   text_model.encoder.layers.{i}.self_attn.{q,k,v}_proj
A PEFT file prefixes each module with ``base_model.model.`` and ends in ``.lora_A.weight`` [r, d_in] /
``.lora_B.weight`` [d_out, r]: exactly our factors (open_clip's fused ``in_proj_weight`` rows p·d..(p+1)·d are
HF's ``{q,k,v}_proj.weight``; both store weights as [out, in]), so tensors are copied, never transposed.

Scaling
-------
PEFT: ΔW = s·B·A with s = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``. The store: s = alpha / r
("standard") or alpha / sqrt(r) ("rslora") — the same two rules, so the export writes r = rank,
lora_alpha = alpha, use_rslora = (scaling == "rslora") and copies the factors unchanged. An imported adapter with
another scale s_p is rescaled into the store's s_s by B ← B · s_p / s_s (A unchanged), which keeps ΔW exact; a
smaller rank is zero-padded (exact), a larger one cannot be represented and is refused.

Usage
-----
Export (the service)::

    folder = peft_adapter_files(layout, lora_config, vector, base_model_name_or_path=hf_base_model_name(...))
    # {"adapter_config.json": bytes, "adapter_model.safetensors": bytes}

Import (a PEFT folder saved for Hugging Face CLIP)::

    config = json.load(open("adapter_config.json"))
    state = safetensors.torch.load_file("adapter_model.safetensors")
    vector = peft_to_vector(state, config, layout, lora_config)   # [D] in the store's layout; LayoutMismatchError
                                                                   # / ValueError name what does not fit

Base weights (tests, or a user without a Hugging Face checkpoint)::

    model = to_hf_clip_model(backbone.model, open_clip.get_model_config(name))   # transformers.CLIPModel
    # or the pure halves: open_clip_to_hf_state_dict(state), hf_clip_config(cfg, quick_gelu=...)
"""

from __future__ import annotations

import json
import math
import re

import torch

from app.ml.canonical import canonical_safetensors
from app.ml.lora import PROJECTIONS, TOWER_BLOCKS, LayoutMismatchError, LoRAConfig, LoRALayout

HF_BLOCKS = {"vision": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
PEFT_PREFIX = "base_model.model."

# Hugging Face checkpoints that hold the same weights as an open_clip (model, pretrained tag) pair.
HF_BASE_MODELS = {
    ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
    ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
    ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14",
    ("ViT-L-14-336", "openai"): "openai/clip-vit-large-patch14-336",
}

_OUR_MODULE = re.compile(r"(?P<tower>visual\.transformer\.resblocks|transformer\.resblocks)\.(?P<i>\d+)"
                         r"\.attn\.(?P<p>[qkv])_proj")
_HF_MODULE = re.compile(r"(?P<tower>vision_model\.encoder\.layers|text_model\.encoder\.layers)\.(?P<i>\d+)"
                        r"\.self_attn\.(?P<p>[qkv])_proj")
_TOWER_OF_OURS = {v: k for k, v in TOWER_BLOCKS.items()}
_TOWER_OF_HF = {v: k for k, v in HF_BLOCKS.items()}


def hf_base_model_name(model_name: str, pretrained: str | None) -> str | None:
    """The Hugging Face name of the store's base model, or None when there is none (local/tiny weights)."""
    return HF_BASE_MODELS.get((model_name.removesuffix("-quickgelu"), pretrained or ""))


# ------------------------------------------------------------------------------------------- LoRA names


def to_hf_module(name: str) -> str:
    """'visual.transformer.resblocks.3.attn.q_proj' -> 'vision_model.encoder.layers.3.self_attn.q_proj'.
    Anything after the module (".lora_A.weight") is kept."""
    m = _OUR_MODULE.match(name)
    if m is None:
        raise LayoutMismatchError(f"{name!r} is not a q/k/v projection of an open_clip attention block")
    tower = _TOWER_OF_OURS[m["tower"]]
    return f"{HF_BLOCKS[tower]}.{m['i']}.self_attn.{m['p']}_proj" + name[m.end():]


def from_hf_module(name: str) -> str:
    """The inverse of `to_hf_module`; a leading 'base_model.model.' is dropped."""
    name = name.removeprefix(PEFT_PREFIX)
    m = _HF_MODULE.match(name)
    if m is None:
        raise LayoutMismatchError(f"{name!r} is not a q/k/v projection of a Hugging Face CLIP attention layer")
    tower = _TOWER_OF_HF[m["tower"]]
    return f"{TOWER_BLOCKS[tower]}.{m['i']}.attn.{m['p']}_proj" + name[m.end():]


def peft_target_modules(layout: LoRALayout) -> list[str]:
    """Every HF module the layout adapts, by full name (PEFT matches a full name exactly), in layout order."""
    return [to_hf_module(f"{path}.{p}_proj") for path, _ in layout.blocks for p in PROJECTIONS]


# ---------------------------------------------------------------------------------------------- scaling


def peft_scale(peft_config: dict, rank: int | None = None) -> float:
    """PEFT's s = lora_alpha / r (or / sqrt(r) with use_rslora) for an adapter_config.json dict."""
    r = int(rank if rank is not None else peft_config["r"])
    alpha = float(peft_config.get("lora_alpha", 8))  # PEFT's default lora_alpha
    return alpha / (math.sqrt(r) if peft_config.get("use_rslora") else r)


def peft_adapter_config(layout: LoRALayout, config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for `layout`: PEFT's LoraConfig fields, with the store's rank/alpha/scaling rule."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": layout.rank,
        "lora_alpha": config.alpha,
        "use_rslora": config.scaling == "rslora",
        "target_modules": peft_target_modules(layout),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


# ------------------------------------------------------------------------------------- state dicts <-> PEFT


def vector_to_peft_state_dict(layout: LoRALayout, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat [D] -> {'base_model.model.<hf module>.lora_{A,B}.weight': tensor}, the adapter_model.safetensors."""
    if vector.ndim != 1 or vector.numel() != layout.D:
        raise LayoutMismatchError(f"expected a flat LoRA vector of length D={layout.D}, got shape {list(vector.shape)}")
    return {PEFT_PREFIX + to_hf_module(e.name): vector[e.offset : e.offset + e.numel].reshape(e.shape).contiguous()
            for e in layout.entries}


def peft_adapter_files(layout: LoRALayout, config: LoRAConfig, vector: torch.Tensor,
                       base_model_name_or_path: str | None, metadata: dict[str, str] | None = None) -> dict[str, bytes]:
    """The PEFT adapter folder as {file name: bytes}: what `PeftModel.from_pretrained(clip_model, folder)` reads."""
    adapter_config = peft_adapter_config(layout, config, base_model_name_or_path)
    tensors = vector_to_peft_state_dict(layout, vector.detach().float().cpu())
    return {
        "adapter_config.json": (json.dumps(adapter_config, indent=2) + "\n").encode(),
        # canonical: one adapter, one byte string (safetensors writes its metadata in hash order)
        "adapter_model.safetensors": canonical_safetensors(tensors, metadata=(metadata or {}) | {"format": "pt"}),
    }


def _normalise_peft_key(key: str) -> str:
    # PEFT's saved files drop the adapter name; a raw model.state_dict() has ".lora_A.<adapter>.weight".
    key = key.removeprefix(PEFT_PREFIX)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _check_importable(peft_config: dict) -> None:
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type {peft_config.get('peft_type')!r}: only LORA adapters can be imported")
    for field, reason in (("use_dora", "DoRA adds a magnitude vector"), ("fan_in_fan_out", "weights are transposed"),
                          ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
        if peft_config.get(field):
            raise ValueError(f"adapter_config {field} is set ({reason}); the store's layout has one rank and scale")
    if peft_config.get("bias", "none") != "none":
        raise ValueError(f"adapter_config bias={peft_config['bias']!r}: trained biases do not fit a LoRA layout")


def peft_to_vector(peft_state: dict[str, torch.Tensor], peft_config: dict, layout: LoRALayout, config: LoRAConfig,
                   strict: bool = True) -> torch.Tensor:
    """A PEFT LoRA for Hugging Face CLIP -> flat float32 [D] in `layout`, rescaled to the store's scale.

    Unexpected tensors (another tower, out_proj, mlp, biases) always raise LayoutMismatchError naming them.
    With strict=False, projections the adapter does not touch are zero (no update), otherwise they raise too.
    """
    _check_importable(peft_config)
    state = {_normalise_peft_key(k): v for k, v in peft_state.items()}
    wanted = {e.name: e for e in layout.entries}
    ours: dict[str, torch.Tensor] = {}
    unexpected = []  # reported under the adapter's own (Hugging Face) names
    for key, tensor in state.items():
        try:
            name = from_hf_module(key)
        except LayoutMismatchError:
            name = None
        if name in wanted:
            ours[name] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise LayoutMismatchError(f"adapter tensors outside the store's layout (towers {list(layout.towers)}, "
                                  f"q/k/v LoRA only): {sorted(unexpected)[:5]}")
    missing = [n for n in wanted if n not in ours]
    if missing and strict:
        raise LayoutMismatchError(f"adapter lacks {len(missing)} of the layout's tensors, e.g. {missing[:3]}")

    r_peft = int(peft_config["r"])
    if r_peft > layout.rank:
        raise LayoutMismatchError(f"adapter rank r={r_peft} exceeds the store's rank {layout.rank}")
    ratio = peft_scale(peft_config) / config.scale  # B <- B · s_peft / s_store keeps ΔW = s·B·A exact
    vector = torch.zeros(layout.D)
    for name, e in wanted.items():
        if name not in ours:
            continue
        t = ours[name].detach().float().cpu()
        is_a = ".lora_A." in name
        expected = (r_peft, e.shape[1]) if is_a else (e.shape[0], r_peft)
        if tuple(t.shape) != expected:
            raise LayoutMismatchError(f"{name}: expected shape {list(expected)}, got {list(t.shape)}")
        padded = torch.zeros(e.shape)  # rank r_peft <= r: the extra rows of A / columns of B stay zero
        if is_a:
            padded[:r_peft] = t
        else:
            padded[:, :r_peft] = t * ratio
        vector[e.offset : e.offset + e.numel] = padded.reshape(-1)
    if not torch.isfinite(vector).all():
        raise ValueError("adapter holds non-finite values")
    return vector


# ------------------------------------------------------------------------------ base weights -> CLIPModel

_LAYER_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_LEVEL = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_KEY = re.compile(r"(?P<tower>visual\.transformer\.resblocks|transformer\.resblocks)\.(?P<i>\d+)\.(?P<rest>.+)")


def open_clip_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain open_clip CLIP state dict (ViT towers, no LoRA wrappers) -> a Hugging Face CLIPModel state dict.

    Fused attention in_proj [3d, d] / [3d] splits into q/k/v_proj; projections [width, embed] become Linear
    weights [embed, width]. Any key this mapping does not know raises (e.g. a LoRA-injected model's state).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (m := _BLOCK_KEY.fullmatch(key)) is not None:
            prefix = f"{HF_BLOCKS[_TOWER_OF_OURS[m['tower']]]}.{m['i']}"
            part, _, kind = m["rest"].rpartition(".")
            if part == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
                suffix = "weight" if kind == "in_proj_weight" else "bias"
                for p, chunk in zip(PROJECTIONS, value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.self_attn.{p}_proj.{suffix}"] = chunk.contiguous()
            elif part in _LAYER_PARTS:
                out[f"{prefix}.{_LAYER_PARTS[part]}.{kind}"] = value
            else:
                raise ValueError(f"open_clip key {key!r} has no Hugging Face CLIP counterpart")
        else:
            raise ValueError(f"open_clip key {key!r} has no Hugging Face CLIP counterpart")
    return out


_UNSUPPORTED_VISION = ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool",
                       "output_tokens", "act_kwargs", "norm_kwargs", "pool_type")
_UNSUPPORTED_TEXT = ("hf_model_name", "ls_init_value", "embed_cls", "pool_type", "proj_bias", "no_causal_mask",
                     "act_kwargs", "norm_kwargs", "pad_id")


def hf_clip_config(open_clip_cfg: dict, quick_gelu: bool = False) -> dict:
    """open_clip's model config (open_clip.get_model_config(name)) -> CLIPConfig kwargs (plain dict).

    quick_gelu: whether the open_clip model was built with QuickGELU (OpenAI weights are). Only the plain
    OpenAI-style ViT/transformer towers convert; other options raise naming the option.
    """
    vision, text = open_clip_cfg["vision_cfg"], open_clip_cfg["text_cfg"]
    bad = [f"vision_cfg.{k}" for k in _UNSUPPORTED_VISION if vision.get(k)]
    bad += [f"text_cfg.{k}" for k in _UNSUPPORTED_TEXT if text.get(k)]
    if isinstance(vision.get("layers"), (list, tuple)):
        bad.append("vision_cfg.layers (ResNet)")
    if open_clip_cfg.get("quick_gelu"):
        quick_gelu = True
    if bad:
        raise ValueError(f"open_clip config options without a Hugging Face CLIP counterpart: {bad}")
    act = "quick_gelu" if quick_gelu else "gelu"
    embed_dim = int(open_clip_cfg["embed_dim"])
    v_width = int(vision["width"])
    t_width = int(text.get("width", 512))
    return {
        "projection_dim": embed_dim,
        "vision_config": {
            "hidden_size": v_width,
            "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": int(vision["layers"]),
            "num_attention_heads": v_width // int(vision.get("head_width", 64)),
            "image_size": int(vision["image_size"]),
            "patch_size": int(vision["patch_size"]),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
        },
        "text_config": {
            "vocab_size": int(text.get("vocab_size", 49408)),
            "hidden_size": t_width,
            "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": int(text.get("layers", 12)),
            "num_attention_heads": int(text.get("heads", 8)),
            "max_position_embeddings": int(text.get("context_length", 77)),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
            # open_clip pools the text at the argmax token id, i.e. the end-of-text token 49407.
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 0,
        },
    }


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def to_hf_clip_model(model: torch.nn.Module, open_clip_cfg: dict):
    """A plain (LoRA-free) open_clip CLIP -> transformers.CLIPModel with the same weights, eval mode.

    Raises when any weight is missing or left over on either side, so a silent partial conversion is impossible.
    """
    from transformers import CLIPConfig, CLIPModel  # optional: only the converter needs transformers

    config = CLIPConfig(**hf_clip_config(open_clip_cfg, quick_gelu=uses_quick_gelu(model)))
    hf = CLIPModel(config)
    state = open_clip_to_hf_state_dict(model.state_dict())
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]  # buffers HF rebuilds itself
    if missing or result.unexpected_keys:
        raise ValueError(f"conversion incomplete: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return hf.eval()
