"""One byte string per safetensors content: files whose hash is compared or used as an id go through here."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save as save_safetensors


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors.torch.save, with the JSON header re-written with sorted keys: safetensors writes its
    metadata map in hash order, which differs between processes (and between calls in one process), so the same
    tensors and metadata would otherwise give different bytes: a content-addressed adapter id, or an expert file
    compared across build engines, needs one byte string."""
    raw = save_safetensors(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # tensor data stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]
