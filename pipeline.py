"""
Text -> images with a trained nanoTLD checkpoint: the pieces that sample.py, eval.py, bench.py and
train.py share. A library: no settings of its own, every function takes its arguments.

    from pipeline import load_pipeline, make_noise, generate_images, save_grid
    pipe = load_pipeline('out-tiny', device='cpu', dtype='float32')   # a run dir or a ckpt file
    images = generate_images(pipe, ['a cat', 'a dog'], n=4, cfg=7, seed=0)  # (8, 3, H, W) in [0, 1]
    save_grid(images, 4, 'cats.png', zoom=0)       # one row per prompt; zoom 0: tiles >= 128 px

    # the same in three phases, which bench.py times apart
    text_emb = pipe.encode_text(['a cat'] * 4)                     # (4, D_text)
    noise = make_noise(range(4), pipe.latent_shape())              # (4, C, h, w)
    x0 = pipe.sample_latents(text_emb, noise, cfg=7, steps=15)     # model space
    images = pipe.decode(x0)                                       # (4, 3, H, W) in [0, 1]

    # from text embeddings computed before (eval.py): no text encoder is loaded
    pipe = load_pipeline('out-tiny', device='cpu', text_encoder=False)
"""
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import sources
from diffusion import generate, lerp, make_mask, slerp, trained_size
from encoders import ImageCodec, TextEncoder
from model import autocast, denoiser_from_checkpoint, load_checkpoint, resolve_dtype

OUTPAINT_DIRECTIONS = ('right', 'left', 'up', 'down')
VIEW_SIZE = 128  # zoom=0 enlarges the saved tiles to at least this many pixels a side


class Pipeline:
    """A trained denoiser with the frozen text encoder and image codec its data was prepared with.
    The three phases are separate methods so that they can be timed on their own (bench.py)."""

    def __init__(self, model, text_encoder, codec, scale_factor, device='cpu', dtype='auto'):
        self.model, self.text_encoder, self.codec = model, text_encoder, codec
        self.scale_factor, self.device = scale_factor, device
        self.dtype = resolve_dtype(dtype, device)
        self.ctx = autocast(device, self.dtype)  # the denoiser only: the sampler's math is fp32

    def latent_shape(self, size=None):
        """(C, h, w) of the model-space tensors for images of `size` pixels, an int or (H, W);
        default the trained size. A size that is not a multiple of patch_size × the VAE's
        downsampling is a ValueError that says so."""
        C, ds, p = self.model.n_channels, self.codec.downsample, self.model.patch_size
        if size is None:
            return (C, *trained_size(self.model))
        H, W = (size, size) if isinstance(size, int) else size
        if H % (p * ds) or W % (p * ds) or H <= 0 or W <= 0:
            given = size if isinstance(size, int) else f'{H} {W}'
            raise ValueError(f"--size {given} is not a positive multiple of {p * ds} "
                             f"(patch_size {p} x VAE downsampling {ds})")
        return (C, H // ds, W // ds)

    def pixel_size(self, shape):
        """(H, W) in pixels of the images decoded from model-space tensors of shape (C, h, w)."""
        return shape[1] * self.codec.downsample, shape[2] * self.codec.downsample

    @torch.no_grad()
    def encode_text(self, prompts):
        """list of str -> (B, D_text) float32 on the pipeline's device."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass text embeddings instead")
        return self.text_encoder(list(prompts)).float().to(self.device)

    @torch.no_grad()
    def encode_image(self, img):
        """(B, 3, H, W) in [-1, 1] -> model space (latents × scale_factor)."""
        return self.codec.encode(img.to(self.device)).float() * self.scale_factor

    @torch.no_grad()
    def sample_latents(self, text_emb, noise, cfg=7.0, steps=15, sampler='dpmpp2m', uncond_emb=None,
                       known=None, mask=None, batch_size=64, cfg_min_sigma=0.2):
        """Solve from noise (B, C, h, w) to x0 (B, C, h, w) in model space for text_emb (B, D_text).
        uncond_emb (1 or B, D_text) replaces the zero embedding (a negative prompt). known/mask:
        outpainting, mask 1 = generate; an outpainting model asked for a plain image gets an
        all-generate mask. Guidance applies to the steps from σ > cfg_min_sigma (see
        diffusion.generate)."""
        B = text_emb.shape[0]
        if uncond_emb is not None:
            uncond_emb = uncond_emb.expand_as(text_emb)
        if self.model.cond_channels and known is None:
            known, mask = torch.zeros_like(noise), torch.ones_like(noise[:, :1])
        out = []
        for i in range(0, B, batch_size):
            part = lambda t: None if t is None else t[i:i + batch_size].to(self.device)
            with self.ctx:
                x0 = generate(self.model, part(text_emb), cfg=cfg, steps=steps, sampler=sampler,
                              noise=part(noise), uncond_emb=part(uncond_emb), known=part(known),
                              mask=part(mask), cfg_min_sigma=cfg_min_sigma)
            out.append(x0.float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, x, batch_size=16):
        """Model space (B, C, h, w) -> images (B, 3, H, W) in [0, 1], on the CPU."""
        return decode_latents(self.codec, x, self.scale_factor, batch_size)


def pipeline_from_checkpoint(ckpt, device='cpu', dtype='auto', compile=False, text_encoder=True,
                             source='checkpoint'):
    """A Pipeline from a loaded checkpoint (model.load_checkpoint): the EMA denoiser, the image
    codec and, unless text_encoder=False, the text encoder recorded in its data_meta. source names
    the checkpoint in errors, which are one-line ValueErrors."""
    meta = ckpt.get('data_meta') or {}
    if text_encoder and 'text_encoder' not in meta:
        raise ValueError(f"checkpoint '{source}' records no data_meta.text_encoder: "
                         f"cannot tell which text encoder its data was prepared with")
    model = denoiser_from_checkpoint(ckpt, ema=True).to(device)
    amp = resolve_dtype(dtype, device) != 'float32'  # the encoders pick their own half type
    encoder = TextEncoder(meta['text_encoder'], device=device, amp=amp) if text_encoder else None
    width = ckpt['model_args'].get('text_emb_size')
    if encoder is not None and width is not None and encoder.dim != width:
        raise ValueError(f"text encoder '{meta['text_encoder']}' gives {encoder.dim}-d embeddings, "
                         f"but the model in '{source}' expects {width}")
    codec = ImageCodec(meta.get('vae', 'none'), device=device, amp=amp)
    scale_factor = float(meta.get('scale_factor', codec.scale_factor))
    params = sum(p.numel() for p in model.parameters())
    if compile:
        model = compile_for_inference(model)
    pipe = Pipeline(model, encoder, codec, scale_factor, device, dtype)
    pipe.ckpt_info = dict(iter_num=ckpt.get('iter_num'), text_encoder=meta.get('text_encoder'),
                          vae=meta.get('vae', 'none'), params=params)
    return pipe


def compile_for_inference(model):
    """torch.compile the model's forward for sampling, in place. On a CPU with inductor's freezing:
    the weights become constants, so they are cast to bf16 once and prepacked for oneDNN (the
    small config's 15-step guided loop of 16 images, bf16 on an AMX CPU: 1.04–1.17 s, against
    1.45 eager and 1.49 compiled without it). The weights must not change after the first call.
    Dynamo reads the flag while it traces, so it is set around each call, not for the process."""
    import torch._inductor.config as inductor_config
    forward = torch.compile(model.forward)
    freezing = next(model.parameters()).device.type == 'cpu'

    def frozen_forward(*args, **kwargs):
        with inductor_config.patch(freezing=freezing):
            return forward(*args, **kwargs)
    model.forward = frozen_forward
    return model


def load_pipeline(path, device='cpu', dtype='auto', compile=False, text_encoder=True):
    """pipeline_from_checkpoint for a checkpoint file or a run dir. Raises FileNotFoundError or
    ValueError with a one-line message."""
    return pipeline_from_checkpoint(load_checkpoint(path, device='cpu'), device, dtype, compile,
                                    text_encoder, source=path)


def make_noise(seeds, shape):
    """One (C, h, w) Gaussian per seed, drawn on the CPU so that a seed gives the same noise on
    every device -> (len(seeds), C, h, w)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in seeds])


def generate_images(pipe, prompts, n=1, cfg=7.0, steps=15, sampler='dpmpp2m', seed=0, negative='',
                    size=None, batch_size=64, decode_batch_size=16, cfg_min_sigma=0.2):
    """n images for each prompt -> (len(prompts)·n, 3, H, W) in [0, 1], prompt-major; image j of
    every prompt starts from the noise of seed + j."""
    text = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (P·n, D_text)
    uncond = pipe.encode_text([negative]) if negative else None  # (1, D_text)
    noise = make_noise([seed + j for j in range(n)], pipe.latent_shape(size))
    x0 = pipe.sample_latents(text, noise.repeat(len(prompts), 1, 1, 1), cfg, steps, sampler,
                             uncond, batch_size=batch_size, cfg_min_sigma=cfg_min_sigma)
    return pipe.decode(x0, decode_batch_size)


# ----- the other modes: interpolation and outpainting -----

def interpolation_inputs(text_emb, shape, n, frames, seed, seeds=None):
    """Inputs for n rows of `frames` images. text_emb (2, D): lerped from the first to the second;
    (1, D): kept. seeds (a, b): row j's noise slerped from seed a+j to b+j; else seed+j kept.
    -> text (n·frames, D), noise (n·frames, C, h, w)."""
    t = torch.linspace(0, 1, frames)[:, None]  # (frames, 1)
    if len(text_emb) == 2:
        text = lerp(text_emb[:1], text_emb[1:], t.to(text_emb))  # (frames, D)
    else:
        text = text_emb.expand(frames, -1)
    rows = []
    for j in range(n):
        if seeds:
            a, b = make_noise([seeds[0] + j], shape), make_noise([seeds[1] + j], shape)
            rows.append(slerp(a.expand(frames, *shape), b.expand(frames, *shape), t))
        else:
            rows.append(make_noise([seed + j], shape).expand(frames, *shape))
    return text.repeat(n, 1), torch.cat(rows)


def outpaint_strip(pipe, text_emb, start, direction, repeat, generators, sample_kw):
    """Extend `start` (B, C, h, w) in model space `repeat` times: each time the canvas slides by
    half in `direction`, the half it keeps is the known region and the other half is generated,
    from noise drawn from generators (one per row). Returns the strip (B, C, h, w + repeat·w/2) for
    right/left, taller for up/down. sample_kw: Pipeline.sample_latents' settings."""
    _, C, h, w = start.shape
    dim, length = (3, w) if direction in ('right', 'left') else (2, h)
    half = length // 2
    forward = direction in ('right', 'down')  # the strip grows at its end
    mask = make_mask(direction, h, w, frac=0.5)[None].expand(len(start), 1, h, w)  # (B, 1, h, w)
    strip, canvas = start, start
    for _ in range(repeat):
        known = torch.roll(canvas, -half if forward else half, dims=dim)  # the kept half moves over
        noise = torch.stack([torch.randn((C, h, w), generator=g) for g in generators])
        canvas = pipe.sample_latents(text_emb, noise, known=known, mask=mask, **sample_kw)
        new = canvas.narrow(dim, length - half, half) if forward else canvas.narrow(dim, 0, half)
        strip = torch.cat([strip, new] if forward else [new, strip], dim=dim)
    return strip


# ----- images in and out -----

def to_unit(images):
    """Images in [-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def decode_latents(codec, x, scale_factor, batch_size=16):
    """Model space (B, C, h, w) -> images (B, 3, H, W) in [0, 1] on the CPU, batch_size at once."""
    images = [codec.decode(x[i:i + batch_size] / scale_factor).float().cpu()
              for i in range(0, x.shape[0], batch_size)]
    return to_unit(torch.cat(images))


def slug(text, max_len=60):
    """A file-name-safe version of a prompt: 'A cute owl!' -> 'a_cute_owl'."""
    return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')[:max_len] or 'prompt'


def read_image(path, size):
    """An image file -> (1, 3, H, W) in [-1, 1], prepared as training data is for a square size
    (transparency onto white, short side resized, centre crop), else resized to (H, W)."""
    if size[0] == size[1]:
        pixels = sources.read_image(path, size[0], min_size=1)  # (H, W, 3) uint8
    else:
        img = Image.open(path).convert('RGB')
        print(f"note: resizing {path} from {img.size[0]}x{img.size[1]} to {size[1]}x{size[0]}")
        pixels = np.asarray(img.resize((size[1], size[0]), Image.BICUBIC))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]


def read_mask(path, size, downsample):
    """A mask image (white = generate) -> (1, 1, H/ds, W/ds) in {0, 1} on the model's grid. A latent
    cell is generated if any of its pixels is, so the known region is only cells fully known."""
    m = Image.open(path).convert('L').resize((size[1], size[0]), Image.NEAREST)
    m = torch.from_numpy(np.asarray(m).copy()).float()[None, None] / 255 > 0.5
    return F.max_pool2d(m.float(), downsample) if downsample > 1 else m.float()


def auto_zoom(height, width):
    """The smallest integer enlargement that makes a height × width tile >= VIEW_SIZE px a side."""
    return max(1, math.ceil(VIEW_SIZE / min(height, width)))


def save_grid(images, nrow, path, individual_names=(), zoom=1, padding=2):
    """Write images (B, 3, H, W) in [0, 1] as one grid PNG of nrow images a row and, if names are
    given, each image on its own in a folder named like the grid. zoom enlarges them (nearest
    neighbour): a factor, or 0 for auto_zoom. Returns the paths written."""
    from torchvision.utils import save_image  # here: its import takes ~1 s, errors need not wait
    zoom = zoom or auto_zoom(*images.shape[-2:])
    if zoom > 1:
        images = F.interpolate(images, scale_factor=zoom, mode='nearest')
    def save(x, p, **kw):  # atomic: a tmp file, renamed
        save_image(x, p + '.tmp', format='png', **kw)
        os.replace(p + '.tmp', p)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    save(images, path, nrow=nrow, padding=padding, pad_value=1.0)
    written = [path]
    if individual_names:
        folder = os.path.splitext(path)[0]
        os.makedirs(folder, exist_ok=True)
        for img, name in zip(images, individual_names):
            written.append(os.path.join(folder, name + '.png'))
            save(img, written[-1])
    return written
