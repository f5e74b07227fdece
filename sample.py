"""
Sample images from a trained nanoTLD model into PNG grids in the run's samples/, named by what
made them, never over an earlier one: the library train.py, eval.py and bench.py use, and its CLI.

    python sample.py --out_dir=out-tiny --prompt "a cute owl" "a dog" --n=8 --size 64  # a row each
    python sample.py --out_dir=out-tiny --prompt_file=prompts.txt --individual     # a row a line
    python sample.py --ckpt=out-tiny/ckpt.pt --prompt "a cat" --negative "a red cat" --sampler=ddim
    python sample.py --out_dir=out-tiny --interp "a cat" "a dog" --frames 8  # walk in text space
    python sample.py --out_dir=out-tiny --prompt "a cat" --interp_seeds 1 2   # walk between noises
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --outpaint right --repeat 4
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --init_image in.png --mask m.png

    from sample import load_pipeline, generate_images, save_grid
    pipe = load_pipeline('out-tiny', device='cpu')                  # a run dir or a ckpt file
    images = generate_images(pipe, ['a cat', 'a dog'], n=4, cfg=7)  # (8, 3, H, W) in [0, 1]
    save_grid(images, 4, 'cats.png', zoom=0)                        # one row per prompt
"""
import hashlib
import itertools
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

from configurator import configure, fail
from diffusion import SAMPLERS, generate, make_mask, slerp, trained_size
from encoders import ImageCodec, TextEncoder
from model import PTDTYPES, autocast, denoiser_from_checkpoint, load_checkpoint, resolve_dtype
from prepare import Skip, latent_norm, read_image, replacing

# -----------------------------------------------------------------------------
# the command line's settings: only the code under __main__ reads them, the library takes arguments
out_dir = 'out'  # the training run: out_dir/ckpt.pt; grids go to out_dir/samples/
ckpt = ''  # or a checkpoint file or run dir, which wins over out_dir
prompt = ('a cute owl',)  # one grid row per prompt: --prompt "a cat" "a dog"
prompt_file = ''  # or one prompt per line
negative = ''  # a prompt to steer away from: replaces the zero "unconditional" embedding
n = 4  # images per prompt
cfg = 7.0  # classifier-free guidance scale; 1 = no guidance (and half the compute)
cfg_min_sigma = 0.2  # guide only the steps from σ > this (a limited guidance interval); 0 = all
seed = 0  # image j of every prompt starts from the noise of seed + j
steps = 15
sampler = ''  # '' = the checkpoint's: dpmpp2m, or consistency for a few-step model; or ddim
size = ()  # pixels, H [W]: a grid other than the trained one (positions resized); () = trained
interp = []  # two prompts: walk from the first to the second in text-embedding space, noise fixed
interp_seeds = []  # two seeds: walk (slerp) from the first's noise to the second's, prompt fixed
frames = 8  # interpolation: a strip of `frames` images per row, one row per image (--n)
# outpainting and inpainting, with an outpainting fine-tune (a model with cond_channels = C+1)
init_image = ''  # the image to extend or fill; without one, --outpaint starts from a generated one
mask = ''  # a mask image, read as --init_image is: white (or transparent) = generate, black = keep
outpaint = ''  # 'right', 'left', 'up' or 'down': slide the canvas by half and fill the new half
repeat = 1  # outpaint this many times in a row: a panorama
out = ''  # the grid's path, replaced if it exists; default: a new file in the run's samples/
individual = False  # also save each image on its own, in a folder named like the grid
zoom = 0  # enlarge the saved images (nearest neighbour); 0 = auto, tiles >= 128 px; 1 = raw
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: bf16 where native, else fp16 on GPU, fp32
compile = False  # torch.compile the denoiser (on a CPU with frozen weights): slow start, then fast
batch_size = 64  # images per denoiser forward (x2 with guidance: both halves go in one batch)
# -----------------------------------------------------------------------------


class Pipeline:
    """A trained denoiser with the frozen text encoder and image codec of its training data."""

    def __init__(self, model, text_encoder, codec, norm=None, device='cpu', dtype='auto'):
        self.model, self.text_encoder, self.codec, self.device = model, text_encoder, codec, device
        self.norm, self.dtype = norm, resolve_dtype(dtype, device)  # norm: prepare.latent_norm's
        self.ctx = autocast(device, self.dtype)  # the denoiser only: the sampler's math is fp32

    def latent_shape(self, size=None):
        """(C, h, w) in model space for images of `size` pixels: an int, (H, W) or None: trained."""
        C, ds, p = self.model.n_channels, self.codec.downsample, self.model.patch_size
        if size is None:
            return (C, *trained_size(self.model))
        H, W = (size, size) if isinstance(size, int) else size
        if H % (p * ds) or W % (p * ds) or H <= 0 or W <= 0:
            raise ValueError(f"--size {size if isinstance(size, int) else f'{H} {W}'} is not a "
                             f"positive multiple of {p * ds} (patch_size {p} x VAE downsampling)")
        return (C, H // ds, W // ds)

    def pixel_size(self, shape):
        """(H, W) in pixels of the images decoded from model-space tensors of shape (C, h, w)."""
        return shape[1] * self.codec.downsample, shape[2] * self.codec.downsample

    def encode_text(self, prompts):
        """list of str -> (B, D_text) float32 on the pipeline's device."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass text embeddings instead")
        return self.text_encoder(list(prompts)).float().to(self.device)

    def encode_image(self, img):
        """(B, 3, H, W) in [-1, 1] -> model space, (latents - shift) · scale."""
        z = self.codec.encode(img.to(self.device)).float()
        return z if self.norm is None else (z - self.norm[0].to(z)) * self.norm[1].to(z)

    @torch.no_grad()
    def sample_latents(self, text_emb, noise, cfg=7.0, steps=15, sampler='dpmpp2m', uncond_emb=None,
                       known=None, mask=None, batch_size=64, cfg_min_sigma=0.2):
        """noise (B, C, h, w) -> x0 in model space for text_emb (B, D_text), as diffusion.generate.
        uncond_emb (a negative prompt), known, mask (1 = generate): outpainting; batch 1 or B."""
        if self.model.cond_channels and known is None:  # an outpainting model, a plain image
            known, mask = torch.zeros_like(noise), torch.ones_like(noise[:, :1])
        full = lambda t: t.expand(len(noise), *t.shape[1:])  # batch 1: the same for all
        out = []
        for i in range(0, len(noise), batch_size):
            part = lambda t: None if t is None else full(t)[i:i + batch_size].to(self.device)
            with self.ctx:
                x0 = generate(self.model, part(text_emb), cfg=cfg, steps=steps, sampler=sampler,
                              noise=part(noise), uncond_emb=part(uncond_emb), known=part(known),
                              mask=part(mask), cfg_min_sigma=cfg_min_sigma)
            out.append(x0.float())
        return torch.cat(out)

    def decode(self, x, batch_size=16):
        """Model space (B, C, h, w) -> images (B, 3, H, W) in [0, 1], on the CPU."""
        return decode_latents(self.codec, x, self.norm, batch_size)


def load_pipeline(ckpt, device='cpu', dtype='auto', compile=False, text_encoder=True):
    """A Pipeline from a checkpoint (a file, a run dir, or one loaded): its EMA denoiser and the
    encoders its data_meta names. Errors: one-line exceptions."""
    source = 'the checkpoint' if isinstance(ckpt, dict) else str(ckpt)  # a str or a Path
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt, device='cpu')
    meta = ckpt.get('data_meta') or {}  # prepare.py's meta.json of the data it was trained on
    model = denoiser_from_checkpoint(ckpt, ema=True).to(device)
    encoder = TextEncoder(meta['text_encoder'], device, dtype) if text_encoder else None
    width = ckpt['model_args'].get('text_emb_size')
    if encoder is not None and width is not None and encoder.dim != width:
        raise ValueError(f"text encoder '{meta['text_encoder']}' gives {encoder.dim}-d embeddings, "
                         f"but the model in '{source}' expects {width}")
    codec = ImageCodec(meta.get('vae', 'none'), device, dtype)
    pipe = Pipeline(compile_for_inference(model) if compile else model, encoder, codec,
                    latent_norm(meta), device, dtype)
    pipe.info = (f"{model.num_params() / 1e6:.2f}M parameters, iter {ckpt.get('iter_num')}, "
                 f"text encoder '{meta.get('text_encoder')}', vae '{codec.name}'")
    pipe.sampler = 'consistency' if ckpt.get('objective') == 'consistency' else 'dpmpp2m'
    pipe.baked_cfg = ckpt.get('baked_cfg') or 0.0  # a consistency-tuned model's guidance, built in
    return pipe


def compile_for_inference(model):
    """torch.compile the model's forward for sampling, in place. On a CPU inductor freezes the
    weights (never change them after the first call), set per call: Dynamo reads it in tracing."""
    import torch._inductor.config as inductor_config
    freezing = next(model.parameters()).device.type == 'cpu'
    model.forward = inductor_config.patch(freezing=freezing)(torch.compile(model.forward))
    return model


def make_noise(seeds, shape):
    """One (C, h, w) Gaussian per seed -> (len(seeds), C, h, w), drawn on the CPU: any device's."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in seeds])


# ----- the modes -> images (B, 3, H, W) in [0, 1]; **settings: Pipeline.sample_latents' -----

def generate_images(pipe, prompts, n=1, seed=0, negative='', size=None, image=None, mask=None,
                    **settings):
    """n images for each prompt, prompt-major; image j of every prompt from seed + j's noise.
    image (1, 3, H, W) in [-1, 1], mask (1, 1, H, W): fill its 1s (a latent cell if any pixel)."""
    text = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (P·n, D_text)
    uncond = pipe.encode_text([negative]) if negative else None  # (1, D_text)
    shape = pipe.latent_shape(size if image is None else image.shape[2:])  # (C, h, w)
    noise = make_noise([seed + j for j in range(n)] * len(prompts), shape)
    if image is not None:  # inpainting: the image's latents where the mask is 0
        settings.update(known=pipe.encode_image(image),
                        mask=F.max_pool2d(mask.float(), pipe.codec.downsample))
    return pipe.decode(pipe.sample_latents(text, noise, uncond_emb=uncond, **settings))


def interpolate(pipe, prompts, n=1, frames=8, seed=0, seeds=None, size=None, negative='',
                **settings):
    """n rows of `frames` images: the text embedding lerped from the first of two prompts to the
    second, or one prompt's kept; seeds (a, b): row j's noise slerped from seed a+j to b+j."""
    text, shape = pipe.encode_text(prompts), pipe.latent_shape(size)  # (1 or 2, D_text), (C, h, w)
    settings['uncond_emb'] = pipe.encode_text([negative]) if negative else None
    t = torch.linspace(0, 1, frames)[:, None]  # (frames, 1)
    walk = torch.lerp(text[:1], text[-1:], t.to(text))  # (frames, D_text); one prompt: kept
    row = lambda s: make_noise([s], shape).expand(frames, *shape)  # (frames, C, h, w)
    noise = [slerp(row(seeds[0] + j), row(seeds[1] + j), t) if seeds else row(seed + j)
             for j in range(n)]
    return pipe.decode(pipe.sample_latents(walk.repeat(n, 1), torch.cat(noise), **settings))


def outpaint_images(pipe, prompts, direction, repeat=1, n=1, seed=0, image=None, size=None,
                    negative='', **settings):
    """n panoramas per prompt: image (1, 3, H, W) in [-1, 1], or a generated one, extended `repeat`
    times towards `direction` by half a canvas each; panorama j of each prompt from seed + j."""
    text = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (P·n, D_text)
    settings['uncond_emb'] = pipe.encode_text([negative]) if negative else None
    generators = [torch.Generator().manual_seed(seed + j % n) for j in range(len(text))]
    C, h, w = pipe.latent_shape(size if image is None else image.shape[2:])
    draw = lambda: torch.stack([torch.randn((C, h, w), generator=g) for g in generators])
    strip = canvas = (pipe.sample_latents(text, draw(), **settings) if image is None
                      else pipe.encode_image(image).expand(len(text), -1, -1, -1))  # (P·n, C, h, w)
    dim, length = (3, w) if direction in ('right', 'left') else (2, h)
    half, forward = length // 2, direction in ('right', 'down')  # forward: grows at its end
    mask = make_mask(direction, h, w, frac=0.5)[None]  # (1, 1, h, w)
    for _ in range(repeat):
        known = torch.roll(canvas, -half if forward else half, dims=dim)  # the kept half moves over
        canvas = pipe.sample_latents(text, draw(), known=known, mask=mask, **settings)
        new = canvas.narrow(dim, length - half, half) if forward else canvas.narrow(dim, 0, half)
        strip = torch.cat([strip, new] if forward else [new, strip], dim=dim)
    return pipe.decode(strip)


def decode_latents(codec, x, norm=None, batch_size=16):
    """Model space (B, C, h, w) -> images in [0, 1] on the CPU; norm: prepare.latent_norm's."""
    x = x if norm is None else x / norm[1].to(x.device) + norm[0].to(x.device)
    images = [codec.decode(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    return ((torch.cat(images) + 1) / 2).clamp(0, 1)


def load_image(path, size):
    """An image file -> (1, 3, H, W) in [-1, 1] for size (H, W), read as prepare.read_image does."""
    pixels = torch.from_numpy(read_image(path, size, min_size=1).copy())  # (H, W, 3) uint8
    return pixels.permute(2, 0, 1)[None].float() / 127.5 - 1


def slug(*texts, max_len=40):
    """A file name for prompts, 'A cute owl!' -> 'a_cute_owl', + a hash where it would lose text."""
    s = re.sub(r'[^a-z0-9]+', '_', texts[0].lower()).strip('_')
    if len(texts) == 1 and texts[0].isascii() and 0 < len(s) <= max_len:
        return s
    digest = hashlib.sha1('\n'.join(texts).encode()).hexdigest()[:6]
    return '_'.join(filter(None, [s[:max_len - 7].strip('_'), digest]))


def unused_path(path):
    """path, or path-1, path-2, ...: the first that names neither an earlier grid nor its folder."""
    stem, ext = os.path.splitext(path)
    stems = (f"{stem}-{k}" if k else stem for k in itertools.count())
    return next(s for s in stems if not os.path.exists(s + ext) and not os.path.exists(s)) + ext


def save_grid(images, nrow, path, individual_names=(), zoom=1, padding=2):
    """Write images (B, 3, H, W) in [0, 1] as a PNG grid, nrow a row, and each image as
    individual_names in a folder named like it, atomically -> the paths. zoom: K times larger
    (nearest neighbour); 0: until a tile is >= 128 px."""
    from torchvision.utils import save_image  # here: its import is slow, errors need not wait
    zoom = zoom or max(1, math.ceil(128 / min(images.shape[-2:])))
    images = F.interpolate(images, scale_factor=zoom, mode='nearest')  # zoom 1: the same pixels
    folder = os.path.splitext(path)[0]
    os.makedirs(folder if individual_names else os.path.dirname(path) or '.', exist_ok=True)
    written = [path] + [os.path.join(folder, name + '.png') for name in individual_names]
    for p, x in zip(written, [images, *images]):  # make_grid leaves a single image as it is
        with replacing(p) as tmp:
            save_image(x, tmp, format='png', nrow=nrow, padding=padding, pad_value=1.0)
    return written


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    walk = bool(interp or interp_seeds)  # an interpolation
    # check all that needs no checkpoint, so that a typo fails in a second, not after loading
    two_ints = len(interp_seeds) in (0, 2) and all(type(s) is int for s in interp_seeds)
    for key, ok, expected in (
        ('steps', steps >= 1, '>= 1'), ('n', n >= 1, '>= 1'), ('repeat', repeat >= 1, '>= 1'),
        ('frames', frames >= 2 or not walk, '>= 2'), ('zoom', zoom >= 0, '>= 0 (0: auto, 1: raw)'),
        ('cfg_min_sigma', 0 <= cfg_min_sigma < 1, 'in [0, 1): no guidance below this σ'),
        ('sampler', sampler in ('', *SAMPLERS), f'one of {sorted(SAMPLERS)}'),
        ('device', device == 'cpu' or device.startswith('cuda') and torch.cuda.is_available(),
         'cpu, or cuda where there is a GPU'), ('batch_size', batch_size >= 1, '>= 1'),
        ('dtype', dtype in ('auto', *PTDTYPES), f"'auto' or one of {sorted(PTDTYPES)}"),
        ('outpaint', outpaint in ('', 'right', 'left', 'up', 'down'), 'right, left, up or down'),
        ('interp', len(interp) in (0, 2), 'two prompts'), ('interp_seeds', two_ints, 'two ints'),
        ('size', len(size) <= 2 and all(type(s) is int for s in size), 'one int or two: H W'),
        ('mask', not mask or init_image and not outpaint, 'with --init_image, not --outpaint'),
    ):
        if not ok:
            fail(f"--{key} must be {expected}, got {globals()[key]!r}")
    if walk and (outpaint or mask):
        fail("interpolation cannot be combined with --outpaint/--mask")
    for flag, path in (('prompt_file', prompt_file), ('init_image', init_image), ('mask', mask)):
        if path and (not os.path.exists(path) or os.path.isdir(path)):  # /dev/stdin works too
            fail(f"--{flag} '{path}' is not a file")
    prompts = [str(p) for p in interp] if interp else list(prompt)  # one grid row each
    if prompt_file and not interp:
        with open(prompt_file, encoding='utf-8', errors='replace') as f:
            prompts = [line.strip() for line in f if line.strip()]
    if not prompts or not all(p.strip() for p in prompts):
        fail(f"--{'interp' if interp else 'prompt_file' if prompt_file else 'prompt'} is empty or "
             f"has an empty prompt: say what to draw, e.g. --prompt \"a cute owl\"")
    if interp_seeds and len(prompts) > 2:
        fail(f"--interp_seeds walks one prompt's noise (or a walk between two), got {len(prompts)}")
    size = size[0] if len(size) == 1 else tuple(size) or None  # as Pipeline.latent_shape takes
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    source = ckpt or out_dir  # the EMA denoiser, and the text encoder and image codec of its data
    try:  # and the image (1, 3, H, W) in [-1, 1], the mask (1, 1, H, W) cropped alike, white = 1
        pipe = load_pipeline(source, device, dtype, compile)
        shape = pipe.latent_shape(size)  # (C, h, w)
        H, W = pipe.pixel_size(shape)
        image = load_image(init_image, (H, W)) if init_image else None
        m = (load_image(mask, (H, W)).mean(1, keepdim=True) > 0).float() if mask else None
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    except Skip as e:
        fail(f"--init_image '{init_image}' or --mask '{mask}': not an image it can read ({e})")
    if (outpaint or mask) and pipe.model.cond_channels != shape[0] + 1:
        fail(f"'{source}' is not an outpainting model (it has {pipe.model.cond_channels} extra "
             f"input channels, outpainting needs {shape[0] + 1}): fine-tune one with "
             f"python train.py config/tiny_outpaint.py")
    sampler = sampler or pipe.sampler
    if pipe.baked_cfg and cfg != 1:
        print(f"note: guidance is in this model's weights (cfg {pipe.baked_cfg:g}): cfg 1")
        cfg = 1.0
    print(f"{source}: {pipe.info}; {H}x{W} px, {steps} {sampler} steps, cfg {cfg:g} at "
          f"σ > {cfg_min_sigma:g}, {device} {pipe.dtype}")

    t0, P = time.time(), len(prompts)  # sample and decode: images (B, 3, H, W) in [0, 1]
    settings = dict(n=n, seed=seed, negative=negative, size=size, cfg=cfg, steps=steps,
                    sampler=sampler, cfg_min_sigma=cfg_min_sigma, batch_size=batch_size)
    if walk:
        images = interpolate(pipe, prompts, frames=frames, seeds=interp_seeds, **settings)
    elif outpaint:
        images = outpaint_images(pipe, prompts, outpaint, repeat, image=image, **settings)
    else:  # image j of each prompt from seed + j; with a mask, the fills of the image's hole
        images = generate_images(pipe, prompts, image=image if mask else None, mask=m, **settings)
    if mask:  # each row: the input with its hole greyed out, then the fills
        before = ((image + 1) / 2 * (1 - m) + 0.5 * m).expand(P, 1, 3, H, W)
        images = torch.cat([before, images.view(P, n, 3, H, W)], 1).flatten(0, 1)  # (P·(n+1), ...)
    print(f"{len(images)} images in {time.time() - t0:.1f}s")

    # name the grid by what made it, in the run's samples/, never over an earlier one's
    name = (f"interp_{slug(prompts[0], max_len=30)}_to_{slug(prompts[1], max_len=30)}" if interp
            else slug(os.path.splitext(os.path.basename(prompt_file))[0], *prompts) if prompt_file
            else slug(*prompts))
    name += (f"_frames{frames}" if walk else f"_outpaint_{outpaint}_x{repeat}" if outpaint
             else f"_mask_{slug(os.path.splitext(os.path.basename(mask))[0])}" if mask else '')
    name += f"_{P}_prompts" if P > 1 and not interp else ''
    name += f"_{H}x{W}_n{n}_{sampler}{steps}_cfg{cfg:g}_" + (
        f"seeds{interp_seeds[0]}to{interp_seeds[1]}" if interp_seeds else f"seed{seed}")
    name += f"_not_{slug(negative, max_len=20)}" if negative else ''
    run_dir = source if os.path.isdir(source) else os.path.dirname(source)  # a ckpt file's dir
    path = out or unused_path(os.path.join(run_dir, 'samples', name + '.png'))
    # a row per prompt (one prompt's: a square-ish grid) or walk; wide panoramas stack, tall don't
    nrow = (frames if walk else n + 1 if mask else
            1 if outpaint in ('right', 'left') else n if P > 1 or outpaint else math.ceil(n ** .5))
    names = ([f"row{j}_frame{i}" for j in range(n) for i in range(frames)] if walk
             else [f"{slug(p)}_" + (f"seed{seed + j}" if j >= 0 else 'input') for p in prompts
                   for j in range(-1 if mask else 0, n)])
    names = names if len(set(names)) == len(names) else [f"{i}_{s}" for i, s in enumerate(names)]
    for p in save_grid(images, nrow, path, names if individual else (), zoom):
        print(f"wrote {p}")
