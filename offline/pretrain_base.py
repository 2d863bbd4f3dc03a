"""Pretrain the tiny base model briefly on a task family, so the demo and the tests have a real starting point.

A random-init backbone retrieves at chance and its experts cannot learn the words (DESIGN, synthetic family).
A short full-model CLIP run makes an under-trained generalist, the role ViT-B/16's pretrained weights play
in production. 600 AdamW steps (≈50 s on 2 cores): at 150 the text tower had barely separated the descriptions
(cosines 0.97–1.0), so routing was half noise and zero-shot moved by ±8 R@1 points with the batch order.
The result is written as a local safetensors weights file and loaded like production weights.

Captions are worded many ways (offline/phrasing.py, build side only): each pair carries its canonical caption and
several rewordings, and every step draws one of them per pair. Pretrained on one caption grammar, the text tower
put every "a photo of a <colour> <shape>" on one dominant direction (cosines 0.89–0.97) and any other wording
elsewhere; a real CLIP has seen countless phrasings, and the stand-in must too before routing can be judged on
how users write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from app.ml.backbone import load_backbone
from offline.data import Pair
from offline.phrasing import caption_variants
from offline.train_experts import contrastive_loss


def pretrain_base(
    model_name: str,
    pairs: Sequence[Pair],
    out_path: Path,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    wordings: int = 6,
) -> Path:
    """Contrastive pretraining on `pairs`, each caption drawn from `wordings` build-side wordings per step."""
    torch.manual_seed(seed)
    backbone = load_backbone(model_name, pretrained=None, device="cpu")
    model = backbone.model.train().requires_grad_(True)
    pixels = backbone.preprocess_images([p.image for p in pairs])
    variants = [caption_variants(p.caption, wordings, seed) for p in pairs]
    tokens = backbone.tokenize([c for v in variants for c in v]).reshape(len(pairs), wordings, -1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="pretrain base", disable=not progress)
    for _ in bar:
        idx = torch.randperm(len(pairs), generator=generator)[:batch_size]
        wording = torch.randint(wordings, (len(idx),), generator=generator)
        loss = contrastive_loss(backbone.encode_images(pixels[idx]), backbone.encode_text(tokens[idx, wording]),
                                model.logit_scale.exp())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(out_path)
    return out_path
