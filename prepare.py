"""
Images and captions -> what train.py reads: per split (train and val; the emoji set adds a held-out
one, data/emoji/README.md) latents.npy (N, C, H, W), text_emb.npy (N, D) and captions.jsonl, a row
per image-caption pair, and meta.json; skipped.jsonl says what was skipped and why. Each batch is a
checkpoint: a killed command, run again, resumes and ends with the bytes of an uninterrupted run.

    python prepare.py               # the emoji set at 128 px, TAEF2 -> data/prepared/emoji128-taef2
    python prepare.py --image_size=32 --vae=none   # pixel space at 32 px -> data/prepared/emoji32
    python prepare.py --source=folder --input=pics/ --image_size=256 --vae=stabilityai/sd-vae-ft-ema
    python prepare.py --source=wds --input='shards/{00000..00009}.tar' --image_size=256 --vae=...

A list of image URLs: download it first into webdataset shards (pip install img2dataset), then wds:
    img2dataset --url_list=urls.parquet --output_format=webdataset --output_folder=shards \
        --image_size=256 --resize_mode=center_crop --caption_col=caption
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
import secrets
import sys
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from configurator import config_keys, configure, fail, read_text, settings
from encoders import ImageCodec, TextEncoder
from model import PTDTYPES

# -----------------------------------------------------------------------------
# default config values
source = 'emoji'  # emoji | folder | wds
input = ''  # emoji: data/emoji | folder: a dir | wds: .tar(s), a dir of them, 'a/{0..9}.tar'
out_dir = ''  # '' -> data/prepared/emoji<image_size>, or data/prepared/<name of the input>
text_encoder = 'minilm'  # minilm | clip:ViT-L/14 | a hub name or local dir (encoders.TextEncoder)
vae = 'taef2'  # the shipped TAEF2 | none: pixel space | a diffusers VAE or TAESD dir (encoders.py)
image_size = 128
min_image_size = None  # skip images whose shorter side is below this; None: image_size // 2
batch_size = 64  # images per encoding step, and per resume checkpoint
device = 'auto'  # auto: cuda when there is one
dtype = 'auto'  # the encoders' precision: auto | float32 | bfloat16 | float16
latent_dtype = 'float16'  # float16 | float32
empty_caption = 'skip'  # skip | error: what to do with an item that has no caption
val_count = 256  # folder/wds: items held out for validation, evenly spread (at most a tenth)
limit = 0  # only the first N items (0: all)
num_workers = 4  # threads decoding images
caption_col = 'caption'  # a folder's captions.csv/.jsonl: the caption column
overwrite = False  # start over, replacing what out_dir holds (else resume, or refuse new settings)
# -----------------------------------------------------------------------------
DEFAULTS = {k: globals()[k] for k in config_keys(globals())}
# what the output depends on; batch_size, device and threads do not change it
SIGNATURE = [k for k in DEFAULTS if k not in ('out_dir', 'batch_size', 'device', 'num_workers',
                                              'overwrite')]
CHOICES = {'source': ('emoji', 'folder', 'wds'), 'empty_caption': ('skip', 'error'),
           'latent_dtype': ('float16', 'float32'), 'dtype': ('auto', *PTDTYPES)}
SPLITS = {'train': ('', 'n'), 'val': ('val_', 'n_val'), 'heldout': ('heldout_', 'n_heldout')}
ARRAYS = ('latents.npy', 'text_emb.npy', 'captions.jsonl')  # per split, after its prefix
IMAGE_EXTS = frozenset({'jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff'})
EMOJI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'emoji')
EMOJI_FONT = 'NotoColorEmoji-set.ttf'  # Noto Color Emoji 2.042 cut to the set's glyphs (OFL)


@contextlib.contextmanager
def replacing(path):
    """Write to a temporary file of this writer's own beside path, then rename it over path: a kill
    leaves the old file or the new, and an error removes the temporary file."""
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(3)}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def claim_new(path):
    """The first of path, path-1, path-2, ... that names neither a file nor a folder (an earlier
    result's images), created empty at once: two writers never get the same name. -> that path;
    fill it with replacing(). A folder that cannot be written raises OSError here, before work."""
    stem, ext = os.path.splitext(path)
    for k in itertools.count():
        p = f"{stem}-{k}{ext}" if k else path
        if not os.path.exists(os.path.splitext(p)[0]):
            try:
                os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                return p
            except FileExistsError:
                continue


def write_json(path, obj):
    with replacing(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


# ----- reading the output -----

class Prepared:
    """A prepare.py output dir, Prepared('data/prepared/emoji32'): .meta, and per split (prefix
    '', val_, heldout_: None without one) memmaps latents (N, C, H, W), unscaled, and text_emb
    (N, D), and captions read on first use; a missing or broken file is a one-line error."""
    captions = functools.cached_property(lambda self: self._captions(''))
    val_captions = functools.cached_property(lambda self: self._captions('val_'))
    heldout_captions = functools.cached_property(lambda self: self._captions('heldout_'))
    keys = functools.cached_property(lambda self: self._captions('', 'key'))  # each row's item

    def __init__(self, data_dir):
        self.data_dir, self.heldout_latents, self.heldout_text_emb = data_dir, None, None
        meta_path = os.path.join(data_dir, 'meta.json')
        if not os.path.isdir(data_dir):
            raise ValueError(f"{data_dir}: no such directory (make it with: python prepare.py "
                             f"--source=emoji)")
        if os.path.isfile(os.path.join(data_dir, 'progress.json')):
            raise ValueError(f"{data_dir}: an unfinished prepare.py run; run the same command "
                             f"again to finish")
        try:
            self.meta = meta = json.load(open(meta_path, encoding='utf-8'))
        except (OSError, ValueError) as e:
            raise ValueError(f"{meta_path}: cannot read ({e}): {data_dir} is not a prepare.py "
                             f"output")
        for split, (prefix, key) in SPLITS.items():
            if split == 'heldout' and key not in meta:
                continue  # only the emoji set has held-out captions
            if not (n := meta.get(key)):
                raise ValueError(f"{meta_path}: the {split} split is empty ({key}={n}): prepare "
                                 f"more data")
            for name, shape in (('latents', meta.get('latent_shape') or ()),
                                ('text_emb', [meta.get('text_dim')])):
                path = os.path.join(data_dir, f'{prefix}{name}.npy')
                try:
                    a = np.load(path, mmap_mode='r')
                except (OSError, ValueError) as e:
                    raise ValueError(f"{path}: cannot read ({e})")
                if a.shape != (n, *shape):
                    raise ValueError(f"{path}: shape {a.shape}, expected {(n, *shape)} (from "
                                     f"meta.json)")
                rows = np.linspace(0, n - 1, min(n, 64)).astype(int)  # a sample, evenly spread
                if len(bad := rows[~np.isfinite(a[rows].reshape(len(rows), -1)).all(1)]):
                    raise ValueError(f"{path}: row {bad[0]} holds NaN or inf: the file is broken")
                setattr(self, prefix + name, a)

    def _captions(self, prefix, field='caption'):
        if (rows := getattr(self, prefix + 'latents')) is None:
            return None
        path = os.path.join(self.data_dir, f'{prefix}captions.jsonl')
        try:
            captions = [json.loads(line)[field] for line in open(path, encoding='utf-8')]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: cannot read captions ({e})")
        if len(captions) != len(rows):
            raise ValueError(f"{path}: {len(captions)} captions, expected {len(rows)} (a row of "
                             f"the .npy each)")
        return captions

    def to_tensor(self, rows, device='cpu'):
        """Rows of latents or text_emb (a memmap's, read-only) -> a float32 copy on device."""
        return torch.tensor(np.asarray(rows)).to(device).float()  # sent small, converted there


def latent_norm(meta):
    """(shift, scale), each (C|1, 1, 1): model space = (latents - shift) · scale, ~unit variance."""
    return tuple(torch.tensor(meta.get(k, v), dtype=torch.float32).reshape(-1, 1, 1)
                 for k, v in (('latent_shift', 0.0), ('scale_factor', 1.0)))


def incompatibility(ckpt_meta, data, strict=True):
    """Why a checkpoint's encoders differ from this data's, or None; strict=False skips unknowns."""
    for key in ('text_encoder', 'text_dim', 'vae'):
        if (strict or key in ckpt_meta) and data.meta.get(key) != ckpt_meta.get(key):
            return (f"{data.data_dir} has {key}={data.meta.get(key)!r} but the checkpoint was "
                    f"trained with {key}={ckpt_meta.get(key)!r}")


# ----- the sources: source(c) -> (items, n_items, skipped [(key, reason)]); items: (key, load) in
# a fixed order, to resume at an index; load() -> ((S, S, 3) uint8, {split: [captions]}) or Skip

class Skip(Exception):
    """An item that is skipped and counted: undecodable, too small, no caption, not downloaded."""


def to_rgb(im):
    """Any image PIL opens -> 8-bit RGB: transparency onto white, 16- and 32-bit grey ('I;16',
    'I': a 16-bit PNG) scaled to 8 bits, float grey ('F') read as [0, 1] where it fits there."""
    if im.mode.startswith('I'):
        a = np.asarray(im, dtype=np.float64) / 257  # 65535 -> 255
        im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    elif im.mode == 'F':
        a = np.asarray(im, dtype=np.float64)
        a = a * 255 if a.max() <= 1 else a
        im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        im = Image.alpha_composite(Image.new('RGBA', im.size, 'white'), im.convert('RGBA'))
    return im.convert('RGB')


def read_image(f, size, min_size):
    """An image (path or file) -> (H, W, 3) uint8 RGB, size (H, W) or S: on white, centre crop."""
    H, W = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(f) as im:
            w, h = im.size
            if min(w, h) >= min_size:
                s = max(H, W)  # a JPEG is decoded at the smallest scale that covers s x s
                im.draft('RGB', (-(-w * s // min(w, h)), -(-h * s // min(w, h))))
                im = to_rgb(ImageOps.exif_transpose(im))  # phones store photos sideways + a tag
    except Exception as e:  # PIL raises many kinds for a broken file
        raise Skip(f"cannot decode ({type(e).__name__}: {str(e)[:120]})") from None
    if min(w, h) < min_size:
        raise Skip(f"too small ({w}x{h}, shorter side < {min_size})")
    return np.asarray(ImageOps.fit(im, (W, H), Image.BICUBIC))


def render_emoji(font_path, emojis, size, canvas=160):
    """Emoji drawn by a colour font (Noto Color Emoji's bitmaps are 109 px) -> (N, size, size, 3)
    uint8: each glyph centred in the square around it, on white, resized with Lanczos."""
    from PIL import ImageDraw, ImageFont, features
    if not features.check('raqm'):  # without it a ZWJ sequence is drawn as several glyphs
        raise ValueError("rendering the emoji needs Pillow with raqm (PyPI's Pillow wheels have "
                         "it)")
    try:
        font = ImageFont.truetype(font_path, 109, layout_engine=ImageFont.Layout.RAQM)
    except OSError as e:
        raise ValueError(f"{font_path}: not a font Pillow can read ({e})") from None
    one_glyph, tiles = font.getlength('\U0001F600') * 1.05, []
    for e in emojis:
        glyph = Image.new('RGBA', (canvas, canvas), (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((canvas // 2, canvas // 2), e, font=font, embedded_color=True,
                                   anchor='mm')
        if (box := glyph.getbbox()) is None or font.getlength(e) > one_glyph:
            raise ValueError(f"{font_path} cannot draw {e} ({e.encode('unicode_escape')}) as one "
                             f"glyph")
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0)  # a square around the glyph, centred: nothing is stretched
        x0, y0 = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
        glyph = glyph.crop((x0, y0, x0 + side, y0 + side))  # out of bounds is transparent
        tile = Image.alpha_composite(Image.new('RGBA', glyph.size, 'white'), glyph).convert('RGB')
        tiles.append(np.asarray(tile.resize((size, size), Image.LANCZOS)))
    return np.stack(tiles)


def emoji_source(c):
    """data/emoji: emoji.jsonl (the captions of each split) and the images: emoji<S>.png (a
    64-column atlas) where there is one, else rendered from the font shipped beside them."""
    root, S = c.input or EMOJI_DIR, c.image_size
    index, atlas_path = os.path.join(root, 'emoji.jsonl'), os.path.join(root, f'emoji{S}.png')
    font_path = os.path.join(root, EMOJI_FONT)
    if not os.path.isfile(index):
        raise ValueError(f"{index} not found: --input should be the emoji dir (default "
                         f"{EMOJI_DIR})")
    entries = [json.loads(line) for line in open(index, encoding='utf-8')]
    if os.path.isfile(atlas_path):
        atlas = np.asarray(Image.open(atlas_path).convert('RGB'))  # (rows·S, cols·S, 3)
        rows, cols, n = atlas.shape[0] // S, atlas.shape[1] // S, len(entries)
        if atlas.shape[:2] != (rows * S, cols * S) or not n <= rows * cols < n + cols:
            raise ValueError(f"{atlas_path} is not an atlas of the {n} emoji in {index}")
        tiles = atlas.reshape(rows, S, cols, S, 3).swapaxes(1, 2).reshape(-1, S, S, 3)
    elif os.path.isfile(font_path):
        tiles = render_emoji(font_path, [e['emoji'] for e in entries], S)  # (N, S, S, 3)
    else:
        raise ValueError(f"neither {atlas_path} nor {font_path} exists: --input should be the "
                         f"emoji dir (default {EMOJI_DIR})")
    load = lambda e: (tiles[e['index']], dict(train=e['captions'], val=e['val_captions'],
                                              heldout=e['heldout_captions']))
    return [(e['emoji'], functools.partial(load, e)) for e in entries], len(entries), []


def _load(image, captions, size, min_size):
    """A folder or wds item's load(): its captions (None: the image's .txt), then its image."""
    if captions is None:
        txt = os.path.splitext(image)[0] + '.txt'
        captions = [read_text(txt)] if os.path.isfile(txt) else []  # not UTF-8: a ValueError
    captions = [' '.join(str(x).split()) for x in captions]  # newlines, runs of spaces -> a space
    if not any(captions):
        raise Skip('empty caption')
    return read_image(image, size, min_size), dict(train=[x for x in captions if x])


def folder_source(c):
    """Images under --input, captioned by captions.csv/.jsonl (file, caption_col) or their .txt."""
    if not os.path.isdir(c.input):
        raise ValueError(f"--input={c.input}: no such directory")
    files = sorted(os.path.relpath(os.path.join(d, f), c.input) for d, _, names in
                   os.walk(c.input) for f in names if f.rsplit('.', 1)[-1].lower() in IMAGE_EXTS)
    table, skipped = None, []
    paths = [os.path.join(c.input, f'captions.{x}') for x in ('csv', 'jsonl')]
    if path := next(filter(os.path.isfile, paths), None):
        text = read_text(path)  # not UTF-8: a ValueError naming the line
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline=''))) if path.endswith('.csv') \
                else [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: a line is not JSON ({e})") from None
        if rows and not {'file', c.caption_col} <= set(rows[0]):
            raise ValueError(f"{path}: needs the columns file and {c.caption_col}, has "
                             f"{sorted(rows[0])}")
        table = {}
        for r in rows:
            table.setdefault(os.path.normpath(str(r['file'])), []).append(r[c.caption_col] or '')
        skipped = [(f, 'missing file') for f in table  # listed but not there
                   if not os.path.isfile(os.path.join(c.input, f))]
    captions = lambda f: None if table is None else table.get(os.path.normpath(f), [])
    return [(f, functools.partial(_load, os.path.join(c.input, f), captions(f), c.image_size,
                                  c.min_image_size)) for f in files], len(files), skipped


def wds_source(c):
    import webdataset as wds
    from braceexpand import braceexpand  # a dependency of webdataset
    from webdataset.tariterators import base_plus_ext
    shards = sorted(glob.glob(os.path.join(c.input, '*.tar'))) if os.path.isdir(c.input) else \
        list(braceexpand(c.input))
    if not shards or (missing := [s for s in shards if not os.path.isfile(s)]):
        raise ValueError(f"--input={c.input}: no such file {missing[0]} ({len(missing)} "
                         f"missing)" if shards
                         else f"--input={c.input}: no .tar shards in this directory")
    n = 0  # samples, from the tar headers as webdataset groups them: an upper bound
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:  # header by header, seeking over the data
                keys = (base_plus_ext(m.name)[0] for m in tar
                        if m.isreg() and not re.match(r'__[^/]*__($|/)', m.name))
                n += sum(1 for key, _ in itertools.groupby(keys) if key is not None)
        except (tarfile.TarError, OSError) as e:
            print(f"warning: {shard}: {e}; reading what can be read")

    def load(sample):  # the caption: its .txt, or its .json's caption or text
        try:
            meta = {} if 'txt' in sample or 'json' not in sample else json.loads(sample['json'])
            caption = sample['txt'].decode('utf-8', errors='replace') if 'txt' in sample else \
                meta.get('caption') or meta.get('text') or ''
        except (ValueError, AttributeError):
            raise Skip("bad .json caption") from None
        if (ext := next((k for k in sample if k in IMAGE_EXTS), None)) is None:
            raise Skip(f"no image in sample (has {sorted(k for k in sample if k[:2] != '__')})")
        return _load(io.BytesIO(sample[ext]), [caption], c.image_size, c.min_image_size)
    ds = wds.WebDataset(shards, shardshuffle=False, handler=wds.warn_and_continue,
                        empty_check=False)  # read lazily: a resumed run skips to its item
    return ((f"{os.path.basename(s.get('__url__', ''))}/{s['__key__']}",
             functools.partial(load, s)) for s in ds), n, []


# ----- writing, resumably -----

class Writer:
    """The output files, appended to. checkpoint() saves the run's state and each file's length to
    progress.json, where a rerun cuts the file; finish() writes the .npy headers, then meta.json."""

    def __init__(self, out_dir, state, latent_shape, latent_dtype, text_dim):
        self.out_dir, self.state, self.skip_counts = out_dir, state, Counter(state['skip_counts'])
        self.row = {'latents.npy': (np.dtype(latent_dtype).str, latent_shape),  # dtype, shape
                    'text_emb.npy': (np.dtype('float16').str, (text_dim,))}
        self.files = {(s, f): SPLITS[s][0] + f for s in state['rows'] for f in ARRAYS}
        self.files[None, 'skipped.jsonl'] = 'skipped.jsonl'
        for key, name in self.files.items():
            nbytes = state['bytes'].get(name, 0)  # its length at the last checkpoint
            try:
                f = self.files[key] = open(os.path.join(out_dir, name), 'r+b' if nbytes else 'wb')
            except OSError as e:
                raise ValueError(f"cannot resume: {e}; pass --overwrite=True to start over")
            f.truncate(nbytes)
            f.seek(nbytes or (128 if key[1] in self.row else 0))  # a new .npy: past its header

    def write(self, split, latents, text_emb, records):
        """Rows: (R, C, H, W) latents, (R, D) text embeddings, R {caption, key} records."""
        for kind, rows in (('latents.npy', latents), ('text_emb.npy', text_emb)):
            self.files[split, kind].write(np.ascontiguousarray(rows, self.row[kind][0]).tobytes())
        self.files[split, 'captions.jsonl'].write(b''.join(
            json.dumps(r, ensure_ascii=False).encode() + b'\n' for r in records))
        self.state['rows'][split] += len(records)

    def skip(self, key, reason):
        """A line in skipped.jsonl, counted by reason; the first 10 are shown."""
        if sum(self.skip_counts.values()) < 10:
            tqdm.write(f"warning: skipped {key}: {reason}")
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
        for (split, kind), f in self.files.items():
            if kind in self.row:  # the .npy header, into the 128 bytes kept for it
                dt, shape = self.row[kind]
                f.seek(0)
                np.lib.format.write_array_header_1_0(f, dict(
                    descr=dt, fortran_order=False, shape=(self.state['rows'][split], *shape)))
            f.close()
        write_json(os.path.join(self.out_dir, 'meta.json'), meta)  # it marks the run finished
        os.remove(os.path.join(self.out_dir, 'progress.json'))


# ----- the run -----

def _settings(overrides):
    """DEFAULTS with the keyword overrides, checked, derived values resolved -> the namespace c."""
    c = settings(DEFAULTS, overrides)  # a ConfigError is a ValueError
    for key, allowed in CHOICES.items():
        if getattr(c, key) not in allowed:
            raise ValueError(f"--{key}={getattr(c, key)}: expected one of {', '.join(allowed)}")
    if c.image_size < 8 or c.batch_size < 1 or c.val_count < 1:
        raise ValueError(f"--image_size={c.image_size}, --batch_size={c.batch_size} and "
                         f"--val_count="
                         f"{c.val_count}: expected at least 8, 1 and 1")
    if c.source != 'emoji' and not c.input:
        raise ValueError(f"--source={c.source} needs --input (a dir or .tar shards)")
    c.min_image_size = c.image_size // 2 if c.min_image_size is None else c.min_image_size
    c.device = ('cuda' if torch.cuda.is_available() else 'cpu') if c.device == 'auto' else c.device
    if c.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"--device={c.device}: no CUDA device here (--device=cpu, or auto)")
    name = os.path.basename(os.path.normpath(c.input)).split('.')[0].split('{')[0] or c.source
    codec = '' if c.vae == 'none' else '-' + os.path.basename(os.path.normpath(c.vae))
    name = f'emoji{c.image_size}{codec}' if c.source == 'emoji' else name
    c.out_dir = c.out_dir or os.path.join('data', 'prepared', name)
    return c


def _batches(pool, items, n, depth=2):
    """(items, futures of their load()) n at a time, `depth` batches loading ahead."""
    pending = deque()
    while batch := list(itertools.islice(items, n)):
        pending.append((batch, [pool.submit(load) for _, load in batch]))
        if len(pending) > depth:
            yield pending.popleft()
    yield from pending


def _rows(c, batch, futures, n_items, writer):
    """A batch's usable images and {split: [(image index, caption, key)]}. A validation item that
    is skipped passes its place on to the next usable one, so that validation is never empty."""
    images, rows, state = [], {split: [] for split in writer.state['rows']}, writer.state
    n_val = 0 if c.source == 'emoji' else min(c.val_count, max(n_items // 10, 1))
    for i, ((key, _), future) in enumerate(zip(batch, futures), state['items_done']):
        k = i * n_val // n_items  # held out: the middle item of the k-th of n_val stretches
        val = n_val > 0 and (2 * k + 1) * n_items // (2 * n_val) == i
        try:
            image, captions = future.result()
        except Skip as e:
            if str(e) == 'empty caption' and c.empty_caption == 'error':
                raise ValueError(f"{key}: empty caption (--empty_caption=skip skips such items)")
            writer.skip(key, str(e))
            state['val_owed'] += val
            continue
        if val or state['val_owed']:
            state['val_owed'] -= not val
            captions = dict(val=captions['train'])  # held out whole
        for split, caps in captions.items():
            rows[split] += [(len(images), cap, key) for cap in caps]
        images.append(image)
    return images, rows


def _encode(c, items, n_items, writer, text, codec):
    """Encode the items batch by batch from the last checkpoint on; each batch is a checkpoint."""
    state, t0 = writer.state, time.time() - writer.state['seconds']  # counts across resumes
    items = itertools.islice(items, state['items_done'], n_items)
    with ThreadPoolExecutor(c.num_workers) as pool, tqdm(
            total=n_items, initial=state['items_done'], unit='img', dynamic_ncols=True) as bar:
        for batch, futures in _batches(pool, items, c.batch_size):
            images, rows = _rows(c, batch, futures, n_items, writer)
            if images:
                x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1  # (B,3,S,S)
                z = codec.encode(x).cpu().numpy()  # (B, C, h, w), unscaled
                m = np.stack([np.full(z.shape[1], z[:, 0].size), z.sum((0, 2, 3), np.float64),
                              np.square(z, dtype=np.float64).sum((0, 2, 3))])  # per channel
                state['moments'] = (m + np.array(state['moments'] or 0)).tolist()
                for split, r in rows.items():
                    emb = text([cap for _, cap, _ in r]).cpu().numpy()  # (R, D)
                    writer.write(split, z[[j for j, _, _ in r]], emb,
                                 [dict(caption=cap, key=key) for _, cap, key in r])
            state['items_done'] += len(batch)
            writer.checkpoint(seconds=time.time() - t0)
            bar.update(len(batch))
            bar.set_postfix(**state['rows'], skipped=sum(writer.skip_counts.values()))


def prepare(**overrides):
    """The whole run, the settings above overridden by keyword (source='folder', ...) -> meta."""
    t_start, c = time.time(), _settings(overrides)
    signature = {k: getattr(c, k) for k in SIGNATURE}
    signature['input'] = os.path.abspath(c.input) if c.input and '{' not in c.input else c.input
    paths = [os.path.join(c.out_dir, f) for f in ('progress.json', 'meta.json')]
    path = next(filter(os.path.isfile, paths), None)  # unfinished: resume; finished: done
    previous = None if c.overwrite or path is None else json.load(open(path, encoding='utf-8'))
    if previous is not None and (old := previous.get('settings') or {}) != signature:
        diff = ', '.join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in signature.items()
                         if old.get(k) != v)
        raise ValueError(f"{c.out_dir} holds a run with other settings ({diff}): pass "
                         f"--overwrite=True to "
                         f"replace it, or another --out_dir")
    if previous is not None and 'items_done' not in previous:
        print(f"{c.out_dir}: already prepared ({previous['n']} rows, {previous['n_val']} val)")
        return previous
    for f in ['meta.json', 'progress.json', 'skipped.jsonl'] + [  # a new run: no old outputs
            p + a for p, _ in SPLITS.values() for a in ARRAYS] if previous is None else []:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(c.out_dir, f))
    sources = dict(emoji=emoji_source, folder=folder_source, wds=wds_source)
    items, n_items, skipped = sources[c.source](c)
    if (n_items := min(n_items, c.limit or n_items)) < (1 if c.source == 'emoji' else 2):
        raise ValueError(f"--input={c.input or EMOJI_DIR}: {n_items} images found, too few to "
                         f"validate on one")
    if previous is not None and previous['n_items'] != n_items:
        raise ValueError(f"--input changed since this run began ({previous['n_items']} items, now "
                         f"{n_items}): pass --overwrite=True to start over")
    os.makedirs(c.out_dir, exist_ok=True)
    text, codec = (TextEncoder(c.text_encoder, c.device, dtype=c.dtype),
                   ImageCodec(c.vae, c.device, dtype=c.dtype))
    if c.image_size % codec.downsample:
        raise ValueError(f"--image_size={c.image_size}: not a multiple of the vae's factor "
                         f"{codec.downsample}")
    latent_shape = (codec.channels, *[c.image_size // codec.downsample] * 2)
    state = previous or dict(
        settings=signature, n_items=n_items, items_done=0, val_owed=0, moments=None, bytes={},
        rows=dict.fromkeys(SPLITS if c.source == 'emoji' else ('train', 'val'), 0),
        skip_counts={}, seconds=0.0)
    writer = Writer(c.out_dir, state, latent_shape, c.latent_dtype, text.dim)
    if previous is not None:
        print(f"resuming {c.out_dir} at item {state['items_done']} of {n_items}")
    for key, reason in skipped if previous is None else []:
        writer.skip(key, reason)
    _encode(c, items, n_items, writer, text, codec)
    return _finish(c, writer, text, codec, latent_shape, time.time() - t_start)


def _finish(c, writer, text, codec, latent_shape, seconds):
    state, counts = writer.state, writer.skip_counts
    if empty := [split for split in ('train', 'val') if not state['rows'][split]]:
        raise ValueError(f"no usable items for the {empty[0]} split in "
                         f"--input={c.input or EMOJI_DIR}: "
                         f"skipped {dict(counts)} (see {os.path.join(c.out_dir, 'skipped.jsonl')})")
    n, s1, s2 = np.array(state['moments'])  # per channel: values, sum, sum of squares
    mean = s1 / n  # a codec without a known scale gets unit variance per channel
    shift, scale = ((mean.tolist(), (1 / np.sqrt(s2 / n - mean ** 2)).tolist())
                    if codec.scale_factor is None else (0.0, codec.scale_factor))
    meta = dict(source=c.source, input=state['settings']['input'], text_encoder=text.name,
                text_dim=text.dim, vae=codec.name, scale_factor=scale, latent_shift=shift,
                latent_shape=list(latent_shape), image_size=c.image_size,
                **{SPLITS[split][1]: n for split, n in state['rows'].items()},
                latent_dtype=c.latent_dtype, text_dtype='float16', items=state['items_done'],
                skipped=dict(total=sum(counts.values()), by_reason=dict(counts)),
                settings=state['settings'], seconds=round(state['seconds'], 2),
                items_per_s=round(state['items_done'] / max(state['seconds'], 1e-9), 1))
    writer.finish(meta)
    held = f" + {meta['n_heldout']} held-out" if 'n_heldout' in meta else ''
    print(f"wrote {meta['n']} rows + {meta['n_val']} val rows{held} to {c.out_dir} in "
          f"{seconds:.1f}s; skipped {sum(counts.values())} items {dict(counts) if counts else ''}")
    return meta


if __name__ == '__main__':
    try:
        prepare(**configure(dict(DEFAULTS), sys.argv[1:]))
    except ValueError as e:  # a setting, a file or an item that cannot be used: one line
        fail(e)
