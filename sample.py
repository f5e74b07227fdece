"""
Sample images from a trained nanoTLD model.

    python sample.py --out_dir=out-tiny --prompt "a cute owl" --cfg 7
    python sample.py --out_dir=out-tiny --prompt_file=prompts.txt --n=8 --seed=11 --individual
    python sample.py --ckpt=out-tiny/ckpt.pt --prompt "a cat" --negative "a red cat" --sampler=ddim --steps=30
    python sample.py --out_dir=out-tiny --prompt "a cat" --cfg_min_sigma=0        # guide every step, not only σ > 0.2
    python sample.py --out_dir=out-tiny --interp "a cat" "a dog" --frames 8      # walk in text space
    python sample.py --out_dir=out-tiny --prompt "a cat" --interp_seeds 1 2       # walk between two noises
    python sample.py --out_dir=out-tiny --prompt "a cat" --size 64                # a grid never trained on
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --outpaint right --repeat 4  # panorama
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --init_image in.png --mask mask.png

It writes one PNG grid (and with --individual each image too) and prints the paths. Image j of every
prompt starts from the noise of seed+j, so the same arguments give bit-identical images, and the
rows of a --prompt_file grid are comparable. Importable pieces (bench.py and eval.py use them):

    pipe = load_pipeline('out-tiny', device='cpu', dtype='float32')
    text_emb = pipe.encode_text(['a cat'] * 4)                                 # (4, D_text)
    x0 = pipe.denoise(text_emb, make_noise(range(4), pipe.latent_shape()), cfg=7, steps=15)
    images = pipe.decode(x0)                                                   # (4, 3, H, W) in [0, 1]
    images = generate_images(pipe, ['a cat', 'a dog'], n=4, cfg=7, seed=0)     # all three at once
"""
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from configurator import configure
from diffusion import SAMPLERS, generate, lerp, make_mask, slerp, trained_size
from encoders import ImageCodec, TextEncoder
from model import PTDTYPES, denoiser_from_checkpoint, load_checkpoint, resolve_dtype

# -----------------------------------------------------------------------------
# what to sample from
out_dir = 'out'  # the training run: out_dir/ckpt.pt
ckpt = ''  # or a checkpoint file, which wins over out_dir
# what to sample
prompt = 'a cute owl'
prompt_file = ''  # many prompts, one per line: one grid row each
negative = ''  # a prompt to steer away from: replaces the zero "unconditional" embedding (on the guided steps)
n = 4  # images per prompt
cfg = 7.0  # classifier-free guidance scale; 1 = no guidance (and half the compute)
cfg_min_sigma = 0.2  # guide only the steps from σ > this (a limited guidance interval); 0 = every step
seed = 0  # image j of every prompt starts from the noise of seed + j
steps = 15
sampler = 'dpmpp2m'  # 'dpmpp2m' or 'ddim'
size = None  # pixels, int or (H, W): a grid other than the trained one (the positional table is resized)
# interpolation: a strip of `frames` images per row, one row per image (--n)
interp = []  # two prompts: walk from the first to the second in text-embedding space, noise fixed
interp_seeds = []  # two seeds: walk (slerp) from the first's noise to the second's, prompt fixed
frames = 8
# outpainting, with an outpainting fine-tune (a model with cond_channels = C+1)
init_image = ''  # the image to extend or fill; without one, --outpaint starts from a generated image
mask = ''  # a mask image, white = generate, black = keep
outpaint = ''  # 'right', 'left', 'up' or 'down': slide the canvas by half and fill the new half
repeat = 1  # outpaint this many times in a row: a panorama
# output
out = ''  # the grid's path; default out_dir/samples/<prompt>_cfg_<cfg>_seed_<seed>.png
individual = False  # also save each image on its own, in a folder named like the grid
zoom = 1  # enlarge the saved images by this factor (nearest neighbour): 32-px samples are hard to see
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: bf16 where the hardware has it, else fp16 on GPU, fp32 on CPU
compile = False  # torch.compile the denoiser (pays off on GPU for big batches; slower on CPU, see PERF.md)
batch_size = 64  # images per denoiser forward (x2 with guidance: both halves go in one batch)
decode_batch_size = 16  # images per VAE decode
# -----------------------------------------------------------------------------

OUTPAINT_DIRECTIONS = ('right', 'left', 'up', 'down')


# ----- the pipeline: text -> embeddings -> denoised latents -> images -----

class Pipeline:
    """A trained denoiser with the frozen text encoder and image codec that its data was prepared with.
    The three phases are separate methods so that they can be timed on their own (bench.py)."""

    def __init__(self, model, text_encoder, codec, scale_factor, device='cpu', dtype='auto'):
        self.model, self.text_encoder, self.codec = model, text_encoder, codec
        self.scale_factor, self.device = scale_factor, device
        self.dtype = dtype = resolve_dtype(dtype, device)
        # the denoiser runs under autocast; the sampler's own arithmetic stays in fp32
        self.ctx = nullcontext() if dtype == 'float32' else torch.autocast(torch.device(device).type, dtype=PTDTYPES[dtype])

    def latent_shape(self, size=None):
        """(C, h, w) of the model-space tensors for an image of `size` pixels (default: the trained size).
        size must be a multiple of patch_size × the VAE's downsampling, or a ValueError says so."""
        C, ds, p = self.model.n_channels, self.codec.downsample, self.model.patch_size
        if size is None:
            return (C, *trained_size(self.model))
        H, W = (size, size) if isinstance(size, int) else size
        if H % (p * ds) or W % (p * ds) or H <= 0 or W <= 0:
            raise ValueError(f"--size {size if isinstance(size, int) else f'{H} {W}'} is not a positive multiple of {p * ds} "
                             f"(patch_size {p} x VAE downsampling {ds})")
        return (C, H // ds, W // ds)

    @torch.no_grad()
    def encode_text(self, prompts):
        """list of str -> (B, D_text) float32 on the pipeline's device."""
        return self.text_encoder(list(prompts)).float().to(self.device)

    @torch.no_grad()
    def encode_image(self, img):
        """(B, 3, H, W) in [-1, 1] -> model space (latents × scale_factor)."""
        return self.codec.encode(img.to(self.device)).float() * self.scale_factor

    @torch.no_grad()
    def denoise(self, text_emb, noise, cfg=7.0, steps=15, sampler='dpmpp2m', uncond_emb=None,
                known=None, mask=None, batch_size=64, cfg_min_sigma=0.2):
        """Sample x0 (B, C, h, w) in model space from noise (B, C, h, w), for text_emb (B, D_text).
        uncond_emb (B, D_text) replaces the zero embedding (a negative prompt). known/mask: outpainting,
        mask 1 = generate. An outpainting model asked for a plain image gets an all-generate mask.
        Guidance applies to the steps from σ > cfg_min_sigma (diffusion.generate), as in the CLI."""
        B = text_emb.shape[0]
        if self.model.cond_channels and known is None:
            known, mask = torch.zeros_like(noise), torch.ones_like(noise[:, :1])
        out = []
        for i in range(0, B, batch_size):
            part = lambda t: None if t is None else t[i:i + batch_size].to(self.device)  # noqa: E731
            with self.ctx:
                x0 = generate(self.model, part(text_emb), cfg=cfg, steps=steps, sampler=sampler,
                              noise=part(noise), uncond_emb=part(uncond_emb), known=part(known), mask=part(mask),
                              cfg_min_sigma=cfg_min_sigma)
            out.append(x0.float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, x, batch_size=16):
        """Model space (B, C, h, w) -> images (B, 3, H, W) in [0, 1], on the CPU."""
        images = [self.codec.decode(x[i:i + batch_size] / self.scale_factor).float().cpu()
                  for i in range(0, x.shape[0], batch_size)]
        return ((torch.cat(images) + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1]


def load_pipeline(path, device='cpu', dtype='auto', compile=False):
    """Rebuild the EMA denoiser from a checkpoint (a file or a run dir) and load the text encoder and image
    codec recorded in it. Raises FileNotFoundError/ValueError with a one-line message."""
    ckpt = load_checkpoint(path, device='cpu')
    meta = ckpt.get('data_meta') or {}
    if 'text_encoder' not in meta:
        raise ValueError(f"checkpoint '{path}' records no data_meta.text_encoder: "
                         f"cannot tell which text encoder its data was prepared with")
    model = denoiser_from_checkpoint(ckpt, ema=True).to(device)
    amp = resolve_dtype(dtype, device) != 'float32'  # the encoders pick their own half type
    text_encoder = TextEncoder(meta['text_encoder'], device=device, amp=amp)
    if text_encoder.dim != model.text_proj.in_features:
        raise ValueError(f"text encoder '{meta['text_encoder']}' gives {text_encoder.dim}-d embeddings, "
                         f"but the model in '{path}' expects {model.text_proj.in_features}")
    codec = ImageCodec(meta.get('vae', 'none'), device=device, amp=amp)
    scale_factor = float(meta.get('scale_factor', codec.scale_factor))
    if compile:
        model = torch.compile(model)
    pipe = Pipeline(model, text_encoder, codec, scale_factor, device, dtype)
    pipe.ckpt_info = dict(iter_num=ckpt.get('iter_num'), text_encoder=meta['text_encoder'],
                          vae=meta.get('vae', 'none'), params=sum(p.numel() for p in model.parameters()))
    return pipe


def make_noise(seeds, shape):
    """One (C, h, w) Gaussian per seed, drawn on the CPU so that a seed gives the same noise on every
    device -> (len(seeds), C, h, w)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def generate_images(pipe, prompts, n=1, cfg=7.0, steps=15, sampler='dpmpp2m', seed=0, negative='',
                    size=None, batch_size=64, decode_batch_size=16, cfg_min_sigma=0.2):
    """n images for each prompt -> (len(prompts)·n, 3, H, W) in [0, 1], prompt-major; image j of every
    prompt starts from the noise of seed + j."""
    emb = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (P·n, D)
    uncond = pipe.encode_text([negative]).expand_as(emb) if negative else None
    noise = make_noise([seed + j for j in range(n)], pipe.latent_shape(size)).repeat(len(prompts), 1, 1, 1)
    x0 = pipe.denoise(emb, noise, cfg, steps, sampler, uncond_emb=uncond, batch_size=batch_size,
                      cfg_min_sigma=cfg_min_sigma)
    return pipe.decode(x0, decode_batch_size)


def interpolation_noise_and_text(pipe, shape, n, frames, seed, prompts=None, seeds=None):
    """Inputs for n rows of `frames` images: text lerped from prompts[0] to prompts[1] (or prompts[0] kept),
    noise slerped from seeds[0]+j to seeds[1]+j on row j (or seed+j kept) -> (n·frames, D), (n·frames, C, h, w)."""
    t = torch.linspace(0, 1, frames)[:, None]  # (frames, 1)
    emb = pipe.encode_text(prompts)
    emb = lerp(emb[:1], emb[1:], t.to(emb)) if len(prompts) == 2 else emb.expand(frames, -1)  # (frames, D)
    rows = []
    for j in range(n):
        if seeds:
            a, b = make_noise([seeds[0] + j], shape), make_noise([seeds[1] + j], shape)
            rows.append(slerp(a.expand(frames, *shape), b.expand(frames, *shape), t))
        else:
            rows.append(make_noise([seed + j], shape).expand(frames, *shape))
    return emb.repeat(n, 1), torch.cat(rows)


def outpaint_strip(pipe, text_emb, start, direction, repeat, generators, denoise_kw):
    """Extend `start` (B, C, h, w) in model space `repeat` times: each time the canvas slides by half in
    `direction`, the half it keeps is the known region and the other half is generated. Returns the strip
    (B, C, h, w + repeat·w/2) for right/left, taller for up/down."""
    _, C, h, w = start.shape
    dim, length = (3, w) if direction in ('right', 'left') else (2, h)
    half = length // 2
    forward = direction in ('right', 'down')  # the strip grows at its end
    mask = make_mask(direction, h, w, frac=0.5)[None].expand(start.shape[0], 1, h, w)  # (B, 1, h, w)
    strip, canvas = start, start
    for _ in range(repeat):
        known = torch.roll(canvas, -half if forward else half, dims=dim)  # the kept half moves to the other side
        noise = torch.stack([torch.randn((C, h, w), generator=g) for g in generators])
        canvas = pipe.denoise(text_emb, noise, known=known, mask=mask, **denoise_kw)
        new = canvas.narrow(dim, length - half, half) if forward else canvas.narrow(dim, 0, half)
        strip = torch.cat([strip, new] if forward else [new, strip], dim=dim)
    return strip


# ----- reading and writing files -----

def slug(text, max_len=60):
    """A file-name-safe version of a prompt: 'A cute owl!' -> 'a_cute_owl'."""
    return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')[:max_len] or 'prompt'


def read_image(path, size):
    """An image file -> (1, 3, H, W) in [-1, 1], resized to size (H, W) if it differs."""
    img = Image.open(path).convert('RGB')
    if img.size != (size[1], size[0]):
        print(f"note: resizing {path} from {img.size[0]}x{img.size[1]} to {size[1]}x{size[0]}")
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]


def read_mask(path, size, downsample):
    """A mask image (white = generate) -> (1, 1, H/ds, W/ds) in {0, 1} on the model's grid. A latent
    cell is generated if any of its pixels is, so the known region is only cells that are fully known."""
    m = Image.open(path).convert('L').resize((size[1], size[0]), Image.NEAREST)
    m = torch.from_numpy(np.asarray(m).copy()).float()[None, None] / 255 > 0.5
    return F.max_pool2d(m.float(), downsample) if downsample > 1 else m.float()


def save_grid(images, nrow, path, individual_names=(), zoom=1):
    """Write images (B, 3, H, W) in [0, 1] as one grid PNG, and each image on its own if names are given,
    into a folder next to the grid named like it; zoom enlarges them (nearest). Returns the paths written."""
    from torchvision.utils import save_image  # here, not at the top: its import costs ~1 s, errors need not wait
    if zoom > 1:
        images = F.interpolate(images, scale_factor=zoom, mode='nearest')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
    written = [path]
    if individual_names:
        folder = os.path.splitext(path)[0]
        os.makedirs(folder, exist_ok=True)
        for img, name in zip(images, individual_names):
            written.append(os.path.join(folder, name + '.png'))
            save_image(img, written[-1])
    return written


# ----- the script -----

def fail(message):
    sys.exit(f"error: {message}")


def check_args():
    """Check everything that needs no checkpoint, so that a typo fails in a second, not after loading."""
    if steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    if sampler not in SAMPLERS:
        fail(f"--sampler must be one of {sorted(SAMPLERS)}, got '{sampler}'")
    if n < 1:
        fail(f"--n must be >= 1, got {n}")
    if not 0 <= cfg_min_sigma < 1:
        fail(f"--cfg_min_sigma must be in [0, 1), the noise level below which guidance is off, got {cfg_min_sigma}")
    if zoom < 1:
        fail(f"--zoom must be >= 1, got {zoom}")
    if dtype not in ('auto', *PTDTYPES):
        fail(f"--dtype must be 'auto' or one of {sorted(PTDTYPES)}, got '{dtype}'")
    if size is not None and not (isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 2
                                                            and all(isinstance(s, int) for s in size))):
        fail(f"--size expects pixels, one int (64) or two (64 128 for H W), got {size!r}")
    if interp and len(interp) != 2:
        fail(f"--interp expects two prompts, got {len(interp)}: {list(interp)}")
    if interp and any(not str(p).strip() for p in interp):
        fail("--interp got an empty prompt")
    if interp_seeds and (len(interp_seeds) != 2 or not all(isinstance(s, int) for s in interp_seeds)):
        fail(f"--interp_seeds expects two integer seeds, got {list(interp_seeds)}")
    if (interp or interp_seeds) and frames < 2:
        fail(f"--frames must be >= 2, got {frames}")
    if outpaint and outpaint not in OUTPAINT_DIRECTIONS:
        fail(f"--outpaint must be one of {list(OUTPAINT_DIRECTIONS)}, got '{outpaint}'")
    if repeat < 1:
        fail(f"--repeat must be >= 1, got {repeat}")
    if mask and not init_image:
        fail("--mask needs --init_image, the image whose white-masked region to fill")
    if mask and outpaint:
        fail("give either --mask or --outpaint, not both")
    if (interp or interp_seeds) and (outpaint or mask):
        fail("interpolation cannot be combined with --outpaint/--mask")
    for flag, path in (('--prompt_file', prompt_file), ('--init_image', init_image), ('--mask', mask)):
        if path and (not os.path.exists(path) or os.path.isdir(path)):  # exists: /dev/stdin works too
            fail(f"{flag} '{path}' is not a file")


def read_prompts():
    if interp:
        return [str(p) for p in interp]
    if prompt_file:
        with open(prompt_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            fail(f"--prompt_file '{prompt_file}' has no prompts (one per line)")
        return prompts
    if not prompt.strip():
        fail("--prompt is empty: say what to draw, e.g. --prompt \"a cute owl\"")
    return [prompt]


def negative_like(pipe, text_emb):
    """The negative prompt's embedding for each row of text_emb, or None (zeros: plain guidance)."""
    return pipe.encode_text([negative]).expand_as(text_emb) if negative else None


def sample_prompts(pipe, prompts, shape):
    """n images per prompt: one row per prompt; a single prompt's images fill a square-ish grid."""
    images = generate_images(pipe, prompts, n, cfg, steps, sampler, seed, negative, size,
                             batch_size, decode_batch_size, cfg_min_sigma)
    names = [f"{slug(p, 40)}_cfg_{cfg:g}_seed_{seed + j}" for p in prompts for j in range(n)]
    return images, (n if len(prompts) > 1 else math.ceil(math.sqrt(n))), f"_cfg_{cfg:g}_seed_{seed}", names


def sample_interpolation(pipe, prompts, shape):
    """n rows of `frames` images: text walks prompt A -> B, and/or noise walks seed a -> b."""
    text, noise = interpolation_noise_and_text(pipe, shape, n, frames, seed, prompts, interp_seeds)
    x0 = pipe.denoise(text, noise, cfg, steps, sampler, negative_like(pipe, text), batch_size=batch_size,
                      cfg_min_sigma=cfg_min_sigma)
    suffix = (f"_seeds_{interp_seeds[0]}_to_{interp_seeds[1]}_cfg_{cfg:g}" if interp_seeds
              else f"_cfg_{cfg:g}_seed_{seed}")
    names = [f"row{j}_frame{i}" for j in range(n) for i in range(frames)]
    return pipe.decode(x0, decode_batch_size), frames, suffix, names


def sample_outpaint(pipe, prompts, shape):
    """n panoramas per prompt: the init image (or one generated from the prompt), extended `repeat` times."""
    text = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (P·n, D)
    kw = dict(cfg=cfg, steps=steps, sampler=sampler, uncond_emb=negative_like(pipe, text), batch_size=batch_size,
              cfg_min_sigma=cfg_min_sigma)
    # panorama j of every prompt draws all its noise, step after step, from the generator of seed + j
    generators = [torch.Generator().manual_seed(seed + j) for _ in prompts for j in range(n)]
    if init_image:
        H, W = shape[1] * pipe.codec.downsample, shape[2] * pipe.codec.downsample
        start = pipe.encode_image(read_image(init_image, (H, W))).expand(len(text), -1, -1, -1)
    else:
        start = pipe.denoise(text, torch.stack([torch.randn(shape, generator=g) for g in generators]), **kw)
    strip = outpaint_strip(pipe, text, start, outpaint, repeat, generators, kw)
    nrow = 1 if outpaint in ('right', 'left') else n  # wide strips stack, tall ones stand side by side
    names = [f"{slug(p, 40)}_seed_{seed + j}" for p in prompts for j in range(n)]
    return pipe.decode(strip, decode_batch_size), nrow, f"_outpaint_{outpaint}_x{repeat}_cfg_{cfg:g}_seed_{seed}", names


def sample_inpaint(pipe, prompts, shape):
    """One row per prompt: the init image with its masked region greyed out, then n fills."""
    H, W = shape[1] * pipe.codec.downsample, shape[2] * pipe.codec.downsample
    image = read_image(init_image, (H, W))  # (1, 3, H, W) in [-1, 1]
    m = read_mask(mask, (H, W), pipe.codec.downsample)  # (1, 1, h, w), 1 = generate
    B = len(prompts) * n
    text = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (B, D)
    noise = make_noise([seed + j for j in range(n)], shape).repeat(len(prompts), 1, 1, 1)
    x0 = pipe.denoise(text, noise, cfg, steps, sampler, negative_like(pipe, text), batch_size=batch_size,
                      known=pipe.encode_image(image).expand(B, -1, -1, -1), mask=m.expand(B, -1, -1, -1),
                      cfg_min_sigma=cfg_min_sigma)
    fills = pipe.decode(x0, decode_batch_size).view(len(prompts), n, 3, H, W)
    m_px = F.interpolate(m, size=(H, W), mode='nearest')
    before = ((image + 1) / 2 * (1 - m_px) + 0.5 * m_px).expand(len(prompts), 1, 3, H, W)
    images = torch.cat([before, fills], dim=1).flatten(0, 1)  # (P·(n+1), 3, H, W)
    mask_name = slug(os.path.splitext(os.path.basename(mask))[0], 20)
    names = [f"{slug(p, 40)}_{'input' if j < 0 else f'seed_{seed + j}'}" for p in prompts for j in range(-1, n)]
    return images, n + 1, f"_{mask_name}_cfg_{cfg:g}_seed_{seed}", names


def main():
    check_args()
    prompts = read_prompts()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    source = ckpt or out_dir
    try:
        pipe = load_pipeline(source, device, dtype, compile)
        shape = pipe.latent_shape(size)  # (C, h, w)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    C, H, W = pipe.model.n_channels, shape[1] * pipe.codec.downsample, shape[2] * pipe.codec.downsample
    if (outpaint or mask) and pipe.model.cond_channels != C + 1:
        fail(f"'{source}' is not an outpainting model (it has {pipe.model.cond_channels} extra input channels, "
             f"outpainting needs {C + 1}): fine-tune one with python train.py config/tiny_outpaint.py")
    info = pipe.ckpt_info
    print(f"{source}: {info['params'] / 1e6:.2f}M parameters, iter {info['iter_num']}, text encoder "
          f"'{info['text_encoder']}', vae '{info['vae']}'; {H}x{W} px, {steps} {sampler} steps, "
          f"cfg {cfg:g} at σ > {cfg_min_sigma:g}, {device} {pipe.dtype}")

    t0 = time.time()
    mode = (sample_interpolation if interp or interp_seeds else sample_outpaint if outpaint
            else sample_inpaint if mask else sample_prompts)
    images, nrow, suffix, names = mode(pipe, prompts, shape)
    seconds = time.time() - t0

    if interp:  # file names carry the prompt(s), cfg and seed
        name = f"interp_{slug(prompts[0], 30)}_to_{slug(prompts[1], 30)}"
    elif prompt_file:
        name = slug(os.path.splitext(os.path.basename(prompt_file))[0])
    else:
        name = slug(prompts[0])
    name += f"_{H}x{W}" if size is not None else ''
    path = out or os.path.join(os.path.dirname(ckpt) if ckpt else out_dir, 'samples', name + suffix + '.png')
    for p in save_grid(images, nrow, path, names if individual else (), zoom):
        print(f"wrote {p}")
    print(f"{len(images)} images in {seconds:.1f}s")


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    main()
