"""Semantic-conditioned CVAE that generates a flat LoRA vector (SG-LoRA §3.3.2).

X ∈ R^D is one LoRA in the flat layout of ``app.ml.lora`` (D = 110,592 for the ViT-B/16 vision tower
at r=2). The condition c = {µ*, σ*²} (each ∈ R^D) comes from the sparse aggregator. Three networks:

* encoder  q(z | X, c)  – training only;
* prior    p(z | c)     – the semantic prior sampled from at inference (not N(0, I));
* decoder  p(X | z, c).

Loss (negative ELBO, the paper's): ``‖X − X̂‖² + λ · KL(q ‖ p)`` with λ = ``kl_weight`` (paper: 1).
The reconstruction term is the squared L2 norm over all D elements (not their mean) and both terms are
averaged over the batch. This is the textbook ELBO of a unit-variance Gaussian decoder (up to a factor 2),
so at λ = 1 a nat carried by z pays for itself as soon as it lowers the summed squared error by one unit
— z stays in use and samples with different seeds differ. (An earlier version averaged the squared error
over D; at λ = 1 that made a nat cost D times more, q collapsed onto p, KL ≈ 2e-5 and every seed decoded
the same adapter.)

Why factorised (DESIGN decision 5): a plain MLP reading D inputs plus a 2·D condition has hundreds
of millions of weights. Instead the flat vector is cut into ``n_chunks`` fixed-size chunks (the tail
zero-padded; D need not divide), and *shared* per-chunk MLPs, told which chunk they look at by a
learned position embedding, do all the work. Global information flows through the latent z and
through mean pooling of per-chunk features. The parameter count therefore depends on D only through
the ``n_chunks × pos_dim`` position table; ``vit_b16_param_count()`` reports it (3.6 M with the
defaults, far under the 30 M budget).

Everything here works in the normalised space of :class:`TensorNormalizer` (DESIGN decision 4):
callers pass normalised X and µ*, and σ*² mapped by ``normalize_var``; generated samples are
denormalised by the caller.

Pure torch: no FastAPI, redis, open_clip or faiss imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CVAE",
    "CVAEConfig",
    "CVAEOutput",
    "TensorNormalizer",
    "count_parameters",
    "kl_diag_gaussians",
    "vit_b16_param_count",
]

# Added inside the log of the condition's variance: σ*² is exactly 0 wherever all selected experts
# (and their checkpoints) agree, e.g. identical checkpoints.
VAR_EPS = 1e-8
# Floor for a segment's standard deviation in TensorNormalizer (a tensor constant over the data).
STD_FLOOR = 1e-8
# Range the predicted log-variances of q and p are clamped to, so exp() can neither overflow nor
# produce a zero variance that makes the KL infinite.
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0

VIT_B16_R2_D = 110_592  # 12 blocks × (q, k, v) × (B, A) × 768 × r=2


# --------------------------------------------------------------------------------------------------
# Normalisation (DESIGN decision 4)
# --------------------------------------------------------------------------------------------------


class TensorNormalizer:
    """Per-tensor z-score of flat LoRA vectors.

    ``segments`` are ``(offset, numel)`` pairs, one per named tensor of the flat layout; together
    they must tile ``[0, D)`` exactly (any order in the list). :meth:`fit` computes one mean and one
    (population) standard deviation per segment over all rows and all elements of that segment;
    std is floored at 1e-8.
    """

    def __init__(
        self,
        segments: Sequence[tuple[int, int]],
        mean: Tensor | None = None,
        std: Tensor | None = None,
    ) -> None:
        segs = [(int(o), int(n)) for o, n in segments]
        if not segs:
            raise ValueError("TensorNormalizer needs at least one segment")
        pos = 0
        for off, numel in sorted(segs):
            if numel <= 0:
                raise ValueError(f"segment at offset {off} has numel {numel} <= 0")
            if off != pos:
                raise ValueError(f"segments must tile [0, D) without gaps or overlaps; at {pos} found {off}")
            pos = off + numel
        self.segments: list[tuple[int, int]] = segs
        self.D: int = pos
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        if mean is not None and std is not None:
            self._set_stats(mean, std)

    # -- statistics --------------------------------------------------------------------------------

    def _set_stats(self, mean: Tensor, std: Tensor) -> None:
        mean = mean.detach().to("cpu", torch.float32).reshape(-1)
        std = std.detach().to("cpu", torch.float32).reshape(-1)
        if mean.numel() != len(self.segments) or std.numel() != len(self.segments):
            raise ValueError(
                f"expected {len(self.segments)} per-segment statistics, got mean {mean.numel()}, std {std.numel()}"
            )
        self.mean = mean
        self.std = std.clamp_min(STD_FLOOR)
        self._cache = {}

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, x: Tensor) -> TensorNormalizer:
        """Fit on training vectors ``x`` of shape [N, D]; returns ``self``."""
        if x.dim() != 2 or x.shape[1] != self.D:
            raise ValueError(f"fit expects [N, {self.D}], got {tuple(x.shape)}")
        means, stds = [], []
        for off, numel in self.segments:
            seg = x[:, off : off + numel].detach().to(torch.float64)
            m = seg.mean()
            means.append(m)
            stds.append(((seg - m) ** 2).mean().sqrt())
        self._set_stats(torch.stack(means), torch.stack(stds))
        return self

    def _expanded(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Per-element mean/std vectors [D] on ``like``'s device and dtype (cached)."""
        if self.mean is None or self.std is None:
            raise RuntimeError("TensorNormalizer is not fitted")
        if like.shape[-1] != self.D:
            raise ValueError(f"expected last dimension {self.D}, got {tuple(like.shape)}")
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (like.device, dtype)
        if key not in self._cache:
            mean = torch.empty(self.D, dtype=torch.float32)
            std = torch.empty(self.D, dtype=torch.float32)
            for i, (off, numel) in enumerate(self.segments):
                mean[off : off + numel] = self.mean[i]
                std[off : off + numel] = self.std[i]
            self._cache[key] = (mean.to(like.device, dtype), std.to(like.device, dtype))
        return self._cache[key]

    # -- transforms (any leading shape, last dimension D) ------------------------------------------

    def normalize(self, x: Tensor) -> Tensor:
        mean, std = self._expanded(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        mean, std = self._expanded(x)
        return x * std + mean

    def normalize_var(self, var: Tensor) -> Tensor:
        """Variance in raw space → variance in normalised space (var / std²)."""
        _, std = self._expanded(var)
        return var / std.square()

    def denormalize_var(self, var: Tensor) -> Tensor:
        _, std = self._expanded(var)
        return var * std.square()

    # -- serialisation (plain tensors, safetensors-friendly) ---------------------------------------

    def to_tensors(self, prefix: str = "normalizer.") -> dict[str, Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("TensorNormalizer is not fitted")
        return {
            f"{prefix}segments": torch.tensor(self.segments, dtype=torch.int64).reshape(-1, 2),
            f"{prefix}mean": self.mean.clone().contiguous(),
            f"{prefix}std": self.std.clone().contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str = "normalizer.") -> TensorNormalizer:
        """Inverse of :meth:`to_tensors`; keys without ``prefix`` are ignored."""
        try:
            segs = tensors[f"{prefix}segments"]
            mean = tensors[f"{prefix}mean"]
            std = tensors[f"{prefix}std"]
        except KeyError as e:
            raise KeyError(f"normalizer tensor {e} missing (prefix {prefix!r})") from None
        segments = [(int(o), int(n)) for o, n in segs.reshape(-1, 2).tolist()]
        return cls(segments, mean=mean, std=std)

    def __repr__(self) -> str:
        return f"TensorNormalizer(D={self.D}, segments={len(self.segments)}, fitted={self.fitted})"


# --------------------------------------------------------------------------------------------------
# CVAE
# --------------------------------------------------------------------------------------------------


@dataclass
class CVAEConfig:
    D: int
    chunk_size: int = 1024
    hidden: int = 512
    cond_dim: int = 256
    latent_dim: int = 32
    pos_dim: int = 64
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("D", "chunk_size", "hidden", "cond_dim", "latent_dim", "pos_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CVAEConfig.{name} must be a positive int, got {value!r}")
        if not self.kl_weight >= 0:
            raise ValueError(f"CVAEConfig.kl_weight must be >= 0, got {self.kl_weight!r}")

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.D / self.chunk_size)

    @property
    def padded_D(self) -> int:
        return self.n_chunks * self.chunk_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> CVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CVAEConfig keys: {sorted(unknown)}")
        return cls(**dict(d))


@dataclass
class CVAEOutput:
    x_hat: Tensor  # [B, D]
    q_mean: Tensor  # [B, latent]
    q_logvar: Tensor  # [B, latent]
    p_mean: Tensor  # [B, latent]
    p_logvar: Tensor  # [B, latent]


def kl_diag_gaussians(q_mean: Tensor, q_logvar: Tensor, p_mean: Tensor, p_logvar: Tensor) -> Tensor:
    """KL(N(q_mean, e^q_logvar) ‖ N(p_mean, e^p_logvar)) for diagonal Gaussians, summed over the
    last dimension: 0.5 · Σ [log σp² − log σq² + (σq² + (µq − µp)²) / σp² − 1]."""
    return 0.5 * (p_logvar - q_logvar + (q_logvar.exp() + (q_mean - p_mean).square()) / p_logvar.exp() - 1.0).sum(
        dim=-1
    )


# The paper's MLPs use ReLU. We use LeakyReLU(0.1): with plain ReLU, on data whose residual X − µ*
# is mostly checkpoint noise, Adam drove whole decoder layers to all-negative pre-activations (every
# unit dead, so the output stopped depending on z and could never recover; seen on the synthetic
# data of tests/test_cvae.py at lr 3e-3 for every seed tried). A small negative slope keeps a
# gradient path alive and otherwise behaves like ReLU.
NEGATIVE_SLOPE = 0.1


def _mlp(sizes: Iterable[int], final_act: bool) -> nn.Sequential:
    sizes = list(sizes)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_act:
            layers.append(nn.LeakyReLU(NEGATIVE_SLOPE))
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    """Factorised conditional VAE over flat LoRA vectors (see module docstring).

    Per chunk j (``x_j``, ``µ_j``, ``v_j`` are slices of length ``chunk_size``; ``pos_j`` a learned
    embedding):

    * condition  ``h_j = cond_net([µ_j, log(v_j + 1e-8)])``                        2-layer MLP
    * encoder    ``q(z|X,c)``: mean_j enc_net([x_j − µ_j, h_j, pos_j]) → linear head → (µ_q, logσ²_q)
    * prior      ``p(z|c)``:   mean_j prior_net([h_j, pos_j])          → linear head → (µ_p, logσ²_p)
    * decoder    ``X̂_j = µ_j + dec_net([z, h_j, pos_j])``                          3-layer MLP

    The encoder sees X through its residual ``X − µ*``; given c this is the same information as X,
    and it is exactly what the decoder has to add to µ*.
    """

    def __init__(self, config: CVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.pos_emb = nn.Embedding(c.n_chunks, c.pos_dim)
        self.cond_net = _mlp([2 * c.chunk_size, c.hidden, c.cond_dim], final_act=True)
        self.enc_net = _mlp([c.chunk_size + c.cond_dim + c.pos_dim, c.hidden, c.hidden], final_act=True)
        self.enc_head = nn.Linear(c.hidden, 2 * c.latent_dim)
        self.prior_net = _mlp([c.cond_dim + c.pos_dim, c.hidden, c.hidden], final_act=True)
        self.prior_head = nn.Linear(c.hidden, 2 * c.latent_dim)
        self.dec_net = _mlp([c.latent_dim + c.cond_dim + c.pos_dim, c.hidden, c.hidden, c.chunk_size], final_act=False)
        # Residual decoder: X̂ = µ* + dec_net(...), with dec_net's last layer zero-initialised, so an
        # untrained model returns exactly the aggregated mean µ* (the top-K weighted merge, a strong
        # baseline) instead of noise. Training then only has to learn the correction to µ*, which is
        # small next to µ* itself when the experts are related, and the decoder never has to spend
        # capacity copying 110k numbers from its condition through a narrow per-chunk bottleneck.
        # Gradients still reach the zero layer (its input activations are non-zero), so it learns.
        last = self.dec_net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    # -- helpers -----------------------------------------------------------------------------------

    def _chunks(self, t: Tensor, pad_value: float = 0.0) -> Tensor:
        """[B, D] → [B, n_chunks, chunk_size], zero-padding the tail."""
        c = self.config
        if t.dim() != 2 or t.shape[1] != c.D:
            raise ValueError(f"expected [B, {c.D}], got {tuple(t.shape)}")
        if c.padded_D != c.D:
            t = F.pad(t, (0, c.padded_D - c.D), value=pad_value)
        return t.reshape(t.shape[0], c.n_chunks, c.chunk_size)

    def _pos(self, batch: int) -> Tensor:
        return self.pos_emb.weight.unsqueeze(0).expand(batch, -1, -1)

    def condition_features(self, cond_mu: Tensor, cond_var: Tensor) -> Tensor:
        """Per-chunk condition features h [B, n_chunks, cond_dim]."""
        mu = self._chunks(cond_mu)
        logvar = self._chunks(torch.log(cond_var.clamp_min(0) + VAR_EPS))
        return self.cond_net(torch.cat([mu, logvar], dim=-1))

    @staticmethod
    def _split_head(out: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = out.chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def prior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """p(z|c) from condition features: (mean, logvar), each [B, latent]."""
        feats = self.prior_net(torch.cat([h, self._pos(h.shape[0])], dim=-1)).mean(dim=1)
        return self._split_head(self.prior_head(feats))

    def encode(self, x: Tensor, cond_mu: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|X,c): (mean, logvar), each [B, latent]."""
        resid = self._chunks(x - cond_mu)
        feats = self.enc_net(torch.cat([resid, h, self._pos(h.shape[0])], dim=-1)).mean(dim=1)
        return self._split_head(self.enc_head(feats))

    def decode(self, z: Tensor, cond_mu: Tensor, h: Tensor) -> Tensor:
        """p(X|z,c) mean: [B, D] = µ* + residual."""
        c = self.config
        B = z.shape[0]
        zz = z.unsqueeze(1).expand(B, c.n_chunks, c.latent_dim)
        resid = self.dec_net(torch.cat([zz, h, self._pos(B)], dim=-1))
        return cond_mu + resid.reshape(B, c.padded_D)[:, : c.D]

    # -- public API --------------------------------------------------------------------------------

    def forward(self, x: Tensor, cond_mu: Tensor, cond_var: Tensor) -> CVAEOutput:
        """Training pass; x, cond_mu, cond_var are [B, D] in normalised space."""
        h = self.condition_features(cond_mu, cond_var)
        q_mean, q_logvar = self.encode(x, cond_mu, h)
        p_mean, p_logvar = self.prior(h)
        z = q_mean + torch.exp(0.5 * q_logvar) * torch.randn_like(q_mean)
        x_hat = self.decode(z, cond_mu, h)
        return CVAEOutput(x_hat=x_hat, q_mean=q_mean, q_logvar=q_logvar, p_mean=p_mean, p_logvar=p_logvar)

    def loss(self, out: CVAEOutput, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(total, recon, kl): recon = ‖X − X̂‖² summed over D, kl summed over latent dimensions, both
        averaged over the batch; total = recon + kl_weight · kl."""
        recon = (out.x_hat - x).square().sum(dim=-1).mean()
        kl = kl_diag_gaussians(out.q_mean, out.q_logvar, out.p_mean, out.p_logvar).mean()
        return recon + self.config.kl_weight * kl, recon, kl

    @torch.no_grad()
    def sample(
        self,
        cond_mu: Tensor,
        cond_var: Tensor,
        num_samples: int = 1,
        seed: int | None = 0,
        use_prior_mean: bool = False,
    ) -> Tensor:
        """Draw ``num_samples`` LoRA vectors [num_samples, D] (normalised space) for one condition
        (cond_mu, cond_var: [D] or [1, D]).

        z ~ p(z|c) with noise from a CPU ``torch.Generator`` seeded by ``seed`` (moved to the model's
        device afterwards), so the same seed gives bitwise identical samples on a given machine;
        ``seed=None`` uses the global RNG. ``use_prior_mean`` sets z to the prior mean (deterministic,
        seed ignored).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if cond_mu.dim() == 1:
            cond_mu = cond_mu.unsqueeze(0)
        if cond_var.dim() == 1:
            cond_var = cond_var.unsqueeze(0)
        if cond_mu.shape[0] != 1 or cond_var.shape[0] != 1:
            raise ValueError("sample takes a single condition ([D] or [1, D])")
        h = self.condition_features(cond_mu, cond_var)
        p_mean, p_logvar = self.prior(h)
        if use_prior_mean:
            z = p_mean.expand(num_samples, -1)
        else:
            gen = None
            if seed is not None:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(int(seed))
            eps = torch.randn(num_samples, self.config.latent_dim, generator=gen, dtype=torch.float32)
            eps = eps.to(device=p_mean.device, dtype=p_mean.dtype)
            z = p_mean + torch.exp(0.5 * p_logvar) * eps
        return self.decode(z, cond_mu.expand(num_samples, -1), h.expand(num_samples, -1, -1))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vit_b16_param_count() -> int:
    """Parameters of the default CVAE for ViT-B/16 vision, r=2 (D = 110,592); built on the meta
    device, so nothing is allocated."""
    with torch.device("meta"):
        model = CVAE(CVAEConfig(D=VIT_B16_R2_D))
    return count_parameters(model)
