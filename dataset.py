"""
The prepared data on disk: what prepare.py writes (resumably, with the writers at the end) and
train.py, eval.py and gpu_check.py read. A library: no settings of its own.

    from dataset import load_prepared
    data = load_prepared('data/prepared/emoji32')  # .npy memmaps: rows are read when indexed
    x = data.to_tensor(data.latents[idx])       # (B, C, H, W) float32, unscaled (train.py scales)
    emb = data.to_tensor(data.text_emb[idx])    # (B, D) float32
    data.val_captions[:3], data.heldout_latents  # heldout_*: None where the data has none

A data dir holds meta.json and, per split, one row per image-caption pair: <prefix>latents.npy
(N, C, H, W) float16, float32 or uint8 (quantized, the scale in meta.json), <prefix>text_emb.npy
(N, D) float16 and <prefix>captions.jsonl ({"caption", "key"} a line). The prefixes are SPLITS.
"""
import functools
import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from tqdm import tqdm

from configurator import fail

SPLITS = {'train': '', 'val': 'val_', 'heldout': 'heldout_'}  # file name prefixes
ARRAYS = ('latents.npy', 'text_emb.npy', 'captions.jsonl')
N_KEYS = {'train': 'n', 'val': 'n_val', 'heldout': 'n_heldout'}  # meta.json's row counts
OUTPUTS = ['meta.json', 'progress.json', 'skipped.jsonl'] + [  # all that prepare.py writes
    p + f for p in SPLITS.values() for f in ARRAYS]


@dataclass
class Prepared:
    """A prepared dataset: .npy memmaps and meta.json. The held-out caption split (the emoji
    set's) is None where the data has none."""
    data_dir: str
    meta: dict
    latents: np.ndarray  # (N, C, H, W) unscaled latents, float16 (or uint8, see to_tensor)
    text_emb: np.ndarray  # (N, D) float16
    val_latents: np.ndarray
    val_text_emb: np.ndarray
    heldout_latents: np.ndarray = None
    heldout_text_emb: np.ndarray = None

    @functools.cached_property
    def captions(self):
        return _read_captions(self.data_dir, '', self.latents)

    @functools.cached_property
    def val_captions(self):
        return _read_captions(self.data_dir, 'val_', self.val_latents)

    @functools.cached_property
    def heldout_captions(self):
        return _read_captions(self.data_dir, 'heldout_', self.heldout_latents)

    def to_tensor(self, rows, device='cpu'):
        """Rows of latents or text_emb (np array) -> float32 tensor on device, uint8 latents
        de-quantized. The latents stay unscaled: train.py multiplies them by the scale_factor."""
        rows = np.asarray(rows)
        # a memmap view is read-only
        rows = np.ascontiguousarray(rows) if rows.flags.writeable else rows.copy()
        x = torch.from_numpy(rows).to(device)  # move the small dtype, convert there
        if x.dtype == torch.uint8:
            q = self.meta['quantization']
            return x.float() * q['scale'] + q['offset']
        return x.float()


def _read_captions(data_dir, prefix, rows):
    if rows is None:
        return None
    path, n = os.path.join(data_dir, f'{prefix}captions.jsonl'), len(rows)
    try:
        captions = [json.loads(line)['caption'] for line in open(path, encoding='utf-8')]
    except (OSError, ValueError, KeyError) as e:
        fail(f"{path}: cannot read captions ({e})")
    if len(captions) != n:
        fail(f"{path}: {len(captions)} captions, expected {n} (one per row of the .npy files)")
    return captions


def _read_meta(data_dir):
    if not os.path.isdir(data_dir):
        fail(f"{data_dir}: no such directory (make it with: python prepare.py --source=emoji)")
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(meta_path):
        if os.path.isfile(os.path.join(data_dir, 'progress.json')):
            fail(f"{data_dir}: an unfinished prepare.py run; run the same prepare.py command "
                 f"again to finish it")
        fail(f"{meta_path} not found: {data_dir} is not a prepare.py output")
    try:
        return json.load(open(meta_path, encoding='utf-8'))
    except ValueError as e:
        fail(f"{meta_path}: not JSON ({e})")


def load_prepared(data_dir):
    """Open a prepare.py output dir for reading; a missing or inconsistent file is a one-line
    error. Directories from before the held-out split load with heldout_* None."""
    meta = _read_meta(data_dir)
    arrays = {}
    for split, prefix in SPLITS.items():
        rows = N_KEYS[split]
        if rows not in meta and split == 'heldout':
            continue  # older outputs and sources without held-out captions
        for name, shape in (('latents', meta.get('latent_shape')),
                            ('text_emb', [meta.get('text_dim')])):
            path = os.path.join(data_dir, f'{prefix}{name}.npy')
            try:
                a = arrays[prefix + name] = np.load(path, mmap_mode='r')
            except (OSError, ValueError) as e:
                fail(f"{path}: cannot read ({e})")
            if a.shape != (meta.get(rows), *shape):
                fail(f"{path}: shape {a.shape}, expected {(meta.get(rows), *shape)} "
                     f"(from meta.json)")
    return Prepared(data_dir, meta, **arrays)


# ----- writing, resumable (prepare.py) -----

def incompatibility(ckpt_meta, data, strict=True):
    """Why a checkpoint cannot train on, or be scored with, this prepared data (its text encoder,
    text width or image codec differ), or None. strict=False skips what a checkpoint lacks."""
    for key in ('text_encoder', 'text_dim', 'vae'):
        if (strict or key in ckpt_meta) and data.meta.get(key) != ckpt_meta.get(key):
            return (f"{data.data_dir} has {key}={data.meta.get(key)!r} but the checkpoint was "
                    f"trained with {key}={ckpt_meta.get(key)!r}")
    return None


def previous_run(data_dir, settings, overwrite=False):
    """The state of an interrupted run (progress.json), the meta.json of a finished one, or None,
    when there is neither or overwrite is set: then the old outputs are removed. A run with other
    settings is an error."""
    progress, meta = (os.path.join(data_dir, f) for f in ('progress.json', 'meta.json'))
    path = progress if os.path.isfile(progress) else meta if os.path.isfile(meta) else None
    previous = None if overwrite or path is None else json.load(open(path, encoding='utf-8'))
    if previous is not None and previous.get('settings') != settings:
        old = previous.get('settings') or {}
        diff = ', '.join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items()
                         if old.get(k) != v)
        fail(f"{data_dir} holds a run with other settings ({diff}): pass --overwrite=True to "
             f"replace it, or another --out_dir")
    if previous is None:
        for f in OUTPUTS:
            if os.path.exists(os.path.join(data_dir, f)):
                os.remove(os.path.join(data_dir, f))
    return previous


class PreparedWriter:
    """A prepare.py output dir being written, resumably: for each split of capacity ({split: the
    most rows it can get}) a SplitWriter, created or (without latent_shape) reopened at state's
    checkpoint, and skipped.jsonl. checkpoint() after each batch records state, the run's progress,
    in progress.json; finish(meta) cuts the files to the rows written and writes meta.json."""

    def __init__(self, data_dir, state, capacity, latent_shape=None, dtype=None, text_dim=None):
        self.data_dir, self.state = data_dir, state
        self.splits = {name: SplitWriter(data_dir, SPLITS[name]) for name in capacity}
        for name, split in self.splits.items():
            if latent_shape is None:
                split.reopen(**state[name])
            else:
                split.create(capacity[name], latent_shape, dtype, text_dim)
                state[name] = dict(n=0, captions_bytes=0)
        self.skip = SkipLog(os.path.join(data_dir, 'skipped.jsonl'), state)

    def checkpoint(self, **updates):
        self.state.update({name: split.checkpoint() for name, split in self.splits.items()},
                          **self.skip.checkpoint(), **updates)
        write_json(os.path.join(self.data_dir, 'progress.json'), self.state)

    def finish(self, meta):
        for split in self.splits.values():
            split.finish()
        write_json(os.path.join(self.data_dir, 'meta.json'), meta)
        os.remove(os.path.join(self.data_dir, 'progress.json'))


class SplitWriter:
    """One split's files: latents and text embeddings written into .npy memmaps sized for the
    most rows the split can get (cut to the rows written by finish); captions go to a .jsonl."""

    def __init__(self, data_dir, prefix):
        self.paths = [os.path.join(data_dir, prefix + f) for f in ARRAYS]

    def create(self, capacity, latent_shape, dtype, text_dim):
        lat, emb, _ = self.paths
        open_memmap = np.lib.format.open_memmap
        self.latents = open_memmap(lat, 'w+', dtype, (capacity, *latent_shape))  # (N, C, H, W)
        self.text_emb = open_memmap(emb, 'w+', np.float16, (capacity, text_dim))  # (N, D)
        self.n, self.captions = 0, open(self.paths[2], 'wb')

    def reopen(self, n, captions_bytes):
        """Continue at a checkpoint: n rows and captions_bytes of captions written."""
        try:
            self.latents, self.text_emb = (np.load(p, mmap_mode='r+') for p in self.paths[:2])
            self.captions = open(self.paths[2], 'r+b')
        except (OSError, ValueError) as e:
            fail(f"cannot resume: {e}; pass --overwrite=True to start over")
        self.captions.truncate(captions_bytes)  # lines past the checkpoint are written again
        self.captions.seek(captions_bytes)
        self.n = n

    def write(self, latents, text_emb, records):
        if self.n + len(latents) > len(self.latents):
            fail(f"more rows than counted ({len(self.latents)}) in {self.paths[0]}: "
                 f"the input changed during the run?")
        self.latents[self.n:self.n + len(latents)] = latents
        self.text_emb[self.n:self.n + len(latents)] = text_emb
        self.captions.writelines(json.dumps(r, ensure_ascii=False).encode() + b'\n'
                                 for r in records)
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


class SkipLog:
    """skipped.jsonl, a line per skipped item, and the counts by reason; the first 10 are shown.
    state: the run's, with the counts and the file's length at the last checkpoint."""

    def __init__(self, path, state):
        self.path, self.counts = path, Counter(state['skip_counts'])
        self.f = open(path, 'r+b' if state['items_done'] else 'wb')
        self.f.truncate(state['skipped_bytes'])  # lines past the checkpoint are written again
        self.f.seek(state['skipped_bytes'])

    def __call__(self, key, reason):
        shown = sum(self.counts.values())
        if shown < 10:
            tqdm.write(f"warning: skipped {key}: {reason}")
        elif shown == 10:
            tqdm.write(f"warning: further skipped items are counted, not shown (all are in "
                       f"{self.path})")
        self.counts[reason.split(' (')[0]] += 1
        self.f.write(json.dumps(dict(key=key, reason=reason), ensure_ascii=False).encode()
                     + b'\n')

    def checkpoint(self):
        self.f.flush()
        return dict(skip_counts=dict(self.counts), skipped_bytes=self.f.tell())


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


def shrink_npy(path, n):
    """Cut a .npy file to its first n rows, in place: rewrite the shape in the header (padded to
    the same length, as the format allows) and truncate the data."""
    with open(path, 'r+b') as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
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


def write_json(path, obj):
    """Atomic: a kill leaves the old file or the new one."""
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(path + '.tmp', path)
