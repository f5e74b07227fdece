"""
Images and captions -> the .npy files that train.py reads: latents, text embeddings, captions, meta.json,
and a held-out validation split of each. Sources: the emoji set shipped in data/emoji/, a folder of images,
webdataset shards, or a list of image URLs (downloaded with img2dataset, then read as shards).

    python prepare.py --source=emoji                       # pixel space + minilm -> data/prepared/emoji32
    python prepare.py --source=emoji --text_encoder=clip:ViT-L/14 --out_dir=data/prepared/emoji32-clip
    python prepare.py --source=emoji --image_size=64 --font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
    python prepare.py --source=folder --input=photos/ --image_size=256 --vae=stabilityai/sd-vae-ft-ema
    python prepare.py --source=wds --input='shards/{00000..00009}.tar' --image_size=256 --vae=stabilityai/sd-vae-ft-ema
    python prepare.py --source=urls --input=urls.parquet --image_size=256 --vae=stabilityai/sd-vae-ft-ema

A killed run resumes where it stopped when the same command is run again. Reading the result:

    from prepare import load_prepared
    data = load_prepared('data/prepared/emoji32')
    x = data.to_tensor(data.latents[idx])  # (B, C, H, W) float32, unscaled: train.py multiplies by scale_factor
"""
import csv
import functools
import glob
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import tarfile
import time
import unicodedata
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from configurator import config_keys, configure
from encoders import ImageCodec, TextEncoder

# -----------------------------------------------------------------------------
# default config values
source = 'emoji'  # emoji | folder | wds | urls
input = ''  # emoji: its data dir (data/emoji) | folder: a dir | wds: a .tar, a dir of them or 'a/{000..009}.tar' | urls: .parquet/.csv/.tsv/.jsonl
out_dir = ''  # '' -> data/prepared/emoji<image_size>, or data/prepared/<name of the input>
text_encoder = 'minilm'  # minilm | clip:ViT-L/14 | a hub name or local dir (encoders.TextEncoder)
vae = 'none'  # none: pixel space | a diffusers AutoencoderKL name or local dir (encoders.ImageCodec)
image_size = 32
min_image_size = None  # skip images whose shorter side is below this; None: image_size // 2
batch_size = 64  # images per encoding step, and per resume checkpoint
device = 'auto'  # auto: cuda when there is one
amp = True  # encode under bf16 autocast (encoders._autocast)
latent_dtype = 'float16'  # float16 | float32 | uint8 (quantized; the scale is in meta.json)
empty_caption = 'skip'  # skip | error: what to do with an item that has no caption
val_count = 256  # folder/wds/urls: items held out for validation, evenly spread (at most a tenth)
limit = 0  # only the first N items (0: all)
num_workers = 4  # threads decoding images
font = ''  # emoji: render the set from this font first (Noto Color Emoji), at image_size
url_col = 'url'  # urls (and captions.csv): the column names
caption_col = 'caption'
download_processes = 1  # urls: img2dataset's processes and threads per process
download_threads = 32
overwrite = False  # start over, replacing what out_dir holds (else: resume, or refuse other settings)
# -----------------------------------------------------------------------------
_DEFAULTS = {k: globals()[k] for k in config_keys(globals())}

SOURCES = ('emoji', 'folder', 'wds', 'urls')
LATENT_DTYPES = {'float16': np.float16, 'float32': np.float32, 'uint8': np.uint8}
IMAGE_EXTS = frozenset({'jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff'})
EMOJI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'emoji')
EMOJI_FONT = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'  # Debian: fonts-noto-color-emoji
SPLITS = {'train': '', 'val': 'val_'}  # file name prefixes
OUTPUTS = ['meta.json', 'progress.json', 'skipped.jsonl'] + [f'{p}{f}' for p in SPLITS.values()
                                                             for f in ('latents.npy', 'text_emb.npy', 'captions.jsonl')]


class PrepareError(SystemExit):
    """Bad input or settings: a one-line message, no traceback, exit status 1."""


def fail(message):
    raise PrepareError(f"error: {message}")


class Skip(Exception):
    """An item that is skipped and counted: undecodable, too small, no caption, not downloaded."""


class Item(NamedTuple):
    key: str
    load: Callable  # () -> (uint8 image (S, S, 3) or None when there is no caption, [captions])
    val_captions: tuple = ()  # captions held out for validation (the emoji set holds out captions)
    n_rows: int = 1  # the most rows it makes: one per caption


class Source(NamedTuple):
    n_items: int
    items: Callable  # start -> iterator over the items from index start on, always in the same order
    capacity: dict  # split -> the most rows it can get, to size the .npy files
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
    im.draft('RGB', (-(-w * size // min(w, h)), -(-h * size // min(w, h))))  # JPEG: decode at 1/2..1/8 size
    im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with a rotation tag
    if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        im = Image.alpha_composite(Image.new('RGBA', im.size, 'white'), im.convert('RGBA'))
    im = im.convert('RGB')
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def _clean(caption):
    return ' '.join(str(caption).split())  # newlines and runs of spaces -> one space


# ----- the emoji set -----
# data/emoji/emoji.jsonl: one line per emoji {index, emoji, codepoints, names, captions, val_captions};
# data/emoji/emoji<S>.png: the images, tile `index` of an atlas of S x S tiles, 64 a row, on white.

EMOJI_TEMPLATES = [  # {a}: the name's article ('a ', 'an ', 'the ' or '' for a plural), {s}: 'a ' or ''
    '{a}{n}', '{n}', '{n} emoji', '{a}{n} emoji', '{s}cartoon {n}', '{s}cute {n}', 'an icon of {a}{n}',
    'a drawing of {a}{n}', 'a picture of {a}{n}', 'an emoji of {a}{n}', 'a flat illustration of {a}{n}',
    '{a}{n} icon', '{a}{n}, emoji style', '{s}small colorful {n}', 'clip art of {a}{n}',
    '{a}{n} on a white background',
]
EMOJI_CAPTIONS = 6  # training captions per emoji, plus 1 held out for validation


def _article(name):
    if name.startswith('flag of '):
        return 'the '
    head = name.split(' with ')[0].split(' of ')[0].split()  # "face with tears of joy" -> face
    last, first = head[-1].lower(), head[0].lower()
    if last.endswith('s') and not last.endswith(('ss', 'us', 'is')) and len(last) > 3:
        return ''  # a plural: "eyes", "sparkles"
    vowel = first[0] in 'aeio' or (first[0] == 'u' and not first.startswith(('uni', 'use', 'usu', 'ur')))
    return 'an ' if vowel else 'a '


def emoji_names(e, data):
    """Its names, most common first: the CLDR short name, the Unicode name, the aliases (GitHub, Slack)."""
    cldr = data['en'].strip(':').replace('_', ' ').replace('\u2019', "'")
    flag = all(0x1F1E6 <= ord(ch) <= 0x1F1FF for ch in e) or (e[0] == '\U0001F3F4' and len(e) > 2
                                                                and 0xE0000 <= ord(e[1]) <= 0xE007F)
    names = [f'flag of {cldr}', f'{cldr} flag'] if flag else [cldr]
    base = e.replace('\ufe0f', '')
    if len(base) == 1:  # Unicode names exist for single code points only
        uname = unicodedata.name(base, '').lower()
        if uname and 'cjk' not in uname and 'regional indicator' not in uname:
            names.append(uname)
    for alias in [] if flag else data.get('alias') or []:  # a flag's aliases: 'flag for Andorra', 'andorra'
        alias = alias.strip(':').replace('_', ' ')
        if re.fullmatch(r"[A-Za-z][A-Za-z ']*", alias):  # words only: not ':+1:' or ':clock1:'
            names.append(alias)
    seen = set()
    return [n for n in names if not (n.lower() in seen or seen.add(n.lower()))]


def emoji_captions(e, names):
    """(train, val) captions: templates over the names, taken in turn from each name, shuffled by
    a seed from the emoji itself, so the same on every machine."""
    rng = random.Random(e)
    pools = []
    for n in names:
        a = _article(n)
        pool = [t.format(n=n, a=a, s='a ' if a else '') for t in EMOJI_TEMPLATES]
        rng.shuffle(pool)
        pools.append(pool)
    picked = []
    while len(picked) < EMOJI_CAPTIONS + 1 and any(pools):
        for pool in pools:
            while pool and pool[-1] in picked:
                pool.pop()
            if pool and len(picked) < EMOJI_CAPTIONS + 1:
                picked.append(pool.pop())
    return picked[:EMOJI_CAPTIONS], picked[EMOJI_CAPTIONS:]


def render_emoji(font_path, out_dir, size):
    """Render every fully-qualified emoji without a skin tone that the font draws as one glyph:
    out_dir/emoji<size>.png and out_dir/emoji.jsonl (see above)."""
    try:
        import emoji
        from fontTools.ttLib import TTFont
        from PIL import ImageDraw, ImageFont, features
    except ImportError as e:
        fail(f"rendering the emoji set needs the emoji and fonttools packages ({e.name} is missing)")
    if not os.path.isfile(font_path):
        fail(f"--font={font_path}: no such file (Debian: apt-get install fonts-noto-color-emoji)")
    cmap = TTFont(font_path)['cmap'].getBestCmap()
    # 109 px is the one size of Noto Color Emoji's bitmaps; raqm shapes ZWJ sequences into one glyph
    layout = ImageFont.Layout.RAQM if features.check('raqm') else ImageFont.Layout.BASIC
    font = ImageFont.truetype(font_path, 109, layout_engine=layout)
    one_glyph = font.getlength('\U0001F600') * 1.05
    joiners = {0x200D, 0xFE0F, 0x20E3}  # ZWJ, emoji presentation, keycap: not glyphs of their own
    tones = range(0x1F3FB, 0x1F400)
    chosen = sorted((e for e, d in emoji.EMOJI_DATA.items()
                     if d['status'] == emoji.STATUS['fully_qualified']
                     and not any(ord(ch) in tones for ch in e)
                     and all(ord(ch) in cmap or ord(ch) in joiners for ch in e)
                     and font.getlength(e) <= one_glyph), key=lambda e: [ord(ch) for ch in e])
    cols, canvas = 64, 160
    atlas = Image.new('RGB', (cols * size, -(-len(chosen) // cols) * size), 'white')
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'emoji.jsonl'), 'w', encoding='utf-8') as f:
        for i, e in enumerate(chosen):
            glyph = Image.new('RGBA', (canvas, canvas), (255, 255, 255, 0))
            ImageDraw.Draw(glyph).text((canvas // 2, canvas // 2), e, font=font, embedded_color=True, anchor='mm')
            l, t, r, b = glyph.getbbox()
            side = max(r - l, b - t)  # a square around the glyph, centered, so nothing is stretched
            l, t = l - (side - (r - l)) // 2, t - (side - (b - t)) // 2
            glyph = glyph.crop((l, t, l + side, t + side))  # out of bounds is transparent
            tile = Image.alpha_composite(Image.new('RGBA', glyph.size, 'white'), glyph).convert('RGB')
            atlas.paste(tile.resize((size, size), Image.LANCZOS), ((i % cols) * size, (i // cols) * size))
            names = emoji_names(e, emoji.EMOJI_DATA[e])
            train, val = emoji_captions(e, names)
            f.write(json.dumps(dict(index=i, emoji=e, codepoints=' '.join(f'{ord(ch):04X}' for ch in e),
                                    names=names, captions=train, val_captions=val), ensure_ascii=False) + '\n')
    atlas.save(os.path.join(out_dir, f'emoji{size}.png'), optimize=True)
    print(f"rendered {len(chosen)} emoji at {size} px into {out_dir}")


def _const(image, captions):
    return image, captions


def emoji_source(c):
    root = c.input or EMOJI_DIR
    if c.font:
        render_emoji(c.font, root, c.image_size)
    index, atlas_path = os.path.join(root, 'emoji.jsonl'), os.path.join(root, f'emoji{c.image_size}.png')
    if not os.path.isfile(index):
        fail(f"{index} not found: --input should be the emoji dir (default {EMOJI_DIR})")
    if not os.path.isfile(atlas_path):
        fail(f"{atlas_path} not found: the repo ships 32 px; render {c.image_size} px with --font={EMOJI_FONT}")
    entries = [json.loads(line) for line in open(index, encoding='utf-8')]
    S = c.image_size
    atlas = np.asarray(Image.open(atlas_path).convert('RGB'))  # (rows·S, cols·S, 3)
    rows, cols = atlas.shape[0] // S, atlas.shape[1] // S
    if atlas.shape[:2] != (rows * S, cols * S) or not len(entries) <= rows * cols < len(entries) + cols:
        fail(f"{atlas_path} ({atlas.shape[1]}x{atlas.shape[0]} px) is not an atlas of the {len(entries)} emoji "
             f"in {index} at {S} px: render both again with --font")
    tiles = atlas.reshape(rows, S, cols, S, 3).swapaxes(1, 2).reshape(-1, S, S, 3)  # (rows·cols, S, S, 3)
    entries = entries[:c.limit or None]
    items = [Item(e['emoji'], functools.partial(_const, tiles[e['index']], e['captions']),
                  tuple(e['val_captions']), len(e['captions']) + len(e['val_captions'])) for e in entries]
    capacity = dict(train=sum(len(e['captions']) for e in entries), val=sum(len(e['val_captions']) for e in entries))
    return Source(len(items), lambda start: iter(items[start:]), capacity, 0, [])


# ----- a folder of images -----

def _val_items(n_items, val_count):
    """How many items to hold out: val_count, at most a tenth, at least one when there are two."""
    return min(val_count, max(n_items // 10, 1 if n_items >= 2 else 0))


def _is_val(i, n_items, n_val):
    """Item k of the n_val held out is the middle one of the k-th of n_val equal stretches."""
    k = i * n_val // max(n_items, 1)
    return n_val > 0 and (2 * k + 1) * n_items // (2 * n_val) == i


def _capacity(rows, n_val):
    """rows[i] = the most rows item i makes -> the most rows each split gets."""
    val = sum(r for i, r in enumerate(rows) if _is_val(i, len(rows), n_val))
    return dict(train=sum(rows) - val, val=val)


def _caption_table(root, c):
    """{image path relative to root: [captions]} from root/captions.csv or .jsonl; None when neither is there."""
    path = next((p for p in (os.path.join(root, 'captions.csv'), os.path.join(root, 'captions.jsonl'))
                 if os.path.isfile(p)), None)
    if path is None:
        return None
    if path.endswith('.csv'):
        with open(path, newline='', encoding='utf-8') as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for i, line in enumerate(open(path, encoding='utf-8')):
            try:
                rows.append(json.loads(line) if line.strip() else None)
            except json.JSONDecodeError:
                fail(f"{path} line {i + 1}: not JSON")
        rows = [r for r in rows if r is not None]
    columns = set(rows[0]) if rows else set()
    file_col = next((k for k in ('file', 'file_name', 'filename', 'image', 'path') if k in columns), None)
    cap_col = next((k for k in (c.caption_col, 'caption', 'text') if k in columns), None)
    if rows and (file_col is None or cap_col is None):
        fail(f"{path}: needs a file column (file, file_name, filename, image or path) and a caption column "
             f"({c.caption_col} or text), has {sorted(columns)}")
    table = {}
    for r in rows:
        table.setdefault(os.path.normpath(str(r[file_col])), []).append(r[cap_col] or '')
    return table


def _load_file(path, captions, size, min_size):
    if callable(captions):
        captions = captions()
    if not any(_clean(cap) for cap in captions):
        return None, []  # no caption: not worth decoding
    return read_image(path, size, min_size), captions


def _read_txt(path):
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return [f.read()]
    except FileNotFoundError:
        return []


def folder_source(c):
    root = c.input
    if not root:
        fail("--source=folder needs --input=DIR, a directory of images")
    if not os.path.isdir(root):
        fail(f"--input={root}: no such directory")
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root)
                   for f in names if f.rsplit('.', 1)[-1].lower() in IMAGE_EXTS)
    table = _caption_table(root, c)
    skipped = []
    if table is not None:  # listed but not there
        skipped = [(f, 'missing file') for f in table if not os.path.isfile(os.path.join(root, f))]
    files = files[:c.limit or None]
    items = []
    for rel in files:
        key = os.path.splitext(rel)[0]
        if table is None:  # same-named .txt, read in the loader threads: a million small files
            captions = functools.partial(_read_txt, os.path.join(root, key + '.txt'))
        else:
            captions = table.get(os.path.normpath(rel), [])
        load = functools.partial(_load_file, os.path.join(root, rel), captions, c.image_size, c.min_image_size)
        items.append(Item(rel, load, (), 1 if callable(captions) else max(1, len(captions))))
    n_val = _val_items(len(items), c.val_count)
    return Source(len(items), lambda start: iter(items[start:]), _capacity([it.n_rows for it in items], n_val),
                  n_val, skipped)


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
        fail(f"--input={spec}: no such file {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''))
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
                    prefix = base_plus_ext(m.name)[0] if m.isreg() and not re.match(r'__[^/]*__($|/)', m.name) else None
                    if prefix is not None and prefix != prev:
                        n, prev = n + 1, prefix
        except (tarfile.TarError, OSError) as e:
            print(f"warning: {shard}: {e}; reading what can be read")
    return n


def _load_sample(sample, size, min_size):
    if 'txt' in sample:
        captions = [sample['txt'].decode('utf-8', errors='replace')]
    elif 'json' in sample:
        try:
            meta = json.loads(sample['json'])
            captions = [meta.get('caption') or meta.get('text') or '']
        except (ValueError, AttributeError):
            raise Skip("bad .json caption") from None
    else:
        captions = []
    ext = next((k for k in sample if k in IMAGE_EXTS), None)
    if ext is None:
        raise Skip(f"no image in sample (has {sorted(k for k in sample if not k.startswith('__'))})")
    if not any(_clean(cap) for cap in captions):
        return None, []
    return read_image(io.BytesIO(sample[ext]), size, min_size), captions


def wds_source(c, spec=None, skipped=()):
    import webdataset as wds
    spec = spec or c.input
    if not spec:
        fail("--source=wds needs --input: a .tar, a directory of them or a pattern like 'shards/{00000..00009}.tar'")
    shards = _shard_list(spec)
    n_items = _count_samples(shards)
    if c.limit:
        n_items = min(n_items, c.limit)

    def items(start):
        ds = wds.WebDataset(shards, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
        for sample in itertools.islice(ds, start, n_items):
            key = f"{os.path.basename(sample.get('__url__', ''))}/{sample['__key__']}"
            yield Item(key, functools.partial(_load_sample, sample, c.image_size, c.min_image_size))
    n_val = _val_items(n_items, c.val_count)
    return Source(n_items, items, dict(train=n_items - n_val, val=n_val), n_val, list(skipped))


# ----- a list of URLs -----

def _columns(path, fmt):
    if fmt == 'parquet':
        import pyarrow.parquet as pq
        return pq.read_schema(path).names
    with open(path, newline='', encoding='utf-8') as f:
        if fmt == 'jsonl':
            return list(json.loads(f.readline() or '{}'))
        return next(csv.reader(f, delimiter='\t' if fmt == 'tsv' else ','), [])


def urls_source(c, out_dir):
    """Download the images with img2dataset into out_dir/shards (resized, center-cropped webdataset
    shards), then read those. Failed downloads are counted as skipped items."""
    path = c.input
    if not path:
        fail("--source=urls needs --input: a .parquet, .csv, .tsv or .jsonl list with url and caption columns")
    if not os.path.isfile(path):
        fail(f"--input={path}: no such file")
    fmt = path.rsplit('.', 1)[-1].lower()
    if fmt not in ('parquet', 'csv', 'tsv', 'jsonl'):
        fail(f"--input={path}: expected a .parquet, .csv, .tsv or .jsonl file")
    columns = _columns(path, fmt)
    for key, col in (('url_col', c.url_col), ('caption_col', c.caption_col)):
        if col not in columns:
            fail(f"{path}: no column '{col}' (has {columns}); set --{key}")
    shards = os.path.join(out_dir, 'shards')
    marker = os.path.join(shards, 'download.json')
    wanted = dict(input=os.path.abspath(path), image_size=c.image_size, min_image_size=c.min_image_size,
                  url_col=c.url_col, caption_col=c.caption_col)
    done = json.load(open(marker, encoding='utf-8')) if os.path.isfile(marker) else {}
    if done.get('settings') != wanted:
        try:
            from img2dataset import download
        except ImportError:
            fail("--source=urls needs img2dataset (pip install -r requirements.txt)")
        if done:  # shards of another list or size
            shutil.rmtree(shards, ignore_errors=True)
        os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')  # img2dataset imports albumentations, which asks PyPI
        download(url_list=path, output_folder=shards, input_format=fmt, url_col=c.url_col, caption_col=c.caption_col,
                 output_format='webdataset', image_size=c.image_size, resize_mode='center_crop',
                 min_image_size=c.min_image_size, processes_count=c.download_processes,
                 thread_count=c.download_threads, number_sample_per_shard=10_000, enable_wandb=False)
        import pyarrow.parquet as pq  # img2dataset writes, beside each shard, a parquet with every url's status
        failed = []
        for p in sorted(glob.glob(os.path.join(shards, '*.parquet'))):
            t = pq.read_table(p, columns=['url', 'status', 'error_message']).to_pylist()
            failed += [(r['url'], f"download failed ({r['error_message']})") for r in t if r['status'] != 'success']
        done = dict(settings=wanted, failed=failed)
        with open(marker + '.tmp', 'w', encoding='utf-8') as f:
            json.dump(done, f)
        os.replace(marker + '.tmp', marker)
    return wds_source(c, shards, [tuple(x) for x in done['failed']])


# ----- writing, resumable -----

class Split:
    """One split's output: latents and text embeddings written into .npy memmaps sized for the most rows
    the split can get (cut to the rows written at the end), and captions appended to a .jsonl."""

    def __init__(self, out_dir, prefix):
        self.paths = [os.path.join(out_dir, f'{prefix}{f}') for f in ('latents.npy', 'text_emb.npy', 'captions.jsonl')]

    def create(self, capacity, latent_shape, dtype, text_dim):
        lat, emb, _ = self.paths
        self.latents = np.lib.format.open_memmap(lat, 'w+', dtype, (capacity, *latent_shape))  # (N, C, H, W)
        self.text_emb = np.lib.format.open_memmap(emb, 'w+', np.float16, (capacity, text_dim))  # (N, D)
        self.n, self.captions = 0, open(self.paths[2], 'wb')

    def reopen(self, n, captions_bytes):
        try:
            self.latents, self.text_emb = (np.load(p, mmap_mode='r+') for p in self.paths[:2])
            self.captions = open(self.paths[2], 'r+b')
        except (OSError, ValueError) as e:
            fail(f"cannot resume: {e}; pass --overwrite=True to start over")
        self.captions.truncate(captions_bytes)  # lines past the last checkpoint are written again
        self.captions.seek(captions_bytes)
        self.n = n

    def write(self, latents, text_emb, records):
        if self.n + len(latents) > len(self.latents):
            fail(f"more rows than counted ({len(self.latents)}) in {self.paths[0]}: the input changed during the run?")
        self.latents[self.n:self.n + len(latents)] = latents
        self.text_emb[self.n:self.n + len(latents)] = text_emb
        self.captions.write(b''.join(json.dumps(r, ensure_ascii=False).encode() + b'\n' for r in records))
        self.n += len(latents)

    def checkpoint(self):
        self.latents.flush()
        self.text_emb.flush()
        self.captions.flush()
        return dict(n=self.n, captions_bytes=self.captions.tell())

    def finish(self):
        self.captions.close()
        del self.latents, self.text_emb  # unmap before cutting the files
        for p in self.paths[:2]:
            shrink_npy(p, self.n)


def shrink_npy(path, n):
    """Cut a .npy file to its first n rows, in place: rewrite the shape in the header (padded to the same
    length, as the format allows) and truncate the data."""
    with open(path, 'r+b') as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if shape[0] == n:
            return
        header = repr({'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': fortran,
                       'shape': (n, *shape[1:])})
        prefix = 8 + (2 if version == (1, 0) else 4)  # magic, version, header length
        f.seek(prefix)
        f.write(header.ljust(offset - prefix - 1).encode('latin1') + b'\n')
        f.truncate(offset + n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _write_json(path, obj):
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(path + '.tmp', path)  # atomic: a kill leaves the old file or the new one


def _quantize(z, q):
    """float latents -> uint8 with z ≈ q·scale + offset; returns the codes and how many were clipped."""
    codes = np.rint((z - q['offset']) / q['scale'])
    return np.clip(codes, 0, 255).astype(np.uint8), int(((codes < 0) | (codes > 255)).sum())


def _prefetch(pool, batches, depth=2):
    """Yield (items, results) batch by batch, loading `depth` batches ahead in threads so decoding overlaps
    encoding. A result is (image, captions), or the Skip that its loader raised."""
    def load(item):
        try:
            return item.load()
        except Skip as e:
            return e
    pending = deque()
    for items in batches:
        pending.append((items, [pool.submit(load, it) for it in items]))
        if len(pending) > depth:
            items, futures = pending.popleft()
            yield items, [f.result() for f in futures]
    while pending:
        items, futures = pending.popleft()
        yield items, [f.result() for f in futures]


def _batches(iterator, n):
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def prepare(**overrides):
    """The whole run: prepare(source='folder', input='photos/', ...) with the keys of the config above.
    Returns meta.json's contents."""
    t_start = time.time()
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        fail(f"unknown config key '{sorted(unknown)[0]}'")
    c = SimpleNamespace(**{**_DEFAULTS, **overrides})
    for key, allowed in (('source', SOURCES), ('latent_dtype', tuple(LATENT_DTYPES)), ('empty_caption', ('skip', 'error'))):
        if getattr(c, key) not in allowed:
            fail(f"--{key}={getattr(c, key)}: expected one of {', '.join(allowed)}")
    if c.image_size < 8 or c.batch_size < 1:
        fail(f"--image_size={c.image_size} and --batch_size={c.batch_size}: expected at least 8 and 1")
    c.min_image_size = c.image_size // 2 if c.min_image_size is None else c.min_image_size
    c.device = ('cuda' if torch.cuda.is_available() else 'cpu') if c.device == 'auto' else c.device
    if c.device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"--device={c.device}: no CUDA device here (--device=cpu, or auto)")
    if not c.out_dir:
        name = f'emoji{c.image_size}' if c.source == 'emoji' else \
            os.path.basename(os.path.normpath(c.input)).split('.')[0].split('{')[0] or c.source
        c.out_dir = os.path.join('data', 'prepared', name)
    out_dir = c.out_dir
    # what the output depends on; batch_size, device and threads do not change it
    settings = {k: getattr(c, k) for k in ('source', 'input', 'text_encoder', 'vae', 'image_size', 'min_image_size',
                                          'amp', 'latent_dtype', 'empty_caption', 'val_count', 'limit',
                                          'url_col', 'caption_col')}
    settings['input'] = os.path.abspath(c.input) if c.input and '{' not in c.input else c.input

    # ----- a finished run, an interrupted one, or a fresh start -----
    progress_path, meta_path = os.path.join(out_dir, 'progress.json'), os.path.join(out_dir, 'meta.json')
    previous = json.load(open(progress_path, encoding='utf-8')) if os.path.isfile(progress_path) else \
        json.load(open(meta_path, encoding='utf-8')) if os.path.isfile(meta_path) else None
    if c.overwrite:
        previous = None
    if previous is not None and previous.get('settings') != settings:
        old = previous.get('settings') or {}
        diff = ', '.join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
        fail(f"{out_dir} holds a run with other settings ({diff}): pass --overwrite=True to replace it, "
             f"or another --out_dir")
    if previous is not None and not os.path.isfile(progress_path):
        print(f"{out_dir} is already prepared ({previous['n']} rows, {previous['n_val']} val): nothing to do")
        return previous
    if previous is None:
        for f in OUTPUTS:
            if os.path.exists(os.path.join(out_dir, f)):
                os.remove(os.path.join(out_dir, f))
    os.makedirs(out_dir, exist_ok=True)

    src = {'emoji': emoji_source, 'folder': folder_source, 'wds': wds_source,
           'urls': functools.partial(urls_source, out_dir=out_dir)}[c.source](c)
    if src.n_items == 0:
        fail(f"no images found in --input={c.input or EMOJI_DIR}")
    text = TextEncoder(c.text_encoder, c.device, amp=c.amp)
    codec = ImageCodec(c.vae, c.device, amp=c.amp)
    if c.image_size % codec.downsample:
        fail(f"--image_size={c.image_size} is not a multiple of the vae's downsampling factor {codec.downsample}")
    latent_shape = (codec.channels, c.image_size // codec.downsample, c.image_size // codec.downsample)
    splits = {name: Split(out_dir, prefix) for name, prefix in SPLITS.items()}
    skip_log = os.path.join(out_dir, 'skipped.jsonl')
    if previous is None:
        state = dict(settings=settings, n_items=src.n_items, items_done=0, skip_counts={}, quantization=None,
                     seconds=0.0)
        for name, split in splits.items():
            split.create(src.capacity[name], latent_shape, LATENT_DTYPES[c.latent_dtype], text.dim)
            state[name] = dict(n=0, captions_bytes=0)
        skips = open(skip_log, 'wb')
        state['skipped_bytes'] = 0
    else:
        state = previous
        if state['n_items'] != src.n_items:
            fail(f"--input changed since this run began ({state['n_items']} items, now {src.n_items}): "
                 f"pass --overwrite=True to start over")
        for name, split in splits.items():
            split.reopen(**state[name])
        skips = open(skip_log, 'r+b')
        skips.truncate(state['skipped_bytes'])
        skips.seek(state['skipped_bytes'])
        print(f"resuming {out_dir} at item {state['items_done']} of {src.n_items}")
    counts = Counter(state['skip_counts'])

    def skip(key, reason):
        if sum(counts.values()) < 10:
            tqdm.write(f"warning: skipped {key}: {reason}")
        elif sum(counts.values()) == 10:
            tqdm.write(f"warning: further skipped items are counted, not shown (all are in {skip_log})")
        counts[reason.split(' (')[0]] += 1
        skips.write(json.dumps(dict(key=key, reason=reason), ensure_ascii=False).encode() + b'\n')

    if previous is None:
        for key, reason in src.skipped:  # found before any image was read
            skip(key, reason)

    # ----- encode, batch by batch; each batch is a resume point -----
    kill_after = int(os.environ.get('PREPARE_TEST_KILL_AFTER', 0))  # test hook: SIGKILL mid-run, see test_smoke.py
    start, t_run = state['items_done'], time.time()
    bar = tqdm(total=src.n_items, initial=start, unit='img', smoothing=0.05, dynamic_ncols=True)
    with ThreadPoolExecutor(c.num_workers) as pool:
        for b, (items, results) in enumerate(_prefetch(pool, _batches(src.items(start), c.batch_size))):
            images, rows = [], {'train': [], 'val': []}  # rows: (image index in batch, caption, key)
            for i, (item, result) in enumerate(zip(items, results)):
                if isinstance(result, Skip):
                    skip(item.key, str(result))
                    continue
                image, captions = result
                captions = [x for x in map(_clean, captions) if x]
                held_out = [x for x in map(_clean, item.val_captions) if x]
                if not captions and not held_out:
                    if c.empty_caption == 'error':
                        fail(f"{item.key}: empty caption (--empty_caption=skip skips such items)")
                    skip(item.key, 'empty caption')
                    continue
                if _is_val(state['items_done'] + i, src.n_items, src.n_val_items):
                    captions, held_out = [], captions  # held out whole
                rows['train'] += [(len(images), x, item.key) for x in captions]
                rows['val'] += [(len(images), x, item.key) for x in held_out]
                images.append(image)
            if images:
                x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, S, S)
                z = codec.encode(x).cpu().numpy()  # (B, C, h, w), unscaled
                emb = text([cap for r in rows.values() for _, cap, _ in r]).cpu().numpy()  # (R, D)
                if c.latent_dtype == 'uint8':
                    if state['quantization'] is None and c.vae == 'none':
                        state['quantization'] = dict(scale=2 / 255, offset=-1.0, clipped=0)  # exact for pixels
                    elif state['quantization'] is None:  # from the first batch, half its range spare on each side
                        lo, hi = float(z.min()), float(z.max())
                        state['quantization'] = dict(scale=2 * (hi - lo) / 255, offset=lo - (hi - lo) / 2, clipped=0)
                    z, clipped = _quantize(z, state['quantization'])
                    state['quantization']['clipped'] += clipped
                done = 0
                for name, r in rows.items():
                    splits[name].write(z[[j for j, _, _ in r]], emb[done:done + len(r)],
                                       [dict(caption=cap, key=key) for _, cap, key in r])
                    done += len(r)
            state['items_done'] += len(items)
            if kill_after and b + 1 == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # after the rows are written, before the checkpoint
            for name, split in splits.items():
                state[name] = split.checkpoint()
            skips.flush()
            state.update(skip_counts=dict(counts), skipped_bytes=skips.tell(),
                         seconds=state['seconds'] + time.time() - t_run)
            t_run = time.time()
            _write_json(progress_path, state)
            bar.update(len(items))
            bar.set_postfix(rows=state['train']['n'], val=state['val']['n'], skipped=sum(counts.values()))
    bar.close()
    skips.close()

    # ----- finish: cut the files to the rows written, write meta.json -----
    if state['train']['n'] == 0:
        fail(f"no usable items in --input={c.input or EMOJI_DIR}: skipped {dict(counts)} (see {skip_log})")
    for split in splits.values():
        split.finish()
    examples = [json.loads(line) for line in itertools.islice(open(skip_log, encoding='utf-8'), 100)]
    meta = dict(
        source=c.source, input=settings['input'], text_encoder=text.name, text_dim=text.dim, vae=codec.name,
        scale_factor=codec.scale_factor, latent_shape=list(latent_shape),
        image_size=c.image_size, n=state['train']['n'], n_val=state['val']['n'], latent_dtype=c.latent_dtype,
        text_dtype='float16', quantization=state['quantization'], items=state['items_done'],
        skipped=dict(total=sum(counts.values()), by_reason=dict(counts), first=examples, all='skipped.jsonl'),
        settings=settings, seconds=round(state['seconds'], 2),
        items_per_s=round(state['items_done'] / max(state['seconds'], 1e-9), 1))
    _write_json(meta_path, meta)
    os.remove(progress_path)
    print(f"wrote {meta['n']} rows + {meta['n_val']} val rows of latents {latent_shape} ({c.latent_dtype}) and "
          f"{text.name} embeddings ({text.dim}) to {out_dir} in {time.time() - t_start:.1f}s; "
          f"skipped {sum(counts.values())} items" + (f" {dict(counts)}" if counts else ''))
    return meta


# ----- reading, for train.py -----

@dataclass
class Prepared:
    """A prepared dataset: .npy memmaps (rows are read from disk as they are indexed) and meta.json."""
    data_dir: str
    meta: dict
    latents: np.ndarray  # (N, C, H, W) unscaled latents, float16 (or uint8, see to_tensor)
    text_emb: np.ndarray  # (N, D) float16
    val_latents: np.ndarray
    val_text_emb: np.ndarray

    @functools.cached_property
    def captions(self):
        return _read_captions(os.path.join(self.data_dir, 'captions.jsonl'), len(self.latents))

    @functools.cached_property
    def val_captions(self):
        return _read_captions(os.path.join(self.data_dir, 'val_captions.jsonl'), len(self.val_latents))

    def to_tensor(self, rows, device='cpu'):
        """Rows read from latents or text_emb (np array) -> float32 tensor on device, uint8 latents
        de-quantized. The latents stay unscaled: train.py multiplies them by meta['scale_factor']."""
        rows = np.asarray(rows)
        rows = np.ascontiguousarray(rows) if rows.flags.writeable else rows.copy()  # a memmap view is read-only
        x = torch.from_numpy(rows).to(device)  # move the small dtype, convert there
        if x.dtype == torch.uint8:
            q = self.meta['quantization']
            return x.float() * q['scale'] + q['offset']
        return x.float()


def _read_captions(path, n):
    try:
        captions = [json.loads(line)['caption'] for line in open(path, encoding='utf-8')]
    except (OSError, ValueError, KeyError) as e:
        fail(f"{path}: cannot read captions ({e})")
    if len(captions) != n:
        fail(f"{path}: {len(captions)} captions, expected {n} (one per row of the .npy files)")
    return captions


def load_prepared(data_dir):
    """Open a prepare.py output dir for reading. A missing or inconsistent file is a one-line PrepareError."""
    if not os.path.isdir(data_dir):
        fail(f"{data_dir}: no such directory (make it with: python prepare.py --source=emoji)")
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        if os.path.isfile(os.path.join(data_dir, 'progress.json')):
            fail(f"{data_dir}: an unfinished prepare.py run; run the same prepare.py command again to finish it")
        fail(f"{meta_path} not found: {data_dir} is not a prepare.py output")
    try:
        meta = json.load(open(meta_path, encoding='utf-8'))
    except ValueError as e:
        fail(f"{meta_path}: not JSON ({e})")
    arrays = {}
    for name, rows, shape in (('latents', 'n', meta.get('latent_shape')), ('text_emb', 'n', [meta.get('text_dim')]),
                              ('val_latents', 'n_val', meta.get('latent_shape')),
                              ('val_text_emb', 'n_val', [meta.get('text_dim')])):
        path = os.path.join(data_dir, f'{name}.npy')
        try:
            arrays[name] = np.load(path, mmap_mode='r')
        except (OSError, ValueError) as e:
            fail(f"{path}: cannot read ({e})")
        expected = (meta.get(rows), *shape)
        if arrays[name].shape != expected:
            fail(f"{path}: shape {arrays[name].shape}, expected {expected} (from meta.json)")
    return Prepared(data_dir, meta, **arrays)


# ----- bench and test helpers -----

def make_random_vae(path, block_out_channels=(32, 64, 128, 128), latent_channels=4, seed=0):
    """Save a random-init AutoencoderKL to path (f = 2^(len(block_out_channels) - 1)): the real code
    path and the real cost of a small VAE, with no download. The default is the SD VAE at 1/4 width."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(block_out_channels)
    AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n,
                  block_out_channels=tuple(block_out_channels), latent_channels=latent_channels,
                  layers_per_block=1, norm_num_groups=min(32, block_out_channels[0])).save_pretrained(path)
    return path


def make_image_folder(path, n, size=256, seed=0):
    """n random-but-smooth JPEG photos of size x size px with .txt captions, as a folder source."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # blurred up, so JPEG sees photo-like content
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(os.path.join(path, f'{i:06d}.jpg'), quality=90)
        with open(os.path.join(path, f'{i:06d}.txt'), 'w') as f:
            f.write(f'a blurry photo number {i}')
    return path


def bench_prepare(source='emoji', n_images=0, image_size=32, vae='none', text_encoder='minilm', device='cpu',
                  batch_size=64, workdir=None):
    """prepare.py's throughput on one setting, for bench.py. source='folder' with no input makes n_images
    random 256 px JPEGs; vae='random' is make_random_vae(). Returns images/s (images decoded and encoded)
    and rows/s (image-caption pairs written; the emoji set has 7 rows an image)."""
    import tempfile
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        kw = dict(source=source, out_dir=os.path.join(tmp, 'out'), image_size=image_size, device=device,
                  text_encoder=text_encoder, batch_size=batch_size, limit=n_images)
        if source == 'folder':
            kw['input'] = make_image_folder(os.path.join(tmp, 'images'), n_images or 64, size=256)
        kw['vae'] = make_random_vae(os.path.join(tmp, 'vae')) if vae == 'random' else vae
        t = time.time()
        meta = prepare(**kw)
        seconds = time.time() - t  # everything: loading the encoders, decoding, encoding, writing
    return dict(images=meta['items'], rows=meta['n'] + meta['n_val'], seconds=seconds,
                images_per_s=meta['items'] / seconds, rows_per_s=(meta['n'] + meta['n_val']) / seconds,
                encode_images_per_s=meta['items_per_s'])


if __name__ == '__main__':
    config = configure(dict(_DEFAULTS), sys.argv[1:])
    prepare(**config)
