"""
The transformer denoiser and its checkpoints, in plain PyTorch.

    model = Denoiser(n_channels=4, image_size=32, patch_size=2, embed_dim=768, n_layers=12,
                     text_emb_size=768)
    x0_pred = model(x_t, sigma, text_emb)   # (B, C, H, W), (B,), (B, D_text) -> (B, C, H, W)

The denoiser predicts the clean image x0 from x_t = (1-σ)·x0 + σ·ε (see diffusion.py). A block is
self-attention over the image tokens, then the conditioning, then an MLP with a depthwise 3×3 conv
on the token grid (LocalViT's FFN). How the text gets in is two settings:

    conditioning='adaln'  adaLN-Zero (DiT): σ and text give each block a shift, scale and gate
                          around its attention and MLP, zero-initialised so every block starts
                          as the identity (the default: it measured best)
    conditioning='cross'  the reference design: cross-attention to LayerNorm([σ token, text token])
    text_prior=16         the caption mapped to a coarse grid of codes added to the input tokens:
                          a per-position picture of what it should look like (0: off)

The reference's block is Denoiser(conditioning='cross', text_prior=0). Denoiser(flow_map=True)
also takes the noise level it jumps to: a few-step flow map (diffusion.flow_map_loss tunes one).
"""
import contextlib
import math
import os
import shutil

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

CONDITIONINGS = ('cross', 'adaln')
PRIOR_GRID = 8  # the text prior's grid, resized to the token grid: a coarse layout at any size


def sinusoidal_embedding(sigma, dim, max_period=10_000.0):
    """σ (B,) in [0, 1] -> (B, dim) sin/cos features at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device) / half)
    angles = 1000.0 * sigma.float()[:, None] * freqs[None]  # ×1000: small σ still turns the angles
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# ----- the one CPU fast path: attention in bf16 training -----
CPU_BF16_TRAINING_ATTENTION = True  # False: SDPA everywhere, which computes the same


def attention(q, k, v, dropout=0.0):
    """softmax(q·kᵀ/√d)·v for (B, h, N, d) queries, (B, h, L, d) keys and values: SDPA, but two
    matmuls and a softmax in CPU bf16 training, where SDPA's backward is slow (docs/speed.md), and
    under forward-mode AD (a flow map's target), which SDPA lacks on the CPU."""
    bf16_cpu_training = (CPU_BF16_TRAINING_ATTENTION and q.device.type == 'cpu'
                         and torch.is_grad_enabled() and torch.is_autocast_enabled('cpu')
                         and torch.get_autocast_dtype('cpu') == torch.bfloat16)
    if bf16_cpu_training or fwAD.unpack_dual(q).tangent is not None:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, h, N, L)
        return F.dropout(scores.softmax(dim=-1), dropout) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # flash attention go brrr


class Attention(nn.Module):
    """Multi-head attention of the image tokens (B, N, D) to themselves or, given one, to a short
    context (B, L, D): the reference's cross-attention. No output projection: the MLP mixes the
    heads."""

    def __init__(self, dim, head_dim, dropout):
        super().__init__()
        self.n_heads, self.dropout = dim // head_dim, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # the q, k and v projections, stacked

    def forward(self, x, context=None):
        if context is None:  # one matmul for all three
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:  # queries from the image tokens, keys and values from the context
            w_q, w_kv = self.qkv.weight.split([x.shape[-1], 2 * x.shape[-1]])
            q, (k, v) = F.linear(x, w_q), F.linear(context, w_kv).chunk(2, dim=-1)
        q, k, v = (rearrange(t, 'b n (h d) -> b h n d', h=self.n_heads) for t in (q, k, v))
        y = attention(q, k, v, self.dropout if self.training else 0.0)  # (B, h, N, hd)
        return rearrange(y, 'b h n d -> b n (h d)')


class ConvMLP(nn.Module):
    """Linear -> depthwise 3×3 conv on the token grid -> GELU -> Linear (LocalViT's FFN): patches
    talk to their neighbours, which removes the patchy look of plain ViT denoisers."""

    def __init__(self, dim, mult, dropout):
        super().__init__()
        hidden = mult * dim
        self.fc1 = nn.Linear(dim, hidden, bias=False)  # the conv's bias follows
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, grid):  # (B, N, D)
        h = rearrange(self.fc1(x), 'b (h w) c -> b c h w', h=grid[0])  # a channels-last view
        h = rearrange(F.gelu(self.dwconv(h)), 'b c h w -> b (h w) c')
        return self.dropout(self.fc2(h))


def modulate(x, shift, scale):
    """adaLN: x·(1 + scale) + shift, per sample; x (B, N, D), shift and scale (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


class Block(nn.Module):
    """x + attention, (the reference: + cross-attention to the context), + MLP; with adaLN, each
    sublayer's input is normalised, then shifted and scaled, and its output gated, per sample."""

    def __init__(self, dim, head_dim, mlp_multiplier, dropout, conditioning):
        super().__init__()
        self.adaln = conditioning == 'adaln'
        self.norm_attn = nn.LayerNorm(dim, elementwise_affine=not self.adaln)
        self.attn = Attention(dim, head_dim, dropout)
        if self.adaln:  # shift, scale, gate for the attention and for the MLP, from (σ, text)
            self.modulation = nn.Linear(dim, 6 * dim)
            nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: each block starts as the identity
            nn.init.zeros_(self.modulation.bias)
        else:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = Attention(dim, head_dim, dropout)
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=not self.adaln)
        self.mlp = ConvMLP(dim, mlp_multiplier, dropout)

    def forward(self, x, c, grid):  # x (B, N, D); c: the context (B, L, D) or adaLN input (B, D)
        if not self.adaln:
            x = x + self.attn(self.norm_attn(x))
            x = x + self.cross(self.norm_cross(x), c)
            return x + self.mlp(self.norm_mlp(x), grid)
        (shift_attn, scale_attn, gate_attn,
         shift_mlp, scale_mlp, gate_mlp) = self.modulation(c)[:, None].chunk(6, dim=-1)  # (B,1,D)
        h = self.attn(modulate(self.norm_attn(x), shift_attn, scale_attn))
        x = torch.addcmul(x, gate_attn, h)  # x + gate · h
        h = self.mlp(modulate(self.norm_mlp(x), shift_mlp, scale_mlp), grid)
        return torch.addcmul(x, gate_mlp, h)


class Denoiser(nn.Module):
    def __init__(self, n_channels=4, image_size=32, patch_size=2, embed_dim=768, n_layers=12,
                 mlp_multiplier=4, head_dim=64, dropout=0.0, text_emb_size=768, cond_channels=0,
                 conditioning='adaln', text_prior=16, flow_map=False):
        super().__init__()
        H, W = (image_size,) * 2 if isinstance(image_size, int) else image_size
        if embed_dim % head_dim or H % patch_size or W % patch_size:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of head_dim={head_dim}, "
                             f"image_size={image_size} of patch_size={patch_size}")
        if conditioning not in CONDITIONINGS or text_prior < 0:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS} and text_prior >= 0, "
                             f"got {conditioning!r} and {text_prior}")
        self.n_channels, self.cond_channels, self.patch_size = n_channels, cond_channels, patch_size
        self.conditioning, self.has_prior, D = conditioning, text_prior > 0, embed_dim
        # (c p1 p2) order: the inputs of extra channels come after those of the image,
        # which is what lets widen_input() add channels without touching the old weights
        self.patch_in = nn.Linear((n_channels + cond_channels) * patch_size ** 2, D)
        self.pos_emb = nn.Parameter(torch.randn(1, H // patch_size, W // patch_size, D) * 0.02)
        self.sigma_mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        if conditioning == 'cross':
            self.text_proj = nn.Linear(text_emb_size, D)  # the reference: one linear text token
            self.context_norm = nn.LayerNorm(D)
        else:  # a nonlinear text code for the modulations
            self.text_proj = nn.Sequential(nn.Linear(text_emb_size, D), nn.GELU(), nn.Linear(D, D))
        if text_prior:  # caption -> (8, 8, text_prior) -> D per position, zero at the start
            self.prior_in = nn.Linear(text_emb_size, PRIOR_GRID ** 2 * text_prior)
            self.prior_out = nn.Linear(text_prior, D, bias=False)
            nn.init.zeros_(self.prior_out.weight)
        self.blocks = nn.ModuleList(Block(D, head_dim, mlp_multiplier, dropout, conditioning)
                                    for _ in range(n_layers))
        self.norm_out = nn.LayerNorm(D)
        self.patch_out = nn.Linear(D, n_channels * patch_size ** 2)
        self.flow_map = False
        if flow_map:  # last: the parameters in the order of a map added to a trained model
            self.add_flow_map()  # (an optimizer's state follows that order on a resume)

    def forward(self, x, sigma, text_emb, cond=None, sigma_next=None):
        """x (B, C, H, W) noisy, sigma (B,), text_emb (B, D_text), cond (B, cond_channels, H, W)
        (outpainting: the masked image and the mask) -> the x0 prediction (B, C, H, W). A flow
        map also takes the level it jumps to, sigma_next (B,), default sigma (flow_map_jump)."""
        if cond is not None:
            x = torch.cat([x, cond], dim=1)  # (B, C + Cc, H, W)
        p = self.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p)
        tokens = rearrange(x, 'b c (h p1) (w p2) -> b h w (c p1 p2)', p1=p, p2=p)
        tokens = self.patch_in(tokens) + resize_positional_table(self.pos_emb, grid)  # (B,h,w,D)
        if self.has_prior:  # the caption's own offset per position, (B, 8, 8, r)
            prior = self.prior_in(text_emb).view(len(text_emb), PRIOR_GRID, PRIOR_GRID, -1)
            tokens = tokens + self.prior_out(resize_positional_table(prior, grid))  # (B, h, w, D)
        tokens = tokens.flatten(1, 2)  # (B, N, D)

        sigma_emb = self.sigma_mlp(sinusoidal_embedding(sigma, tokens.shape[-1]))  # (B, D)
        if self.flow_map:  # the jump's length, 0 for the plain denoiser
            gap = sigma - sigma_next if sigma_next is not None else torch.zeros_like(sigma)
            sigma_emb = sigma_emb + self.gap_mlp(sinusoidal_embedding(gap, tokens.shape[-1]))
        elif sigma_next is not None:
            raise ValueError("sigma_next is for a flow map; this model is a plain denoiser")
        text = self.text_proj(text_emb)  # (B, D)
        if self.conditioning == 'adaln':
            c = F.silu(sigma_emb + text)  # (B, D), the input of every modulation
        else:
            c = self.context_norm(torch.stack([sigma_emb, text], 1))  # (B, 2, D)
        for block in self.blocks:
            tokens = block(tokens, c, grid)

        out = self.patch_out(self.norm_out(tokens))  # (B, N, C·p·p)
        return rearrange(out, 'b (h w) (c p1 p2) -> b c (h p1) (w p2)', h=grid[0], p1=p, p2=p)

    @torch.no_grad()
    def widen_input(self, cond_channels):
        """Add extra input channels whose weights start at zero, so the widened model computes
        exactly what it did before (how the reference's outpainting model was made)."""
        old = self.patch_in
        extra = (cond_channels - self.cond_channels) * self.patch_size ** 2
        self.patch_in = nn.Linear(old.in_features + extra, old.out_features).to(old.weight)
        self.patch_in.weight.zero_()
        self.patch_in.weight[:, :old.in_features] = old.weight
        self.patch_in.bias.copy_(old.bias)
        self.cond_channels = cond_channels

    def add_flow_map(self):
        """The input of a flow map's jump length σ - σ_next, its last layer zero: the model
        computes exactly what it did before, at every jump (diffusion.flow_map_loss tunes it)."""
        D = self.sigma_mlp[0].in_features
        self.gap_mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.gap_mlp.to(self.sigma_mlp[0].weight)
        nn.init.zeros_(self.gap_mlp[2].weight)
        nn.init.zeros_(self.gap_mlp[2].bias)
        self.flow_map = True

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def resize_positional_table(table, grid):
    """(B, h, w, D) -> (B, *grid, D), bilinear on the 2-D grid: a size never trained at."""
    if tuple(grid) == tuple(table.shape[1:3]):
        return table
    t = rearrange(table, 'b h w d -> b d h w')
    t = F.interpolate(t.float(), size=tuple(grid), mode='bilinear', align_corners=False)
    return rearrange(t, 'b d h w -> b h w d').to(table.dtype)


# ----- precision and random state -----

PTDTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def resolve_dtype(dtype, device):
    """'auto' -> the fastest dtype for the device, for the denoiser and the encoders alike. GPUs:
    bf16 from compute capability 8 on, else fp16 (is_bf16_supported() says yes to a V100, which
    emulates it). CPUs: bf16 where matmuls have it natively (AVX512-bf16, AMX), else fp32."""
    if dtype != 'auto':
        if dtype not in PTDTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(PTDTYPES)}, got {dtype!r}")
        return dtype
    device = torch.device(device)
    if device.type == 'cuda':
        return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'
    if device.type == 'cpu' and getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)():
        return 'bfloat16'
    return 'float32'


def gpu_problem():
    """Why this machine's NVIDIA GPU cannot run this torch, in one line, or None: a driver too old
    for the wheel's CUDA (torch sees no GPU), or a GPU the wheel has no kernels for."""
    if not torch.cuda.is_available():
        if os.path.exists('/proc/driver/nvidia') or shutil.which('nvidia-smi'):
            return (f"an NVIDIA GPU is here but torch {torch.__version__} cannot use it (built "
                    f"for CUDA {torch.version.cuda or 'none: a CPU build'}; an older driver?): "
                    f"running on the CPU. README, GPUs, says which torch to install")
        return None
    major, minor = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()  # 'sm_80': binaries, 'compute_90': PTX for newer GPUs
    cap, nums = 10 * major + minor, lambda p: [int(a[len(p):]) for a in archs if a.startswith(p)]
    if archs and not any(a // 10 == major and a <= cap for a in nums('sm_')) \
            and not any(a <= cap for a in nums('compute_')):
        return (f"torch {torch.__version__} has no kernels for this GPU (sm_{cap}; it has "
                f"{' '.join(archs)}): README, GPUs, says which torch to install")
    return None


def rng_state(device):
    """This process's CPU and own-GPU random state, for an exact resume."""
    cuda = torch.cuda.get_rng_state(device) if torch.device(device).type == 'cuda' else None
    return {'torch': torch.get_rng_state(), 'cuda': cuda}


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    if torch.device(device).type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'], device)


def autocast(device, dtype):
    """Autocast to a resolved dtype (none for float32): fp32 weights, matmuls in dtype."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PTDTYPES[dtype])


# ----- checkpoints -----

def load_checkpoint(path, device='cpu'):
    """Load a train.py checkpoint safely (weights_only: tensors and plain containers, no code)."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at '{path}' "
                                f"(train one with: python train.py config/tiny.py)")
    try:  # mmap: only what is used is read (sample.py needs the EMA weights, not AdamW's state)
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # torch's own message would suggest unsafe loading: never say that
        raise ValueError(f"'{path}' is not a nanoTLD checkpoint (torch.load with weights_only "
                         f"failed: {type(e).__name__})") from None
    if missing := {'model', 'model_args'} - set(ckpt if isinstance(ckpt, dict) else {}):
        raise ValueError(f"'{path}' is not a nanoTLD checkpoint: missing {sorted(missing)}")
    return ckpt


def denoiser_from_checkpoint(ckpt, ema=True):
    """The Denoiser of a checkpoint, with its EMA weights by default."""
    model = Denoiser(**ckpt['model_args'])
    state = ckpt['ema'] if ema and ckpt.get('ema') is not None else ckpt['model']
    model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in state.items()})
    return model.eval()


def finetune_from(ckpt, image_size, cond_channels, dropout=0.0, flow_map=False):
    """A checkpoint's EMA model to fine-tune at image_size (H, W) with cond_channels inputs, made
    a flow map if asked: new inputs start at zero, so step 0 computes what the old model did.
    -> (model, args)."""
    model = denoiser_from_checkpoint(dict(ckpt, model_args={**ckpt['model_args'],
                                                            'dropout': dropout})).train()
    H, W = image_size
    grid = (H // model.patch_size, W // model.patch_size)  # the same size keeps the same values
    model.pos_emb = nn.Parameter(resize_positional_table(model.pos_emb.data, grid))
    if model.cond_channels == 0 and cond_channels > 0:
        model.widen_input(cond_channels)
    if flow_map and not model.flow_map:
        model.add_flow_map()
    args = dict(ckpt['model_args'], image_size=H if H == W else (H, W),
                cond_channels=model.cond_channels, dropout=dropout, flow_map=model.flow_map)
    return model, args
