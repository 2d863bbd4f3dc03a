"""The frozen open_clip model: loading (pretrained tag or local weights file), tokenizer, preprocess, encoders.

Nothing here knows about LoRA; `lora.py` wraps the attention blocks of the model this returns.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

# Model configs shipped with the package (the tiny test/demo model) join open_clip's registry, so they are
# created exactly like production models: by name.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when present; anything else is passed to torch (and fails loudly if absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_id(pretrained: str | None) -> str:
    """A stable name for the base weights, recorded in every artifact so stores and models can't be mixed.

    A local file is identified by content (sha256), a tag by its name, random init by "random-init".
    """
    if pretrained is None:
        return "random-init"
    if os.path.isfile(pretrained):
        return "sha256:" + file_sha256(pretrained)
    return "tag:" + pretrained


@dataclass
class Backbone:
    model: open_clip.CLIP
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    preprocess: object  # torchvision transform: PIL image -> [3, H, W] tensor
    device: torch.device
    model_name: str
    weights_id: str

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, tuple) else int(size)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)  # [N, context_length]

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device)

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """[N] strings (or [N, ctx] tokens) -> [N, embed_dim] float32, L2-normalised."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """[N] PIL images (or [N, 3, H, W] preprocessed) -> [N, embed_dim] float32, L2-normalised."""
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess_images(images)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)


def load_backbone(model_name: str, pretrained: str | None = None, device: str = "auto") -> Backbone:
    """Create a frozen open_clip model by name.

    `pretrained` is an open_clip tag ("openai", may download), a local weights file (.safetensors or
    .pt/.bin, read with weights_only=True by open_clip), or None for random init (tests).
    """
    if pretrained is not None and os.path.sep in pretrained and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"weights file not found: {pretrained}")
    torch_device = resolve_device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=torch_device
    )
    model.eval().requires_grad_(False)
    model.sglora_model_name = model_name  # LoRA layouts carry the model's name, so stores can't be mixed
    return Backbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        preprocess=preprocess,
        device=torch_device,
        model_name=model_name,
        weights_id=weights_id(pretrained),
    )
