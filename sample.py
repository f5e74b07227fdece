"""
Sample images from a trained nanoTLD model.

    python sample.py --out_dir=out-tiny --prompt "a cute owl" --cfg 7
    python sample.py --out_dir=out-tiny --prompt_file=prompts.txt --n=8 --seed=11 --individual
    python sample.py --ckpt=out-tiny/ckpt.pt --prompt "a cat" --negative "a red cat" --sampler=ddim
    python sample.py --out_dir=out-tiny --prompt "a cat" --cfg_min_sigma=0    # guide every step
    python sample.py --out_dir=out-tiny --interp "a cat" "a dog" --frames 8  # walk in text space
    python sample.py --out_dir=out-tiny --prompt "a cat" --interp_seeds 1 2   # walk between noises
    python sample.py --out_dir=out-tiny --prompt "a cat" --size 64            # an untrained size
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --outpaint right --repeat 4
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --init_image in.png --mask m.png

It writes one PNG grid (and with --individual each image too, in a folder named like the grid)
and prints the paths. Image j of every prompt starts from the noise of seed+j, so the same
arguments give bit-identical images, and the rows of a --prompt_file grid are comparable.

For viewing, the saved images are enlarged with nearest neighbour (each pixel becomes a square
block, nothing is smoothed): by default (--zoom=0) by the smallest integer factor that makes every
tile at least 128 px a side, so 32 px samples are saved 4x, 16 px ones 8x and 256 px ones as they
are. --zoom=1 saves the raw pixels; --zoom=K enlarges K times.

To generate from Python (eval.py and bench.py do), use pipeline.py.
"""
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from configurator import configure, fail
from diffusion import SAMPLERS
from model import PTDTYPES
from pipeline import (OUTPAINT_DIRECTIONS, interpolation_inputs, load_pipeline, make_noise,
                      outpaint_strip, read_image, read_mask, save_grid, slug, to_unit)

# -----------------------------------------------------------------------------
# what to sample from
out_dir = 'out'  # the training run: out_dir/ckpt.pt
ckpt = ''  # or a checkpoint file, which wins over out_dir
# what to sample
prompt = 'a cute owl'
prompt_file = ''  # many prompts, one per line: one grid row each
negative = ''  # a prompt to steer away from: replaces the zero "unconditional" embedding
n = 4  # images per prompt
cfg = 7.0  # classifier-free guidance scale; 1 = no guidance (and half the compute)
cfg_min_sigma = 0.2  # guide only the steps from σ > this (a limited guidance interval); 0 = all
seed = 0  # image j of every prompt starts from the noise of seed + j
steps = 15
sampler = 'dpmpp2m'  # 'dpmpp2m' or 'ddim'
size = None  # pixels, int or (H, W): a grid other than the trained one (positions are resized)
# interpolation: a strip of `frames` images per row, one row per image (--n)
interp = []  # two prompts: walk from the first to the second in text-embedding space, noise fixed
interp_seeds = []  # two seeds: walk (slerp) from the first's noise to the second's, prompt fixed
frames = 8
# outpainting, with an outpainting fine-tune (a model with cond_channels = C+1)
init_image = ''  # the image to extend or fill; without one, --outpaint starts from a generated one
mask = ''  # a mask image, white = generate, black = keep
outpaint = ''  # 'right', 'left', 'up' or 'down': slide the canvas by half and fill the new half
repeat = 1  # outpaint this many times in a row: a panorama
# output
out = ''  # the grid's path; default out_dir/samples/<prompt>_cfg_<cfg>_seed_<seed>.png
individual = False  # also save each image on its own, in a folder named like the grid
zoom = 0  # enlarge the saved images (nearest neighbour); 0 = auto, tiles >= 128 px; 1 = raw
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: bf16 where fast, else fp16 on GPU, fp32
compile = False  # torch.compile (CPU: frozen weights): ~10 s a batch shape, then ~1.3x faster
batch_size = 64  # images per denoiser forward (x2 with guidance: both halves go in one batch)
decode_batch_size = 16  # images per VAE decode
# -----------------------------------------------------------------------------


def check_args(c):
    """Check all that needs no checkpoint, so that a typo fails in a second, not after loading."""
    if c.steps < 1:
        fail(f"--steps must be >= 1, got {c.steps}")
    if c.sampler not in SAMPLERS:
        fail(f"--sampler must be one of {sorted(SAMPLERS)}, got '{c.sampler}'")
    if c.n < 1:
        fail(f"--n must be >= 1, got {c.n}")
    if not 0 <= c.cfg_min_sigma < 1:
        fail(f"--cfg_min_sigma must be in [0, 1), the noise level below which guidance is off, "
             f"got {c.cfg_min_sigma}")
    if c.zoom < 0:
        fail(f"--zoom must be >= 0 (0: auto, 1: raw pixels), got {c.zoom}")
    if c.dtype not in ('auto', *PTDTYPES):
        fail(f"--dtype must be 'auto' or one of {sorted(PTDTYPES)}, got '{c.dtype}'")
    pair = isinstance(c.size, (list, tuple)) and len(c.size) == 2
    if c.size is not None and not (isinstance(c.size, int)
                                   or pair and all(isinstance(s, int) for s in c.size)):
        fail(f"--size expects pixels, one int (64) or two (64 128 for H W), got {c.size!r}")
    if c.interp and len(c.interp) != 2:
        fail(f"--interp expects two prompts, got {len(c.interp)}: {list(c.interp)}")
    if c.interp and any(not str(p).strip() for p in c.interp):
        fail("--interp got an empty prompt")
    seeds = c.interp_seeds
    if seeds and (len(seeds) != 2 or not all(isinstance(s, int) for s in seeds)):
        fail(f"--interp_seeds expects two integer seeds, got {list(seeds)}")
    if (c.interp or seeds) and c.frames < 2:
        fail(f"--frames must be >= 2, got {c.frames}")
    if c.outpaint and c.outpaint not in OUTPAINT_DIRECTIONS:
        fail(f"--outpaint must be one of {list(OUTPAINT_DIRECTIONS)}, got '{c.outpaint}'")
    if c.repeat < 1:
        fail(f"--repeat must be >= 1, got {c.repeat}")
    if c.mask and not c.init_image:
        fail("--mask needs --init_image, the image whose white-masked region to fill")
    if c.mask and c.outpaint:
        fail("give either --mask or --outpaint, not both")
    if (c.interp or seeds) and (c.outpaint or c.mask):
        fail("interpolation cannot be combined with --outpaint/--mask")
    for flag in ('prompt_file', 'init_image', 'mask'):
        path = getattr(c, flag)
        if path and (not os.path.exists(path) or os.path.isdir(path)):  # /dev/stdin works too
            fail(f"--{flag} '{path}' is not a file")


def read_prompts(c):
    """One grid row each: the two prompts of --interp, the lines of --prompt_file, or --prompt."""
    if c.interp:
        return [str(p) for p in c.interp]
    if c.prompt_file:
        with open(c.prompt_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            fail(f"--prompt_file '{c.prompt_file}' has no prompts (one per line)")
        if c.interp_seeds and len(prompts) > 2:
            fail(f"--interp_seeds walks one prompt's noise (two with a text walk): "
                 f"--prompt_file '{c.prompt_file}' has {len(prompts)}")
        return prompts
    if not c.prompt.strip():
        fail("--prompt is empty: say what to draw, e.g. --prompt \"a cute owl\"")
    return [c.prompt]


# ----- the modes other than plain prompts: each returns images (B, 3, H, W) in [0, 1] -----
# text (P, D_text) holds one embedding per prompt; kw are Pipeline.sample_latents' settings

def sample_interpolation(pipe, text, shape, n, frames, seed, seeds, kw, decode_batch_size):
    """n rows of `frames` images: text walks from prompt A to B (given two), and/or the noise of
    row j walks from seed a + j to b + j (given seeds (a, b))."""
    text, noise = interpolation_inputs(text, shape, n, frames, seed, seeds)
    return pipe.decode(pipe.sample_latents(text, noise, **kw), decode_batch_size)


def sample_outpaint(pipe, text, shape, n, seed, direction, repeat, init_image, kw,
                    decode_batch_size):
    """n panoramas per prompt: the init image (or one generated from the prompt) extended `repeat`
    times towards `direction`. Panorama j of every prompt draws all its noise from seed + j."""
    text = text.repeat_interleave(n, dim=0)  # (P·n, D)
    generators = [torch.Generator().manual_seed(seed + j) for _ in range(len(text) // n)
                  for j in range(n)]
    if init_image:
        start = pipe.encode_image(read_image(init_image, pipe.pixel_size(shape)))
        start = start.expand(len(text), -1, -1, -1)
    else:
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        start = pipe.sample_latents(text, noise, **kw)
    strip = outpaint_strip(pipe, text, start, direction, repeat, generators, kw)
    return pipe.decode(strip, decode_batch_size)


def sample_inpaint(pipe, text, shape, n, seed, init_image, mask, kw, decode_batch_size):
    """One row per prompt: the init image with its masked region greyed out, then n fills."""
    H, W = pipe.pixel_size(shape)
    image = read_image(init_image, (H, W))  # (1, 3, H, W) in [-1, 1]
    m = read_mask(mask, (H, W), pipe.codec.downsample)  # (1, 1, h, w), 1 = generate
    P, B = len(text), len(text) * n
    noise = make_noise([seed + j for j in range(n)], shape).repeat(P, 1, 1, 1)
    known = pipe.encode_image(image).expand(B, -1, -1, -1)
    x0 = pipe.sample_latents(text.repeat_interleave(n, dim=0), noise, known=known,
                             mask=m.expand(B, -1, -1, -1), **kw)
    fills = pipe.decode(x0, decode_batch_size).view(P, n, 3, H, W)
    m_px = F.interpolate(m, size=(H, W), mode='nearest')
    before = (to_unit(image) * (1 - m_px) + 0.5 * m_px).expand(P, 1, 3, H, W)
    return torch.cat([before, fills], dim=1).flatten(0, 1)  # (P·(n+1), 3, H, W)


def grid_layout(c, prompts, H, W):
    """The grid's path, its images per row and each image's name, for the mode and settings in c.
    Names carry the prompt(s), cfg and seed."""
    g, seeds, P = f"cfg_{c.cfg:g}", c.interp_seeds, len(prompts)
    by_prompt = lambda fmt: [fmt(slug(p, 40), c.seed + j) for p in prompts for j in range(c.n)]
    if c.interp or seeds:
        suffix = f"_seeds_{seeds[0]}_to_{seeds[1]}_{g}" if seeds else f"_{g}_seed_{c.seed}"
        nrow, names = c.frames, [f"row{j}_frame{i}" for j in range(c.n) for i in range(c.frames)]
    elif c.outpaint:  # wide strips stack, tall ones stand side by side
        suffix = f"_outpaint_{c.outpaint}_x{c.repeat}_{g}_seed_{c.seed}"
        nrow = 1 if c.outpaint in ('right', 'left') else c.n
        names = by_prompt(lambda p, s: f"{p}_seed_{s}")
    elif c.mask:  # each row: the input, then the fills
        suffix = f"_{slug(os.path.splitext(os.path.basename(c.mask))[0], 20)}_{g}_seed_{c.seed}"
        nrow = c.n + 1
        names = [f"{slug(p, 40)}_{'input' if j < 0 else f'seed_{c.seed + j}'}"
                 for p in prompts for j in range(-1, c.n)]
    else:  # one row per prompt; a single prompt's images fill a square-ish grid
        suffix, nrow = f"_{g}_seed_{c.seed}", c.n if P > 1 else math.ceil(math.sqrt(c.n))
        names = by_prompt(lambda p, s: f"{p}_{g}_seed_{s}")
    if c.interp:
        name = f"interp_{slug(prompts[0], 30)}_to_{slug(prompts[1], 30)}"
    elif c.prompt_file:
        name = slug(os.path.splitext(os.path.basename(c.prompt_file))[0])
    else:
        name = slug(prompts[0])
    name += f"_{H}x{W}" if c.size is not None else ''
    run_dir = os.path.dirname(c.ckpt) if c.ckpt else c.out_dir
    return c.out or os.path.join(run_dir, 'samples', name + suffix + '.png'), nrow, names


# -----------------------------------------------------------------------------
c = SimpleNamespace(**configure(globals(), sys.argv[1:]))
check_args(c)
prompts = read_prompts(c)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

# load the EMA denoiser, and the text encoder and image codec its data was prepared with
source = ckpt or out_dir
try:
    pipe = load_pipeline(source, device, dtype, compile)
    shape = pipe.latent_shape(size)  # (C, h, w)
except (FileNotFoundError, ValueError) as e:
    fail(e)
H, W = pipe.pixel_size(shape)
if (outpaint or mask) and pipe.model.cond_channels != shape[0] + 1:
    fail(f"'{source}' is not an outpainting model (it has {pipe.model.cond_channels} extra input "
         f"channels, outpainting needs {shape[0] + 1}): fine-tune one with "
         f"python train.py config/tiny_outpaint.py")
info = pipe.ckpt_info
print(f"{source}: {info['params'] / 1e6:.2f}M parameters, iter {info['iter_num']}, text encoder "
      f"'{info['text_encoder']}', vae '{info['vae']}'; {H}x{W} px, {steps} {sampler} steps, "
      f"cfg {cfg:g} at σ > {cfg_min_sigma:g}, {device} {pipe.dtype}")

# encode the prompts; a negative prompt takes the place of the zero embedding on the guided steps
t0 = time.time()
text = pipe.encode_text(prompts)  # (P, D_text)
uncond = pipe.encode_text([negative]) if negative else None  # (1, D_text)
kw = dict(cfg=cfg, steps=steps, sampler=sampler, cfg_min_sigma=cfg_min_sigma, uncond_emb=uncond,
          batch_size=batch_size)

# sample and decode: images (B, 3, H, W) in [0, 1]
if interp or interp_seeds:
    images = sample_interpolation(pipe, text, shape, n, frames, seed, interp_seeds, kw,
                                  decode_batch_size)
elif outpaint:
    images = sample_outpaint(pipe, text, shape, n, seed, outpaint, repeat, init_image, kw,
                             decode_batch_size)
elif mask:
    images = sample_inpaint(pipe, text, shape, n, seed, init_image, mask, kw, decode_batch_size)
else:  # n images per prompt, image j of each from the noise of seed + j
    noise = make_noise([seed + j for j in range(n)], shape).repeat(len(prompts), 1, 1, 1)
    x0 = pipe.sample_latents(text.repeat_interleave(n, dim=0), noise, **kw)  # (P·n, C, h, w)
    images = pipe.decode(x0, decode_batch_size)
seconds = time.time() - t0

# save the grid (and each image)
path, nrow, names = grid_layout(c, prompts, H, W)
for p in save_grid(images, nrow, path, names if individual else (), zoom):
    print(f"wrote {p}")
print(f"{len(images)} images in {seconds:.1f}s")
