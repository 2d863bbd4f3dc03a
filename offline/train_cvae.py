"""Train the CVAE on every expert's kept checkpoints, conditioned on the semantic prior of its description.

Training pairs: X = one checkpoint of expert e ([D]), c = {µ*, σ*²} built for e's description by the prior the
CVAE is conditioned on (a strategy of app/ml/strategies.PRIORS: the one validation ranked best), exactly as the
service builds it. With `leave_self_out` the expert is excluded from its own routing, which is the situation of
an unseen task at serving time (otherwise the CVAE learns to copy the nearest expert). Early stopping on held-out
experts, by leave-one-task-out retrieval (see `train_cvae`), keeps it from memorising a small library.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from app.ml.cvae import CVAE, CVAEConfig, TensorNormalizer, count_parameters
from app.ml.lora import LoRALayout
from app.ml.store import Store, TrainedCVAE
from app.ml.strategies import PRIORS, GenerationRequest, resolved_params
from offline.config import CVAETrainingConfig
from offline.train_experts import expert_path, read_expert

logger = logging.getLogger(__name__)

# Scores a CVAE candidate on the validation experts (higher is better): LOTO retrieval (offline/validate.py).
SelectFn = Callable[[TrainedCVAE, list[str]], float]


def conditions_for_experts(store: Store, prior: str, leave_self_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """c for every library expert, by the named prior with the store's validated K/τ: µ* [E, D], σ*² [E, D]."""
    bank = store.bank
    mus, variances = [], []
    for i, expert_id in enumerate(bank.ids):
        request = GenerationRequest(bank.embeddings[i], exclude=(expert_id,) if leave_self_out else ())
        c = PRIORS[prior](store, request, *resolved_params(store, prior, request))
        mus.append(c.mu)
        variances.append(c.var)
    return torch.stack(mus), torch.stack(variances)


def load_checkpoints(store: Store, experts_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All kept checkpoints [E·M, D] and the library row each belongs to [E·M]."""
    xs, owner = [], []
    for i, expert_id in enumerate(store.bank.ids):
        checkpoints = read_expert(expert_path(experts_dir, expert_id))[0]["checkpoints"]
        xs.append(checkpoints)
        owner.append(torch.full((len(checkpoints),), i, dtype=torch.long))
    return torch.cat(xs), torch.cat(owner)


def split_experts(n_experts: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train rows, validation rows) of the library; validation gets round(fraction·E) experts, at least
    one when fraction > 0 and E ≥ 2."""
    n_val = min(max(round(fraction * n_experts), 1 if fraction > 0 else 0), n_experts - 1)
    order = torch.randperm(n_experts, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


@torch.no_grad()
def prior_mean_error(model: CVAE, target: torch.Tensor, cond_mu: torch.Tensor, cond_var: torch.Tensor) -> float:
    """Mean squared error (per element, normalised space) of the prior-mean decode against experts' µ_e [V, D].

    Recorded for comparison only: it rewards shrinking towards the soup, so it chooses nothing."""
    model.eval()
    preds = torch.cat([model.sample(m, v, use_prior_mean=True) for m, v in zip(cond_mu, cond_var, strict=True)])
    model.train()
    return (preds - target).square().mean().item()


def train_cvae(store: Store, experts_dir: Path, cfg: CVAETrainingConfig, prior: str = "topk_weighted",
               select: SelectFn | None = None, progress: bool = True) -> TrainedCVAE:
    """Fit the CVAE on the library's checkpoints, keeping the step that held-out experts say is best.

    A library has tens of experts, so a decoder that learns X − µ* freely memorises its training experts and
    generalises worse than µ* itself. `val_fraction` of the experts are held out; every `eval_every` steps the
    candidate is scored by `select` (leave-one-task-out retrieval of the held-out experts' tasks; higher is
    better) and the best state is kept — step 0 included, where the zero-initialised residual decoder returns
    exactly the prior's µ*. SG-LoRA therefore starts from the validated merge and moves away from it only as far
    as held-out retrieval says it helps. Without `select` (no held-out pairs) the last step is kept.
    """
    layout: LoRALayout = store.layout
    x_raw, owner = load_checkpoints(store, experts_dir)  # [N, D], [N]
    cond_mu_raw, cond_var_raw = conditions_for_experts(store, prior, cfg.leave_self_out)
    normalizer = TensorNormalizer(layout.segments()).fit(x_raw)
    x = normalizer.normalize(x_raw)
    cond_mu, cond_var = normalizer.normalize(cond_mu_raw), normalizer.normalize_var(cond_var_raw)
    expert_mu = normalizer.normalize(store.bank.mu)  # [E, D]: the flat-layout error is recorded beside

    train_rows, val_rows = split_experts(len(store.bank), cfg.val_fraction if select else 0.0, cfg.seed)
    val_ids = [store.bank.ids[i] for i in val_rows.tolist()]
    train_idx = torch.cat([torch.nonzero(owner == r).flatten() for r in train_rows])  # checkpoints of train experts

    torch.manual_seed(cfg.seed)
    model = CVAE(CVAEConfig(D=layout.D, chunk_size=cfg.chunk_size, hidden=cfg.hidden, cond_dim=cfg.cond_dim,
                            latent_dim=cfg.latent_dim, pos_dim=cfg.pos_dim, kl_weight=cfg.kl_weight))
    n_params = count_parameters(model)
    logger.info("CVAE: %d parameters for D=%d", n_params, layout.D)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)

    def validation_score() -> float | None:  # None: nothing held out, the last step is kept
        if select is None or len(val_rows) == 0:
            return None
        model.eval()
        score = select(TrainedCVAE(model, normalizer, {"prior": prior}), val_ids)
        model.train()
        return score

    def flat_error() -> float | None:
        return prior_mean_error(model, expert_mu[val_rows], cond_mu[val_rows], cond_var[val_rows]) if val_ids else None

    best_score, best_step = validation_score(), 0  # step 0: the decoder returns the prior's µ* exactly
    baseline_score, baseline_error = best_score, flat_error()
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, cfg.steps + 1), desc=f"cvae ({n_params / 1e6:.2f}M params)", disable=not progress)
    model.train()
    recon = kl = torch.tensor(float("nan"))
    for step in bar:
        idx = train_idx[torch.randint(len(train_idx), (min(cfg.batch_size, len(train_idx)),), generator=generator)]
        out = model(x[idx], cond_mu[owner[idx]], cond_var[owner[idx]])
        total, recon, kl = model.loss(out, x[idx])
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            score = validation_score()
            if score is None or score > best_score:
                best_score, best_step, best_state = score, step, copy.deepcopy(model.state_dict())
            bar.set_postfix(recon=f"{recon.item() / layout.D:.4f}", kl=f"{kl.item():.2f}", val=score, best=best_step)
    model.load_state_dict(best_state)
    logger.info("CVAE: kept step %d of %d (held-out LOTO mR@1 %s; the prior alone %s)", best_step, cfg.steps,
                best_score, baseline_score)
    info = {"parameters": n_params, "steps": cfg.steps, "best_step": best_step, "prior": prior,
            "selection": "leave-one-task-out mR@1 of the held-out experts' tasks" if select else "last step",
            "val_experts": val_ids, "val_mr1": best_score, "val_mr1_of_prior": baseline_score,
            "val_flat_error": flat_error(), "val_flat_error_of_prior": baseline_error,
            "final_recon_per_element": recon.item() / layout.D, "final_kl": kl.item(),
            "prior_params": resolved_params(store, prior, GenerationRequest(store.bank.embeddings[0]))[0:2],
            "leave_self_out": cfg.leave_self_out, "n_checkpoints": len(train_idx), "seed": cfg.seed}
    return TrainedCVAE(model.eval(), normalizer, info)
