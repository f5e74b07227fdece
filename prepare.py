"""
Images and captions -> what train.py reads: latents, text embeddings and captions of a training
and a validation split (the emoji set adds a held-out one: data/emoji/README.md), and meta.json.
Sources: the emoji set, a folder of images (captions in same-named .txt files, or a captions.csv
or .jsonl), webdataset shards, or a list of image URLs (downloaded with img2dataset).

    python prepare.py --source=emoji             # pixel space + minilm -> data/prepared/emoji32
    python prepare.py --source=folder --input=pics/ --image_size=256 --vae=stabilityai/sd-vae-ft-ema
    python prepare.py --source=wds --input='shards/{00000..00009}.tar' --image_size=256 --vae=...
    python prepare.py --source=urls --input=urls.parquet --image_size=256 --vae=...

Each batch is a checkpoint: a killed command, run again, resumes and ends with the bytes of an
uninterrupted run. Per split (file prefix '', val_, heldout_) a row per image-caption pair:
latents.npy (N, C, H, W) float16, float32 or uint8, text_emb.npy (N, D) float16, captions.jsonl;
skipped.jsonl says what was skipped and why. From Python:

    prepare(source='folder', input='pics/', image_size=64)  # the settings below, by keyword
    data = load_prepared('data/prepared/emoji32')  # memmaps: x = data.to_tensor(data.latents[i])
"""
import contextlib
import csv
import functools
import glob
import io
import itertools
import json
import os
import re
import shutil
import sys
import tarfile
import time
from collections import Counter, deque, namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from configurator import ConfigError, config_keys, configure, fail, settings
from encoders import ImageCodec, TextEncoder
from model import PTDTYPES

# -----------------------------------------------------------------------------
# default config values
source = 'emoji'  # emoji | folder | wds | urls
input = ''  # emoji: its dir (data/emoji) | folder: a dir | wds: a .tar, a dir of them or
#             'a/{000..009}.tar' | urls: a .parquet/.csv/.tsv/.jsonl list
out_dir = ''  # '' -> data/prepared/emoji<image_size>, or data/prepared/<name of the input>
text_encoder = 'minilm'  # minilm | clip:ViT-L/14 | a hub name or local dir (encoders.TextEncoder)
vae = 'none'  # none: pixel space | a diffusers AutoencoderKL or a TAESD dir (encoders.ImageCodec)
image_size = 32
min_image_size = None  # skip images whose shorter side is below this; None: image_size // 2
batch_size = 64  # images per encoding step, and per resume checkpoint
device = 'auto'  # auto: cuda when there is one
dtype = 'auto'  # the encoders' precision: auto | float32 | bfloat16 | float16
latent_dtype = 'float16'  # float16 | float32 | uint8 (quantized; the scale is in meta.json)
empty_caption = 'skip'  # skip | error: what to do with an item that has no caption
val_count = 256  # folder/wds/urls: items held out for validation, evenly spread (at most a tenth)
limit = 0  # only the first N items (0: all)
num_workers = 4  # threads decoding images
url_col = 'url'  # urls (and captions.csv): the column names
caption_col = 'caption'
download_processes = 1  # urls: img2dataset's processes and threads per process
download_threads = 32
overwrite = False  # start over, replacing what out_dir holds (else resume, or refuse new settings)
# -----------------------------------------------------------------------------
DEFAULTS = {k: globals()[k] for k in config_keys(globals())}
# what the output depends on; batch_size, device and threads do not change it
SIGNATURE = ('source', 'input', 'text_encoder', 'vae', 'image_size', 'min_image_size', 'dtype',
             'latent_dtype', 'empty_caption', 'val_count', 'limit', 'url_col', 'caption_col')
CHOICES = {'source': ('emoji', 'folder', 'wds', 'urls'), 'empty_caption': ('skip', 'error'),
           'latent_dtype': ('float16', 'float32', 'uint8'), 'dtype': ('auto', *PTDTYPES)}
SPLITS = {'train': ('', 'n'), 'val': ('val_', 'n_val'), 'heldout': ('heldout_', 'n_heldout')}
ARRAYS = ('latents.npy', 'text_emb.npy', 'captions.jsonl')  # per split, after its prefix
IMAGE_EXTS = frozenset({'jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff'})
EMOJI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'emoji')


@contextlib.contextmanager
def replacing(path):
    """Write to path + '.tmp', then rename it over path: a kill leaves the old file or the new."""
    yield path + '.tmp'
    os.replace(path + '.tmp', path)


def write_json(path, obj):
    with replacing(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


# ----- reading the output -----

@dataclass
class Prepared:
    """A prepared dataset: .npy memmaps and meta.json; heldout_* None where it has no such split."""
    data_dir: str
    meta: dict
    latents: np.ndarray  # (N, C, H, W) unscaled latents, float16 (or uint8, see to_tensor)
    text_emb: np.ndarray  # (N, D) float16
    val_latents: np.ndarray
    val_text_emb: np.ndarray
    heldout_latents: np.ndarray = None
    heldout_text_emb: np.ndarray = None
    captions = functools.cached_property(lambda self: self._captions(''))
    val_captions = functools.cached_property(lambda self: self._captions('val_'))
    heldout_captions = functools.cached_property(lambda self: self._captions('heldout_'))

    def _captions(self, prefix):
        if (rows := getattr(self, prefix + 'latents')) is None:
            return None
        path = os.path.join(self.data_dir, f'{prefix}captions.jsonl')
        try:
            captions = [json.loads(line)['caption'] for line in open(path, encoding='utf-8')]
        except (OSError, ValueError, KeyError) as e:
            fail(f"{path}: cannot read captions ({e})")
        if len(captions) != len(rows):
            fail(f"{path}: {len(captions)} captions, expected {len(rows)} (a row of the .npy each)")
        return captions

    def to_tensor(self, rows, device='cpu'):
        """Rows of latents or text_emb (np array) -> float32 tensor on device, uint8 latents
        de-quantized. The latents stay unscaled: train.py multiplies them by the scale_factor."""
        rows = np.asarray(rows)
        # a memmap view is read-only
        rows = np.ascontiguousarray(rows) if rows.flags.writeable else rows.copy()
        x = torch.from_numpy(rows).to(device).float()  # move the small dtype, convert there
        q = self.meta.get('quantization') if rows.dtype == np.uint8 else None
        return x if q is None else x * q['scale'] + q['offset']


def latent_norm(meta):
    """(shift, scale), each (C|1, 1, 1): model space = (latents - shift) · scale, the denoiser's
    roughly unit-variance input. A codec's own scale_factor, or per channel as measured here."""
    return tuple(torch.tensor(meta.get(k, v), dtype=torch.float32).reshape(-1, 1, 1)
                 for k, v in (('latent_shift', 0.0), ('scale_factor', 1.0)))


def load_prepared(data_dir):
    """Open a prepare.py output dir for reading. A missing or inconsistent file, an empty split or
    a NaN or inf in a sample of the rows is a one-line error naming the file."""
    meta_path, arrays = os.path.join(data_dir, 'meta.json'), {}
    if not os.path.isdir(data_dir):
        fail(f"{data_dir}: no such directory (make it with: python prepare.py --source=emoji)")
    if os.path.isfile(os.path.join(data_dir, 'progress.json')):
        fail(f"{data_dir}: an unfinished prepare.py run; run the same command again to finish it")
    try:
        meta = json.load(open(meta_path, encoding='utf-8'))
    except (OSError, ValueError) as e:
        fail(f"{meta_path}: cannot read ({e}): {data_dir} is not a prepare.py output")
    for split, (prefix, key) in SPLITS.items():
        if split == 'heldout' and key not in meta:
            continue  # only the emoji set has held-out captions
        if not (n := meta.get(key)):
            fail(f"{meta_path}: the {split} split is empty ({key}={n}); prepare the data again "
                 f"with more usable items")
        for name, shape in (('latents', meta.get('latent_shape') or ()),
                            ('text_emb', [meta.get('text_dim')])):
            path = os.path.join(data_dir, f'{prefix}{name}.npy')
            try:
                a = arrays[prefix + name] = np.load(path, mmap_mode='r')
            except (OSError, ValueError) as e:
                fail(f"{path}: cannot read ({e})")
            if a.shape != (n, *shape):
                fail(f"{path}: shape {a.shape}, expected {(n, *shape)} (from meta.json)")
            rows = np.linspace(0, n - 1, min(n, 64)).astype(int)  # a cheap sample, evenly spread
            if len(bad := rows[~np.isfinite(a[rows].reshape(len(rows), -1)).all(1)]):
                fail(f"{path}: row {bad[0]} holds NaN or inf: the file is broken, prepare it again")
    return Prepared(data_dir, meta, **arrays)


def incompatibility(ckpt_meta, data, strict=True):
    """Why a checkpoint cannot train on, or be scored with, this prepared data (its text encoder,
    text width or image codec differ), or None. strict=False skips what a checkpoint lacks."""
    for key in ('text_encoder', 'text_dim', 'vae'):
        if (strict or key in ckpt_meta) and data.meta.get(key) != ckpt_meta.get(key):
            return (f"{data.data_dir} has {key}={data.meta.get(key)!r} but the checkpoint was "
                    f"trained with {key}={ckpt_meta.get(key)!r}")
    return None


# ----- the sources: items in a fixed order, so that a killed run resumes at any index -----

class Skip(Exception):
    """An item that is skipped and counted: undecodable, too small, no caption, not downloaded."""


# items(start): (key, load) from item start on, in the same order each time; load() -> (image
# (S, S, 3) uint8, {split: [captions]}), where a split other than train holds out captions (the
# emoji set's); skipped: (key, reason) found before any image is read
Source = namedtuple('Source', 'n_items items skipped')


def read_image(f, size, min_size):
    """An image file (path or file object) -> (size, size, 3) uint8 RGB: transparency onto white,
    the shorter side resized to size, a center crop. Raises Skip for what cannot be used."""
    try:
        with Image.open(f) as im:
            w, h = im.size
            if min(w, h) >= min_size:
                im.draft('RGB', (-(-w * size // min(w, h)), -(-h * size // min(w, h))))  # JPEG
                im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with a tag
                if im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info:
                    im = Image.alpha_composite(Image.new('RGBA', im.size, 'white'),
                                               im.convert('RGBA'))
                im = im.convert('RGB')
    except Exception as e:  # PIL raises many kinds for a broken file
        raise Skip(f"cannot decode ({type(e).__name__}: {str(e)[:120]})") from None
    if min(w, h) < min_size:
        raise Skip(f"too small ({w}x{h}, shorter side < {min_size})")
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size)))


def clean(caption):
    return ' '.join(str(caption).split())  # newlines and runs of spaces -> one space


def emoji_source(c):
    """data/emoji: emoji.jsonl (the captions of each split) and emoji<S>.png (a 64-column atlas)."""
    root, S = c.input or EMOJI_DIR, c.image_size
    index, atlas_path = os.path.join(root, 'emoji.jsonl'), os.path.join(root, f'emoji{S}.png')
    if not os.path.isfile(index):
        fail(f"{index} not found: --input should be the emoji dir (default {EMOJI_DIR})")
    if not os.path.isfile(atlas_path):
        fail(f"{atlas_path} not found: the repo ships 32 px; render {S} px: data/emoji/build.py")
    entries = [json.loads(line) for line in open(index, encoding='utf-8')]
    atlas = np.asarray(Image.open(atlas_path).convert('RGB'))  # (rows·S, cols·S, 3)
    rows, cols, n = atlas.shape[0] // S, atlas.shape[1] // S, len(entries)
    if atlas.shape[:2] != (rows * S, cols * S) or not n <= rows * cols < n + cols:
        fail(f"{atlas_path} ({atlas.shape[1]}x{atlas.shape[0]} px) is not an atlas of the {n} "
             f"emoji in {index} at {S} px: render both again with data/emoji/build.py")
    tiles = atlas.reshape(rows, S, cols, S, 3).swapaxes(1, 2).reshape(-1, S, S, 3)  # (K, S, S, 3)
    items = [(e['emoji'], functools.partial(tuple, (tiles[e['index']], dict(  # load: a tuple
        train=e['captions'], val=e['val_captions'], heldout=e['heldout_captions']))))
        for e in entries[:c.limit or None]]
    return Source(len(items), lambda start: iter(items[start:]), [])


def is_val(i, n_items, n_val):
    """Item k of the n_val held out is the middle one of the k-th of n_val equal stretches."""
    k = i * n_val // max(n_items, 1)
    return n_val > 0 and (2 * k + 1) * n_items // (2 * n_val) == i


def _caption_table(root, caption_col):
    """{image path relative to root: [captions]} from root/captions.csv or .jsonl, or None."""
    path = next((p for p in (os.path.join(root, f'captions.{x}') for x in ('csv', 'jsonl'))
                 if os.path.isfile(p)), None)
    if path is None:
        return None
    with open(path, newline='', encoding='utf-8') as f:
        try:
            rows = list(csv.DictReader(f)) if path.endswith('.csv') else [
                json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            fail(f"{path}: a line is not JSON ({e})")
    columns = set(rows[0]) if rows else set()
    file_col = next((k for k in ('file', 'file_name', 'image', 'path') if k in columns), None)
    cap_col = next((k for k in (caption_col, 'caption', 'text') if k in columns), None)
    if rows and None in (file_col, cap_col):
        fail(f"{path}: needs a file column (file, file_name, image or path) and a caption column "
             f"({caption_col} or text), has {sorted(columns)}")
    table = {}
    for r in rows:
        table.setdefault(os.path.normpath(str(r[file_col])), []).append(r[cap_col] or '')
    return table


def _load(image, captions, size, min_size):
    """An item's load(): not decoded without a caption. captions None: the image path's
    same-named .txt, read here in the loader threads."""
    if captions is None:
        txt = os.path.splitext(image)[0] + '.txt'
        captions = [open(txt, encoding='utf-8', errors='replace').read()] \
            if os.path.isfile(txt) else []
    if not any(clean(cap) for cap in captions):
        return None, {}
    return read_image(image, size, min_size), dict(train=captions)


def folder_source(c):
    if not c.input or not os.path.isdir(c.input):
        fail(f"--input={c.input}: no such directory" if c.input else
             "--source=folder needs --input=DIR, a directory of images")
    files = sorted(os.path.relpath(os.path.join(d, f), c.input) for d, _, names in
                   os.walk(c.input) for f in names if f.rsplit('.', 1)[-1].lower() in IMAGE_EXTS)
    table = _caption_table(c.input, c.caption_col)
    skipped = [] if table is None else [  # listed but not there
        (f, 'missing file') for f in table if not os.path.isfile(os.path.join(c.input, f))]
    items = [(f, functools.partial(_load, os.path.join(c.input, f), None if table is None else
                                   table.get(os.path.normpath(f), []), c.image_size,
                                   c.min_image_size)) for f in files[:c.limit or None]]
    return Source(len(items), lambda start: iter(items[start:]), skipped)


def _count_samples(shards):
    """Samples in the shards, from the tar headers alone (no image is read), grouped by key the way
    webdataset groups them: an upper bound, for the progress bar and the validation items."""
    from webdataset.tariterators import base_plus_ext
    n = 0
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:  # header by header, seeking over the data
                keys = (base_plus_ext(m.name)[0] for m in tar
                        if m.isreg() and not re.match(r'__[^/]*__($|/)', m.name))
                n += sum(1 for key, _ in itertools.groupby(keys) if key is not None)
        except (tarfile.TarError, OSError) as e:
            print(f"warning: {shard}: {e}; reading what can be read")
    return n


def _load_sample(sample, size, min_size):
    """A webdataset sample's load(): its caption is its .txt, or its .json's caption or text."""
    try:
        meta = {} if 'txt' in sample or 'json' not in sample else json.loads(sample['json'])
        caption = sample['txt'].decode('utf-8', errors='replace') if 'txt' in sample else \
            meta.get('caption') or meta.get('text') or ''
    except (ValueError, AttributeError):
        raise Skip("bad .json caption") from None
    if (ext := next((k for k in sample if k in IMAGE_EXTS), None)) is None:
        raise Skip(f"no image in sample (has {sorted(k for k in sample if k[:2] != '__')})")
    return _load(io.BytesIO(sample[ext]), [caption], size, min_size)


def wds_source(c, spec=None, skipped=()):
    import webdataset as wds
    from braceexpand import braceexpand  # a dependency of webdataset
    if not (spec := spec or c.input):
        fail("--source=wds needs --input: a .tar, a directory of them or a pattern like "
             "'shards/{00000..00009}.tar'")
    shards = sorted(glob.glob(os.path.join(spec, '*.tar'))) if os.path.isdir(spec) else \
        list(braceexpand(spec))
    if not shards or (missing := [s for s in shards if not os.path.isfile(s)]):
        fail(f"--input={spec}: no such file {missing[0]} ({len(missing)} missing)" if shards
             else f"--input={spec}: no .tar shards in this directory")
    n_items = min(_count_samples(shards), c.limit or sys.maxsize)

    def items(start):
        ds = wds.WebDataset(shards, shardshuffle=False, handler=wds.warn_and_continue,
                            empty_check=False)
        for sample in itertools.islice(ds, start, n_items):
            key = f"{os.path.basename(sample.get('__url__', ''))}/{sample['__key__']}"
            yield key, functools.partial(_load_sample, sample, c.image_size, c.min_image_size)
    return Source(n_items, items, list(skipped))


def _download(c, path, fmt, shards):
    """img2dataset: the list -> resized, center-cropped webdataset shards; the failed urls."""
    try:
        from img2dataset import download
    except ImportError:
        fail("--source=urls needs img2dataset (pip install -r requirements.txt)")
    import pyarrow.parquet as pq  # a dependency of img2dataset
    os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')  # albumentations would ask PyPI
    os.makedirs(shards, exist_ok=True)
    download(url_list=path, output_folder=shards, input_format=fmt, url_col=c.url_col,
             caption_col=c.caption_col, output_format='webdataset', image_size=c.image_size,
             resize_mode='center_crop', min_image_size=c.min_image_size,
             processes_count=c.download_processes, thread_count=c.download_threads,
             number_sample_per_shard=10_000, enable_wandb=False)
    failed = []  # beside each shard a parquet has every url's status
    for p in sorted(glob.glob(os.path.join(shards, '*.parquet'))):
        t = pq.read_table(p, columns=['url', 'status', 'error_message']).to_pylist()
        failed += [(r['url'], f"download failed ({r['error_message']})") for r in t
                   if r['status'] != 'success']
    return failed


def urls_source(c):
    """Download the images into out_dir/shards, then read those; failed downloads are skipped."""
    path, fmt = c.input, c.input.rsplit('.', 1)[-1].lower()
    if not path or not os.path.isfile(path) or fmt not in ('parquet', 'csv', 'tsv', 'jsonl'):
        fail(f"--input={path}: " + ("no such file" if path and not os.path.isfile(path) else
                                    "expected a .parquet, .csv, .tsv or .jsonl list of urls"))
    if fmt == 'parquet':
        import pyarrow.parquet as pq
        columns = pq.read_schema(path).names
    else:
        with open(path, newline='', encoding='utf-8') as f:
            columns = list(json.loads(f.readline() or '{}')) if fmt == 'jsonl' else \
                next(csv.reader(f, delimiter='\t' if fmt == 'tsv' else ','), [])
    for key in ('url_col', 'caption_col'):
        if getattr(c, key) not in columns:
            fail(f"{path}: no column '{getattr(c, key)}' (has {columns}); set --{key}")
    shards = os.path.join(c.out_dir, 'shards')
    marker = os.path.join(shards, 'download.json')
    wanted = dict(input=os.path.abspath(path), image_size=c.image_size,
                  min_image_size=c.min_image_size, url_col=c.url_col, caption_col=c.caption_col)
    done = json.load(open(marker, encoding='utf-8')) if os.path.isfile(marker) else {}
    if done.get('settings') != wanted:
        shutil.rmtree(shards, ignore_errors=True)  # shards of another list or size
        done = dict(settings=wanted, failed=_download(c, path, fmt, shards))
        write_json(marker, done)
    return wds_source(c, shards, [tuple(x) for x in done['failed']])


# ----- writing, resumably -----

def previous_run(data_dir, signature, overwrite=False):
    """The state of an interrupted run (progress.json), the meta.json of a finished one, or None,
    when there is neither or overwrite is set: then the old outputs are removed. A run with other
    settings is an error."""
    progress, meta = (os.path.join(data_dir, f) for f in ('progress.json', 'meta.json'))
    path = progress if os.path.isfile(progress) else meta if os.path.isfile(meta) else None
    previous = None if overwrite or path is None else json.load(open(path, encoding='utf-8'))
    if previous is not None and previous.get('settings') != signature:
        old = previous.get('settings') or {}
        diff = ', '.join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in signature.items()
                         if old.get(k) != v)
        fail(f"{data_dir} holds a run with other settings ({diff}): pass --overwrite=True to "
             f"replace it, or another --out_dir")
    outputs = ['meta.json', 'progress.json', 'skipped.jsonl'] + [
        prefix + f for prefix, _ in SPLITS.values() for f in ARRAYS]
    for f in outputs if previous is None else []:
        if os.path.exists(os.path.join(data_dir, f)):
            os.remove(os.path.join(data_dir, f))
    return previous


class Writer:
    """An output dir being written, each file appended to: per split its ARRAYS, and skipped.jsonl.
    checkpoint() after each batch saves the run's state with each file's length to progress.json;
    a rerun passes that state back and cuts each file there, so what a killed run wrote past it is
    written again. finish() writes the row counts into the .npy headers."""

    def __init__(self, out_dir, state, latent_shape, latent_dtype, text_dim):
        self.out_dir, self.state, self.skip_counts = out_dir, state, Counter(state['skip_counts'])
        self.row = {'latents.npy': (np.dtype(latent_dtype), latent_shape),  # dtype and shape
                    'text_emb.npy': (np.dtype('float16'), (text_dim,))}
        self.files = {(s, f): self._open(SPLITS[s][0] + f, f) for s in state['rows']
                      for f in ARRAYS}
        self.files[None, 'skipped.jsonl'] = self._open('skipped.jsonl', None)

    def _open(self, name, kind):
        nbytes = self.state['bytes'].get(name, 0)  # its length at the last checkpoint
        try:
            f = open(os.path.join(self.out_dir, name), 'r+b' if nbytes else 'wb')
        except OSError as e:
            fail(f"cannot resume: {e}; pass --overwrite=True to start over")
        f.truncate(nbytes)
        f.seek(nbytes)
        f.write(self._header(kind, 0) if kind in self.row and not nbytes else b'')
        return f

    def _header(self, kind, n):
        """A .npy header for n rows, 128 bytes whatever n, so finish() can write n in place."""
        dt, shape = self.row[kind]
        d = dict(descr=np.lib.format.dtype_to_descr(dt), fortran_order=False, shape=(n, *shape))
        return np.lib.format.magic(1, 0) + (118).to_bytes(2, 'little') + \
            repr(d).ljust(117).encode() + b'\n'  # magic and version, length, the dict

    def write(self, split, latents, text_emb, records):
        """Rows: (R, C, H, W) latents, (R, D) text embeddings, R {caption, key} records."""
        for kind, rows in (('latents.npy', latents), ('text_emb.npy', text_emb)):
            self.files[split, kind].write(np.ascontiguousarray(rows, self.row[kind][0]).tobytes())
        self.files[split, 'captions.jsonl'].write(b''.join(
            json.dumps(r, ensure_ascii=False).encode() + b'\n' for r in records))
        self.state['rows'][split] += len(records)

    def skip(self, key, reason):
        """A line in skipped.jsonl, counted by reason; the first 10 are shown."""
        if (shown := sum(self.skip_counts.values())) <= 10:
            tqdm.write(f"warning: skipped {key}: {reason}" if shown < 10 else "warning: further "
                       "skipped items are counted, not shown (all are in skipped.jsonl)")
        self.skip_counts[reason.split(' (')[0]] += 1
        self.files[None, 'skipped.jsonl'].write(json.dumps(
            dict(key=key, reason=reason), ensure_ascii=False).encode() + b'\n')

    def checkpoint(self, **updates):
        for f in self.files.values():
            f.flush()
        self.state.update(skip_counts=dict(self.skip_counts), **updates, bytes={
            os.path.basename(f.name): f.tell() for f in self.files.values()})
        write_json(os.path.join(self.out_dir, 'progress.json'), self.state)

    def finish(self, meta):
        """The row counts into the .npy headers, then meta.json: it marks the run finished."""
        for (split, kind), f in self.files.items():
            if kind in self.row:
                f.seek(0)
                f.write(self._header(kind, self.state['rows'][split]))
            f.close()
        write_json(os.path.join(self.out_dir, 'meta.json'), meta)
        os.remove(os.path.join(self.out_dir, 'progress.json'))


def quantize(z, q, pixel_space):
    """float latents -> (uint8 codes, q): z ≈ codes·q['scale'] + q['offset'] (Prepared.to_tensor
    undoes it). q None: the scale is fixed by this batch, half its range spare on each side (for
    pixels exact: [-1, 1]); clipped codes are counted in q['clipped']."""
    if q is None:
        lo, hi = (-1.0, 1.0) if pixel_space else (float(z.min()), float(z.max()))
        q = dict(scale=2 / 255, offset=-1.0, clipped=0) if pixel_space \
            else dict(scale=2 * (hi - lo) / 255, offset=lo - (hi - lo) / 2, clipped=0)
    codes = np.rint((z - q['offset']) / q['scale'])
    q['clipped'] += int(((codes < 0) | (codes > 255)).sum())
    return np.clip(codes, 0, 255).astype(np.uint8), q


# ----- the run -----

def _settings(overrides):
    """DEFAULTS with the keyword overrides, checked, derived values resolved -> the namespace c."""
    try:
        c = settings(DEFAULTS, overrides)
    except ConfigError as e:
        fail(e)
    for key, allowed in CHOICES.items():
        if getattr(c, key) not in allowed:
            fail(f"--{key}={getattr(c, key)}: expected one of {', '.join(allowed)}")
    if c.image_size < 8 or c.batch_size < 1 or c.val_count < 1:
        fail(f"--image_size={c.image_size}, --batch_size={c.batch_size} and --val_count="
             f"{c.val_count}: expected at least 8, 1 and 1")
    c.min_image_size = c.image_size // 2 if c.min_image_size is None else c.min_image_size
    c.device = ('cuda' if torch.cuda.is_available() else 'cpu') if c.device == 'auto' else c.device
    if c.device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"--device={c.device}: no CUDA device here (--device=cpu, or auto)")
    if not c.out_dir:
        name = f'emoji{c.image_size}' if c.source == 'emoji' else \
            os.path.basename(os.path.normpath(c.input)).split('.')[0].split('{')[0] or c.source
        c.out_dir = os.path.join('data', 'prepared', name)
    return c


def _batches(pool, iterator, n, depth=2):
    """Yield (items, results) n items at a time, loading `depth` batches ahead in threads so
    decoding overlaps encoding. A result is (image, captions), or the Skip its loader raised."""
    def load(item):
        try:
            return item[1]()
        except Skip as e:
            return e
    pending = deque()
    while True:
        if batch := list(itertools.islice(iterator, n)):
            pending.append((batch, [pool.submit(load, it) for it in batch]))
        if not pending:
            return
        if len(pending) > depth or not batch:  # at the end: what is left, in order
            items, futures = pending.popleft()
            yield items, [f.result() for f in futures]


def _rows(c, items, results, n_items, writer):
    """A batch's usable images and {split: [(image index, caption, key)]}. A validation item that
    is skipped passes its place on to the next usable one, so that validation is never empty."""
    images, rows, state = [], {name: [] for name in writer.state['rows']}, writer.state
    n_val = 0 if c.source == 'emoji' else min(c.val_count, max(n_items // 10, 1))
    for i, ((key, _), result) in enumerate(zip(items, results)):
        val = is_val(state['items_done'] + i, n_items, n_val)
        skip = str(result) if isinstance(result, Skip) else None
        caps = {} if skip else {k: [x for x in map(clean, v) if x] for k, v in result[1].items()}
        if not skip and not any(caps.values()):
            if c.empty_caption == 'error':
                fail(f"{key}: empty caption (--empty_caption=skip skips such items)")
            skip = 'empty caption'
        if skip:
            writer.skip(key, skip)
            state['val_owed'] += val
            continue
        if val or state['val_owed']:
            state['val_owed'] -= not val
            caps = dict(val=caps['train'])  # held out whole
        for name, captions in caps.items():
            rows[name] += [(len(images), x, key) for x in captions]
        images.append(result[0])
    return images, rows


def _encode(c, src, writer, text, codec):
    """Encode the items batch by batch from the last checkpoint on; each batch is a checkpoint."""
    state, t_run = writer.state, time.time()
    bar = tqdm(total=src.n_items, initial=state['items_done'], unit='img', smoothing=0.05,
               dynamic_ncols=True)
    with ThreadPoolExecutor(c.num_workers) as pool:
        for items, results in _batches(pool, src.items(state['items_done']), c.batch_size):
            images, rows = _rows(c, items, results, src.n_items, writer)
            if images:
                x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1  # (B,3,S,S)
                z = codec.encode(x).cpu().numpy()  # (B, C, h, w), unscaled
                m = np.stack([np.full(z.shape[1], z[:, 0].size), z.sum((0, 2, 3), np.float64),
                              np.square(z, dtype=np.float64).sum((0, 2, 3))])  # per channel
                state['moments'] = (m + np.array(state['moments'] or 0)).tolist()
                if c.latent_dtype == 'uint8':
                    z, state['quantization'] = quantize(z, state['quantization'], c.vae == 'none')
                for name, r in rows.items():
                    emb = text([cap for _, cap, _ in r]).cpu().numpy()  # (R, D)
                    writer.write(name, z[[j for j, _, _ in r]], emb,
                                 [dict(caption=cap, key=key) for _, cap, key in r])
            state['items_done'] += len(items)
            writer.checkpoint(seconds=state['seconds'] + time.time() - t_run)
            t_run = time.time()
            bar.update(len(items))
            bar.set_postfix(rows=state['rows']['train'], val=state['rows']['val'],
                            skipped=sum(writer.skip_counts.values()))
    bar.close()


def prepare(**overrides):
    """The whole run with the settings above, overridden by keyword as on the command line
    (prepare(source='folder', input='photos/')). Returns meta.json's contents."""
    t_start, c = time.time(), _settings(overrides)
    signature = {k: getattr(c, k) for k in SIGNATURE}
    signature['input'] = os.path.abspath(c.input) if c.input and '{' not in c.input else c.input
    previous = previous_run(c.out_dir, signature, c.overwrite)
    if previous is not None and 'items_done' not in previous:
        print(f"{c.out_dir} is already prepared ({previous['n']} rows, {previous['n_val']} val): "
              f"nothing to do")
        return previous
    src = dict(emoji=emoji_source, folder=folder_source, wds=wds_source,
               urls=urls_source)[c.source](c)
    if src.n_items < (1 if c.source == 'emoji' else 2):  # one is held out for validation
        fail(f"--input={c.input or EMOJI_DIR}: {src.n_items} images found, too few to train on "
             f"one and validate on another")
    if previous is not None and previous['n_items'] != src.n_items:
        fail(f"--input changed since this run began ({previous['n_items']} items, now "
             f"{src.n_items}): pass --overwrite=True to start over")
    os.makedirs(c.out_dir, exist_ok=True)
    text, codec = (TextEncoder(c.text_encoder, c.device, dtype=c.dtype),
                   ImageCodec(c.vae, c.device, dtype=c.dtype))
    if c.image_size % codec.downsample:
        fail(f"--image_size={c.image_size} is not a multiple of the vae's downsampling factor "
             f"{codec.downsample}")
    latent_shape = (codec.channels, *[c.image_size // codec.downsample] * 2)
    splits = list(SPLITS) if c.source == 'emoji' else ['train', 'val']
    state = previous or dict(settings=signature, n_items=src.n_items, items_done=0, val_owed=0,
                             moments=None,
                             rows=dict.fromkeys(splits, 0), bytes={}, skip_counts={},
                             quantization=None, seconds=0.0)
    writer = Writer(c.out_dir, state, latent_shape, c.latent_dtype, text.dim)
    if previous is not None:
        print(f"resuming {c.out_dir} at item {state['items_done']} of {src.n_items}")
    for key, reason in src.skipped if previous is None else []:  # found before any image was read
        writer.skip(key, reason)
    _encode(c, src, writer, text, codec)
    return _finish(c, writer, text, codec, latent_shape, time.time() - t_start)


def _finish(c, writer, text, codec, latent_shape, seconds):
    state, counts = writer.state, Counter(writer.state['skip_counts'])
    for split in ('train', 'val'):
        if state['rows'][split] == 0:
            fail(f"no usable items for the {split} split in --input={c.input or EMOJI_DIR}: "
                 f"skipped {dict(counts)} (see {os.path.join(c.out_dir, 'skipped.jsonl')})")
    n, s1, s2 = np.array(state['moments'])  # per channel: values, sum, sum of squares
    mean = s1 / n  # a codec without a known scale gets unit variance per channel
    shift, scale = ((mean.tolist(), (1 / np.sqrt(s2 / n - mean ** 2)).tolist())
                    if codec.scale_factor is None else (0.0, codec.scale_factor))
    meta = dict(
        source=c.source, input=state['settings']['input'], text_encoder=text.name,
        text_dim=text.dim, vae=codec.name, scale_factor=scale, latent_shift=shift,
        latent_shape=list(latent_shape), image_size=c.image_size,
        **{SPLITS[split][1]: n for split, n in state['rows'].items()},
        latent_dtype=c.latent_dtype, text_dtype='float16', quantization=state['quantization'],
        items=state['items_done'], skipped=dict(total=sum(counts.values()), by_reason=dict(counts)),
        settings=state['settings'], seconds=round(state['seconds'], 2),
        items_per_s=round(state['items_done'] / max(state['seconds'], 1e-9), 1))
    writer.finish(meta)
    held, why = f" + {meta.get('n_heldout')} held-out" * ('n_heldout' in meta), f" {dict(counts)}"
    print(f"wrote {meta['n']} rows + {meta['n_val']} val rows{held} of latents {latent_shape} "
          f"({c.latent_dtype}) and {text.name} embeddings ({text.dim}) to {c.out_dir} in "
          f"{seconds:.1f}s; skipped {sum(counts.values())} items{why * bool(counts)}")
    return meta


if __name__ == '__main__':
    prepare(**configure(dict(DEFAULTS), sys.argv[1:]))
