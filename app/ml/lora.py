"""Rank-r LoRA on W_q, W_k, W_v of open_clip's attention blocks, and THE flat parameter layout.

open_clip keeps q|k|v fused in `attn.in_proj_weight` [3d, d]. The paper adapts each projection with its own
(A, B) pair, which PEFT's MultiheadAttention support cannot express, so `LoRAAttention` wraps the block's
`nn.MultiheadAttention` and adds ΔW_p = s·B_p A_p to rows [p·d, (p+1)·d) of the fused projection.

Three ways an adapter reaches the forward pass:
  trainable   the wrapper's own (A, B) parameters, the only tensors with requires_grad;
  merged      s·BA folded into in_proj_weight (an optimisation for a worker that owns its model copy);
              `unmerge_lora` restores the saved original weight bit for bit;
  per-sample  `with per_sample_lora(layout, bank, index):` gives sample n the adapter bank[index[n]].
              The adapters live in a context variable, never in module state, so concurrent requests
              sharing one model never see each other's weights.

Flat layout (DESIGN decision 2): towers (vision, then text) → block → q, k, v → lora_B [d, r] then
lora_A [r, d]. Every expert, CVAE sample and served file uses it; `LoRALayout` describes it and its hash
makes a mismatch fail loudly.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

TOWER_BLOCKS = {"vision": "visual.transformer.resblocks", "text": "transformer.resblocks"}
PROJECTIONS = ("q", "k", "v")


class LayoutMismatchError(ValueError):
    """A flat vector, manifest or state dict does not fit the model's LoRA layout."""


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 2
    alpha: float = 4.0
    towers: tuple[str, ...] = ("vision",)
    scaling: str = "standard"  # "standard": alpha/r (LoRA); "rslora": alpha/sqrt(r)
    init_seed: int = 0  # every expert starts from the same A, so averaging factors means something

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.towers or any(t not in TOWER_BLOCKS for t in self.towers):
            raise ValueError(f"towers must be a non-empty subset of {list(TOWER_BLOCKS)}, got {self.towers}")
        if self.scaling not in ("standard", "rslora"):
            raise ValueError(f"scaling must be 'standard' or 'rslora', got {self.scaling!r}")
        # Canonical tower order keeps the layout independent of how the user listed them.
        object.__setattr__(self, "towers", tuple(t for t in TOWER_BLOCKS if t in self.towers))

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank if self.scaling == "standard" else math.sqrt(self.rank))

    def to_dict(self) -> dict:
        return asdict(self) | {"towers": list(self.towers)}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        return cls(**(d | {"towers": tuple(d["towers"])}))


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class LayoutEntry:
    name: str  # PEFT-style key, e.g. "visual.transformer.resblocks.0.attn.q_proj.lora_A.weight"
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LoRALayout:
    model_name: str
    rank: int
    towers: tuple[str, ...]
    blocks: tuple[tuple[str, int], ...]  # (module path of the wrapped attention, width d), in layout order
    entries: tuple[LayoutEntry, ...] = field(repr=False)

    @property
    def D(self) -> int:
        last = self.entries[-1]
        return last.offset + last.numel

    @property
    def hash(self) -> str:
        spec = [self.model_name, self.rank, [(e.name, list(e.shape)) for e in self.entries]]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def segments(self) -> list[tuple[int, int]]:
        """(offset, numel) per named tensor: the unit of per-tensor normalisation."""
        return [(e.offset, e.numel) for e in self.entries]

    def to_manifest(self) -> dict:
        return {
            "model_name": self.model_name,
            "rank": self.rank,
            "towers": list(self.towers),
            "D": self.D,
            "hash": self.hash,
            "blocks": [list(b) for b in self.blocks],
            "entries": [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries],
        }

    @classmethod
    def from_manifest(cls, m: dict) -> LoRALayout:
        layout = cls(
            model_name=m["model_name"],
            rank=int(m["rank"]),
            towers=tuple(m["towers"]),
            blocks=tuple((p, int(d)) for p, d in m["blocks"]),
            entries=tuple(LayoutEntry(e["name"], tuple(e["shape"]), int(e["offset"])) for e in m["entries"]),
        )
        if layout.hash != m["hash"] or layout.D != m["D"]:
            raise LayoutMismatchError(
                f"layout manifest is inconsistent: stated hash {m['hash']} / D {m['D']}, "
                f"recomputed {layout.hash} / {layout.D}"
            )
        return layout


def _build_layout(model_name: str, rank: int, towers: tuple[str, ...], widths: dict[str, list[int]]) -> LoRALayout:
    blocks, entries, offset = [], [], 0
    for tower in towers:
        for i, d in enumerate(widths[tower]):
            path = f"{TOWER_BLOCKS[tower]}.{i}.attn"
            blocks.append((path, d))
            for p in PROJECTIONS:
                for factor, shape in (("lora_B", (d, rank)), ("lora_A", (rank, d))):
                    entries.append(LayoutEntry(f"{path}.{p}_proj.{factor}.weight", shape, offset))
                    offset += d * rank
    return LoRALayout(model_name, rank, towers, tuple(blocks), tuple(entries))


def layout_from_model_config(model_name: str, config: LoRAConfig) -> LoRALayout:
    """The layout from open_clip's model config alone: no weights are created or downloaded."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if isinstance(vision.get("layers"), (list, tuple)) or "timm_model_name" in vision or "hf_model_name" in text:
        raise ValueError(f"{model_name}: LoRA supports open_clip's own ViT towers only")
    widths = {
        "vision": [vision["width"]] * vision["layers"],
        "text": [text.get("width", 512)] * text.get("layers", 12),
    }
    return _build_layout(model_name, config.rank, config.towers, widths)


def check_layout(expected: LoRALayout, actual: LoRALayout) -> None:
    if expected.hash != actual.hash:
        raise LayoutMismatchError(
            f"LoRA layout mismatch: expected {expected.model_name} r={expected.rank} towers={list(expected.towers)} "
            f"D={expected.D} hash={expected.hash}; got {actual.model_name} r={actual.rank} "
            f"towers={list(actual.towers)} D={actual.D} hash={actual.hash}"
        )


# ------------------------------------------------------------------------------------- per-sample state

# None: each wrapper uses its own parameters. _NO_LORA: base model only. Otherwise a dict
# {block path: (A [N, 3, r, d], B [N, 3, d, r])} with one adapter per sample of the batch.
_NO_LORA = object()
_active_factors: contextvars.ContextVar[object] = contextvars.ContextVar("sglora_lora_factors", default=None)


def vectors_to_factors(layout: LoRALayout, vectors: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """[U, D] flat adapters -> {block: (A [U, 3, r, d], B [U, 3, d, r])} as views, no copies."""
    if vectors.ndim != 2 or vectors.shape[1] != layout.D:
        raise LayoutMismatchError(f"expected adapters of shape [U, {layout.D}], got {list(vectors.shape)}")
    factors, offset, r = {}, 0, layout.rank
    for path, d in layout.blocks:
        chunk = vectors[:, offset : offset + 3 * 2 * d * r].reshape(-1, 3, 2 * d * r)  # per proj: B then A
        factors[path] = (chunk[:, :, d * r :].reshape(-1, 3, r, d), chunk[:, :, : d * r].reshape(-1, 3, d, r))
        offset += 3 * 2 * d * r
    return factors


@contextlib.contextmanager
def per_sample_lora(layout: LoRALayout, bank: torch.Tensor, index: torch.Tensor) -> Iterator[None]:
    """Within this block, sample n of every forward pass uses adapter bank[index[n]].

    bank [U, D] holds the distinct adapters (a zero row means "no adapter"); index [N] long. Gathering per
    sample inside the layer lets one batch mix adapters without materialising N copies of the weights.
    """
    with per_sample_factors(vectors_to_factors(layout, bank), index):
        yield


@contextlib.contextmanager
def per_sample_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor) -> Iterator[None]:
    """`per_sample_lora` with factors given per block, {path: (A [U, 3, R, d], B [U, 3, d, R])}, of any rank R.

    A weighted sum of adapters, Σ_k w_k·s·B_k A_k, is their factors side by side ([w_k B_k] and [A_k], rank K·r):
    few-shot refinement (app/ml/fewshot.py) differentiates through that without merging or truncating."""
    gathered = {p: (A[index.to(A.device)], B[index.to(B.device)]) for p, (A, B) in factors.items()}
    token = _active_factors.set(gathered)
    try:
        yield
    finally:
        _active_factors.reset(token)


@contextlib.contextmanager
def no_lora() -> Iterator[None]:
    """The frozen base model, whatever adapters are attached (e.g. to route with base text embeddings)."""
    token = _active_factors.set(_NO_LORA)
    try:
        yield
    finally:
        _active_factors.reset(token)


# ------------------------------------------------------------------------------------------- the layer


class LoRAAttention(nn.Module):
    """nn.MultiheadAttention (self-attention, batch_first) with rank-r LoRA on W_q, W_k, W_v."""

    def __init__(self, base: nn.MultiheadAttention, path: str, rank: int, scale: float):
        super().__init__()
        if not base.batch_first or not base._qkv_same_embed_dim:
            raise ValueError(f"{path}: only batch_first self-attention with a fused in_proj is supported")
        self.base, self.path, self.rank, self.scale = base, path, rank, scale
        d = base.embed_dim
        self.lora_A = nn.Parameter(torch.zeros(3, rank, d, device=base.in_proj_weight.device))  # q, k, v
        self.lora_B = nn.Parameter(torch.zeros(3, d, rank, device=base.in_proj_weight.device))
        self.merged = False
        self._original_weight: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        """s·B_p A_p stacked over q, k, v: [3d, d], rows aligned with in_proj_weight."""
        return (self.scale * torch.einsum("pdr,pre->pde", self.lora_B, self.lora_A)).reshape(-1, self.base.embed_dim)

    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base.in_proj_weight
        self._original_weight = weight.detach().clone()
        with torch.no_grad():
            weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        # Restore the saved copy rather than subtract: subtraction leaves rounding error in the base weights.
        if not self.merged:
            return
        with torch.no_grad():
            self.base.in_proj_weight.copy_(self._original_weight)
        self._original_weight, self.merged = None, False

    def _qkv_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [N, L, d] -> LoRA contribution to the fused projection [N, L, 3d], or None."""
        active = _active_factors.get()
        if active is _NO_LORA:
            return None
        if active is not None:
            if self.merged:
                raise RuntimeError(f"{self.path}: per-sample adapters on a merged model would apply two adapters")
            A, B = active[self.path]  # [N, 3, r, d], [N, 3, d, r]
            if A.shape[0] != x.shape[0]:
                raise LayoutMismatchError(f"{self.path}: {A.shape[0]} adapters for a batch of {x.shape[0]}")
            xa = torch.einsum("nld,nprd->nlpr", x, A.to(x.dtype))  # [N, L, 3, r]
            delta = torch.einsum("nlpr,npdr->nlpd", xa, B.to(x.dtype))  # [N, L, 3, d]
        elif self.merged:
            return None
        else:
            xa = torch.einsum("nld,prd->nlpr", x, self.lora_A.to(x.dtype))
            delta = torch.einsum("nlpr,pdr->nlpd", xa, self.lora_B.to(x.dtype))
        return self.scale * delta.flatten(2)

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None):
        if not (query is key is value) or key_padding_mask is not None:
            raise NotImplementedError(f"{self.path}: LoRAAttention supports plain self-attention only")
        base = self.base
        n, length, d = query.shape
        h = base.num_heads
        qkv = F.linear(query, base.in_proj_weight, base.in_proj_bias)  # [N, L, 3d]
        delta = self._qkv_delta(query)
        if delta is not None:
            qkv = qkv + delta
        q, k, v = (t.reshape(n, length, h, d // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        dropout = base.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = base.out_proj(out.transpose(1, 2).reshape(n, length, d))
        return out, None


# ------------------------------------------------------------------------------------ model-level API


def inject_lora(model: nn.Module, config: LoRAConfig) -> LoRALayout:
    """Wrap q/k/v of every attention block of the configured towers; freeze everything else.

    The model's weights are untouched; the factors start at the shared init (A from config.init_seed, B = 0),
    so the adapted model computes exactly what the base model does until B moves.
    """
    layout = layout_from_model(model, config)
    model.requires_grad_(False)
    for path, _ in layout.blocks:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        if isinstance(base, LoRAAttention):
            raise ValueError(f"{path} already carries LoRA")
        setattr(parent, child, LoRAAttention(base, path, config.rank, config.scale))
    model.sglora_layout = layout
    reset_lora(model, config)
    return layout


def layout_from_model(model: nn.Module, config: LoRAConfig) -> LoRALayout:
    """The layout read off the model's modules; the name comes from `load_backbone` (open_clip's name)."""
    widths: dict[str, list[int]] = {}
    for tower in config.towers:
        blocks = model.get_submodule(TOWER_BLOCKS[tower])
        widths[tower] = [_attention_of(b).embed_dim for b in blocks]
    name = getattr(model, "sglora_model_name", None) or type(model).__name__
    return _build_layout(name, config.rank, config.towers, widths)


def _attention_of(block: nn.Module) -> nn.Module:
    attn = block.attn
    return attn.base if isinstance(attn, LoRAAttention) else attn


def lora_modules(model: nn.Module) -> list[LoRAAttention]:
    return [m for m in model.modules() if isinstance(m, LoRAAttention)]  # module order == layout order


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def shared_init(layout: LoRALayout, config: LoRAConfig) -> torch.Tensor:
    """The common starting point of every expert as a flat [D] vector: A ~ U(±1/√d) from a fixed seed, B = 0."""
    generator = torch.Generator().manual_seed(config.init_seed)
    vector = torch.zeros(layout.D)
    for e in layout.entries:
        if ".lora_A." in e.name:
            bound = 1.0 / math.sqrt(e.shape[1])
            vector[e.offset : e.offset + e.numel] = (torch.rand(e.numel, generator=generator) * 2 - 1) * bound
    return vector


def reset_lora(model: nn.Module, config: LoRAConfig) -> None:
    vector_to_lora(model, shared_init(model_layout(model), config))


def lora_to_vector(model: nn.Module) -> torch.Tensor:
    """The model's adapter as a flat float32 [D] vector in layout order."""
    parts = []
    for m in lora_modules(model):
        for p in range(3):
            parts += [m.lora_B[p].reshape(-1), m.lora_A[p].reshape(-1)]
    return torch.cat(parts).detach().float().cpu()


def model_layout(model: nn.Module) -> LoRALayout:
    layout = getattr(model, "sglora_layout", None)
    if layout is None:
        raise ValueError("model carries no LoRA: call inject_lora first")
    return layout


def vector_to_lora(model: nn.Module, vector: torch.Tensor, layout: LoRALayout | None = None) -> None:
    """Load a flat [D] vector into the model's LoRA factors. `layout`, when given (e.g. from a stored
    manifest), must be the model's own."""
    own = model_layout(model)
    if layout is not None:
        check_layout(layout, own)
    if vector.ndim != 1 or vector.numel() != own.D:
        raise LayoutMismatchError(f"expected a flat LoRA vector of length D={own.D}, got shape {list(vector.shape)}")
    for m, (A, B) in zip(lora_modules(model), vectors_to_factors(own, vector[None]).values(), strict=True):
        with torch.no_grad():
            m.lora_A.copy_(A[0])
            m.lora_B.copy_(B[0])


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.unmerge()


def vector_to_state_dict(layout: LoRALayout, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat [D] -> {PEFT-style name: tensor}, the form served to users as safetensors."""
    if vector.ndim != 1 or vector.numel() != layout.D:
        raise LayoutMismatchError(f"expected a flat LoRA vector of length D={layout.D}, got shape {list(vector.shape)}")
    return {e.name: vector[e.offset : e.offset + e.numel].reshape(e.shape).contiguous() for e in layout.entries}


def state_dict_to_vector(layout: LoRALayout, state: dict[str, torch.Tensor]) -> torch.Tensor:
    missing = [e.name for e in layout.entries if e.name not in state]
    extra = sorted(set(state) - {e.name for e in layout.entries})
    if missing or extra:
        raise LayoutMismatchError(f"adapter keys do not fit the layout: missing {missing[:3]}, unexpected {extra[:3]}")
    for e in layout.entries:
        if tuple(state[e.name].shape) != e.shape:
            raise LayoutMismatchError(f"{e.name}: expected shape {list(e.shape)}, got {list(state[e.name].shape)}")
    return torch.cat([state[e.name].reshape(-1).float() for e in layout.entries])


def merged_state_dict(model: nn.Module, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain open_clip state dict (no LoRA wrappers, open_clip's own key names) with the flat [D] adapter
    merged: in_proj_weight += s·B·A per block. The shared model is not modified (new tensors for merged blocks).
    `open_clip.create_model(name, pretrained=<this saved as .safetensors>)` loads it as a single-file model."""
    layout = model_layout(model)
    if any(m.merged for m in lora_modules(model)):
        raise RuntimeError("the model already has an adapter merged; unmerge_lora first")
    factors = vectors_to_factors(layout, vector.detach().float().reshape(1, -1).to("cpu"))
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        state[key.replace(".attn.base.", ".attn.")] = value.detach().cpu()
    for m in lora_modules(model):
        A, B = factors[m.path]  # [1, 3, r, d], [1, 3, d, r]
        delta = (m.scale * torch.einsum("pdr,pre->pde", B[0], A[0])).reshape(-1, m.base.embed_dim)
        key = f"{m.path}.in_proj_weight"
        state[key] = (state[key].float() + delta).to(state[key].dtype)
    return state
