"""Train the CVAE on every expert's kept checkpoints, conditioned on the semantic prior of its description.

Training pairs: X = one checkpoint of expert e ([D]), c = {µ*, σ*²} aggregated from e's top-K neighbours by
the same router the service uses. With `leave_self_out` the expert is excluded from its own top-K, which is
the situation of an unseen task at serving time (otherwise the CVAE learns to copy the nearest expert).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from app.ml.aggregator import aggregate_experts
from app.ml.cvae import CVAE, CVAEConfig, TensorNormalizer, count_parameters
from app.ml.lora import LoRALayout
from app.ml.store import Store, TrainedCVAE
from offline.config import CVAETrainingConfig
from offline.train_experts import expert_path, read_expert

logger = logging.getLogger(__name__)


def conditions_for_experts(store: Store, k: int, tau: float, leave_self_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """c for every library expert: µ* [E, D], σ*² [E, D]."""
    bank = store.bank
    k = min(k, len(bank) - 1) if leave_self_out else min(k, len(bank))
    mus, variances = [], []
    for i, expert_id in enumerate(bank.ids):
        prior = aggregate_experts(bank, bank.embeddings[i], k, tau, exclude=(expert_id,) if leave_self_out else ())
        mus.append(prior.mu)
        variances.append(prior.var)
    return torch.stack(mus), torch.stack(variances)


def load_checkpoints(store: Store, experts_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All kept checkpoints [E·M, D] and the library row each belongs to [E·M]."""
    xs, owner = [], []
    for i, expert_id in enumerate(store.bank.ids):
        checkpoints = read_expert(expert_path(experts_dir, expert_id))[0]["checkpoints"]
        xs.append(checkpoints)
        owner.append(torch.full((len(checkpoints),), i, dtype=torch.long))
    return torch.cat(xs), torch.cat(owner)


def train_cvae(store: Store, experts_dir: Path, cfg: CVAETrainingConfig, k: int, tau: float,
               progress: bool = True) -> TrainedCVAE:
    layout: LoRALayout = store.layout
    x_raw, owner = load_checkpoints(store, experts_dir)  # [N, D], [N]
    cond_mu_raw, cond_var_raw = conditions_for_experts(store, k, tau, cfg.leave_self_out)
    normalizer = TensorNormalizer(layout.segments()).fit(x_raw)
    x = normalizer.normalize(x_raw)
    cond_mu, cond_var = normalizer.normalize(cond_mu_raw), normalizer.normalize_var(cond_var_raw)

    torch.manual_seed(cfg.seed)
    model = CVAE(CVAEConfig(D=layout.D, chunk_size=cfg.chunk_size, hidden=cfg.hidden, cond_dim=cfg.cond_dim,
                            latent_dim=cfg.latent_dim, pos_dim=cfg.pos_dim, kl_weight=cfg.kl_weight))
    n_params = count_parameters(model)
    logger.info("CVAE: %d parameters for D=%d", n_params, layout.D)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc=f"cvae ({n_params / 1e6:.2f}M params)", disable=not progress)
    model.train()
    for _ in bar:
        idx = torch.randint(len(x), (min(cfg.batch_size, len(x)),), generator=generator)
        rows = owner[idx]
        out = model(x[idx], cond_mu[rows], cond_var[rows])
        total, recon, kl = model.loss(out, x[idx])
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        bar.set_postfix(recon=f"{recon.item():.4f}", kl=f"{kl.item():.3f}")
    info = {"parameters": n_params, "steps": cfg.steps, "final_recon": recon.item(), "final_kl": kl.item(),
            "k": k, "tau": tau, "leave_self_out": cfg.leave_self_out, "n_checkpoints": len(x), "seed": cfg.seed}
    return TrainedCVAE(model.eval(), normalizer, info)
