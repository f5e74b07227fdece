"""
The inputs that prepare.py reads, its --source: the emoji set, a folder of images, webdataset
shards, a list of image URLs. A library; the settings come in as c, prepare.py's config.

    src = open_source(c)   # a Source: n_items, items(start), the splits' capacity, ...
    for item in src.items(0):  # from any index on, in the same order: a killed run resumes
        image, captions = item.load()  # (S, S, 3) uint8, [str]; raises Skip for an unusable item
"""
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
from collections import Counter
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from configurator import fail
from dataset import write_json

IMAGE_EXTS = frozenset({'jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff'})
EMOJI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'emoji')


class Skip(Exception):
    """An item that is skipped and counted: undecodable, too small, no caption, not downloaded."""


class Item(NamedTuple):
    key: str
    load: Callable  # () -> (uint8 image (S, S, 3) or None when there is no caption, [captions])
    held_out: dict = {}  # split -> captions that only it gets (the emoji set: val, heldout)
    n_rows: int = 1  # the most rows it makes: one per caption


class Source(NamedTuple):
    n_items: int
    items: Callable  # start -> iterator over the items from index start on, in the same order
    capacity: dict  # split -> the most rows it can get, to size the .npy files; its splits
    n_val_items: int  # items held out whole, evenly spread (0: the items hold out captions instead)
    skipped: list  # (key, reason) found before any image is read: missing files, failed downloads


# ----- images -----

def read_image(f, size, min_size):
    """An image file (path or file object) -> (size, size, 3) uint8 RGB: transparency onto white,
    the shorter side resized to size, a center crop. Raises Skip for what cannot be used."""
    try:
        with Image.open(f) as im:
            return _resize_crop(im, size, min_size)
    except Skip:
        raise
    except Exception as e:  # PIL raises many kinds for a broken file
        raise Skip(f"cannot decode ({type(e).__name__}: {str(e)[:120]})") from None


def _resize_crop(im, size, min_size):
    w, h = im.size
    if min(w, h) < min_size:
        raise Skip(f"too small ({w}x{h}, shorter side < {min_size})")
    im.draft('RGB', (-(-w * size // min(w, h)), -(-h * size // min(w, h))))  # JPEG: decode smaller
    im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with a rotation tag
    if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        im = Image.alpha_composite(Image.new('RGBA', im.size, 'white'), im.convert('RGBA'))
    im = im.convert('RGB')
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def clean(caption):
    return ' '.join(str(caption).split())  # newlines and runs of spaces -> one space


# ----- the emoji set: data/emoji/emoji.jsonl (captions) and emoji<S>.png (a 64-column atlas) -----

def emoji_source(c):
    root, S = c.input or EMOJI_DIR, c.image_size
    index, atlas_path = os.path.join(root, 'emoji.jsonl'), os.path.join(root, f'emoji{S}.png')
    if not os.path.isfile(index):
        fail(f"{index} not found: --input should be the emoji dir (default {EMOJI_DIR})")
    if not os.path.isfile(atlas_path):
        fail(f"{atlas_path} not found: the repo ships 32 px; render {S} px: data/emoji/build.py")
    entries = [json.loads(line) for line in open(index, encoding='utf-8')]
    atlas = np.asarray(Image.open(atlas_path).convert('RGB'))  # (rows·S, cols·S, 3)
    rows, cols = atlas.shape[0] // S, atlas.shape[1] // S
    n = len(entries)
    if atlas.shape[:2] != (rows * S, cols * S) or not n <= rows * cols < n + cols:
        fail(f"{atlas_path} ({atlas.shape[1]}x{atlas.shape[0]} px) is not an atlas of the {n} "
             f"emoji in {index} at {S} px: render both again with data/emoji/build.py")
    tiles = atlas.reshape(rows, S, cols, S, 3).swapaxes(1, 2).reshape(-1, S, S, 3)  # (K, S, S, 3)
    splits = ['val'] + ['heldout'] * ('heldout_captions' in (entries or [{}])[0])  # older: none
    items, capacity = [], Counter({k: 0 for k in ['train', *splits]})
    for e in entries[:c.limit or None]:
        train = e['captions'] + (e.get('extra_captions', []) if c.emoji_captions == 'rich' else [])
        held_out = {k: e[f'{k}_captions'] for k in splits}
        load = functools.partial(tuple, (tiles[e['index']], train))  # () -> (image, captions)
        n_rows = len(train) + sum(map(len, held_out.values()))
        items.append(Item(e['emoji'], load, held_out, n_rows))
        capacity.update(train=len(train), **{k: len(v) for k, v in held_out.items()})
    return Source(len(items), lambda start: iter(items[start:]), dict(capacity), 0, [])


# ----- a folder of images -----

def _val_items(n_items, val_count):
    """How many items to hold out: val_count, at most a tenth, at least one when there are two."""
    return min(val_count, max(n_items // 10, 1 if n_items >= 2 else 0))


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
        rows = list(csv.DictReader(f)) if path.endswith('.csv') else []
        for i, line in enumerate(f if path.endswith('.jsonl') else []):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError:
                fail(f"{path} line {i + 1}: not JSON")
    columns = set(rows[0]) if rows else set()
    file_cols = ('file', 'file_name', 'filename', 'image', 'path')
    file_col = next((k for k in file_cols if k in columns), None)
    cap_col = next((k for k in (caption_col, 'caption', 'text') if k in columns), None)
    if rows and (file_col is None or cap_col is None):
        fail(f"{path}: needs a file column ({', '.join(file_cols)}) and a caption column "
             f"({caption_col} or text), has {sorted(columns)}")
    table = {}
    for r in rows:
        table.setdefault(os.path.normpath(str(r[file_col])), []).append(r[cap_col] or '')
    return table


def _load_file(path, captions, size, min_size):
    """captions None: the same-named .txt, read here in the loader threads (millions of files)."""
    txt = os.path.splitext(path)[0] + '.txt'
    if captions is None:
        captions = [open(txt, encoding='utf-8', errors='replace').read()] if os.path.isfile(txt) \
            else []
    if not any(clean(cap) for cap in captions):
        return None, []  # no caption: not worth decoding
    return read_image(path, size, min_size), captions


def folder_source(c):
    root = c.input
    if not root:
        fail("--source=folder needs --input=DIR, a directory of images")
    if not os.path.isdir(root):
        fail(f"--input={root}: no such directory")
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root)
                   for f in names if f.rsplit('.', 1)[-1].lower() in IMAGE_EXTS)[:c.limit or None]
    table = _caption_table(root, c.caption_col)
    skipped = [] if table is None else [  # listed but not there
        (f, 'missing file') for f in table if not os.path.isfile(os.path.join(root, f))]
    items = []
    for rel in files:
        captions = None if table is None else table.get(os.path.normpath(rel), [])
        load = functools.partial(_load_file, os.path.join(root, rel), captions, c.image_size,
                                 c.min_image_size)
        items.append(Item(rel, load, {}, max(1, len(captions or []))))
    n_val = _val_items(len(items), c.val_count)
    val = sum(it.n_rows for i, it in enumerate(items) if is_val(i, len(items), n_val))
    capacity = dict(train=sum(it.n_rows for it in items) - val, val=val)
    return Source(len(items), lambda start: iter(items[start:]), capacity, n_val, skipped)


# ----- webdataset shards -----

def _shard_list(spec):
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(spec, '*.tar')))
        if not shards:
            fail(f"--input={spec}: no .tar shards in this directory")
        return shards
    if '{' in spec:
        from braceexpand import braceexpand  # a dependency of webdataset
        shards = list(braceexpand(spec))
    else:
        shards = [spec]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''
        fail(f"--input={spec}: no such file {missing[0]}{more}")
    return shards


def _count_samples(shards):
    """Samples in the shards, from the tar headers alone (no image is read), grouped by key the way
    webdataset groups them: an upper bound that sizes the output files and the progress bar."""
    from webdataset.tariterators import base_plus_ext
    n = 0
    for shard in shards:
        prev = None
        try:
            with tarfile.open(shard) as tar:
                for m in tar:  # header by header, seeking over the data
                    ok = m.isreg() and not re.match(r'__[^/]*__($|/)', m.name)
                    prefix = base_plus_ext(m.name)[0] if ok else None
                    if prefix is not None and prefix != prev:
                        n, prev = n + 1, prefix
        except (tarfile.TarError, OSError) as e:
            print(f"warning: {shard}: {e}; reading what can be read")
    return n


def _load_sample(sample, size, min_size):
    captions = []
    if 'txt' in sample:
        captions = [sample['txt'].decode('utf-8', errors='replace')]
    elif 'json' in sample:
        try:
            meta = json.loads(sample['json'])
            captions = [meta.get('caption') or meta.get('text') or '']
        except (ValueError, AttributeError):
            raise Skip("bad .json caption") from None
    ext = next((k for k in sample if k in IMAGE_EXTS), None)
    if ext is None:
        raise Skip(f"no image in sample (has {sorted(k for k in sample if k[:2] != '__')})")
    if not any(clean(cap) for cap in captions):
        return None, []
    return read_image(io.BytesIO(sample[ext]), size, min_size), captions


def wds_source(c, spec=None, skipped=()):
    import webdataset as wds
    spec = spec or c.input
    if not spec:
        fail("--source=wds needs --input: a .tar, a directory of them or a pattern like "
             "'shards/{00000..00009}.tar'")
    shards = _shard_list(spec)
    n_items = min(_count_samples(shards), c.limit or sys.maxsize)

    def items(start):
        ds = wds.WebDataset(shards, shardshuffle=False, handler=wds.warn_and_continue,
                            empty_check=False)
        for sample in itertools.islice(ds, start, n_items):
            key = f"{os.path.basename(sample.get('__url__', ''))}/{sample['__key__']}"
            yield Item(key, functools.partial(_load_sample, sample, c.image_size,
                                              c.min_image_size))
    n_val = _val_items(n_items, c.val_count)
    return Source(n_items, items, dict(train=n_items - n_val, val=n_val), n_val, list(skipped))


# ----- a list of URLs -----

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
    path = c.input
    if not path:
        fail("--source=urls needs --input: a .parquet, .csv, .tsv or .jsonl list with url and "
             "caption columns")
    if not os.path.isfile(path):
        fail(f"--input={path}: no such file")
    fmt = path.rsplit('.', 1)[-1].lower()
    if fmt not in ('parquet', 'csv', 'tsv', 'jsonl'):
        fail(f"--input={path}: expected a .parquet, .csv, .tsv or .jsonl file")
    if fmt == 'parquet':
        import pyarrow.parquet as pq
        columns = pq.read_schema(path).names
    else:
        with open(path, newline='', encoding='utf-8') as f:
            columns = list(json.loads(f.readline() or '{}')) if fmt == 'jsonl' else \
                next(csv.reader(f, delimiter='\t' if fmt == 'tsv' else ','), [])
    for key, col in (('url_col', c.url_col), ('caption_col', c.caption_col)):
        if col not in columns:
            fail(f"{path}: no column '{col}' (has {columns}); set --{key}")
    shards = os.path.join(c.out_dir, 'shards')
    marker = os.path.join(shards, 'download.json')
    wanted = dict(input=os.path.abspath(path), image_size=c.image_size,
                  min_image_size=c.min_image_size, url_col=c.url_col, caption_col=c.caption_col)
    done = json.load(open(marker, encoding='utf-8')) if os.path.isfile(marker) else {}
    if done.get('settings') != wanted:
        if done:  # shards of another list or size
            shutil.rmtree(shards, ignore_errors=True)
        done = dict(settings=wanted, failed=_download(c, path, fmt, shards))
        write_json(marker, done)
    return wds_source(c, shards, [tuple(x) for x in done['failed']])


def open_source(c):
    """The Source that c.source names."""
    return dict(emoji=emoji_source, folder=folder_source, wds=wds_source,
                urls=urls_source)[c.source](c)
