"""
Sample images from a trained nanoTLD model into PNG grids in the run's samples/, named by what
made them, never over an earlier one: the library train.py, eval.py and bench.py use, and its CLI.

    python sample.py --prompt "a red apple" --cfg 7       # the demo's run, out-tiny: a 2x2 grid
    python sample.py --prompt "a cute owl" "a dog" --n=8 --size 256          # a row each, larger
    python sample.py --prompt_file=prompts.txt --individual                  # a row a line
    python sample.py --ckpt=out-tiny/ckpt.pt --prompt "a cat" --negative "a red cat" --sampler=ddim
    python sample.py --interp "a cat" "a dog" --frames 8          # a walk in text space
    python sample.py --prompt "a cat" --interp_seeds 1 2          # a walk between two noises
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --outpaint right --repeat 4
    python sample.py --out_dir=out-tiny-outpaint --prompt "a tree" --init_image in.png --mask m.png

    from sample import load_pipeline, generate_images, save_grid
    pipe = load_pipeline('out-tiny', device='cpu')                  # a run dir or a ckpt file
    images = generate_images(pipe, ['a cat', 'a dog'], n=4, cfg=7)  # (8, 3, H, W) in [0, 1]
    save_grid(images, 4, 'cats.png', zoom=0)                        # one row per prompt
"""
import hashlib
import math
import os
import re
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from configurator import configure, fail, read_text
from diffusion import CFG_MIN_SIGMA, generate, make_mask, slerp, trained_size
from encoders import ImageCodec, TextEncoder
from model import autocast, denoiser_from_checkpoint, gpu_problem, load_checkpoint, resolve_dtype
from prepare import Skip, claim_new, latent_norm, read_image, replacing

# -----------------------------------------------------------------------------
# the command line's settings: only the code under __main__ reads them, the library takes arguments
out_dir = 'out-tiny'  # the training run: out_dir/ckpt.pt; grids go to out_dir/samples/
ckpt = ''  # or a checkpoint file or run dir, which wins over out_dir
prompt = ('a cute owl',)  # one grid row per prompt: --prompt "a cat" "a dog"
prompt_file = ''  # or one prompt per line
negative = ''  # a prompt to steer away from: replaces the zero "unconditional" embedding
n = 4  # images per prompt
cfg = 7.0  # classifier-free guidance scale; 1 = no guidance (and half the compute)
cfg_min_sigma = CFG_MIN_SIGMA  # guide only the steps from σ > this (a guidance interval); 0 = all
seed = 0  # image j of every prompt starts from the noise of seed + j
steps = 15
sampler = ''  # '' = the checkpoint's: dpmpp2m, or flowmap for a few-step model; or ddim
size = ()  # pixels, H [W]: a size other than the trained one (positions resized); () = trained
interp = []  # two prompts: walk from the first to the second in text-embedding space, noise fixed
interp_seeds = []  # two seeds: walk (slerp) from the first's noise to the second's, prompt fixed
frames = 8  # interpolation: a strip of `frames` images per row, one row per image (--n)
# outpainting and inpainting, with an outpainting fine-tune (a model with cond_channels = C+1)
init_image = ''  # the image to extend (--outpaint) or fill (--mask); --outpaint alone generates one
mask = ''  # a mask image, read as --init_image is: white (or transparent) = generate, black = keep
outpaint = ''  # 'right', 'left', 'up' or 'down': slide the canvas by half and fill the new half
repeat = 1  # outpaint this many times in a row: a panorama
out = ''  # the grid's path (a new name if it exists); default: a new file in the run's samples/
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
        self.sampler, self.baked_cfg = 'dpmpp2m', 0.0  # load_pipeline sets a checkpoint's own

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

    def sampling(self, sampler='', cfg=7.0):
        """(sampler, cfg) for this model: '' is the checkpoint's own sampler, and a model with
        guidance in its weights samples at cfg 1 (sample.py and eval.py alike)."""
        if sampler == 'flowmap' and not getattr(self.model, 'flow_map', False):
            raise ValueError("--sampler=flowmap needs a flow map (train.py "
                             "config/tiny_fewstep.py makes one); this model is a plain denoiser")
        return sampler or self.sampler, 1.0 if self.baked_cfg else cfg

    @torch.no_grad()
    def sample_latents(self, text_emb, noise, cfg=7.0, steps=15, sampler='', negative='',
                       known=None, mask=None, batch_size=64, cfg_min_sigma=CFG_MIN_SIGMA):
        """noise (B, C, h, w) -> x0 in model space for text_emb (B, D_text), as diffusion.generate;
        sampler and cfg as sampling() settles them. negative: a prompt to steer away from, in
        place of the empty one; known, mask (1 = generate): outpainting; batch 1 or B."""
        sampler, cfg = self.sampling(sampler, cfg)
        uncond_emb = self.encode_text([negative]) if negative else None  # (1, D_text)
        if self.model.cond_channels and known is None:  # an outpainting model, a plain image
            known, mask = torch.zeros_like(noise), torch.ones_like(noise[:, :1])
        full = lambda t: t.expand(len(noise), *t.shape[1:])  # batch 1: the same for all
        out = []
        for i in range(0, len(noise), batch_size):
            part = lambda t: None if t is None else full(t)[i:i + batch_size].to(self.device)
            with self.ctx:
                x0 = generate(self.model, part(text_emb), part(noise), cfg, steps, sampler,
                              part(uncond_emb), part(known), part(mask), cfg_min_sigma)
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
    pipe.sampler = 'flowmap' if ckpt.get('objective') == 'flowmap' else 'dpmpp2m'
    pipe.baked_cfg = ckpt.get('baked_cfg') or 0.0  # a flow map's guidance, built in
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

def generate_images(pipe, prompts, n=1, seed=0, size=None, image=None, mask=None, **settings):
    """n images for each prompt, prompt-major; image j of every prompt from seed + j's noise.
    image (1, 3, H, W) in [-1, 1], mask (1, 1, H, W): fill its 1s (a latent cell if any pixel)."""
    text = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (P·n, D_text)
    shape = pipe.latent_shape(size if image is None else image.shape[2:])  # (C, h, w)
    noise = make_noise([seed + j for j in range(n)] * len(prompts), shape)
    if image is not None:  # inpainting: the image's latents where the mask is 0
        settings.update(known=pipe.encode_image(image),
                        mask=F.max_pool2d(mask.float(), pipe.codec.downsample))
    return pipe.decode(pipe.sample_latents(text, noise, **settings))


def interpolate(pipe, prompts, n=1, frames=8, seed=0, seeds=None, size=None, **settings):
    """n rows of `frames` images: the text embedding lerped from the first of two prompts to the
    second, or one prompt's kept; seeds (a, b): row j's noise slerped from seed a+j to b+j."""
    text, shape = pipe.encode_text(prompts), pipe.latent_shape(size)  # (1 or 2, D_text), (C, h, w)
    t = torch.linspace(0, 1, frames)[:, None]  # (frames, 1)
    walk = torch.lerp(text[:1], text[-1:], t.to(text))  # (frames, D_text); one prompt: kept
    row = lambda s: make_noise([s], shape).expand(frames, *shape)  # (frames, C, h, w)
    noise = [slerp(row(seeds[0] + j), row(seeds[1] + j), t) if seeds else row(seed + j)
             for j in range(n)]
    return pipe.decode(pipe.sample_latents(walk.repeat(n, 1), torch.cat(noise), **settings))


def outpaint_images(pipe, prompts, direction, repeat=1, n=1, seed=0, image=None, size=None,
                    **settings):
    """n panoramas per prompt: image (1, 3, H, W) in [-1, 1], or a generated one, extended `repeat`
    times towards `direction` by half a canvas each; panorama j of each prompt from seed + j."""
    text = pipe.encode_text(prompts).repeat_interleave(n, dim=0)  # (P·n, D_text)
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


# ----- the command line: c is its settings, the globals at the top as configure() left them -----

def grid_name(c, prompts, H, W, sampler, cfg):
    """The grid's file name: what made it."""
    walk, P = c.interp or c.interp_seeds, len(prompts)
    name = (f"interp_{slug(prompts[0], max_len=30)}_to_{slug(prompts[1], max_len=30)}" if c.interp
            else slug(os.path.splitext(os.path.basename(c.prompt_file))[0], *prompts)
            if c.prompt_file else slug(*prompts))
    name += (f"_frames{c.frames}" if walk else f"_outpaint_{c.outpaint}_x{c.repeat}" if c.outpaint
             else f"_mask_{slug(os.path.splitext(os.path.basename(c.mask))[0])}" if c.mask else '')
    name += f"_{P}_prompts" if P > 1 and not c.interp else ''
    seeds = (f"seeds{c.interp_seeds[0]}to{c.interp_seeds[1]}" if c.interp_seeds
             else f"seed{c.seed}")
    name += f"_{H}x{W}_n{c.n}_{sampler}{c.steps}_cfg{cfg:g}_{seeds}"
    return name + (f"_not_{slug(c.negative, max_len=20)}" if c.negative else '')


def check_settings(c):
    """What no library call checks, before any work: one line for the first that is wrong."""
    walk, modes = c.interp or c.interp_seeds, c.outpaint or c.mask
    for key, ok, expected in (
        ('n', c.n >= 1, '>= 1'), ('repeat', c.repeat >= 1, '>= 1'),
        ('batch_size', c.batch_size >= 1, '>= 1'), ('zoom', 0 <= c.zoom <= 64, 'in 0-64'),
        ('frames', c.frames >= 2 or not walk, '>= 2'),
        ('outpaint', c.outpaint in ('', 'right', 'left', 'up', 'down'), 'right, left, up or down'),
        ('interp', len(c.interp) in (0, 2), 'two prompts'),
        ('interp_seeds', len(c.interp_seeds) in (0, 2)
         and all(type(s) is int for s in c.interp_seeds), 'two ints'),
        ('size', len(c.size) <= 2 and all(type(s) is int for s in c.size), 'one int or two: H W'),
        ('mask', not c.mask or c.init_image and not c.outpaint,
         'with --init_image, not --outpaint'),
        ('init_image', not c.init_image or modes, 'with --mask (fill) or --outpaint (extend)'),
        ('interp', not (walk and modes), 'without --outpaint or --mask'),
        ('device', c.device == 'cpu' or c.device.startswith('cuda') and torch.cuda.is_available(),
         'cpu, or cuda where torch sees a GPU')):
        if not ok:
            fail(f"--{key} must be {expected}, got {getattr(c, key)!r}")


def read_prompts(c):
    """The grid's rows: --interp's two prompts, --prompt_file's lines or --prompt's."""
    prompts = list(c.interp or c.prompt)
    if c.prompt_file and not c.interp:
        prompts = [p.strip() for p in read_text(c.prompt_file).splitlines() if p.strip()]
    if not prompts or not all(p.strip() for p in prompts):
        flag = 'interp' if c.interp else 'prompt_file' if c.prompt_file else 'prompt'
        raise ValueError(f"--{flag} is empty or has an empty prompt: say what to draw, e.g. "
                         f"--prompt \"a cute owl\"")
    if c.interp_seeds and len(prompts) > 2:
        raise ValueError(f"--interp_seeds walks one prompt's noise, got {len(prompts)} prompts")
    return prompts


def check_memory(n_images, H, W, zoom):
    """Refuse, before any work, images that would not fit: in fp32, and their zoomed copy."""
    free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    need = n_images * 3 * H * W * 4 * (2 + max(zoom, 1) ** 2)
    if need > free:
        fail(f"{n_images} images of {H}x{W} px (zoom {zoom}) need about {need / 2 ** 30:.1f} GiB, "
             f"{free / 2 ** 30:.1f} GiB is free: ask for fewer or smaller images")


def take_grid_path(c, name):
    """The grid's path, taken now (a new name if it exists): a folder that cannot be written
    fails before the work, not after it."""
    run_dir = c.ckpt if os.path.isdir(c.ckpt) else os.path.dirname(c.ckpt) if c.ckpt else c.out_dir
    try:
        if c.out and os.path.isdir(c.out):
            raise ValueError(f"--out '{c.out}' is a directory; give a file name such as grid.png")
        folder = os.path.dirname(c.out) or '.' if c.out else os.path.join(run_dir, 'samples')
        os.makedirs(folder, exist_ok=True)
        return claim_new(c.out or os.path.join(folder, name + '.png'))
    except (OSError, ValueError) as e:
        fail(f"cannot write the grid: {e}")


def main(c):
    check_settings(c)
    if why := gpu_problem():
        print(f"warning: {why}")
    source, walk = c.ckpt or c.out_dir, bool(c.interp or c.interp_seeds)
    try:  # and the image (1, 3, H, W) in [-1, 1], the mask (1, 1, H, W) cropped alike, white = 1
        prompts = read_prompts(c)
        pipe = load_pipeline(source, c.device, c.dtype, c.compile)
        if (c.outpaint or c.mask) and pipe.model.cond_channels != pipe.model.n_channels + 1:
            raise ValueError(f"'{source}' is not an outpainting model: fine-tune one with "
                             f"python train.py config/tiny_outpaint.py")
        H, W = pipe.pixel_size(pipe.latent_shape(c.size[0] if len(c.size) == 1
                                                 else tuple(c.size) or None))
        image = load_image(c.init_image, (H, W)) if c.init_image else None
        holes = (load_image(c.mask, (H, W)).mean(1, keepdim=True) > 0).float() if c.mask else None
        sampler, cfg = pipe.sampling(c.sampler, c.cfg)
    except (OSError, ValueError) as e:
        fail(e)
    except Skip as e:
        fail(f"--init_image '{c.init_image}' or --mask '{c.mask}': not an image it can read ({e})")
    P = len(prompts)
    check_memory(P * (c.n + bool(c.mask)) * (c.frames if walk else c.repeat + 1), H, W, c.zoom)
    path = take_grid_path(c, grid_name(c, prompts, H, W, sampler, cfg))
    if cfg != c.cfg:
        print(f"note: guidance is in this model's weights (cfg {pipe.baked_cfg:g}): cfg 1")
    print(f"{source}: {pipe.info}; {H}x{W} px, {c.steps} {sampler} steps, cfg {cfg:g} at "
          f"σ > {c.cfg_min_sigma:g}, {c.device} {pipe.dtype}")
    t0 = time.time()  # sample and decode: images (B, 3, H, W) in [0, 1]
    settings = dict(n=c.n, seed=c.seed, negative=c.negative, cfg=c.cfg, steps=c.steps,
                    sampler=c.sampler, cfg_min_sigma=c.cfg_min_sigma, batch_size=c.batch_size,
                    size=(H, W))
    try:
        if walk:
            images = interpolate(pipe, prompts, frames=c.frames, seeds=c.interp_seeds, **settings)
        elif c.outpaint:
            images = outpaint_images(pipe, prompts, c.outpaint, c.repeat, image=image, **settings)
        else:  # image j of each prompt from seed + j; with a mask, the fills of the image's hole
            images = generate_images(pipe, prompts, image=image, mask=holes, **settings)
        print(f"{len(images)} images in {time.time() - t0:.1f}s")
        save(c, images, prompts, path, image, holes)
    except BaseException as e:  # the name taken above is free again
        os.remove(path)
        if isinstance(e, (OSError, ValueError)):
            fail(e)
        raise


def save(c, images, prompts, path, image=None, holes=None):
    """The grid: a row per prompt (one prompt's: a square-ish grid) or per walk; wide panoramas
    stack, tall ones stand side by side; with a mask, each row starts with the input."""
    P, n, walk = len(prompts), c.n, c.interp or c.interp_seeds
    if c.mask:  # the input with its hole greyed out, then the fills
        H, W = images.shape[-2:]
        before = ((image + 1) / 2 * (1 - holes) + 0.5 * holes).expand(P, 1, 3, H, W)
        images = torch.cat([before, images.view(P, n, 3, H, W)], 1).flatten(0, 1)  # (P·(n+1),...)
    nrow = (c.frames if walk else n + 1 if c.mask else 1 if c.outpaint in ('right', 'left')
            else n if P > 1 or c.outpaint else math.ceil(n ** .5))
    names = ([f"row{j}_frame{i}" for j in range(n) for i in range(c.frames)] if walk
             else [f"{slug(p)}_" + (f"seed{c.seed + j}" if j >= 0 else 'input') for p in prompts
                   for j in range(-1 if c.mask else 0, n)])
    names = names if len(set(names)) == len(names) else [f"{i}_{s}" for i, s in enumerate(names)]
    for p in save_grid(images, nrow, path, names if c.individual else (), c.zoom):
        print(f"wrote {p}")


if __name__ == '__main__':
    main(SimpleNamespace(**configure(globals(), sys.argv[1:])))
