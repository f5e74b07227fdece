"""The noise process, the loss, guidance, the samplers (against exact solutions) and masks."""
import copy

import pytest
import torch

from conftest import GaussianData, tiny_denoiser
from diffusion import (MASK_MODES, add_noise, generate, guided_denoiser, make_mask,
                       random_masks, sample_ddim, sample_dpmpp_2m, sigma_schedule, slerp,
                       training_loss)


def test_add_noise_and_training_loss():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = add_noise(x0, sigma, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[3], noise[3])
    # the loss is the MSE of the x0 prediction, reproduced by hand from the same RNG draws
    model = tiny_denoiser(trained=True)
    x0, text = torch.randn(4, 3, 16, 16), torch.randn(4, 8)
    torch.manual_seed(1)
    loss = training_loss(model, x0, text, 'x0', beta_a=1.0, beta_b=2.5, p_uncond=0.5)
    torch.manual_seed(1)
    s = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(2.5)).sample((4,))
    x_t = add_noise(x0, s, torch.randn_like(x0))
    keep = (torch.rand(4, 1) >= 0.5).float()
    torch.testing.assert_close(loss, ((model(x_t, s, text * keep) - x0) ** 2).mean())


def test_training_sigma_is_beta_and_text_dropout_rate():
    from diffusion import drop_text, sample_sigma
    torch.manual_seed(0)
    s = sample_sigma(200_000, 1.0, 2.5)
    assert abs(s.mean().item() - 1 / 3.5) < 3e-3  # Beta(a, b) mean a / (a + b)
    dropped = (drop_text(torch.ones(200_000, 4), 0.15).sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.15) < 5e-3


def test_guidance_endpoints_and_batching():
    model = tiny_denoiser(trained=True)
    x, text, neg = torch.randn(3, 3, 16, 16), torch.randn(3, 8), torch.randn(3, 8)
    s = torch.full((3,), 0.4)
    cond, uncond = model(x, s, text), model(x, s, torch.zeros_like(text))
    negative = model(x, s, neg)
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=1.0)(x, 0.4), cond, **close)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=0.0)(x, 0.4), uncond, **close)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=7.0)(x, 0.4), 7 * cond - 6 * uncond,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=0.0, uncond_emb=neg)(x, 0.4),
                               negative, **close)


def test_guidance_interval_is_a_second_solve_without_guidance():
    """cfg_min_sigma: the steps from σ > cfg_min_sigma are guided, the rest run the conditional
    model alone, as a second solve, so that DPM-Solver++(2M) does not extrapolate from a guided
    prediction to an unguided one."""
    model = tiny_denoiser(trained=True).eval()
    text, noise = torch.randn(2, 8), torch.randn(2, 3, 16, 16)

    def reference(g):  # guidance written out with separate forwards
        def denoise(x, sigma):
            s = torch.full((2,), sigma)
            return g * model(x, s, text) + (1 - g) * model(x, s, torch.zeros_like(text))
        return denoise
    switching = lambda x, sigma: reference(5.0 if sigma > 0.3 else 1.0)(x, sigma)  # noqa: E731
    sigmas = sigma_schedule(8)  # 1, .82, .65, .49, .35 | .23, .13, .04, 0: 5 steps from σ > 0.3
    close = dict(rtol=1e-4, atol=1e-4)
    for name, sampler in (('ddim', sample_ddim), ('dpmpp2m', sample_dpmpp_2m)):
        got = generate(model, text, cfg=5.0, steps=8, sampler=name, noise=noise, cfg_min_sigma=0.3)
        two_solves = sampler(reference(1.0), sampler(reference(5.0), noise, sigmas[:6]), sigmas[5:])
        torch.testing.assert_close(got, two_solves, **close)
        single = generate(model, text, cfg=5.0, steps=8, sampler=name, noise=noise)
        assert (got - single).abs().max() > 1e-3
        one_solve = sampler(switching, noise, sigmas)  # the same denoisers without the restart
        if name == 'ddim':  # a one-step method has no history: the restart changes nothing
            torch.testing.assert_close(got, one_solve, **close)
        else:  # 2M's first unguided step is first order instead of extrapolating across the switch
            assert (got - one_solve).abs().max() > 1e-3
    batch_sizes = []
    model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    generate(model, text, cfg=5.0, steps=8, noise=noise, cfg_min_sigma=0.3)
    assert batch_sizes == [4] * 5 + [2] * 3  # both halves in one forward while guided, then one
    # only guidance that amplifies (g > 1) is limited: cfg 0, the unconditional model, stays so
    torch.testing.assert_close(generate(model, text, cfg=0.0, steps=8, noise=noise,
                                        cfg_min_sigma=0.3),
                               generate(model, torch.zeros_like(text), cfg=1.0, steps=8,
                                        noise=noise), **close)


def test_samplers_converge_to_exact_ode_solution_at_their_order():
    data = GaussianData()
    dpm = {n: data.error(sample_dpmpp_2m, n) for n in (15, 30, 60, 120)}
    ddim = {n: data.error(sample_ddim, n) for n in (15, 30, 50, 60, 120)}
    assert dpm[15] < 0.02  # data std is 0.5-1.5
    assert dpm[15] < ddim[50]  # 15 second-order steps beat 50 first-order ones
    for n in (30, 60):  # doubling the steps: ~4x less error for 2M (order 2), ~2x for DDIM
        assert 3.0 < dpm[n] / dpm[2 * n] < 5.0, dpm
        assert 1.8 < ddim[n] / ddim[2 * n] < 2.2, ddim
    # the same holds on a schedule that starts below σ=1 and with another spacing
    ratio = data.error(sample_dpmpp_2m, 60, 0.95, rho=1.0) / data.error(sample_dpmpp_2m, 120, 0.95,
                                                                         rho=1.0)
    assert 3.0 < ratio < 5.0


def test_sigma_schedule():
    s = sigma_schedule(4, 2.0)  # explicit ρ=2: the default is 1.5
    assert s == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    with pytest.raises(ValueError, match='steps'):
        sigma_schedule(0)


def test_generate_is_seeded_and_guidance_changes_output():
    model = tiny_denoiser(trained=True).eval()
    text = torch.randn(2, 8)
    run = lambda seed, cfg=3.0, sampler='dpmpp2m': generate(  # noqa: E731
        model, text, cfg=cfg, steps=4, sampler=sampler,
        generator=torch.Generator().manual_seed(seed))
    a = run(0)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, run(0))
    assert not torch.allclose(a, run(1))
    assert not torch.allclose(a, run(0, cfg=1.0))
    assert not torch.allclose(a, run(0, sampler='ddim'))


def test_masks_cover_each_mode_with_the_right_area():
    H, W = 16, 24
    assert make_mask('left', H, W)[0, :, :12].all() and make_mask('left', H, W).sum() == H * W / 2
    assert make_mask('right', H, W)[0, :, 12:].all() and make_mask('right', H, W).sum() == H * W / 2
    assert make_mask('up', H, W)[0, :8].all() and make_mask('up', H, W).sum() == H * W / 2
    assert make_mask('down', H, W)[0, 8:].all() and make_mask('down', H, W).sum() == H * W / 2
    border = make_mask('border', H, W, frac=0.5)
    assert border.sum() == H * W - 8 * 12 and border[0, 4:12, 6:18].sum() == 0
    assert make_mask('box', H, W, box=(2, 3, 6, 10)).sum() == 4 * 7
    masks = random_masks(600, H, W, torch.Generator().manual_seed(0))
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    areas = masks.mean((1, 2, 3))
    assert (areas > 0).all() and (areas < 1).all()
    assert (areas == 0.5).float().mean() > 0.4  # the 4 half-image directions (and some borders)
    assert ((areas != 0.5) & (areas >= 1 / 16)).any()  # boxes and borders
    with pytest.raises(ValueError, match='mask mode'):
        make_mask('diagonal', H, W)
    assert len(MASK_MODES) == 6


def test_masked_generation_keeps_the_known_region():
    model = tiny_denoiser(trained=True, cond_channels=4).eval()
    known = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = make_mask('right', 16, 16)[None].expand(2, 1, 16, 16)
    for sampler in ('ddim', 'dpmpp2m'):
        out = generate(model, torch.randn(2, 8), cfg=3.0, steps=5, sampler=sampler, known=known,
                       mask=mask, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out * (1 - mask), known * (1 - mask), rtol=0, atol=1e-6)
        assert (out * mask - known * mask).abs().mean() > 0.05  # the masked half is generated


def test_slerp():
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=1e-5, atol=1e-5)
    mid = slerp(a, b, 0.5)
    # nearly orthogonal Gaussian vectors: slerp keeps the norm that lerp would shrink by ~1/sqrt(2)
    assert abs(mid.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1) - 1).max() < 0.1


def test_sigma_goes_to_a_gpu_pinned_and_without_waiting(monkeypatch):
    """On a GPU, σ is drawn from the CPU generator (the stream a resume restores) and copied from
    pinned memory with non_blocking=True, so the CPU never waits for the GPU here."""
    from diffusion import sample_sigma
    calls = []
    monkeypatch.setattr(torch.Tensor, 'pin_memory', lambda t: calls.append('pin') or t)
    monkeypatch.setattr(torch.Tensor, 'to', lambda t, *a, **k: calls.append((a, k)) or t)
    torch.manual_seed(3)
    sigma = sample_sigma(5, 1.0, 2.5, device='cuda:0')
    assert calls == ['pin', (('cuda:0',), {'non_blocking': True})]
    torch.manual_seed(3)
    torch.testing.assert_close(sigma, sample_sigma(5, 1.0, 2.5))  # the same draws as on a CPU


def test_outpainting_loss_counts_the_masked_region_and_its_masks_go_to_the_device(monkeypatch):
    """x0_error with a mask: the model sees the masked image and the mask, and the error counts
    where the mask is 1 only. training_loss(outpaint=True) draws a mask per row and moves it, like
    σ, through to_device (pinned, non-blocking on a GPU): never a blocking copy per step."""
    import diffusion
    from diffusion import masked_input, x0_error
    model = tiny_denoiser(trained=True, cond_channels=4)
    x0, text, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 8), torch.randn(2, 3, 16, 16)
    sigma, mask = torch.tensor([0.3, 0.7]), make_mask('right', 16, 16)[None].expand(2, 1, 16, 16)
    err = (model(add_noise(x0, sigma, noise), sigma, text, cond=masked_input(x0, mask)) - x0) ** 2
    torch.testing.assert_close(x0_error(model, x0, text, sigma, noise, mask),
                               err[..., 8:].mean())  # the right half: what is generated
    moved = []
    monkeypatch.setattr(diffusion, 'to_device', lambda t, device: moved.append(t.shape) or t)
    training_loss(model, x0, text, 'x0', 1.0, 1.0, 0.0, outpaint=True)
    assert moved == [(2,), (2, 1, 16, 16)]  # σ, then the masks


def test_guided_denoiser_makes_sigma_on_the_device_without_a_copy():
    """A sampler's σ is a Python float: the guided denoiser builds the (B,) tensor on x's device
    (aten.full), never on the host and then copied (a blocking copy on a GPU, every step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = []
    denoise = guided_denoiser(lambda x, s, t, cond=None: seen.append(s) or x, torch.zeros(2, 8))
    with Ops() as record:
        denoise(torch.zeros(2, 3, 4, 4), 0.4)
    assert 'aten.full.default' in record.ops, record.ops
    assert not any('copy' in op or 'lift' in op for op in record.ops), record.ops
    torch.testing.assert_close(seen[0], torch.full((2,), 0.4))


# ----- flow maps -----

def flow_map_of(data, shape):
    """The exact flow map of GaussianData as a model D(x, t, text, sigma_next=r): the x0 for which
    flow_map_jump lands on the ODE's solution at r; the ideal denoiser at r = t (its limit)."""
    exact = GaussianData.__new__(GaussianData)  # its μ and s as (1, *shape) fp32
    exact.mu, exact.s = (v.float().view(1, *shape) for v in (data.mu, data.s))

    def model(x, t, text, cond=None, sigma_next=None):
        t4, r4 = t.view(-1, 1, 1, 1), (t if sigma_next is None else sigma_next).view(-1, 1, 1, 1)
        ratio = r4 / t4
        jumped = (exact.jump(x, t4, r4) - ratio * x) / (1 - ratio).clamp(min=1e-12)
        return torch.where(r4 < t4, jumped, exact.denoise(x, t4))
    return model, exact


def test_flow_map_jump_is_exact_at_r_equals_t_and_ddim_for_a_new_map():
    """r = t returns x_t itself, whatever the map's x0; a map just added to a model (its jump
    input zero-initialised) is the model, so its jumps are DDIM steps of the model."""
    from diffusion import flow_map_jump, sample_flowmap
    base = tiny_denoiser(trained=True).eval()
    fresh = copy.deepcopy(base)
    fresh.add_flow_map()
    trained = copy.deepcopy(fresh)
    x, text = torch.randn(2, 3, 16, 16), torch.randn(2, 8)
    t, r = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.1])
    with torch.no_grad():
        for p in trained.gap_mlp.parameters():
            p.normal_(0, 0.1)
        x0 = trained(x, t, text, sigma_next=t)
        torch.testing.assert_close(flow_map_jump(x, t, t, x0), x, rtol=0, atol=1e-6)
        assert not torch.allclose(trained(x, t, text, sigma_next=r), base(x, t, text))
        torch.testing.assert_close(fresh(x, t, text, sigma_next=r), base(x, t, text))
        sigmas = sigma_schedule(4)
        jumps = sample_flowmap(guided_denoiser(fresh, text), x, sigmas)
        torch.testing.assert_close(jumps, sample_ddim(guided_denoiser(base, text), x, sigmas))
    with pytest.raises(ValueError, match='sigma_next is for a flow map'):
        base(x, t, text, sigma_next=t)


def test_flow_map_loss_vanishes_for_the_exact_map_only():
    """On Gaussian data the exact flow map satisfies u = v - (t - r)·du/dt, so its loss is ~0 with
    the full derivative term (ramp 1), and not without it (ramp 0); the ideal denoiser used as a
    map (DDIM jumps) has u = v, which is the target only at r = t."""
    from diffusion import flow_map_loss
    exact_map, exact = flow_map_of(GaussianData(dim=256), (1, 16, 16))
    ideal = lambda x, t, text, cond=None, sigma_next=None: exact.denoise(x, t.view(-1, 1, 1, 1))
    x0 = exact.mu + exact.s * torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(16, 8)

    def loss(model, ramp):  # the same σ, r and noise for every call
        torch.manual_seed(0)
        return flow_map_loss(model, model, ideal, x0, text, 1.0, 1.0, 1.0, ramp).item()
    without = loss(exact_map, 0.0)
    assert without > 1e-3 and loss(ideal, 1.0) > 1e-3
    assert loss(exact_map, 1.0) < 1e-6 * without


def test_flow_map_sampler_follows_the_exact_map_in_any_number_of_jumps():
    """The exact map's samples are the ODE's solution in 1 jump as in 8 (no renoising), one
    forward a step, and each image depends on its own noise alone."""
    exact_map, exact = flow_map_of(GaussianData(dim=256), (1, 16, 16))
    calls = []

    def counting(x, sigma, text, cond=None, sigma_next=None):
        calls.append(len(x))
        return exact_map(x, sigma, text, sigma_next=sigma_next)
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    truth = exact.jump(noise, 1.0, 0.0)
    for steps in (1, 2, 8):
        calls.clear()
        out = generate(counting, torch.zeros(3, 8), noise, cfg=1.0, steps=steps, sampler='flowmap')
        assert calls == [3] * steps
        torch.testing.assert_close(out, truth, rtol=1e-4, atol=1e-4)
    model = tiny_denoiser(trained=True, flow_map=True).eval()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    text = torch.randn(2, 8)
    both = generate(model, text, noise, cfg=1.0, steps=4, sampler='flowmap')
    one = generate(model, text[:1], noise[:1], cfg=1.0, steps=4, sampler='flowmap')
    torch.testing.assert_close(one, both[:1], rtol=1e-4, atol=1e-5)
