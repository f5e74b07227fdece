"""
Measure a checkpoint's images with numbers, so that two checkpoints, samplers or cfg values are
compared by more than eye. For each validation prompt it samples n images with the EMA model and
reports, for every setting (sampler × cfg × cfg_min_sigma × steps):

    top1, top5  prompt fidelity (pixel-space data like the emoji set): how often the nearest real image
                to a generated one is the image of the held-out caption it was made from
    rank        the median rank of that intended image among all real ones (1 = a hit, (K+1)/2 = chance)
    diversity   the mean pairwise distance between the images of one prompt, in the same features
    fid         Fréchet Inception distance to reference images (needs --inception, a local weights file)
    clip        CLIP score: the cosine of CLIP's image and prompt embeddings (needs a CLIP)

    python eval.py --out_dir=out-tiny                                     # cfg 7 at σ > 0.2, 15 dpmpp2m steps
    python eval.py --out_dir=out-tiny --cfg 1,3,5,7 --steps 5,10,15,25    # every combination
    python eval.py --out_dir=out-tiny --sampler ddim,dpmpp2m --steps 5,10,15 --out=out-tiny/eval_samplers.json
    python eval.py --out_dir=out-tiny --cfg_min_sigma 0,0.2,0.4 --out=out-tiny/eval_interval.json  # guidance interval
    python eval.py --out_dir=out-tiny --inception=weights-inception-2015-12-05-6726825d.pth  # + FID
    python eval.py --out_dir=out-clip --clip=openai/clip-vit-large-patch14                 # + CLIP score

It prints a markdown table and writes the numbers as JSON next to the checkpoint (eval.json).
Every setting starts from the same noise (image i from seed + i), so differences between rows are
the setting's, not the luck of the draw.

The feature space of top1/top5/diversity, fixed and simple: the RGB image in [0, 1], average-pooled
to 16×16 (768 numbers), minus the mean of the reference images, scaled to unit L2 norm. The
reference is the set of distinct images of the prepared data (train and val); images identical in
this space are one class, so an emoji drawn alike under two names, or one image under several
captions, is one answer. A caption's class is the class of its own val image. Read the numbers
against the two baseline rows: 'random guess' (top1 = 1/K, top5 = 5/K for K classes; diversity of
two different real images) and 'real images' (the val images themselves: top1 = 100% by construction,
and one image per caption, so diversity 0). FID for few images is biased upwards: compare FIDs
computed with the same numbers of images only.
"""
import itertools
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from configurator import configure

# -----------------------------------------------------------------------------
# what to evaluate
out_dir = 'out'  # the training run: out_dir/ckpt.pt
ckpt = ''  # or a checkpoint file, which wins over out_dir
data_dir = ''  # prepared data whose val captions are the prompts; default: the checkpoint's own
# the settings: every combination of these four lists is one row of the table
cfg = (7.0,)  # --cfg 1,3,5,7 or --cfg=7
cfg_min_sigma = (0.2,)  # --cfg_min_sigma 0,0.2: guidance only at σ > this (as sample.py); 0 = at every step
steps = (15,)  # --steps 5,10,15,25
sampler = 'dpmpp2m'  # --sampler ddim,dpmpp2m
n_prompts = 64  # val captions to prompt with: a seeded random subset; 0 = all of them
n_per_prompt = 4  # images per prompt (diversity needs 2 or more)
seed = 0  # image i of a setting starts from the noise of seed + i; the prompt subset is drawn with it too
# the metrics
inception = ''  # FID: torch-fidelity's Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth)
fid_ref = ''  # FID reference: a folder of images; default: the prepared training images
fid_ref_n = 2048  # at most this many reference images (a seeded random subset)
clip = ''  # CLIP score: a CLIP model (hub name or local dir); default: the checkpoint's text encoder if CLIP
# output
out = ''  # the JSON; default: eval.json next to the checkpoint
grids = True  # a PNG grid per setting (the first 8 prompts, one row each) in an eval/ folder next to the JSON
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: as sample.py (bf16 where the hardware has it)
batch_size = 64  # images per denoiser forward
# -----------------------------------------------------------------------------

FEATURE_SIZE = 16  # the emoji metrics' images are average-pooled to FEATURE_SIZE × FEATURE_SIZE


# ----- prompt fidelity and diversity: a fixed, simple feature space -----

def pooled_pixels(images):
    """(B, 3, H, W) in [0, 1] -> (B, 3·16·16): the image average-pooled to 16×16."""
    return F.adaptive_avg_pool2d(images.float(), FEATURE_SIZE).flatten(1)


class Reference:
    """The distinct real images (K classes) that a generated image is matched to.

    images (N, 3, H, W) in [0, 1], duplicates allowed: rows identical in feature space are one class,
    and .row_class (N,) is each row's class."""

    def __init__(self, images, batch_size=4096):
        pooled = torch.cat([pooled_pixels(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        self.pooled, self.row_class = torch.unique(pooled, dim=0, return_inverse=True)  # (K, F), (N,)
        self.mean = self.pooled.mean(0)  # centring removes what all emojis share (white ground, yellow faces)
        self.feats = F.normalize(self.pooled - self.mean, dim=1)  # (K, F)
        self.K = len(self.pooled)

    def features(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, F) unit vectors."""
        return F.normalize(pooled_pixels(images) - self.mean, dim=1)

    def nearest(self, feats, k=5):
        """(B, F) unit features -> (B, k) classes, nearest first (the largest cosine is the smallest L2)."""
        return (feats @ self.feats.T).topk(min(k, self.K), dim=1).indices

    def chance(self, k):
        """The top-k accuracy of a uniform random guess of k distinct classes."""
        return min(k, self.K) / self.K

    def random_pair_distance(self):
        """The mean distance between two different real images: the diversity of unrelated images."""
        return torch.pdist(self.feats).mean().item() if self.K > 1 else 0.0


def prompt_fidelity(ref, feats, targets):
    """Fractions of images whose nearest real image is their target class (top1), or among the 5 nearest."""
    nearest = ref.nearest(feats, 5)  # (B, 5)
    hit = nearest == targets[:, None]
    return hit[:, 0].float().mean().item(), hit.any(1).float().mean().item()


def target_rank(ref, feats, targets):
    """The median over images of the rank of the intended image among all K by similarity: 1 is a hit,
    (K+1)/2 is chance. Still moves when top-5 is 0, as for a young model."""
    sims = feats @ ref.feats.T  # (B, K)
    rank = 1 + (sims > sims.gather(1, targets[:, None])).sum(1)  # (B,)
    return rank.float().median().item()


def diversity(feats, n_per_prompt):
    """Mean L2 distance between the unit features of two images of the same prompt, averaged over
    prompts; feats (P·n, F) prompt-major. 0 when every image of a prompt is the same; at most 2."""
    if n_per_prompt < 2:
        return None
    groups = feats.view(-1, n_per_prompt, feats.shape[1])  # (P, n, F)
    dist = torch.cdist(groups, groups, compute_mode='donot_use_mm_for_euclid_dist')  # (P, n, n), exact 0 for copies
    return (dist.sum() / (len(groups) * n_per_prompt * (n_per_prompt - 1))).item()  # the mean off the diagonal


def measure(images, targets, n_per_prompt, ref, fid=None, clip_score=None, prompts=None):
    """Every metric of one setting. images (P·n, 3, H, W) in [0, 1], prompt-major; targets (P·n,) the class
    in ref of each image's prompt (or None: no fidelity); fid an InceptionFID holding the reference's
    features; clip_score a ClipScore with prompts (P·n,) the caption of each image.
    -> {'top1', 'top5', 'rank', 'diversity', 'fid', 'clip'}, a missing metric None."""
    row = dict(top1=None, top5=None, rank=None, diversity=None, fid=None, clip=None)
    if ref is not None:
        feats = ref.features(images)
        row['diversity'] = diversity(feats, n_per_prompt)
        if targets is not None:
            row['top1'], row['top5'] = prompt_fidelity(ref, feats, targets)
            row['rank'] = target_rank(ref, feats, targets)
    if fid is not None:
        row['fid'] = fid(images)
    if clip_score is not None:
        row['clip'] = clip_score(images, prompts).mean().item()
    return row


# ----- FID: Inception-v3 pool features (torchmetrics), the Fréchet distance of their Gaussians -----

def frechet_distance(real, fake):
    """FID's formula on two feature sets (N1, F) and (N2, F), each seen as a Gaussian N(μ, Σ):
        d² = ‖μ1 - μ2‖² + Tr Σ1 + Tr Σ2 - 2·Tr √(Σ1·Σ2)
    Σ = aᵀa for a factor a: the centred features / √(N-1) when N <= F, else √Σ itself. The eigenvalues
    of Σ1Σ2 = a1ᵀa1·a2ᵀa2 that are not 0 are the squared singular values of a1·a2ᵀ, so Tr √(Σ1Σ2) is the
    sum of those singular values: an (N1, N2) problem instead of the general eigenproblem of an F×F
    matrix (torchmetrics' way, over a minute for F = 2048 on a busy 2-core CPU)."""
    def stats(x):
        x = x.double()
        mu, centred = x.mean(0), x - x.mean(0)
        a = centred / math.sqrt(len(x) - 1)  # (N, F), Σ = aᵀa
        if len(x) > x.shape[1]:  # more samples than features: the F×F symmetric square root is smaller
            w, v = torch.linalg.eigh(a.T @ a)
            a = (v * w.clamp(min=0).sqrt()) @ v.T
        return mu, a
    (mu1, a1), (mu2, a2) = stats(real), stats(fake)
    cross = torch.linalg.svdvals(a1 @ a2.T).sum()  # Tr √(Σ1Σ2)
    return ((mu1 - mu2).square().sum() + a1.square().sum() + a2.square().sum() - 2 * cross).item()


class InceptionFID:
    """FID to a fixed set of reference images: the 2048-d pool features of torchmetrics' FID Inception-v3
    (torch-fidelity's port of the TF weights), read from a local file because their download needs a
    network. Images in [0, 1], quantized to uint8 as saved images would be."""

    def __init__(self, weights_path, device='cpu', batch_size=64):
        from torchmetrics.image.fid import NoTrainInceptionV3
        self.net = NoTrainInceptionV3(name='inception-v3-compat', features_list=['2048'],
                                      feature_extractor_weights_path=weights_path).to(device)
        self.device, self.batch_size, self.reference = device, batch_size, None

    @torch.no_grad()
    def features(self, images):
        """(N, 3, H, W) in [0, 1] -> (N, 2048) float64 on the CPU."""
        out = [self.net((images[i:i + self.batch_size] * 255).round().byte().to(self.device)).double().cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def set_reference(self, images):
        self.reference = self.features(images)

    def __call__(self, images):
        return frechet_distance(self.reference, self.features(images))


def fid_or_reason(path):
    """(an InceptionFID, None) or (None, why FID is skipped)."""
    if not path:
        return None, ("no Inception weights: pass --inception=PATH, torch-fidelity's "
                      "weights-inception-2015-12-05-6726825d.pth (they cannot be downloaded here)")
    if not os.path.isfile(path):
        return None, f"--inception '{path}' does not exist"
    try:
        import torch_fidelity  # noqa: F401 (torchmetrics' Inception comes from it)
    except ImportError:
        return None, "it needs the torch-fidelity package (pip install -r requirements.txt)"
    try:
        return InceptionFID(path, device), None
    except Exception as e:  # a file that is not the Inception state dict
        return None, (f"--inception '{path}' is not torch-fidelity's Inception-v3 weights: "
                      f"{type(e).__name__}: {str(e).strip()[:200]}")


# ----- CLIP score: one CLIP's image and text embeddings -----

class ClipScore:
    """The cosine between CLIP's embedding of an image and of its prompt, per image, in [-1, 1]
    (torchmetrics' CLIPScore reports 100·max(cos, 0); this is the plain cosine)."""

    def __init__(self, name_or_path, device='cpu'):
        from transformers import CLIPModel, CLIPProcessor
        local = os.path.isdir(name_or_path)
        self.model = CLIPModel.from_pretrained(name_or_path, local_files_only=local).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=local)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts, batch_size=64):
        """images (B, 3, H, W) in [0, 1], prompts list of B str -> (B,) cosines."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = [(img.permute(1, 2, 0) * 255).round().byte().numpy() for img in images[i:i + batch_size].cpu()]
            inputs = self.processor(text=list(prompts[i:i + batch_size]), images=pixels, return_tensors='pt',
                                    padding=True, truncation=True).to(self.device)
            o = self.model(**inputs)
            out.append(F.cosine_similarity(o.image_embeds, o.text_embeds, dim=-1).float().cpu())
        return torch.cat(out)


def clip_or_reason(name, text_encoder):
    """(a ClipScore, None) or (None, why CLIP score is skipped). name '' means the checkpoint's text
    encoder, when it is a CLIP."""
    if not name:
        from encoders import TEXT_ENCODERS
        if not str(text_encoder).lower().startswith('clip'):
            return None, (f"the checkpoint's text encoder is '{text_encoder}', not a CLIP "
                          f"(pass --clip=NAME_OR_DIR to score with one anyway)")
        name = TEXT_ENCODERS.get(text_encoder) or text_encoder.removeprefix('clip:')
    try:
        return ClipScore(name, device), None
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"cannot load CLIP '{name}': {reason[:300]}"


# ----- the data: val prompts with their images, the reference set -----

def to_unit(x):
    """Images in [-1, 1] -> [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def read_folder(path, size, limit, rng):
    """Up to `limit` images of a folder (seeded random subset), resized to size (H, W) -> (N, 3, H, W) in [0, 1]."""
    from PIL import Image
    exts = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(exts))
    if len(files) < 2:
        fail(f"--fid_ref '{path}' has {len(files)} images ({'/'.join(exts)}), FID needs at least 2")
    if len(files) > limit:
        files = [files[i] for i in sorted(rng.choice(len(files), limit, replace=False))]
    out = []
    for f in files:
        img = Image.open(os.path.join(path, f)).convert('RGB').resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def as_list(value, cast, key):
    """A sweep setting as given on the command line -> a flat list: --cfg 1,3,5,7 (a tuple), --cfg 1 3 5 7,
    --cfg=7, --sampler ddim,dpmpp2m (a string)."""
    items, flat = (value if isinstance(value, (list, tuple)) else [value]), []
    for v in items:
        if isinstance(v, (list, tuple)):
            flat += list(v)
        elif isinstance(v, str):
            flat += [s for s in re.split(r'[,\s]+', v) if s]
        else:
            flat.append(v)
    try:
        out = [cast(v) for v in flat]
        if cast is int and any(float(v) != o for v, o in zip(flat, out)):
            raise ValueError  # --steps 7.5
    except (TypeError, ValueError):
        fail(f"--{key} expects a comma-separated list of {cast.__name__}s, got {value!r}")
    if not out:
        fail(f"--{key} is empty")
    return out


def fail(message):
    sys.exit(f"error: {message}")


def fmt(v, pct=False, rank=False):
    if v is None:
        return '-'
    if rank:
        return f"{v:g}"
    if pct:
        return f"{100 * v:.2f}%" if 0 < v < 0.01 else f"{100 * v:.1f}%"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def table(rows, baselines):
    """The results as a markdown table, baselines last."""
    head = "| sampler | cfg | at σ > | steps | top1 | top5 | rank | diversity | FID | CLIP | img/s |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['cfg']:g} | {r['cfg_min_sigma']:g} | {r['steps']} | "
                     f"{fmt(r['top1'], True)} | {fmt(r['top5'], True)} | {fmt(r['rank'], rank=True)} | "
                     f"{fmt(r['diversity'])} | {fmt(r['fid'])} | {fmt(r['clip'])} | {r['images_per_s']:.1f} |")
    for name, b in baselines.items():
        lines.append(f"| {name} | | | | {fmt(b['top1'], True)} | {fmt(b['top5'], True)} | "
                     f"{fmt(b['rank'], rank=True)} | {fmt(b['diversity'])} | {fmt(b['fid'])} | {fmt(b['clip'])} | |")
    return "\n".join(lines)


# ----- the script -----

def main():
    from diffusion import SAMPLERS
    cfgs = as_list(cfg, float, 'cfg')
    min_sigmas = as_list(cfg_min_sigma, float, 'cfg_min_sigma')
    if any(not 0 <= m < 1 for m in min_sigmas):
        fail(f"--cfg_min_sigma must all be in [0, 1), got {min_sigmas}")
    steps_list = as_list(steps, int, 'steps')
    samplers = as_list(sampler, str, 'sampler')
    for s in samplers:
        if s not in SAMPLERS:
            fail(f"--sampler must be among {sorted(SAMPLERS)}, got '{s}'")
    if any(s < 1 for s in steps_list):
        fail(f"--steps must all be >= 1, got {steps_list}")
    if n_per_prompt < 1 or n_prompts < 0:
        fail(f"--n_per_prompt must be >= 1 and --n_prompts >= 0, got {n_per_prompt} and {n_prompts}")
    if fid_ref and not os.path.isdir(fid_ref):
        fail(f"--fid_ref '{fid_ref}' is not a folder of images")

    from encoders import ImageCodec
    from model import PTDTYPES, denoiser_from_checkpoint, load_checkpoint
    from prepare import load_prepared
    from sample import Pipeline, make_noise, save_grid
    if dtype not in PTDTYPES and dtype != 'auto':
        fail(f"--dtype must be 'auto' or one of {sorted(PTDTYPES)}, got '{dtype}'")
    source = ckpt or out_dir
    try:
        checkpoint = load_checkpoint(source, device='cpu')
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    meta = checkpoint.get('data_meta') or {}
    data_path = data_dir or (checkpoint.get('config') or {}).get('data_dir')
    if not data_path:
        fail(f"checkpoint '{source}' records no data_dir: pass --data_dir=PATH (prepare.py's output)")
    try:
        data = load_prepared(data_path)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    for key in ('text_encoder', 'vae'):
        if key in meta and data.meta.get(key) != meta.get(key):
            fail(f"{data_path} has {key}={data.meta.get(key)!r}, the checkpoint was trained with {meta.get(key)!r}")
    model = denoiser_from_checkpoint(checkpoint, ema=True).to(device)
    if model.cond_channels:
        fail(f"'{source}' is an outpainting model; eval.py measures text-to-image models")
    codec = ImageCodec(meta.get('vae', 'none'), device=device)
    pipe = Pipeline(model, None, codec, float(meta.get('scale_factor', codec.scale_factor)), device, dtype)
    json_path = out or os.path.join(os.path.dirname(ckpt) if ckpt else out_dir, 'eval.json')

    # the prompts: a seeded subset of the val captions, each with the real image it was written for
    rng = np.random.default_rng(seed)
    n_val = len(data.val_latents)
    rows_idx = np.arange(n_val)
    if 0 < n_prompts < n_val:
        rows_idx = np.sort(rng.choice(n_val, n_prompts, replace=False))
    P, n = len(rows_idx), n_per_prompt
    captions = [data.val_captions[i] for i in rows_idx]
    text_emb = torch.from_numpy(np.asarray(data.val_text_emb[rows_idx], dtype=np.float32))  # (P, D)
    prompts = [c for c in captions for _ in range(n)]  # prompt-major, like the images
    print(f"{source}: iter {checkpoint.get('iter_num')}, {P} val prompts of {data_path} × {n} images, "
          f"{len(cfgs) * len(min_sigmas) * len(steps_list) * len(samplers)} settings, {device} {pipe.dtype}")

    # the emoji metrics' reference: the distinct images of the pixel-space data, train and val
    ref, targets, real_val, skipped = None, None, None, {}
    pixel_space = meta.get('vae', 'none') == 'none'
    if pixel_space:
        real_val = to_unit(data.to_tensor(data.val_latents[rows_idx]))  # (P, 3, H, W)
        ref = Reference(to_unit(torch.cat([data.to_tensor(data.latents[:]), data.to_tensor(data.val_latents[:])])))
        targets = ref.row_class[len(data.latents) + torch.from_numpy(rows_idx)].repeat_interleave(n)
        print(f"prompt fidelity: {ref.K} distinct images in {data_path} (train and val)")
    else:
        skipped['fidelity'] = ("prompt fidelity and diversity need pixel-space data (the emoji set); "
                               "this data is VAE latents")

    # FID's reference features, computed once for the whole sweep
    fid, reason = fid_or_reason(inception)
    if fid is None:
        skipped['fid'] = reason
    else:
        shape = pipe.latent_shape()
        size = (shape[1] * codec.downsample, shape[2] * codec.downsample)
        if fid_ref:
            ref_images = read_folder(fid_ref, size, fid_ref_n, rng)
        else:
            pick = np.sort(rng.choice(len(data.latents), min(fid_ref_n, len(data.latents)), replace=False))
            ref_images = torch.cat([to_unit(codec.decode(data.to_tensor(data.latents[pick[i:i + 256]], device)).cpu())
                                    for i in range(0, len(pick), 256)])  # unscaled latents -> [0, 1] images
        print(f"FID reference: {len(ref_images)} images from {fid_ref or data_path}")
        fid.set_reference(ref_images)
    clip_score, reason = clip_or_reason(clip, meta.get('text_encoder'))
    if clip_score is None:
        skipped['clip'] = reason
    for what, why in skipped.items():
        print(f"{'FID' if what == 'fid' else 'CLIP score' if what == 'clip' else 'prompt fidelity'} skipped: {why}")

    # the baselines that make the numbers readable
    baselines = {}
    if ref is not None:
        baselines['random guess'] = dict(top1=ref.chance(1), top5=ref.chance(5), rank=(ref.K + 1) / 2,
                                         diversity=ref.random_pair_distance(), fid=None, clip=None)
        real = measure(real_val, targets[::n], 1, ref, fid, clip_score, captions)
        baselines['real images'] = {**real, 'diversity': 0.0}  # one image per caption
    elif fid is not None or clip_score is not None:
        real_images = to_unit(codec.decode(data.to_tensor(data.val_latents[rows_idx], device)).cpu())
        baselines['real images'] = measure(real_images, None, 1, None, fid, clip_score, captions)

    # the sweep; every setting starts from the same noise
    noise = make_noise(range(seed, seed + P * n), pipe.latent_shape())  # (P·n, C, h, w)
    emb = text_emb.repeat_interleave(n, dim=0).to(device)  # (P·n, D)
    pipe.denoise(emb[:2], noise[:2], cfg=3.0, steps=1)  # warm up, so the first row's img/s is not the slowest
    results, t_metrics, n_measured = [], 0.0, 0
    for s, g, lo, k in itertools.product(samplers, cfgs, min_sigmas, steps_list):
        t0 = time.time()
        x0 = pipe.denoise(emb, noise, cfg=g, steps=k, sampler=s, batch_size=batch_size, cfg_min_sigma=lo)
        images = pipe.decode(x0)
        t1 = time.time()
        row = measure(images, targets, n, ref, fid, clip_score, prompts)
        t_metrics, n_measured = t_metrics + time.time() - t1, n_measured + len(images)
        row = dict(sampler=s, cfg=g, cfg_min_sigma=lo, steps=k, **row, images_per_s=len(images) / (t1 - t0))
        results.append(row)
        print(f"{s} cfg {g:g} at σ > {lo:g}, steps {k}: " + ", ".join(
            f"{m} {fmt(row[m], pct=m.startswith('top'), rank=m == 'rank')}"
            for m in ('top1', 'top5', 'rank', 'diversity', 'fid', 'clip') if row[m] is not None)
            + f" ({row['images_per_s']:.1f} img/s)")
        if grids:  # the first 8 prompts, one row each
            grid = os.path.join(os.path.dirname(json_path) or '.', 'eval', f"{s}_cfg{g:g}_min{lo:g}_steps{k}.png")
            save_grid(images[:min(P, 8) * n], n, grid)

    report = dict(checkpoint=source, iter_num=checkpoint.get('iter_num'), data_dir=data_path,
                  n_prompts=P, n_per_prompt=n, seed=seed, device=device, dtype=pipe.dtype,
                  feature_space=f"RGB in [0,1] average-pooled to {FEATURE_SIZE}x{FEATURE_SIZE}, minus the "
                                f"reference mean, L2-normalized; nearest neighbour over {ref.K if ref else 0} "
                                f"distinct images",
                  rows=results, baselines=baselines, skipped=skipped,
                  metric_images_per_s=n_measured / max(t_metrics, 1e-9))
    os.makedirs(os.path.dirname(json_path) or '.', exist_ok=True)
    with open(json_path + '.tmp', 'w') as f:
        json.dump(report, f, indent=1)
    os.replace(json_path + '.tmp', json_path)
    print()
    print(table(results, baselines))
    print(f"\nmetrics: {report['metric_images_per_s']:.0f} images/s; wrote {json_path}")


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    main()
