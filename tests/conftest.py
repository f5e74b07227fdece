"""
Shared fakes for the tests: tiny models and data the tests build themselves, never a download.

    python -m pytest -q            # the whole suite: tests/ and test_smoke.py
"""
import contextlib
import gc
import io
import json
import os
import runpy
import signal
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts are flat files at the repo root

from diffusion import sigma_schedule  # noqa: E402
from model import Denoiser  # noqa: E402


def run_script(*args, check=True, env=None, timeout=600):
    """Run one of the repo's scripts as a user would, from the repo root."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def run_in_process(script, *args, check=True):
    """run_script in this process: a fresh one pays ~5 s of imports for what a tiny model's
    sampling or a bad flag takes. An exit by SystemExit sets the returncode, and its message ends
    stderr, as the interpreter would print it. The random state and the signal handlers are the
    caller's again afterwards."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with (mock.patch.object(sys, 'argv', [script, *args]), contextlib.chdir(ROOT),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          torch.random.fork_rng()):
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
        except SystemExit as e:
            code = e.code or 0
            if isinstance(code, str):  # sys.exit(message): the message on stderr, status 1
                print(code, file=err)
                code = 1
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            gc.collect()  # the script's globals: a run directory's lock goes with its file
    proc = subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
    if check and code:
        raise AssertionError(f"{script} {args} failed ({code}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def one_line_error(proc):
    """The error a script gave: exit status 1 and a single 'error: ...' line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines and lines[-1].startswith('error: '), proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


def save_taesd(folder, name, channels=4, pool=False, seed=0, from_state=None):
    """A TAESD pair NAME_encoder.pth / NAME_decoder.pth as published: fp16 state dicts."""
    torch.manual_seed(seed)
    from encoders import TinyAutoencoder
    model = TinyAutoencoder(channels, pool)
    if from_state is not None:
        model.load_state_dict(from_state)
    os.makedirs(folder, exist_ok=True)
    for part in ('encoder', 'decoder'):
        state = {k: v.half() for k, v in getattr(model, part).state_dict().items()}
        torch.save(state, os.path.join(folder, f'{name}_{part}.pth'))
    return str(folder)


TINY_ARGS = dict(n_channels=3, image_size=16, patch_size=2, embed_dim=64, n_layers=2,
                 head_dim=32, mlp_multiplier=2, text_emb_size=8)


def tiny_denoiser(trained=False, **kw):
    """A tiny Denoiser. trained=True stands in for a trained one: the zero-initialised weights
    (adaLN-Zero gates, the text prior's output) are made random, so the text changes the output."""
    torch.manual_seed(0)
    model = Denoiser(**{**TINY_ARGS, **kw})
    if trained:
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.05)
    return model


def save_tiny_checkpoint(path, cond_channels=0, flow_map=False, **extra):
    """A random tiny pixel-space Denoiser saved in train.py's checkpoint format, with MiniLM (whose
    weights ship in an installed package) as its text encoder. Untrained: its images are a
    deterministic function of the noise and the prompt, which is what sampling tests need."""
    args = dict(TINY_ARGS, embed_dim=32, n_layers=1, head_dim=16, text_emb_size=384,
                cond_channels=cond_channels, flow_map=flow_map)
    model = tiny_denoiser(trained=True, **args)
    os.makedirs(path, exist_ok=True)
    torch.save({'model': model.state_dict(), 'ema': model.state_dict(), 'model_args': args,
                'iter_num': 0, 'config': {}, **extra,
                'data_meta': {'text_encoder': 'minilm', 'vae': 'none', 'scale_factor': 1.0}},
               os.path.join(path, 'ckpt.pt'))
    return os.path.join(path, 'ckpt.pt')


def make_random_vae(path, block_out_channels=(8, 16), seed=0):
    """A random-init diffusers AutoencoderKL saved to path (f = 2^(len(block_out_channels) - 1))."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(block_out_channels)
    AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * n,
                  up_block_types=('UpDecoderBlock2D',) * n,
                  block_out_channels=block_out_channels, latent_channels=4, layers_per_block=1,
                  norm_num_groups=min(32, block_out_channels[0])).save_pretrained(path)
    return str(path)


def make_random_clip_text(path):
    """A tiny random CLIP text model with a byte-level BPE tokenizer, saved like a hub model."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = ['<|startoftext|>', '<|endoftext|>'] + chars + [ch + '</w>' for ch in chars]
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModelWithProjection(config).save_pretrained(path)
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope='session')
def tiny_encoders(tmp_path_factory):
    """A tiny random CLIP text model and a tiny random AutoencoderKL (f = 2), saved to disk:
    prepare.py loads them by path, through the same code as a real model name."""
    root = tmp_path_factory.mktemp('encoders')
    return dict(clip=make_random_clip_text(root / 'clip'), vae=make_random_vae(root / 'vae'))


def write_prepared(path, size=16, n=40, n_val=8, dim=8, seed=0):
    """A prepare.py output dir of coloured squares on white, one caption per colour, in pixel
    space: small enough for a few-second training run."""
    rng = np.random.default_rng(seed)
    colors = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)
    names = ['red', 'green', 'blue', 'yellow']
    emb = rng.standard_normal((4, dim)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    for prefix, rows in (('', n), ('val_', n_val)):
        k = np.arange(rows) % 4
        img = np.ones((rows, 3, size, size), np.float32)
        for i in range(rows):
            y, x = rng.integers(0, size // 2, 2)
            img[i, :, y:y + size // 2, x:x + size // 2] = colors[k[i], :, None, None]
        np.save(os.path.join(path, f'{prefix}latents.npy'), img.astype(np.float16))
        np.save(os.path.join(path, f'{prefix}text_emb.npy'), emb[k].astype(np.float16))
        with open(os.path.join(path, f'{prefix}captions.jsonl'), 'w') as f:
            f.writelines(json.dumps({'caption': f'a {names[j]} square'}) + '\n' for j in k)
    meta = dict(text_encoder='test', text_dim=dim, vae='none', scale_factor=1.0,
                latent_shape=[3, size, size], image_size=size, n=n, n_val=n_val,
                latent_dtype='float16')
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(path)


class GaussianData:
    """Data with a known answer, for checking the samplers.
    For x0 ~ N(μ, diag(s²)) both E[x0 | x_σ] (the ideal denoiser) and the exact probability-flow
    ODE solution are closed-form: z = (x_σ - α·μ) / sqrt(α²s² + σ²) is constant along the flow."""

    def __init__(self, dim=4096, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(dim, generator=g, dtype=torch.float64) - 0.5
        self.s = 0.5 + torch.rand(dim, generator=g, dtype=torch.float64)
        self.noise = torch.randn(dim, generator=g, dtype=torch.float64)

    def denoise(self, x, sigma):  # the ideal x0-predictor E[x0 | x_σ]
        a = 1 - sigma
        return self.mu + a * self.s ** 2 / (a ** 2 * self.s ** 2 + sigma ** 2) * (x - a * self.mu)

    def exact(self, x, sigma):  # the ODE solution at σ = 0 from x at σ
        a = 1 - sigma
        return self.mu + self.s * (x - a * self.mu) / torch.sqrt(a ** 2 * self.s ** 2 + sigma ** 2)

    def jump(self, x, sigma, sigma_next):  # the exact flow map: the ODE from σ to σ_next
        a, b = 1 - sigma, 1 - sigma_next
        z = (x - a * self.mu) / torch.sqrt(a ** 2 * self.s ** 2 + sigma ** 2)
        return b * self.mu + torch.sqrt(b ** 2 * self.s ** 2 + sigma_next ** 2) * z

    def error(self, sampler, steps, sigma_max=1.0, **schedule):
        """RMS error of a sampler's answer against the exact one, from σ_max to 0."""
        x = sigma_max * self.noise
        out = sampler(self.denoise, x, [sigma_max * s for s in sigma_schedule(steps, **schedule)])
        return ((out - self.exact(x, sigma_max)) ** 2).mean().sqrt().item()


def _toy_emojis(K=60, seed=0):
    """K distinct blocky 32×32 'emojis' in [0, 1]; #1 is drawn exactly like #0 (two names, one
    image)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.interpolate(torch.rand(K, 3, 4, 4, generator=g), size=32,
                                             mode='nearest')
    images[1] = images[0]
    return images


@pytest.fixture(scope='session')
def inception():
    """The real FID Inception-v3 (installed by requirements-fid.txt, no download), loaded once for
    every test, eval.py's runs included."""
    import metrics
    return metrics.InceptionFeatures()
