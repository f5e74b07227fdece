"""
sample.py: the generation library (load_pipeline, generate_images, the modes, save_grid) and its
command line, on a random tiny pixel-space checkpoint with MiniLM as its text encoder.

    python -m pytest -q tests/test_sample.py
"""
import builtins
import dis
import inspect
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import ROOT, one_line_error, run_in_process, run_script, save_tiny_checkpoint
from configurator import config_keys
from model import Denoiser, load_checkpoint
from sample import generate_images, load_image, load_pipeline, make_noise, save_grid


@pytest.fixture(scope='module')
def sample_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('sample')
    save_tiny_checkpoint(str(root / 'run'))
    save_tiny_checkpoint(str(root / 'outpaint'), cond_channels=4)  # C + 1: masked image and mask
    (root / 'prompts.txt').write_text("a red apple\n\na cute owl\n")
    return root


def _png(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(np.float32) / 255  # (H, W, 3)


def _tile(grid, row, col, h=16, w=16, pad=2):
    """The image at (row, col) of a torchvision make_grid with padding 2."""
    return grid[pad + row * (h + pad):pad + row * (h + pad) + h,
                pad + col * (w + pad):pad + col * (w + pad) + w]


def _sample(*args, zoom=1):
    """Run sample.py and return the paths it wrote: 4 steps in float32 (fast, and as exact as the
    Python calls they are compared with), at --zoom=1 (raw pixels) unless zoom=None."""
    fast = ['--steps=4', '--dtype=float32', *([] if zoom is None else [f'--zoom={zoom}'])]
    proc = run_in_process('sample.py', *fast, *args)
    return [line.split(' ', 1)[1] for line in proc.stdout.splitlines() if line.startswith('wrote ')]


def _random_png(path, h=16, w=16, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels.astype(np.float32) / 255


@pytest.fixture(scope='module')
def pipe(sample_run):
    return load_pipeline(str(sample_run / 'run'), 'cpu', 'float32')


@pytest.fixture(scope='module')
def reference_grid(sample_run):
    """2 prompts × seeds 3 and 4, the grid and each image: the images the other tests compare
    with."""
    args = ['--out_dir', str(sample_run / 'run'), '--prompt_file', str(sample_run / 'prompts.txt'),
            '--cfg', '7', '--n=2', '--seed', '3']
    return args, _sample(*args, '--individual')


def test_sample_grid_layout_seeds_and_reproducibility(sample_run, reference_grid):
    args, paths = reference_grid
    # the grid goes to the run's samples/; a row per prompt, a column per seed
    assert os.path.dirname(paths[0]) == str(sample_run / 'run' / 'samples')
    assert len(paths) == 5 and all(os.path.dirname(p) == paths[0][:-4] for p in paths[1:])
    grid = _png(paths[0])
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    tiles = {(r, c): _tile(grid, r, c) for r in range(2) for c in range(2)}
    for path, (r, c) in zip(paths[1:], [(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.array_equal(_png(path), tiles[r, c])
    assert not np.allclose(tiles[0, 0], tiles[1, 0], atol=0.05)  # the prompt matters
    assert not np.allclose(tiles[0, 0], tiles[0, 1], atol=0.05)  # the seed matters (column j: +j)
    # the same arguments give the same bytes, in a new file: the first is kept
    again = _sample(*args)
    assert again[0] != paths[0] and os.path.dirname(again[0]) == os.path.dirname(paths[0])
    assert open(again[0], 'rb').read() == open(paths[0], 'rb').read()
    # --out names the file itself
    out = _sample(*args, '--out', str(sample_run / 'again.png'))
    assert out == [str(sample_run / 'again.png')]
    assert open(out[0], 'rb').read() == open(paths[0], 'rb').read()


def test_several_prompts_after_prompt_are_the_rows_of_a_prompt_file(sample_run, reference_grid):
    """--prompt "a red apple" "a cute owl": two prompts, one row each (not one prompt of both)."""
    paths = _sample('--out_dir', str(sample_run / 'run'), '--prompt', 'a red apple', 'a cute owl',
                    '--cfg', '7', '--n=2', '--seed', '3')
    assert open(paths[0], 'rb').read() == open(reference_grid[1][0], 'rb').read()
    one = _sample('--out_dir', str(sample_run / 'run'), '--prompt', 'a red apple a cute owl',
                  '--cfg', '7', '--n=2', '--seed', '3')
    assert _png(one[0]).shape == (18 + 2, 2 * 18 + 2, 3)  # one prompt: one row


def test_outputs_never_replace_each_other(sample_run):
    """Runs that differ in any setting write files whose names differ (no -1 needed); prompts in
    other scripts or of emoji get names of their own; a repeated run adds a file."""
    run = str(sample_run / 'run')
    base = ['--ckpt', run, '--prompt', 'a green pear', '--n=1', '--steps=1']
    variants = [[], ['--n=2'], ['--steps=2'], ['--sampler=ddim'], ['--cfg=3'], ['--seed=1'],
                ['--size=8'], ['--prompt', 'تفاحة حمراء'], ['--prompt', '🍎'], ['--prompt', '🍐']]
    paths = [_sample(*base, *v, '--individual')[0] for v in variants]
    assert len(set(paths)) == len(paths)
    assert not any(re.search(r'-\d+\.png$', p) for p in paths)  # told apart by their names
    assert all(os.path.isfile(p) for p in paths)
    again = _sample(*base)
    assert again[0] not in paths and os.path.isfile(paths[0])
    assert open(again[0], 'rb').read() != b''


def test_ckpt_outputs_go_next_to_the_checkpoint(sample_run, tmp_path):
    """--ckpt=<a run dir> or <its ckpt.pt>: the run's samples/, never the current directory's."""
    cwd_samples = os.path.join(ROOT, 'samples')
    before = set(os.listdir(cwd_samples)) if os.path.isdir(cwd_samples) else set()
    ckpt = save_tiny_checkpoint(str(tmp_path / 'elsewhere'))
    for source in (str(tmp_path / 'elsewhere'), ckpt):
        path = _sample('--ckpt', source, '--prompt', 'a red apple', '--n=1', '--steps=2')[0]
        assert os.path.dirname(path) == str(tmp_path / 'elsewhere' / 'samples')
    after = set(os.listdir(cwd_samples)) if os.path.isdir(cwd_samples) else set()
    assert after == before


def test_sample_interpolation_strips(sample_run, reference_grid):
    run, ref = str(sample_run / 'run'), _png(reference_grid[1][0])
    # text: 'a red apple' -> 'a cute owl' with the noise of seed 3 kept
    strip = _png(_sample('--out_dir', run, '--interp', 'a red apple', 'a cute owl', '--frames', '5',
                         '--n', '1', '--seed=3')[0])
    assert strip.shape == (18 + 2, 5 * 18 + 2, 3)
    frames = [_tile(strip, 0, i) for i in range(5)]
    assert np.abs(frames[0] - _tile(ref, 0, 0)).max() <= 3 / 255  # the ends: the prompts' images
    assert np.abs(frames[4] - _tile(ref, 1, 0)).max() <= 3 / 255
    assert not np.allclose(frames[2], frames[0], atol=0.02)
    assert not np.allclose(frames[2], frames[4], atol=0.02)
    # noise: seed 3 -> seed 4 (slerp) with the prompt kept; --n 2 gives two rows, the second from
    # seeds 4 -> 5
    paths = _sample('--out_dir', run, '--prompt', 'a red apple', '--interp_seeds', '3', '4',
                    '--frames', '3', '--n', '2', '--individual')
    assert len(paths) == 1 + 2 * 3
    strip = _png(paths[0])
    assert strip.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    assert np.abs(_tile(strip, 0, 0) - _tile(ref, 0, 0)).max() <= 3 / 255
    assert np.abs(_tile(strip, 0, 2) - _tile(ref, 0, 1)).max() <= 3 / 255
    assert np.abs(_tile(strip, 1, 0) - _tile(ref, 0, 1)).max() <= 3 / 255


def test_sample_at_a_size_never_trained(sample_run, pipe):
    path = _sample('--out_dir', str(sample_run / 'run'), '--prompt', 'a red apple', '--size', '32',
                   '16', '--n', '1', '--individual')[1]
    assert Image.open(path).size == (16, 32)  # (W, H): --size is H W, in pixels
    assert _png(path).std() > 0.01
    assert pipe.latent_shape(64) == (3, 64, 64) and pipe.latent_shape((32, 16)) == (3, 32, 16)


def test_sample_negative_prompt_replaces_the_unconditional_half(pipe):
    gen = lambda **kw: generate_images(pipe, ['a red apple'], n=2, steps=4, seed=0, **kw)
    plain, negative = gen(cfg=5.0), gen(cfg=5.0, negative='a green apple')
    assert (plain - negative).abs().mean() > 0.01
    # cfg 1 never calls the unconditional half, so a negative prompt cannot change anything there
    assert torch.equal(gen(cfg=1.0), gen(cfg=1.0, negative='a green apple'))


def test_sample_cfg_min_sigma_reaches_every_mode(sample_run, reference_grid, pipe):
    """--cfg_min_sigma is passed to the sampler in every mode: the same call as from Python, and a
    different interval gives different images (the default is 0.2)."""
    run, outpaint, args = str(sample_run / 'run'), str(sample_run / 'outpaint'), reference_grid[0]
    grid = _png(_sample(*args, '--cfg_min_sigma=0.5', '--out', str(sample_run / 'interval.png'))[0])
    python = generate_images(pipe, ['a red apple', 'a cute owl'], n=2, cfg=7.0, seed=3,
                             cfg_min_sigma=0.5, steps=4)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.abs(_tile(grid, r, c) - python[k].permute(1, 2, 0).numpy()).max() <= 1 / 255
    assert np.abs(grid - _png(reference_grid[1][0])).max() > 0.05
    half = np.zeros((16, 16), np.uint8)
    half[:, 8:] = 255  # white = generate: the right half
    Image.fromarray(half).save(sample_run / 'half.png')
    _random_png(sample_run / 'start.png')
    for mode in (['--out_dir', run, '--interp', 'a red apple', 'a cute owl', '--frames', '3'],
                 ['--out_dir', outpaint, '--prompt', 'a red apple', '--outpaint', 'right'],
                 ['--out_dir', outpaint, '--prompt', 'a red apple',
                  '--init_image', str(sample_run / 'start.png'),
                  '--mask', str(sample_run / 'half.png')]):
        a, b = (_png(_sample(*mode, '--n=1', f'--cfg_min_sigma={lo}')[0]) for lo in (0.2, 0.5))
        assert np.abs(a - b).max() > 2 / 255, mode  # same args, same bytes: this is the interval


def test_outpaint_keeps_the_known_region(sample_run):
    run, image = str(sample_run / 'outpaint'), _random_png(sample_run / 'init.png')
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 10:] = 255  # white = generate: the right 6 columns
    Image.fromarray(mask).save(sample_run / 'mask.png')
    paths = _sample('--out_dir', run, '--prompt', 'a red apple',
                    '--init_image', str(sample_run / 'init.png'),
                    '--mask', str(sample_run / 'mask.png'), '--n', '2', '--individual')
    # the input with its hole greyed out, then 2 fills
    assert _png(paths[0]).shape == (18 + 2, 3 * 18 + 2, 3)
    for path in paths[2:]:
        fill = _png(path)
        assert np.abs(fill[:, :10] - image[:, :10]).max() <= 1 / 255
        assert np.abs(fill[:, 10:] - image[:, 10:]).mean() > 0.05
    # a panorama: slide right by half a canvas twice, keeping the start
    strip = _png(_sample('--out_dir', run, '--prompt', 'a red apple',
                         '--init_image', str(sample_run / 'init.png'), '--outpaint', 'right',
                         '--repeat', '2', '--n', '1', '--individual')[1])
    assert strip.shape == (16, 16 + 2 * 8, 3)
    assert np.abs(strip[:, :16] - image).max() <= 1 / 255
    # from the prompt alone, upwards: two tall strips side by side
    grid = _png(_sample('--out_dir', run, '--prompt', 'a red apple', '--outpaint', 'up',
                        '--n', '2')[0])
    assert grid.shape == (16 + 8 + 4, 2 * 18 + 2, 3)


@pytest.mark.parametrize('args, message', [
    (['--out_dir', '/nonexistent/run'], "error: no checkpoint at '/nonexistent/run'"),
    (['--cfg', 'high'], "error: config key 'cfg' expects float"),
    (['--steps', '0'], "error: steps must be an int >= 1, got 0"),
    (['--cfg_min_sigma', '1'], "error: cfg_min_sigma must be in [0, 1)"),
    (['--sampler', 'euler'], "error: unknown sampler 'euler'"),
    (['--dtype', 'fp8'], "error: dtype must be 'auto' or one of"),
    (['--init_image', 'in.png'], "--init_image must be with --mask (fill) or --outpaint"),
    (['--out', '/'], "error: cannot write the grid: --out '/' is a directory"),
    (['--n', '1000000', '--size', '1024'], "need about"),
    (['--zoom', '1000'], "error: --zoom must be in 0-64"),
    (['--size', '100000'], "need about"),
    (['--prompt', ''], "error: --prompt is empty"),
    (['--size', '15'], "error: --size 15 is not a positive multiple of 2"),
    (['--outpaint', 'right'], "is not an outpainting model"),
    (['--zoom', '-1'], "error: --zoom must be in 0-64"),
    (['--interp', 'a cat'], "--interp"),
    (['--mask', 'm.png'], "--mask"),
    (['--cfg', '1e999'], "'cfg'"),  # non-finite numbers: inf, nan
    (['--cfg', 'nan'], "'cfg'"),
    (['--cfg_min_sigma=-inf'], "'cfg_min_sigma'"),
])
def test_sample_errors_are_one_line(sample_run, args, message):
    samples = sample_run / 'run' / 'samples'
    before = set(os.listdir(samples)) if samples.is_dir() else set()
    proc = run_in_process('sample.py', '--out_dir', str(sample_run / 'run'), *args, check=False)
    assert message in one_line_error(proc) and len(proc.stderr.strip().splitlines()) == 1
    assert (set(os.listdir(samples)) if samples.is_dir() else set()) == before  # nothing written


def test_a_checkpoint_of_random_bytes_is_not_a_nanotld_checkpoint(tmp_path):
    (tmp_path / 'ckpt.pt').write_bytes(np.random.default_rng(0).bytes(4096))
    error = one_line_error(run_in_process('sample.py', '--ckpt', str(tmp_path), check=False))
    assert 'not a nanoTLD checkpoint' in error and 'weights_only=False' not in error


def test_sample_error_from_the_command_line_is_one_line(sample_run):
    """As a user sees it, in a process of its own: one line on stderr, no traceback or warning."""
    proc = run_script('sample.py', '--out_dir', str(sample_run / 'run'), '--outpaint', 'right',
                      check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: '{sample_run / 'run'}' is not an outpainting model")


def test_no_library_function_reads_a_setting():
    """The command line's settings are read by the code under __main__ only: no function or
    method of the library loads a global that is a setting, or that only the CLI defines."""
    settings, defined = set(config_keys(vars(sample))), set(vars(sample)) | set(dir(builtins))
    objects = [*vars(sample).values(), *vars(sample.Pipeline).values()]
    codes = [inspect.unwrap(f).__code__ for f in objects  # unwrap: under torch.no_grad
             if inspect.isfunction(f) and f.__module__ == 'sample']
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if inspect.iscode(c)]  # lambdas, nested functions
        for ins in dis.get_instructions(code):
            if ins.opname in ('LOAD_GLOBAL', 'LOAD_NAME'):
                assert ins.argval not in settings, f"{code.co_name} reads the setting {ins.argval}"
                assert ins.argval in defined, f"{code.co_name} reads {ins.argval}"


# ----- the library -----

def test_init_image_is_prepared_like_training_data(tmp_path):
    """--init_image: transparency onto white and a centre crop, as prepare.py does."""
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)  # transparent black, 16 wide
    rgba[2:6, 2:6] = (0, 0, 255, 255)  # blue, left of the centre: cropped away
    rgba[2:6, 6:10] = (255, 0, 0, 255)  # red in the centre
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    x = load_image(str(tmp_path / 'a.png'), (8, 8))  # (1, 3, 8, 8) in [-1, 1]: columns 4..11
    assert x.shape == (1, 3, 8, 8)
    torch.testing.assert_close(x[0, :, 0, 0], torch.ones(3))  # transparent -> white, not black
    torch.testing.assert_close(x[0, :, 3, 3], torch.tensor([1.0, -1.0, -1.0]))  # red
    torch.testing.assert_close(x[0, :, 3, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue's last two


def test_inpainting_mask_in_pixels_generates_every_latent_cell_it_touches(pipe, monkeypatch):
    """generate_images takes the mask in pixels; where the codec downsamples, a cell of the model's
    grid is generated if any of its pixels is."""
    seen = {}
    monkeypatch.setattr(pipe.codec, 'downsample', 4)  # 16 px -> a 4 x 4 grid, as a VAE's 8
    monkeypatch.setattr(pipe, 'encode_image', lambda image: torch.zeros(1, 3, 4, 4))
    monkeypatch.setattr(pipe, 'sample_latents', lambda text, noise, **kw: seen.update(kw) or noise)
    monkeypatch.setattr(pipe, 'decode', lambda x: x)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5, 9] = 1  # one pixel, in the cell at row 1, column 2
    generate_images(pipe, ['a red apple'], image=torch.zeros(1, 3, 16, 16), mask=mask)
    assert seen['mask'].shape == (1, 1, 4, 4)
    assert seen['mask'][0, 0].nonzero().tolist() == [[1, 2]]


def test_sample_zoom_auto_reaches_128_px_and_1_keeps_raw_pixels(sample_run, tmp_path):
    sizes = [(16, 16), (32, 32), (32, 64), (100, 300), (128, 128), (256, 256)]
    zooms = [8, 4, 4, 2, 1, 1]  # the smallest integer factor to reach 128 px
    for (h, w), k in zip(sizes, zooms):
        paths = save_grid(torch.rand(1, 3, h, w), 1, str(tmp_path / f'{h}.png'), ['one'], zoom=0)
        assert Image.open(paths[1]).size == (w * k, h * k)
    args = ['--out_dir', str(sample_run / 'run'), '--prompt', 'a red apple', '--n=2',
            '--individual']
    raw = _sample(*args, '--out', str(sample_run / 'raw.png'))  # --zoom=1
    auto = _sample(*args, '--out', str(sample_run / 'auto.png'), zoom=None)  # the default
    assert Image.open(raw[0]).size == (2 * 18 + 2, 18 + 2) and Image.open(raw[1]).size == (16, 16)
    assert Image.open(auto[0]).size == (2 * 130 + 2, 130 + 2)  # 16 px × 8 = 128 px, padding 2
    for r, a in zip(raw[1:], auto[1:]):
        assert Image.open(a).size == (128, 128)
        assert np.array_equal(np.repeat(np.repeat(_png(r), 8, 0), 8, 1), _png(a))  # nearest: blocks


def test_pipeline_without_text_encoder_and_the_text_width_check(sample_run, pipe, tmp_path):
    """eval.py's pipeline: from a loaded checkpoint, no text encoder, embeddings given; the same
    images as the full pipeline's. A text encoder of the wrong width is a one-line ValueError."""
    run = str(sample_run / 'run')
    full = pipe
    bare = load_pipeline(load_checkpoint(run), 'cpu', 'float32', text_encoder=False)
    assert bare.text_encoder is None
    with pytest.raises(ValueError, match='no text encoder'):
        bare.encode_text(['a red apple'])
    prompts = ['a red apple', 'a cute owl']
    emb = full.encode_text(prompts).repeat_interleave(2, dim=0)  # (4, 384)
    x0 = bare.sample_latents(emb, make_noise([3, 4, 3, 4], bare.latent_shape()), cfg=7.0)
    assert torch.equal(bare.decode(x0), generate_images(full, prompts, n=2, cfg=7.0, seed=3))
    # image j of a prompt is seed + j's, whatever else is in the batch (to float rounding)
    torch.testing.assert_close(bare.decode(x0)[1:2], generate_images(full, prompts[:1], seed=4),
                               atol=1e-4, rtol=0)
    args = dict(load_checkpoint(run)['model_args'], text_emb_size=8)
    torch.save({'model': Denoiser(**args).state_dict(), 'model_args': args,
                'data_meta': {'text_encoder': 'minilm', 'vae': 'none'}}, tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError, match=r"gives 384-d embeddings, but the model in .* expects 8$"):
        load_pipeline(str(tmp_path), 'cpu', 'float32')


def test_compiled_pipeline_samples_as_the_eager_one_with_frozen_weights(sample_run, monkeypatch):
    """sample.py --compile: the compiled denoiser's samples are the eager one's, and on a CPU
    inductor freezes its weights into the compiled code (what makes it fast)."""
    import torch._inductor.freezing
    freeze, frozen = torch._inductor.freezing.freeze, []
    monkeypatch.setattr(torch._inductor.freezing, 'freeze',
                        lambda *a, **kw: frozen.append(1) or freeze(*a, **kw))
    ckpt = load_checkpoint(str(sample_run / 'run'))
    eager, compiled = (load_pipeline(ckpt, 'cpu', 'float32', compile=c, text_encoder=False)
                       for c in (False, True))
    emb, noise = torch.randn(2, 384), make_noise([0, 1], eager.latent_shape())
    # guided at every step: one batch shape, one compilation
    expected = eager.sample_latents(emb, noise, cfg=7.0, steps=2, cfg_min_sigma=0.0)
    got = compiled.sample_latents(emb, noise, cfg=7.0, steps=2, cfg_min_sigma=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert frozen, "inductor did not freeze the weights"


def test_a_few_step_checkpoint_picks_its_sampler_and_its_baked_guidance(tmp_path):
    """A flow map samples with its jumps and cfg 1 (its guidance is in the weights) without a
    flag: the images are generate()'s with those settings. A plain model refuses the flow-map
    sampler in one line."""
    run = tmp_path / 'fewstep'
    save_tiny_checkpoint(str(run), flow_map=True, objective='flowmap', baked_cfg=4.0)
    proc = run_in_process('sample.py', f'--out_dir={run}', '--prompt', 'a red apple', '--n=2',
                          '--steps=2', '--dtype=float32', '--zoom=1')
    assert 'guidance is in this model' in proc.stdout
    assert '2 flowmap steps, cfg 1' in proc.stdout
    path = next(line.split(' ', 1)[1] for line in proc.stdout.splitlines()
                if line.startswith('wrote '))
    pipe = load_pipeline(run, 'cpu', 'float32')  # a pathlib.Path works as a str does
    expected = generate_images(pipe, ['a red apple'], n=2, cfg=1.0, steps=2, sampler='flowmap')
    assert not torch.allclose(expected, generate_images(pipe, ['a red apple'], n=2, cfg=1.0,
                                                        steps=2, sampler='ddim'))
    grid = _png(path)
    torch.testing.assert_close(torch.from_numpy(_tile(grid, 0, 1)).permute(2, 0, 1), expected[1],
                               atol=1 / 255 + 1e-6, rtol=0)
    save_tiny_checkpoint(str(tmp_path / 'plain'))
    proc = run_in_process('sample.py', f'--out_dir={tmp_path / "plain"}', '--prompt', 'a cat',
                          '--sampler=flowmap', check=False)
    assert 'needs a flow map' in one_line_error(proc)


def test_text_is_taken_as_written_and_must_be_utf8(sample_run, tmp_path):
    """--prompt "('a cat', 'a dog')" is one prompt, as typed; a prompt file that is not UTF-8 is one
    line naming the file and the line."""
    paths = _sample('--out_dir', str(sample_run / 'run'), '--prompt', "('a cat', 'a dog')", '--n=1')
    assert _png(paths[0]).shape == (16, 16, 3)  # one prompt, one image: no grid around it
    (tmp_path / 'latin1.txt').write_bytes('a red apple\nun caf\xe9\n'.encode('latin-1'))
    proc = run_in_process('sample.py', '--out_dir', str(sample_run / 'run'),
                          '--prompt_file', str(tmp_path / 'latin1.txt'), check=False)
    assert f"{tmp_path / 'latin1.txt'}, line 2: not UTF-8" in one_line_error(proc)


def test_concurrent_identical_runs_both_write_and_nothing_is_left_behind(sample_run):
    """Two identical sample.py at once: each takes a name of its own for its grid before sampling
    (no shared temporary file), so both succeed and neither replaces the other."""
    import subprocess
    import sys
    args = [sys.executable, 'sample.py', '--out_dir', str(sample_run / 'run'), '--prompt',
            'two at once', '--n=1', '--steps=2', '--dtype=float32']
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = [re.search(r'wrote (.*)', out).group(1) for out, _ in outs]
    assert len(set(paths)) == 2 and all(os.path.getsize(p) > 0 for p in paths)
    samples = sample_run / 'run' / 'samples'
    assert not [f for f in os.listdir(samples) if f.endswith('.tmp')]


def test_an_unwritable_run_dir_fails_before_sampling(tmp_path):
    """A samples/ folder that cannot be written (here a file of that name, which root cannot write
    into either) is one line before any image is made; a console that cannot print σ (latin-1)
    does not crash the run."""
    ckpt = save_tiny_checkpoint(str(tmp_path / 'ro'))
    (tmp_path / 'ro' / 'samples').write_text('not a folder')
    proc = run_in_process('sample.py', '--ckpt', ckpt, check=False)
    assert 'cannot write the grid' in one_line_error(proc) and 'images in' not in proc.stdout
    proc = run_script('sample.py', '--ckpt', save_tiny_checkpoint(str(tmp_path / 'ok')),
                      '--steps=1', '--n=1', env={'PYTHONIOENCODING': 'latin-1'})
    assert '\\u03c3' in proc.stdout  # σ, escaped: printed all the same


def test_the_usage_line_samples_the_demo_run():
    """`python sample.py --prompt "..." --cfg 7` after `python train.py config/tiny.py`: sample.py
    and eval.py read the run the demo writes by default."""
    import eval as evaluation
    from configurator import load_config
    demo = load_config(os.path.join(ROOT, 'config', 'tiny.py'))['out_dir']
    assert sample.out_dir == evaluation.out_dir == demo == 'out-tiny'
