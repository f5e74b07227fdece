"""
Images and captions -> what train.py reads: latents, text embeddings and captions of a training
and a validation split, and meta.json; the emoji set adds a held-out caption split (see
data/emoji/README.md). Sources (sources.py): the emoji set, a folder of images, webdataset shards,
or image URLs.

    python prepare.py --source=emoji             # pixel space + minilm -> data/prepared/emoji32
    python prepare.py --source=emoji --emoji_captions=rich --out_dir=data/prepared/emoji32_rich
    python prepare.py --source=emoji --text_encoder=clip:ViT-L/14 --out_dir=data/prepared/emoji-clip
    python prepare.py --source=folder --input=pics/ --image_size=256 --vae=stabilityai/sd-vae-ft-ema
    python prepare.py --source=wds --input='shards/{00000..00009}.tar' --image_size=256 --vae=...
    python prepare.py --source=urls --input=urls.parquet --image_size=256 --vae=...

The emoji set at another size: render it first (data/emoji/build.py --font=... --image_size=64).
A killed run resumes where it stopped when the same command is run again. dataset.py reads the
result: data = dataset.load_prepared('data/prepared/emoji32').
"""
import itertools
import json
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from configurator import config_keys, configure, fail
from dataset import PreparedWriter, previous_run, quantize
from encoders import ImageCodec, TextEncoder
from sources import EMOJI_DIR, Skip, clean, is_val, open_source

# -----------------------------------------------------------------------------
# default config values
source = 'emoji'  # emoji | folder | wds | urls
input = ''  # emoji: its dir (data/emoji) | folder: a dir | wds: a .tar, a dir of them or
#             'a/{000..009}.tar' | urls: a .parquet/.csv/.tsv/.jsonl list
out_dir = ''  # '' -> data/prepared/emoji<image_size>, or data/prepared/<name of the input>
text_encoder = 'minilm'  # minilm | clip:ViT-L/14 | a hub name or local dir (encoders.TextEncoder)
vae = 'none'  # none: pixel space | a diffusers AutoencoderKL name or dir (encoders.ImageCodec)
image_size = 32
min_image_size = None  # skip images whose shorter side is below this; None: image_size // 2
batch_size = 64  # images per encoding step, and per resume checkpoint
device = 'auto'  # auto: cuda when there is one
amp = True  # encode under bf16 autocast (encoders._autocast)
latent_dtype = 'float16'  # float16 | float32 | uint8 (quantized; the scale is in meta.json)
empty_caption = 'skip'  # skip | error: what to do with an item that has no caption
emoji_captions = 'standard'  # emoji: standard (6 a picture) | rich (+ up to 6 extra_captions)
val_count = 256  # folder/wds/urls: items held out for validation, evenly spread (at most a tenth)
limit = 0  # only the first N items (0: all)
num_workers = 4  # threads decoding images
url_col = 'url'  # urls (and captions.csv): the column names
caption_col = 'caption'
download_processes = 1  # urls: img2dataset's processes and threads per process
download_threads = 32
overwrite = False  # start over, replacing what out_dir holds (else resume, or refuse new settings)
# -----------------------------------------------------------------------------
_DEFAULTS = {k: globals()[k] for k in config_keys(globals())}
# what the output depends on; batch_size, device and threads do not change it
_SIGNATURE = ('source', 'input', 'text_encoder', 'vae', 'image_size', 'min_image_size', 'amp',
              'latent_dtype', 'empty_caption', 'val_count', 'limit', 'url_col', 'caption_col')
CHOICES = {'source': ('emoji', 'folder', 'wds', 'urls'), 'empty_caption': ('skip', 'error'),
           'latent_dtype': ('float16', 'float32', 'uint8'), 'emoji_captions': ('standard', 'rich')}


def _prefetch(pool, iterator, n, depth=2):
    """Yield (items, results) n items at a time, loading `depth` batches ahead in threads so
    decoding overlaps encoding. A result is (image, captions), or the Skip its loader raised."""
    def load(item):
        try:
            return item.load()
        except Skip as e:
            return e
    pending = deque()
    while items := list(itertools.islice(iterator, n)):
        pending.append((items, [pool.submit(load, it) for it in items]))
        if len(pending) > depth:
            items, futures = pending.popleft()
            yield items, [f.result() for f in futures]
    while pending:
        items, futures = pending.popleft()
        yield items, [f.result() for f in futures]


# ----- the run -----

def _configure(overrides):
    """The settings above with the overrides -> checked module globals, derived values resolved."""
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        fail(f"unknown config key '{sorted(unknown)[0]}'")
    globals().update({**_DEFAULTS, **overrides})
    global min_image_size, device, out_dir
    for key, allowed in CHOICES.items():
        if globals()[key] not in allowed:
            fail(f"--{key}={globals()[key]}: expected one of {', '.join(allowed)}")
    if image_size < 8 or batch_size < 1:
        fail(f"--image_size={image_size} and --batch_size={batch_size}: expected at least 8 and 1")
    min_image_size = image_size // 2 if min_image_size is None else min_image_size
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"--device={device}: no CUDA device here (--device=cpu, or auto)")
    if not out_dir:
        name = f'emoji{image_size}' if source == 'emoji' else \
            os.path.basename(os.path.normpath(input)).split('.')[0].split('{')[0] or source
        out_dir = os.path.join('data', 'prepared', name)
    settings = {k: globals()[k] for k in _SIGNATURE}
    settings['input'] = os.path.abspath(input) if input and '{' not in input else input
    if source == 'emoji':
        settings['emoji_captions'] = emoji_captions
    return settings


def _open(previous, settings, src, latent_shape, text_dim):
    """The output dir's writer: new, or reopened at the last checkpoint of the previous run."""
    if previous is None:
        previous = dict(settings=settings, n_items=src.n_items, items_done=0, skip_counts={},
                        skipped_bytes=0, quantization=None, seconds=0.0)
        return PreparedWriter(out_dir, previous, src.capacity, latent_shape,
                              np.dtype(latent_dtype), text_dim)
    if previous['n_items'] != src.n_items:
        fail(f"--input changed since this run began ({previous['n_items']} items, now "
             f"{src.n_items}): pass --overwrite=True to start over")
    print(f"resuming {out_dir} at item {previous['items_done']} of {src.n_items}")
    return PreparedWriter(out_dir, previous, src.capacity)


def _rows(items, results, first, src, skip):
    """A batch's usable images and {split: [(image index, caption, key)]}."""
    images, rows = [], {name: [] for name in src.capacity}
    for i, (item, result) in enumerate(zip(items, results)):
        if isinstance(result, Skip):
            skip(item.key, str(result))
            continue
        captions = [x for x in map(clean, result[1]) if x]
        held_out = {k: [x for x in map(clean, v) if x] for k, v in item.held_out.items()}
        if not captions and not any(held_out.values()):
            if empty_caption == 'error':
                fail(f"{item.key}: empty caption (--empty_caption=skip skips such items)")
            skip(item.key, 'empty caption')
            continue
        if is_val(first + i, src.n_items, src.n_val_items):
            captions, held_out = [], dict(val=captions)  # held out whole
        for name, caps in [('train', captions), *held_out.items()]:
            rows[name] += [(len(images), x, item.key) for x in caps]
        images.append(result[0])
    return images, rows


def _encode(src, writer, text, codec):
    """Encode the items batch by batch from the last checkpoint on; each batch is a checkpoint."""
    state, splits, t_run = writer.state, writer.splits, time.time()
    bar = tqdm(total=src.n_items, initial=state['items_done'], unit='img', smoothing=0.05,
               dynamic_ncols=True)
    with ThreadPoolExecutor(num_workers) as pool:
        for items, results in _prefetch(pool, src.items(state['items_done']), batch_size):
            images, rows = _rows(items, results, state['items_done'], src, writer.skip)
            if images:
                x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1  # (B,3,S,S)
                z = codec.encode(x).cpu().numpy()  # (B, C, h, w), unscaled
                if latent_dtype == 'uint8':
                    z, state['quantization'] = quantize(z, state['quantization'], vae == 'none')
                emb = text([cap for r in rows.values() for _, cap, _ in r]).cpu().numpy()  # (R, D)
                done = 0
                for name, r in rows.items():
                    splits[name].write(z[[j for j, _, _ in r]], emb[done:done + len(r)],
                                       [dict(caption=cap, key=key) for _, cap, key in r])
                    done += len(r)
            state['items_done'] += len(items)
            writer.checkpoint(seconds=state['seconds'] + time.time() - t_run)
            t_run = time.time()
            bar.update(len(items))
            bar.set_postfix(rows=state['train']['n'], val=state['val']['n'],
                            skipped=sum(writer.skip.counts.values()))
    bar.close()
    writer.skip.f.close()


def prepare(**overrides):
    """The whole run with the settings above, overridden by keyword (prepare(source='folder',
    input='photos/')), as the command line does. Returns meta.json's contents."""
    t_start = time.time()
    settings = _configure(overrides)
    previous = previous_run(out_dir, settings, overwrite)
    if previous is not None and 'items_done' not in previous:
        print(f"{out_dir} is already prepared ({previous['n']} rows, {previous['n_val']} val): "
              f"nothing to do")
        return previous
    src = open_source(SimpleNamespace(**{k: globals()[k] for k in _DEFAULTS}))
    if src.n_items == 0:
        fail(f"no images found in --input={input or EMOJI_DIR}")
    os.makedirs(out_dir, exist_ok=True)
    text = TextEncoder(text_encoder, device, amp=amp)
    codec = ImageCodec(vae, device, amp=amp)
    if image_size % codec.downsample:
        fail(f"--image_size={image_size} is not a multiple of the vae's downsampling factor "
             f"{codec.downsample}")
    latent_shape = (codec.channels, image_size // codec.downsample, image_size // codec.downsample)
    writer = _open(previous, settings, src, latent_shape, text.dim)
    for key, reason in src.skipped if previous is None else []:  # found before any image was read
        writer.skip(key, reason)
    _encode(src, writer, text, codec)
    return _finish(writer, text, codec, latent_shape, time.time() - t_start)


def _finish(writer, text, codec, latent_shape, seconds):
    """meta.json, written last: it marks the run finished."""
    state, counts = writer.state, Counter(writer.state['skip_counts'])
    skipped = os.path.join(out_dir, 'skipped.jsonl')
    if state['train']['n'] == 0:
        fail(f"no usable items in --input={input or EMOJI_DIR}: skipped {dict(counts)} "
             f"(see {skipped})")
    examples = [json.loads(line) for line in itertools.islice(open(skipped, encoding='utf-8'), 100)]
    meta = dict(
        source=source, input=state['settings']['input'], text_encoder=text.name, text_dim=text.dim,
        vae=codec.name, scale_factor=codec.scale_factor, latent_shape=list(latent_shape),
        image_size=image_size, n=state['train']['n'], n_val=state['val']['n'],
        **({'n_heldout': state['heldout']['n']} if 'heldout' in writer.splits else {}),
        latent_dtype=latent_dtype, text_dtype='float16', quantization=state['quantization'],
        items=state['items_done'], skipped=dict(total=sum(counts.values()), by_reason=dict(counts),
                                                first=examples, all='skipped.jsonl'),
        settings=state['settings'], seconds=round(state['seconds'], 2),
        items_per_s=round(state['items_done'] / max(state['seconds'], 1e-9), 1))
    writer.finish(meta)
    held = f" + {meta['n_heldout']} held-out" if 'n_heldout' in meta else ''
    why = f" {dict(counts)}" if counts else ''
    print(f"wrote {meta['n']} rows + {meta['n_val']} val rows{held} of latents {latent_shape} "
          f"({latent_dtype}) and {text.name} embeddings ({text.dim}) to {out_dir} in "
          f"{seconds:.1f}s; skipped {sum(counts.values())} items{why}")
    return meta


if __name__ == '__main__':
    prepare(**configure(dict(_DEFAULTS), sys.argv[1:]))
