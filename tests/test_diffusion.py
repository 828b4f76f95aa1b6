import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import DDIMSampler, DDPMSampler, respaced_timesteps
from ddpm.schedule import cosine_alphas_cumprod

ABAR = cosine_alphas_cumprod(1000)


def test_cosine_schedule_is_monotone_from_clean_to_noise():
    assert ABAR.shape == (1000,) and ABAR[0] > 0.999 and ABAR[-1] < 1e-4
    assert torch.all(ABAR[1:] < ABAR[:-1])


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_target_and_predictions_round_trip(prediction):
    d = GaussianDiffusion(ABAR, prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, 5, generator=g), torch.randn(4, 3, 5, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.predict_x0_eps(x_t, t, d.target(x0, noise, t))
    # x0 from eps is ill-conditioned at t = 999 (abar ~ 0), eps from x0 at t = 0 (1 - abar ~ 0)
    assert torch.allclose(x0_hat[:3], x0[:3], atol=1e-3)
    assert torch.allclose(eps_hat[1:], noise[1:], atol=2e-3)
    assert torch.allclose(d.q_sample(x0_hat, t, eps_hat), x_t, atol=1e-4)


def test_min_snr_weights_match_the_formula():
    t = torch.tensor([1, 100, 900])
    for pred, expect in (("eps", lambda s: torch.clamp(s, max=5) / s), ("v", lambda s: torch.clamp(s, max=5) / (s + 1)),
                         ("x0", lambda s: torch.clamp(s, max=5))):
        d = GaussianDiffusion(ABAR, pred, min_snr_gamma=5.0)
        assert torch.allclose(d.loss_weight(t), expect(d.snr(t)))
    # an exact network has zero loss
    d = GaussianDiffusion(ABAR, "v")
    x0 = torch.randn(2, 1, 4, 4, 4)
    noise = torch.randn_like(x0)
    oracle = lambda x_t, t: d.target(x0, noise, t)  # noqa: E731
    assert torch.all(d.training_losses(oracle, x0, torch.tensor([3, 700]), noise) == 0)


def test_respacing_keeps_both_ends():
    steps = respaced_timesteps(1000, 50)
    assert steps[0] == 999 and steps[-1] == 0 and len(steps) == 50 and torch.all(steps[1:] < steps[:-1])
    with pytest.raises(ValueError):
        respaced_timesteps(1000, 0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler_cls,steps", [(DDIMSampler, 10), (DDIMSampler, 50), (DDPMSampler, 100)])
def test_samplers_with_an_oracle_network_recover_x0(prediction, sampler_cls, steps):
    """The oracle knows x0, so it outputs the exact target for whatever x_t it is given."""
    d = GaussianDiffusion(ABAR, prediction)
    x0 = torch.randn(2, 4, 6, 6, 6, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)

    def oracle(x_t, t):
        a, s = d.coefs(t, x_t.ndim)
        eps = (x_t - a * x0) / s
        return d.target(x0, eps, t)

    out = sampler_cls(d).sample(oracle, x0.shape, steps, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, x0, atol=1e-3)


def test_sampling_is_deterministic_under_a_seed():
    d = GaussianDiffusion(ABAR, "v")
    model = lambda x, t: 0.1 * x  # noqa: E731
    for sampler in (DDIMSampler(d, eta=0.5), DDPMSampler(d)):
        a = sampler.sample(model, (1, 2, 4, 4, 4), 20, generator=torch.Generator().manual_seed(7))
        b = sampler.sample(model, (1, 2, 4, 4, 4), 20, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b)


def test_sampler_registry_and_the_config_schema_name_the_same_samplers():
    """The schema (thinslice, which imports no model code) lists the names by hand; this holds it to the registry."""
    import typing

    from ddpm.samplers import SAMPLERS, make_sampler
    from thinslice.config import DiffusionConfig

    assert set(typing.get_args(DiffusionConfig.model_fields["sampler"].annotation)) == set(SAMPLERS)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        make_sampler("dpm", GaussianDiffusion(ABAR))
