"""
The noise process, the training loss, guidance and the samplers. No model code lives here:
a denoiser is any function D(x, σ) -> x0 estimate.

Forward process (add_noise):          x_σ = (1-σ)·x0 + σ·ε,   ε ~ N(0, I),  σ ∈ [0, 1]
Training (training_loss):             σ ~ Beta(a, b),  loss = ‖D(x_σ, σ, text) - x0‖² (x0_error)
Guidance (guided_denoiser):           D = g·D(x, σ, text) + (1-g)·D(x, σ, ∅)
                                      (generate: at σ > cfg_min_sigma, default CFG_MIN_SIGMA)
Samplers, with α = 1-σ, λ = log(α/σ), h = λ_next - λ:
  DDIM (sample_ddim):                 x_next = ((σ - σ_next)·D + σ_next·x) / σ
  DPM-Solver++(2M) (sample_dpmpp_2m): x_next = (σ_next/σ)·x + α_next·(1 - e^{-h})·D',
                                      D' = (1 + 1/2r)·D - (1/2r)·D_prev,  r = h_prev / h
  flow map (sample_flowmap):          x_next = (σ_next/σ)·x + (1 - σ_next/σ)·D(x, σ, σ_next)
Flow-map distillation (flow_map_loss): u = (x_t - D(x_t, t, r))/t learns v - (t - r)·du/dt

    x = generate(model, text_emb, noise, cfg=7, steps=15)   # (B, C, H, W) from noise (B, C, H, W)
"""
import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F


# ----- the forward process and the loss -----

def add_noise(x0, sigma, noise):
    """x_σ = (1-σ)·x0 + σ·ε, σ (B,) broadcast over (B, C, H, W)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def sample_sigma(n, a, b, device='cpu'):
    """Training noise levels σ ~ Beta(a, b), from the CPU RNG that train.py seeds and saves;
    copied to a GPU without waiting."""
    sigma = torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(b))).sample((n,))
    return to_device(sigma, device)


def to_device(t, device):
    """A CPU tensor to device; to a GPU from pinned memory, so the host never waits for it."""
    on_gpu = torch.device(device).type == 'cuda'
    return t.pin_memory().to(device, non_blocking=True) if on_gpu else t


def drop_text(text_emb, p_uncond):
    """Each text embedding zeroed with probability p_uncond: the same network learns the
    unconditional model that classifier-free guidance needs."""
    keep = torch.rand(text_emb.shape[0], 1, device=text_emb.device) >= p_uncond
    return text_emb * keep.to(text_emb.dtype)


def x0_error(denoise, x0, text_emb, sigma, noise, mask=None):
    """Mean ‖D(x_σ, σ, text) - x0‖² where mask (B, 1, H, W) is 1, everywhere without one: the x0
    objective, and the val loss of any model (of a flow map: its jump to σ itself).
    With a mask (outpainting: 1 = generate) the masked image and the mask are the model's input."""
    cond = None if mask is None else masked_input(x0, mask)
    pred = denoise(add_noise(x0, sigma, noise), sigma, text_emb, cond=cond)
    err = (pred.float() - x0.float()) ** 2  # (B, C, H, W)
    if mask is None:
        return err.mean()
    return (err * mask).sum() / (mask.expand_as(err).sum() + 1e-8)


def training_loss(model, x0, text_emb, objective, beta_a, beta_b, p_uncond, outpaint=False,
                  teacher=None, teacher_cfg=1.0, student=None, ramp=1.0):
    """One batch's loss for train.py's objective; σ, ε, the text dropout and outpainting's masks
    are drawn here. 'x0': x0_error at σ ~ Beta(a, b), every σ alike (the reference's);
    'flowmap': flow_map_loss from the frozen teacher guided at teacher_cfg (student: the model
    unwrapped from torch.compile and DDP)."""
    if objective == 'flowmap':
        return flow_map_loss(model, student, teacher, x0, drop_text(text_emb, p_uncond),
                             teacher_cfg, beta_a, beta_b, ramp)
    sigma = sample_sigma(len(x0), beta_a, beta_b, x0.device)
    mask = to_device(random_masks(len(x0), *x0.shape[2:]), x0.device) if outpaint else None
    noise = torch.randn_like(x0)
    return x0_error(model, x0, drop_text(text_emb, p_uncond), sigma, noise, mask)


# ----- guidance -----

def guided_denoiser(model, text_emb, cfg=1.0, uncond_emb=None, cond=None):
    """D(x, σ) for the samplers: x0 = g·x0_cond + (1-g)·x0_uncond, both halves in one forward.
    uncond_emb: zeros (what training dropped to) or a negative prompt's; cfg=1: one half only."""
    uncond_emb = torch.zeros_like(text_emb) if uncond_emb is None else uncond_emb

    def denoise(x, sigma, sigma_next=None):  # σ: a number (made on the device) or (B,)
        s, s_next = (torch.full((len(x),), v, device=x.device) if isinstance(v, float) else v
                     for v in (sigma, sigma_next))
        jump = {} if s_next is None else {'sigma_next': s_next}  # a flow map's
        if cfg == 1.0:  # the sampler's arithmetic stays fp32
            return model(x, s, text_emb, cond=cond, **jump).float()
        two = lambda t: None if t is None else torch.cat([t, t])
        both = model(two(x), two(s), torch.cat([text_emb, uncond_emb]), cond=two(cond),
                     **{k: two(v) for k, v in jump.items()})
        x0_cond, x0_uncond = both.float().chunk(2)
        return cfg * x0_cond + (1 - cfg) * x0_uncond
    return denoise


# ----- the samplers -----

def sigma_schedule(steps, rho=1.5):
    """steps+1 noise levels σ_i = (1 - i/steps)^ρ from 1 down to 0; ρ > 1 spends more steps at
    low noise, where the detail is decided."""
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return [(1 - i / steps) ** rho for i in range(steps + 1)]


def _lambda(sigma):
    """Log signal-to-noise ratio λ = log((1-σ)/σ), from -inf at σ=1 to +inf at σ=0."""
    return math.inf if sigma <= 0 else -math.inf if sigma >= 1 else math.log((1 - sigma) / sigma)


def flow_map_jump(x, sigma, sigma_next, x0):
    """x_r = (r/t)·x_t + (1 - r/t)·x0 for t = sigma, r = sigma_next: a DDIM step with the map's own
    x0 = D(x_t, t, r), so a jump to r = t is x_t exactly, and D's error shrinks with the jump."""
    ratio = sigma_next / sigma
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.view(-1, *([1] * (x.dim() - 1)))
    return ratio * x + (1 - ratio) * x0


@torch.no_grad()
def sample_ddim(denoise, x, sigmas):
    """First-order (DDIM) steps in x0 form: x moves to a weighted average of x and D, the jump
    of a flow map whose x0 is D(x, σ) whatever the level it jumps to."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = flow_map_jump(x, sigma, sigma_next, denoise(x, sigma))
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022), in x0 form with α = 1-σ. Second order from one model
    call a step: it extrapolates D linearly in λ from the previous step's prediction."""
    x0_prev, h_prev = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoise(x, sigma)
        if sigma_next == 0:  # the last step lands on D itself (λ_next = ∞)
            return x0
        h = _lambda(sigma_next) - _lambda(sigma)  # ∞ on a first step from σ=1
        x0_hat = x0
        if x0_prev is not None:
            r = h_prev / h  # ∞ after a step from σ=1: the correction vanishes, as it should
            x0_hat = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma_next / sigma) * x + (1 - sigma_next) * (-math.expm1(-h)) * x0_hat
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def sample_flowmap(denoise, x, sigmas):
    """A flow map's jumps σ_i -> σ_{i+1}: no fresh noise between them, so more steps follow the
    teacher's trajectory more closely rather than renoising away what was drawn."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = flow_map_jump(x, sigma, sigma_next, denoise(x, sigma, sigma_next))
    return x


SAMPLERS = {'ddim': sample_ddim, 'dpmpp2m': sample_dpmpp_2m, 'flowmap': sample_flowmap}


CFG_MIN_SIGMA = 0.2  # guide only the steps from σ > this (sample.py, eval.py, train.py's grids)


@torch.no_grad()
def generate(model, text_emb, noise=None, cfg=7.0, steps=15, sampler='dpmpp2m', uncond_emb=None,
             known=None, mask=None, cfg_min_sigma=CFG_MIN_SIGMA, generator=None):
    """x0 (B, C, H, W) for text embeddings (B, D_text) from noise (B, C, H, W), or noise drawn
    with generator at the model's trained size. Guidance only at σ > cfg_min_sigma (Kynkäänniemi
    et al. 2024): below, cond - uncond is mostly the model's small errors, which g > 1 amplifies.
    Outpainting: known (B, C, H, W) and mask (B, 1, H, W), 1 = generate; every x0 prediction
    keeps the known region exactly."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}', expected one of {sorted(SAMPLERS)}")
    if not 0 <= cfg_min_sigma < 1:
        raise ValueError(f"cfg_min_sigma must be in [0, 1): no guidance below this σ; got "
                         f"{cfg_min_sigma}")
    if noise is None:
        shape = (len(text_emb), model.n_channels, *trained_size(model))
        noise = torch.randn(shape, generator=generator, device=text_emb.device)
    sigmas = sigma_schedule(steps)
    cond = None if known is None else masked_input(known, mask)

    def denoiser(g):  # D(x, σ) at guidance scale g; outpainting keeps the known region
        denoise = guided_denoiser(model, text_emb, g, uncond_emb, cond)
        return denoise if known is None else lambda x, *s: torch.lerp(known, denoise(x, *s), mask)

    # two solves, one per denoiser, so that DPM-Solver++(2M) never extrapolates across the switch
    # (from a guided prediction to an unguided one); only amplifying guidance, cfg > 1, is limited
    n_guided = sum(s > cfg_min_sigma for s in sigmas[:-1]) if cfg > 1 else steps
    x = SAMPLERS[sampler](denoiser(cfg), noise.float(), sigmas[:n_guided + 1])
    return SAMPLERS[sampler](denoiser(1.0), x, sigmas[n_guided:])


# ----- flow-map distillation: a model that jumps from a noise level to any lower one -----

def mean_velocity(model, x, t, r, text_emb):
    """u(x_t, t, r) = (x_t - D(x_t, t, r)) / t: x_r = x_t - (t - r)·u is flow_map_jump."""
    return (x - model(x, t, text_emb, sigma_next=r).float()) / t.view(-1, 1, 1, 1)


def teacher_velocity(teacher, x, t, text_emb, cfg):
    """v = (x_t - D)/t, dx/dt of the teacher's ODE, with D guided at cfg where t > CFG_MIN_SIGMA
    and unguided below, as generate() samples it."""
    if cfg == 1.0:
        return (x - teacher(x, t, text_emb).float()) / t.view(-1, 1, 1, 1)
    both = teacher(torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([text_emb, torch.zeros_like(text_emb)])).float()
    x0_cond, x0_uncond = both.chunk(2)
    g = torch.where(t > CFG_MIN_SIGMA, cfg, 1.0).view(-1, 1, 1, 1)
    return (x - torch.lerp(x0_uncond, x0_cond, g)) / t.view(-1, 1, 1, 1)


FLOW_MAP_C = 1e-3  # c of the adaptive weight 1/(‖u - u*‖² + c) (MeanFlow's)


def flow_map_loss(model, student, teacher, x0, text_emb, teacher_cfg, beta_a, beta_b, ramp):
    """MeanFlow distillation (Geng et al. 2025) of the guided teacher. The mean velocity from t
    to r obeys u = v - (t - r)·du/dt, du/dt = ∂u/∂x·v + ∂u/∂t along the teacher's trajectory; u
    learns that target, made with v from the teacher and du/dt by forward-mode AD of the student
    (the same weights, unwrapped, no gradient). t ~ Beta(a, b) as in training; r ~ U(0, t) for
    half the batch, r = t for the other half: there u = v, plain distillation. Loss a row:
    ‖u - u*‖² / sg(‖u - u*‖² + c), about 1 whatever the error's size; ramp in [0, 1] scales
    du/dt in."""
    B = len(x0)
    t = sample_sigma(B, beta_a, beta_b, x0.device).clamp(min=1e-3)  # as the base model trained
    jump_to = to_device(torch.rand(B), x0.device) * 2  # r/t: U(0, 1) for half the rows
    r = torch.where(jump_to < 1, t * jump_to, t)
    x_t = add_noise(x0, t, torch.randn_like(x0))
    with torch.no_grad():
        v = teacher_velocity(teacher, x_t, t, text_emb, teacher_cfg)  # (B, C, H, W)
        target = v.clone()
        jump = (r < t).nonzero().squeeze(1)  # the rows whose du/dt counts
        with fwAD.dual_level():
            dual = mean_velocity(student, fwAD.make_dual(x_t[jump], v[jump]),
                                 fwAD.make_dual(t[jump], torch.ones_like(t[jump])), r[jump],
                                 text_emb[jump])
            du_dt = fwAD.unpack_dual(dual).tangent.float()
        target[jump] -= ramp * (t - r)[jump].view(-1, 1, 1, 1) * du_dt
    err = ((mean_velocity(model, x_t, t, r, text_emb) - target) ** 2).flatten(1).mean(1)  # (B,)
    return (err / (err.detach() + FLOW_MAP_C)).mean()


def trained_size(model):
    """(H, W) of the inputs the model was trained on, from its positional table."""
    return model.pos_emb.shape[1] * model.patch_size, model.pos_emb.shape[2] * model.patch_size


# ----- masks for outpainting and inpainting (1 = generate, 0 = known) -----

MASK_MODES = ('left', 'right', 'up', 'down', 'border', 'box')


def masked_input(known, mask):
    """The extra input channels of an outpainting model: the masked clean image and the mask."""
    return torch.cat([known * (1 - mask), mask], dim=1)  # (B, C+1, H, W)


def make_mask(mode, H, W, frac=0.5, box=None):
    """One (1, H, W) mask. 'left'/'right'/'up'/'down': generate that side (frac of the image);
    'border': keep the centre, generate a frame frac/2 wide on each side; 'box': generate
    box=(y0, x0, y1, x1)."""
    h, w = round(H * frac), round(W * frac)
    regions = {'left': (0, 0, H, w), 'right': (0, W - w, H, W), 'up': (0, 0, h, W),
               'down': (H - h, 0, H, W), 'border': (h // 2, w // 2, H - h // 2, W - w // 2),
               'box': box}  # (y0, x0, y1, x1)
    if mode not in regions:
        raise ValueError(f"unknown mask mode '{mode}', expected one of {MASK_MODES}")
    y0, x0, y1, x1 = regions[mode]
    m = torch.zeros(1, H, W)
    m[:, y0:y1, x0:x1] = 1
    return 1 - m if mode == 'border' else m  # the border: all but the centre


def random_masks(B, H, W, generator=None):
    """(B, 1, H, W) training masks drawn from MASK_MODES: half-image outpainting in 4 directions,
    a border of 1/4 to 1/2 of the size, or a box of 1/4 to 3/4 of each side for inpainting."""
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=generator))  # inclusive
    masks = []
    for _ in range(B):
        mode = MASK_MODES[randint(0, len(MASK_MODES) - 1)]
        if mode == 'box':
            bh, bw = randint(H // 4, 3 * H // 4), randint(W // 4, 3 * W // 4)
            y0, x0 = randint(0, H - bh), randint(0, W - bw)
            masks.append(make_mask('box', H, W, box=(y0, x0, y0 + bh, x0 + bw)))
        else:
            frac = 0.5 if mode != 'border' else randint(2, 4) / 8
            masks.append(make_mask(mode, H, W, frac))
    return torch.stack(masks)


# ----- interpolation -----

def slerp(a, b, t):
    """Spherical interpolation between a and b (flattened per row) at t ∈ [0, 1]. Keeps the norm of
    Gaussian noise, which a plain lerp would shrink halfway (and so give a blurry mean image)."""
    a_flat, b_flat = a.flatten(1).float(), b.flatten(1).float()
    cos = (F.normalize(a_flat, dim=1) * F.normalize(b_flat, dim=1)).sum(1).clamp(-1, 1)
    omega = torch.acos(cos)[:, None]
    so, arc = omega.sin(), torch.sin((1 - t) * omega) * a_flat + torch.sin(t * omega) * b_flat
    out = torch.where(so > 1e-6, arc / so.clamp_min(1e-6), torch.lerp(a_flat, b_flat, t))
    return out.view_as(a).to(a.dtype)

