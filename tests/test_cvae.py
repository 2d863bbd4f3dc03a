"""Tests for app.ml.cvae: size budget, shapes, training, KL, seeding, residual design, normaliser."""

from __future__ import annotations

import pytest
import torch

from app.ml.cvae import (
    CVAE,
    CVAEConfig,
    CVAEOutput,
    TensorNormalizer,
    count_parameters,
    kl_diag_gaussians,
    vit_b16_param_count,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny: intra-op threads only add synchronisation, which costs 10x or more
    # when the 2-core CI machine is busy with other work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = dict(chunk_size=64, hidden=64, cond_dim=32, latent_dim=8, pos_dim=16)


def small_model(D: int = 300, seed: int = 0, **overrides) -> CVAE:
    torch.manual_seed(seed)
    return CVAE(CVAEConfig(D=D, **{**SMALL, **overrides}))


def test_vit_b16_param_count_within_budget():
    n = vit_b16_param_count()
    print(f"CVAE parameters for ViT-B/16 r=2 (D=110,592): {n:,}")
    assert 0 < n <= 30_000_000
    assert count_parameters(CVAE(CVAEConfig(D=300, **SMALL))) < n


def test_config_roundtrip_and_validation():
    cfg = CVAEConfig(D=300, **SMALL, kl_weight=0.5)
    assert CVAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        CVAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        CVAEConfig(D=0)


def test_shapes_with_d_not_divisible_by_chunk():
    D, B = 300, 3  # 300 = 4·64 + 44: a padded tail chunk
    model = small_model(D)
    assert model.config.n_chunks == 5
    x, mu, var = torch.randn(B, D), torch.randn(B, D), torch.rand(B, D)
    out = model(x, mu, var)
    assert out.x_hat.shape == (B, D)
    for t in (out.q_mean, out.q_logvar, out.p_mean, out.p_logvar):
        assert t.shape == (B, 8)
    total, recon, kl = model.loss(out, x)
    assert total.shape == recon.shape == kl.shape == ()
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
    s = model.sample(mu[0], var[0], num_samples=4)
    assert s.shape == (4, D)
    assert model.sample(mu[:1], var[:1]).shape == (1, D)


def test_zero_variance_condition_is_finite():
    model = small_model()
    mu = torch.randn(2, 300)
    out = model(mu, mu, torch.zeros(2, 300))  # identical checkpoints ⇒ σ*² = 0
    assert all(torch.isfinite(t).all() for t in model.loss(out, mu))


def _synthetic(shift: float = 1.0, D: int = 300, experts: int = 8, ckpts: int = 5, noise: float = 0.1):
    """Each expert e has a mean m_e; its checkpoints are m_e + noise. The condition is the expert's
    checkpoint mean·shift and variance (shift < 1 imitates a biased aggregate the decoder must fix)."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(experts, 1, D, generator=g)
    x = means + noise * torch.randn(experts, ckpts, D, generator=g)
    mu = x.mean(dim=1, keepdim=True).expand_as(x) * shift
    var = x.var(dim=1, unbiased=False, keepdim=True).expand_as(x)
    return x.reshape(-1, D), mu.reshape(-1, D), var.reshape(-1, D)


def _train(model: CVAE, x, mu, var, steps: int = 200, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        total, _, _ = model.loss(model(x, mu, var), x)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses


def _recon_from_prior_mean(model: CVAE, x, mu, var) -> float:
    preds = torch.cat([model.sample(m, v, use_prior_mean=True) for m, v in zip(mu, var, strict=True)])
    return torch.mean((preds - x) ** 2).item()


def test_training_decreases_loss_and_beats_zeros():
    x, mu, var = _synthetic(shift=0.5)  # a biased condition: the residual decoder has something to learn
    model = small_model()
    losses = _train(model, x, mu, var)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    zeros_err = torch.mean(x**2).item()
    recon = _recon_from_prior_mean(model, x, mu, var)
    assert recon < 0.05 * zeros_err, (recon, zeros_err)


def test_training_learns_beyond_the_residual_baseline():
    # The condition's mean is biased (0.5·m_e): the untrained model returns µ* and is off by a lot;
    # training must learn the correction from the condition.
    x, mu, var = _synthetic(shift=0.5)
    model = small_model()
    untrained = _recon_from_prior_mean(model, x, mu, var)
    _train(model, x, mu, var)
    trained = _recon_from_prior_mean(model, x, mu, var)
    assert trained < 0.3 * untrained, (trained, untrained)


def test_kl_matches_manual_computation():
    model = small_model(latent_dim=2)
    q_mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    q_logvar = torch.log(torch.tensor([[1.0, 0.25], [4.0, 1.0]]))
    p_mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    p_logvar = torch.log(torch.tensor([[1.0, 1.0], [1.0, 2.0]]))

    def kl1(mq, vq, mp, vp):  # KL(N(mq, vq) ‖ N(mp, vp)), one dimension
        return 0.5 * (torch.log(torch.tensor(vp / vq)).item() + (vq + (mq - mp) ** 2) / vp - 1.0)

    per_sample = [
        kl1(0.0, 1.0, 0.0, 1.0) + kl1(1.0, 0.25, 0.0, 1.0),
        kl1(2.0, 4.0, 1.0, 1.0) + kl1(-1.0, 1.0, 1.0, 2.0),
    ]
    assert per_sample[0] == pytest.approx(0.5 * (1.3862944 + 0.25 + 1.0 - 1.0), rel=1e-6)
    torch.testing.assert_close(kl_diag_gaussians(q_mean, q_logvar, p_mean, p_logvar), torch.tensor(per_sample))
    x = torch.randn(2, 300)
    out = CVAEOutput(x_hat=x + 0.5, q_mean=q_mean, q_logvar=q_logvar, p_mean=p_mean, p_logvar=p_logvar)
    total, recon, kl = model.loss(out, x)
    expected_kl = sum(per_sample) / 2
    assert kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert recon.item() == pytest.approx(0.25 * 300, rel=1e-5)  # ‖X − X̂‖², summed over D = 300
    assert total.item() == pytest.approx(0.25 * 300 + expected_kl, rel=1e-5)
    # identical Gaussians ⇒ 0
    assert kl_diag_gaussians(q_mean, q_logvar, q_mean, q_logvar).abs().max().item() < 1e-6


def _nonzero_decoder_model() -> CVAE:
    """A model whose decoder output depends on z (the zero-initialised last layer is perturbed)."""
    model = small_model()
    with torch.no_grad():
        model.dec_net[-1].weight.normal_(0, 0.1)
    return model


def test_same_seed_identical_different_seed_different():
    model = _nonzero_decoder_model()
    mu, var = torch.randn(300), torch.rand(300)
    a = model.sample(mu, var, num_samples=3, seed=7)
    b = model.sample(mu, var, num_samples=3, seed=7)
    c = model.sample(mu, var, num_samples=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().max().item() > 1e-4
    assert not torch.equal(a[0], a[1])  # samples within one call differ too
    # the global RNG state neither affects nor is consumed by a seeded sample
    state = torch.get_rng_state()
    torch.manual_seed(123)
    d = model.sample(mu, var, num_samples=3, seed=7)
    assert torch.equal(a, d)
    torch.set_rng_state(state)


def test_prior_mean_is_deterministic_regardless_of_seed():
    model = _nonzero_decoder_model()
    mu, var = torch.randn(300), torch.rand(300)
    a = model.sample(mu, var, num_samples=2, seed=1, use_prior_mean=True)
    b = model.sample(mu, var, num_samples=2, seed=999, use_prior_mean=True)
    c = model.sample(mu, var, num_samples=2, seed=None, use_prior_mean=True)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[0], a[1])


def test_untrained_model_returns_the_aggregated_mean():
    # Residual design: X̂ = µ* + decoder(...), decoder's last layer zero-initialised. Without the
    # residual, the output would be (near) zero and this relative error would be ≈ 1.
    model = small_model()
    mu, var = 3.0 * torch.randn(300), torch.rand(300)
    for use_prior_mean in (True, False):
        s = model.sample(mu, var, num_samples=2, use_prior_mean=use_prior_mean)
        rel = ((s - mu).norm(dim=-1) / mu.norm()).max().item()
        assert rel < 1e-3, rel


# --------------------------------------------------------------------------------------------------
# TensorNormalizer
# --------------------------------------------------------------------------------------------------

SEGMENTS = [(0, 40), (40, 100), (140, 7), (147, 153)]  # D = 300


def _fit_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.01, 5.0, 100.0, 1e-3])
    shifts = torch.tensor([1.0, -3.0, 50.0, 0.0])
    cols = [shifts[i] + scales[i] * torch.randn(20, n, generator=g) for i, (_, n) in enumerate(SEGMENTS)]
    return torch.cat(cols, dim=1)


def test_normalizer_fit_zero_mean_unit_std_per_segment():
    x = _fit_data()
    norm = TensorNormalizer(SEGMENTS).fit(x)
    assert norm.D == 300
    z = norm.normalize(x)
    for off, n in SEGMENTS:
        seg = z[:, off : off + n]
        assert abs(seg.mean().item()) < 1e-4
        assert seg.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)


def test_normalizer_roundtrip_and_var():
    x = _fit_data()
    norm = TensorNormalizer(SEGMENTS).fit(x)
    y = x[:3] * 1.5 + 0.2
    torch.testing.assert_close(norm.denormalize(norm.normalize(y)), y, rtol=1e-5, atol=1e-4)
    # variance maps like the squared scale of normalize
    var = x.var(dim=0, unbiased=False)
    torch.testing.assert_close(
        norm.normalize_var(var), norm.normalize(x).var(dim=0, unbiased=False), rtol=1e-3, atol=1e-5
    )
    torch.testing.assert_close(norm.denormalize_var(norm.normalize_var(var)), var)


def test_normalizer_constant_segment_is_floored():
    x = _fit_data()
    x[:, 140:147] = 2.0
    norm = TensorNormalizer(SEGMENTS).fit(x)
    z = norm.normalize(x)
    assert torch.isfinite(z).all()
    assert z[:, 140:147].abs().max().item() == 0.0


def test_normalizer_tensors_roundtrip():
    x = _fit_data()
    norm = TensorNormalizer(SEGMENTS).fit(x)
    tensors = norm.to_tensors()
    assert all(isinstance(t, torch.Tensor) and t.is_contiguous() for t in tensors.values())
    extra = {**tensors, "cvae.pos_emb.weight": torch.zeros(1)}  # other keys in the same file are ignored
    again = TensorNormalizer.from_tensors(extra)
    assert again.segments == norm.segments
    assert torch.equal(again.normalize(x), norm.normalize(x))
    pref = TensorNormalizer.from_tensors(norm.to_tensors(prefix="n."), prefix="n.")
    assert torch.equal(pref.mean, norm.mean)


def test_normalizer_rejects_bad_segments():
    with pytest.raises(ValueError):
        TensorNormalizer([(0, 10), (12, 5)])  # gap
    with pytest.raises(ValueError):
        TensorNormalizer([(0, 10), (5, 10)])  # overlap
    with pytest.raises(ValueError):
        TensorNormalizer([(1, 10)])  # does not start at 0
    with pytest.raises(RuntimeError):
        TensorNormalizer([(0, 10)]).normalize(torch.zeros(10))  # not fitted


def test_latent_stays_in_use_at_the_papers_kl_weight():
    # Regressions: with plain ReLU, Adam killed every unit of a decoder layer on this data and the
    # output stopped depending on z (spread exactly 0); with the squared error averaged over D instead of
    # summed, λ = 1 collapsed q onto p (KL ≈ 0). With the paper's loss and λ = 1, z must carry information.
    # What z can carry: a checkpoint-to-checkpoint variation the condition does not predict, low-rank so that a
    # few latent nats explain a lot of squared error.
    x, mu, var = _synthetic()
    g = torch.Generator().manual_seed(2)
    x = x + torch.randn(len(x), 4, generator=g) @ torch.randn(4, x.shape[1], generator=g)
    model = small_model(kl_weight=1.0)
    _train(model, x, mu, var)
    _, _, kl = model.loss(model(x, mu, var), x)
    spread = model.sample(mu[0], var[0], num_samples=16, seed=0).std(dim=0).mean().item()
    assert kl.item() > 0.1, kl.item()
    assert spread > 1e-3, spread
