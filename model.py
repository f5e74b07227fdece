"""
The transformer denoiser, and the frozen encoders around it.

    model = Denoiser(n_channels=4, image_size=32, patch_size=2, embed_dim=768, n_layers=12,
                     text_emb_size=768)
    x0_pred = model(x_t, sigma, text_emb)   # (B, C, H, W), (B,), (B, D_text) -> (B, C, H, W)

The denoiser predicts the clean image x0 from x_t = (1-σ)·x0 + σ·ε (see diffusion.py).
Each block: self-attention over the image tokens, cross-attention to a 2-token context
[noise embedding, text embedding], and an MLP with a depthwise 3×3 conv on the token grid.
"""
import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def sinusoidal_embedding(sigma, dim, max_period=10_000.0):
    """σ (B,) in [0, 1] -> (B, dim) sin/cos features at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device) / half)
    angles = 1000.0 * sigma.float()[:, None] * freqs[None]  # σ·1000 so small σ still moves the angles
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection. As in the reference model there is no
    output projection: heads are concatenated into the residual and the MLP that follows mixes them."""

    def __init__(self, dim, head_dim, dropout):
        super().__init__()
        self.n_heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.dropout = dropout

    def forward(self, x):  # (B, N, D)
        q, k, v = rearrange(self.qkv(x), 'b n (three h d) -> three b h n d', three=3, h=self.n_heads)
        dropout = self.dropout if self.training else 0.0
        if x.is_cuda:  # flash attention make GPU go brrrrr
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, h, N, hd)
        else:  # on CPU, two bf16 matmuls and a softmax beat SDPA's kernel ~1.6x (bench.py)
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, h, N, N)
            y = F.dropout(attn.softmax(dim=-1), dropout, self.training) @ v
        return rearrange(y, 'b h n d -> b n (h d)')


class CrossAttention(nn.Module):
    """Image tokens attend to a short context (here 2 tokens: noise level and text).
    With so few keys, the softmax is done with plain tensor ops: SDPA's CPU kernels are slow
    for this shape, in bf16 above all (see ../shared/PERF.md)."""

    def __init__(self, dim, head_dim, dropout):
        super().__init__()
        self.n_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, context):  # x (B, N, D), context (B, L, D)
        q = rearrange(self.q(x), 'b n (h d) -> b h n d', h=self.n_heads)
        k, v = rearrange(self.kv(context), 'b l (two h d) -> two b h l d', two=2, h=self.n_heads)
        attn = (q @ (k.transpose(-1, -2) * self.scale)).softmax(dim=-1)  # (B, h, N, L)
        y = self.dropout(attn) @ v  # (B, h, N, hd)
        return rearrange(y, 'b h n d -> b n (h d)')


class ConvMLP(nn.Module):
    """Linear -> depthwise 3×3 conv on the token grid -> GELU -> Linear (LocalViT's FFN).
    The linears run on (B, N, D) tokens; the conv sees the same memory as a channels-last
    (B, D, H, W) tensor, so neither rearrange copies."""

    def __init__(self, dim, mult, dropout):
        super().__init__()
        hidden = mult * dim
        self.fc1 = nn.Linear(dim, hidden, bias=False)  # the conv's bias follows
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, grid):  # (B, N, D)
        B, N, _ = x.shape
        h = self.fc1(x)  # (B, N, mD)
        h = h.view(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (B, mD, H, W), channels-last strides
        h = self.dwconv(h).permute(0, 2, 3, 1).reshape(B, N, -1)  # back to (B, N, mD), a view
        return self.dropout(self.fc2(F.gelu(h)))


class Block(nn.Module):
    def __init__(self, dim, head_dim, mlp_multiplier, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = ConvMLP(dim, mlp_multiplier, dropout)

    def forward(self, x, context, grid):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), context)
        x = x + self.mlp(self.norm3(x), grid)
        return x


class Denoiser(nn.Module):
    def __init__(self, n_channels=4, image_size=32, patch_size=2, embed_dim=768, n_layers=12,
                 mlp_multiplier=4, head_dim=64, dropout=0.0, text_emb_size=768, cond_channels=0):
        super().__init__()
        if embed_dim % head_dim:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of head_dim={head_dim}")
        H, W = _pair(image_size)
        if H % patch_size or W % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        self.n_channels, self.cond_channels, self.patch_size = n_channels, cond_channels, patch_size
        # (c p1 p2) order: the inputs of extra channels are appended after those of the image,
        # which is what lets widen_input() add channels without touching the old weights
        self.patch_in = nn.Linear((n_channels + cond_channels) * patch_size ** 2, embed_dim)
        self.pos_emb = nn.Parameter(torch.randn(1, H // patch_size, W // patch_size, embed_dim) * 0.02)
        self.sigma_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(),
                                       nn.Linear(embed_dim, embed_dim))
        self.text_proj = nn.Linear(text_emb_size, embed_dim)
        self.context_norm = nn.LayerNorm(embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, head_dim, mlp_multiplier, dropout)
                                    for _ in range(n_layers))
        self.norm_out = nn.LayerNorm(embed_dim)
        self.patch_out = nn.Linear(embed_dim, n_channels * patch_size ** 2)

    def forward(self, x, sigma, text_emb, cond=None):
        """x (B, C, H, W) noisy input, sigma (B,), text_emb (B, D_text),
        cond (B, cond_channels, H, W) extra inputs (masked image and mask for outpainting).
        Returns the x0 prediction, (B, C, H, W)."""
        if cond is not None:
            x = torch.cat([x, cond], dim=1)  # (B, C + Cc, H, W)
        p = self.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p)
        tokens = rearrange(x, 'b c (h p1) (w p2) -> b h w (c p1 p2)', p1=p, p2=p)
        tokens = self.patch_in(tokens) + self.positional_table(grid)  # (B, h, w, D)
        tokens = tokens.flatten(1, 2)  # (B, N, D)

        sigma_emb = self.sigma_mlp(sinusoidal_embedding(sigma, tokens.shape[-1]).to(tokens.dtype))
        context = self.context_norm(torch.stack([sigma_emb, self.text_proj(text_emb)], dim=1))  # (B, 2, D)

        for block in self.blocks:
            tokens = block(tokens, context, grid)

        out = self.patch_out(self.norm_out(tokens))  # (B, N, C·p·p)
        return rearrange(out, 'b (h w) (c p1 p2) -> b c (h p1) (w p2)', h=grid[0], p1=p, p2=p)

    def positional_table(self, grid):
        """The (1, h, w, D) positional table for a token grid, resized bilinearly when the grid
        differs from the trained one (sampling at a size that was never trained)."""
        if tuple(grid) == tuple(self.pos_emb.shape[1:3]):
            return self.pos_emb
        return resize_positional_table(self.pos_emb, grid)

    @torch.no_grad()
    def resize_pos_emb(self, image_size):
        """Resize the positional table for a new image_size and keep it (fine-tuning at a new size)."""
        H, W = _pair(image_size)
        grid = (H // self.patch_size, W // self.patch_size)
        self.pos_emb = nn.Parameter(resize_positional_table(self.pos_emb.data, grid))

    @torch.no_grad()
    def widen_input(self, cond_channels):
        """Add extra input channels whose weights start at zero, so the widened model computes
        exactly what it did before (how the reference's outpainting model was made)."""
        old = self.patch_in
        extra = (cond_channels - self.cond_channels) * self.patch_size ** 2
        if extra < 0:
            raise ValueError(f"cannot narrow the input from {self.cond_channels} to {cond_channels} cond channels")
        self.patch_in = nn.Linear(old.in_features + extra, old.out_features).to(old.weight)
        self.patch_in.weight.zero_()
        self.patch_in.weight[:, :old.in_features] = old.weight
        self.patch_in.bias.copy_(old.bias)
        self.cond_channels = cond_channels

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def resize_positional_table(table, grid):
    """(1, h, w, D) -> (1, *grid, D), bilinear on the 2-D grid. The same size returns the same values."""
    t = rearrange(table, '1 h w d -> 1 d h w')
    t = F.interpolate(t.float(), size=tuple(grid), mode='bilinear', align_corners=False)
    return rearrange(t, '1 d h w -> 1 h w d').to(table.dtype)


# ----- precision -----

PTDTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def resolve_dtype(dtype, device):
    """'auto' -> the fastest dtype for the device: bf16 on GPUs that have it (Ampere on) and on CPUs with
    native bf16 matmuls (AVX512-bf16: ~2x fp32 on the dev machines), where elsewhere it is emulated and slow."""
    if dtype != 'auto':
        return dtype
    if torch.device(device).type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if torch.device(device).type == 'cpu' and getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)():
        return 'bfloat16'
    return 'float32'


def autocast(device, dtype):
    """The autocast context for a resolved dtype: none for float32. Weights stay fp32; matmuls run in
    dtype. Sampler arithmetic and losses are done in fp32 outside of it."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PTDTYPES[dtype])


# ----- checkpoints -----

def load_checkpoint(path, device='cpu'):
    """Load a train.py checkpoint safely (weights_only: tensors and plain containers, no pickled code)."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at '{path}' (train one with: python train.py config/tiny.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"'{path}' is not a readable nanoTLD checkpoint: {type(e).__name__}: {e}") from None
    missing = {'model', 'model_args'} - set(ckpt)
    if missing:
        raise ValueError(f"'{path}' is not a nanoTLD checkpoint: missing {sorted(missing)}")
    return ckpt


def denoiser_from_checkpoint(ckpt, ema=True):
    """Rebuild the Denoiser from the args stored in a checkpoint, with its EMA weights by default."""
    model = Denoiser(**ckpt['model_args'])
    state = ckpt['ema'] if ema and ckpt.get('ema') is not None else ckpt['model']
    model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in state.items()})
    return model.eval()
