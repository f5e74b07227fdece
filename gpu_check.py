"""
A one-shot check of the GPU paths, reported as one markdown table (about 3 minutes on one GPU).

    python gpu_check.py                                       # on a GPU, at the base model's size
    python gpu_check.py --device=cpu --tiny --compile=False   # the same checks, tiny, in seconds

- attention: model.attention's two branches, SDPA and the plain matmuls and softmax, each
  forced, on the same inputs: max |difference| / max |output| in fp32 (on GPUs) and bf16.
- train step: config/base.py's model (~101M), batch 64, bf16 autocast, fused AdamW, eager and
  torch.compile'd: images/s and peak GPU memory.
- sampling: 36 images x 15 steps at cfg 7 through pipeline.py (text encoding, the solver and the VAE
  decode), timed; the reference model's figure is 0.6 s on an A100. Nothing is downloaded: the VAE
  is a random one of SD's architecture, the text encoder a small random CLIP, both saved to a
  temporary directory.
- resume: torchrun of train.py config/base.py on synthetic 4x32x32 latents, 40 iterations straight
  and 20 + a resume to 40, compared (another straight run measures the run-to-run spread if the two
  are not bitwise equal).
- fp16: train.py with dtype='float16' (fp16 autocast and a GradScaler) gives finite losses.

The exit status is 1 if a check fails.
"""
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from configurator import configure
from dataset import load_prepared
from diffusion import training_loss
from model import Denoiser, attention, autocast

# -----------------------------------------------------------------------------
device = 'cuda'
tiny = False  # tiny models and data: the whole check in seconds, on a CPU too
compile = True  # also time the torch.compile'd train step (a minute to compile on a GPU)
nproc = 1  # torchrun processes for the resume check, one GPU each
train_steps = 10  # timed train steps, after 3 warmup ones
n_images = 36  # images sampled at once
seed = 0
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])

ROOT = os.path.dirname(os.path.abspath(__file__))


def base_architecture():
    """config/base.py's Denoiser settings, for its data: 4x32x32 latents, 768-d CLIP text."""
    scope = {}
    exec(open(os.path.join(ROOT, 'config', 'base.py')).read(), scope)
    arch = {k: v for k, v in scope.items() if k in inspect.signature(Denoiser).parameters}
    return dict(arch, n_channels=4, image_size=32, text_emb_size=768)


TINY = dict(n_channels=4, image_size=8, patch_size=2, embed_dim=32, n_layers=2, mlp_multiplier=2,
            head_dim=16, text_emb_size=16)
ARCH = TINY if tiny else base_architecture()
TINY_ARGS = ['--embed_dim=32', '--n_layers=2', '--head_dim=16', '--mlp_multiplier=2',
             '--batch_size=8', '--gradient_accumulation_steps=2', '--n_sample=4',
             '--sample_steps=4']
is_cuda = device.startswith('cuda')


def sync():
    if is_cuda:
        torch.cuda.synchronize()


def log(message):
    print(message, file=sys.stderr, flush=True)


# ----- attention: the two branches of model.SelfAttention -----

class _OnCuda(torch.Tensor):
    is_cuda = property(lambda self: True)


class _OnCpu(torch.Tensor):
    is_cuda = property(lambda self: False)


def attention_branches(q, k, v):
    """model.attention's two branches on the same (B, h, N, d) queries and (B, h, L, d) keys and
    values, each forced through what attention() tests (q.is_cuda, which a tensor subclass answers;
    CPU autocast; grad mode): SDPA, the GPUs' path, and the plain matmul-softmax-matmul of CPU
    training in bf16. The plain one needs CPU autocast on: on a CPU it runs in bf16."""
    with torch.no_grad():
        sdpa = attention(q.as_subclass(_OnCuda), k, v)
    with torch.enable_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        plain = attention(q.as_subclass(_OnCpu), k, v)
    return sdpa.as_subclass(torch.Tensor).detach(), plain.as_subclass(torch.Tensor).detach()


def check_attention():
    """Self-attention's shape (N keys) and cross-attention's (2 keys): the largest difference of the
    two branches relative to the largest output, fp32 (GPUs only, see above) and bf16."""
    torch.manual_seed(seed)
    heads, d = ARCH['embed_dim'] // ARCH['head_dim'], ARCH['head_dim']
    tokens = (ARCH['image_size'] // ARCH['patch_size']) ** 2
    errors = []
    for dtype, tolerance in (('float32', 1e-4), ('bfloat16', 3e-2))[0 if is_cuda else 1:]:
        for keys in (tokens, 2):
            q = torch.randn(8, heads, tokens, d, device=device)
            k, v = (torch.randn(8, heads, keys, d, device=device) for _ in range(2))
            with autocast(device, dtype):
                sdpa, plain = attention_branches(q, k, v)
            error = ((sdpa.float() - plain.float()).abs().max() / plain.float().abs().max()).item()
            errors.append((dtype, keys, error, tolerance))
    return all(e <= t for *_, e, t in errors), ', '.join(
        f"{dtype} {keys} keys: {e:.1e} (<= {t:.0e})" for dtype, keys, e, t in errors)


# ----- the train step, eager and compiled -----

def time_train_step(compiled, batch):
    torch.manual_seed(seed)
    model = Denoiser(**ARCH).to(device)
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    C, S, D = ARCH['n_channels'], ARCH['image_size'], ARCH['text_emb_size']
    x0, text = torch.randn(batch, C, S, S, device=device), torch.randn(batch, D, device=device)

    def step():
        with autocast(device, 'bfloat16'):
            loss = training_loss(net, x0, text)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    loss = step()  # compiles, when compiled
    sync()
    first = time.perf_counter() - t0
    for _ in range(2):
        step()
    sync()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(train_steps):
        loss = step()
    sync()
    rate = batch * train_steps / (time.perf_counter() - t0)
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if is_cuda else 'n/a'
    return math.isfinite(loss.item()), rate, memory, first


def check_train_step(compiled):
    batch = 8 if tiny else 64  # config/base.py's batch_size
    ok, rate, memory, first = time_train_step(compiled, batch)
    detail = f"{rate:.0f} images/s, peak memory {memory}, batch {batch}, {train_steps} steps"
    return ok, detail + (f", first step (compiling) {first:.0f} s" if compiled else '')


# ----- sampling through pipeline.py, with a random VAE and text encoder -----

def make_vae(path, channels, layers):
    """A random diffusers AutoencoderKL, 4 latent channels, f = 2^(len(channels) - 1)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(channels)
    vae = AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * n,
                        up_block_types=('UpDecoderBlock2D',) * n, block_out_channels=channels,
                        layers_per_block=layers, latent_channels=4,
                        norm_num_groups=min(32, channels[0]), scaling_factor=0.18215)
    vae.save_pretrained(path)
    return path


def make_clip(path, dim):
    """A random 2-layer CLIP text model, byte-level tokenizer, dim-d projected embeddings."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    tokens = ['<|startoftext|>', '<|endoftext|>'] + chars + [c + '</w>' for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, projection_dim=dim,
                         max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModelWithProjection(cfg).save_pretrained(path)
    try:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])  # transformers 5
    except TypeError:  # transformers 4 reads files
        os.makedirs(path, exist_ok=True)
        files = os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt')
        json.dump(vocab, open(files[0], 'w'))
        open(files[1], 'w').write('#version: 0.2\n')
        tokenizer = CLIPTokenizer(*files)
    tokenizer.save_pretrained(path)
    return path


def check_sampling(tmp):
    from pipeline import make_noise, pipeline_from_checkpoint
    # SD's VAE (f = 8, 128-256-512-512 wide, 2 layers a block); tiny: f = 2
    vae = make_vae(os.path.join(tmp, 'sd_vae'), (8, 8) if tiny else (128, 256, 512, 512),
                   1 if tiny else 2)
    clip = make_clip(os.path.join(tmp, 'clip'), ARCH['text_emb_size'])
    torch.manual_seed(seed)
    state = Denoiser(**ARCH).state_dict()
    ckpt = dict(model=state, ema=state, model_args=ARCH, iter_num=0,
                data_meta=dict(text_encoder=clip, vae=vae, scale_factor=0.18215))
    pipe = pipeline_from_checkpoint(ckpt, device=device, dtype='auto')
    prompts = [f'a photo of thing number {i}' for i in range(n_images)]

    def run():
        times = [time.perf_counter()]
        text = pipe.encode_text(prompts)
        sync()
        times.append(time.perf_counter())
        noise = make_noise(range(n_images), pipe.latent_shape())
        x0 = pipe.sample_latents(text, noise, cfg=7.0, steps=15)
        sync()
        times.append(time.perf_counter())
        images = pipe.decode(x0)  # to the CPU
        times.append(time.perf_counter())
        return images, np.diff(times)

    run()  # warm up: kernels, cuDNN's choices
    images, (t_text, t_solve, t_decode) = run()
    shape = (n_images, 3, *pipe.pixel_size(pipe.latent_shape()))
    ok = images.shape == shape and bool(images.isfinite().all())
    return ok, (f"{t_text + t_solve + t_decode:.2f} s for {n_images} images of {shape[-1]} px "
                f"(text {t_text:.3f} s, 15 steps {t_solve:.2f} s, VAE decode {t_decode:.2f} s), "
                f"{pipe.dtype}; the reference: 0.6 s on an A100")


# ----- train.py: torchrun with a resume, and fp16 -----

def write_data(path, n=1024, n_val=64):
    """Synthetic prepared data in the format dataset.load_prepared reads: random latents of unit
    variance in model space, random text embeddings. 4x32x32 latents with a small random VAE
    (f = 8) for the sample grids; tiny: 3x8x8 pixels (no VAE, so no diffusers in train.py)."""
    rng = np.random.default_rng(seed)
    C, S, D = 3 if tiny else ARCH['n_channels'], ARCH['image_size'], ARCH['text_emb_size']
    vae, scale = 'none', 1.0
    if not tiny:
        vae, scale = make_vae(os.path.join(path, 'vae'), (8, 8, 8, 8), 1), 0.18215
    os.makedirs(path, exist_ok=True)
    for prefix, rows in (('', n), ('val_', n_val)):
        np.save(os.path.join(path, f'{prefix}latents.npy'),
                (rng.standard_normal((rows, C, S, S)) / scale).astype(np.float16))
        np.save(os.path.join(path, f'{prefix}text_emb.npy'),
                rng.standard_normal((rows, D)).astype(np.float16))
        with open(os.path.join(path, f'{prefix}captions.jsonl'), 'w') as f:
            f.writelines(json.dumps({'caption': f'synthetic row {i}'}) + '\n' for i in range(rows))
    meta = dict(text_encoder='synthetic', text_dim=D, vae=vae, scale_factor=scale,
                latent_shape=[C, S, S], image_size=S * (1 if tiny else 8), n=n, n_val=n_val,
                latent_dtype='float16', quantization=None)
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    load_prepared(path)  # the format is still the one train.py reads
    return path


def train(out_dir, *args, torchrun=False):
    """Run train.py config/base.py on the synthetic data; (ok, stdout, last stderr line)."""
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = [sys.executable, *(launcher if torchrun else []), 'train.py', 'config/base.py',
           f'--device={device}', '--compile=False', f'--out_dir={out_dir}', '--eval_interval=1000',
           '--ckpt_interval=1000', '--log_interval=1', '--warmup_iters=10', '--lr_decay_iters=40',
           '--eval_samples=64', *(TINY_ARGS if tiny else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    last = (proc.stderr.strip().splitlines() or [''])[-1]
    return proc.returncode == 0, proc.stdout, last


def max_difference(a, b):
    """The largest |a - b| over the weights, EMA and optimizer state of two checkpoints."""
    pairs = [(a[k][n], b[k][n]) for k in ('model', 'ema') for n in a[k]]
    for p in a['optimizer']['state']:
        pairs += [(a['optimizer']['state'][p][n], b['optimizer']['state'][p][n])
                  for n in a['optimizer']['state'][p]]
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def check_resume(tmp, data):
    load = lambda d: torch.load(os.path.join(tmp, d, 'ckpt.pt'), 'cpu', weights_only=True)
    runs = [('straight', ['--max_iters=40']), ('resumed', ['--max_iters=20']),
            ('resumed', ['--max_iters=40', '--init_from=resume'])]
    for out, args in runs:
        ok, stdout, last = train(os.path.join(tmp, out), f'--data_dir={data}', *args, torchrun=True)
        if not ok:
            return False, f"torchrun train.py ({out}, {' '.join(args)}) failed: {last}"
    first_line = stdout.splitlines()[0]
    a, c = load('straight'), load('resumed')
    same = a['iter_num'] == c['iter_num'] == 40 and a['data_state'] == c['data_state']
    diff = max_difference(a, c)
    if diff == 0:
        return same, f"bitwise equal after 40 iterations; {first_line.split(';')[0]}"
    ok, _, last = train(os.path.join(tmp, 'again'), f'--data_dir={data}', '--max_iters=40',
                        torchrun=True)
    spread = max_difference(a, load('again')) if ok else math.inf
    return same and diff <= 10 * spread, (f"max |resumed - straight| {diff:.1e}, run-to-run spread "
                                          f"{spread:.1e} (two straight runs); "
                                          f"{first_line.split(';')[0]}")


def check_fp16(tmp, data):
    ok, stdout, last = train(os.path.join(tmp, 'fp16'), f'--data_dir={data}', '--max_iters=10',
                             '--dtype=float16')
    if not ok:
        return False, f"train.py --dtype=float16 failed: {last}"
    losses = [float(v) for v in re.findall(r'iter \d+: loss ([^,]+),', stdout)]
    ckpt = torch.load(os.path.join(tmp, 'fp16', 'ckpt.pt'), 'cpu', weights_only=True)
    scale = ckpt['scaler'].get('scale')
    ok = len(losses) == 10 and all(math.isfinite(v) for v in losses) and scale is not None
    return ok, f"losses {losses[0]:.3f} -> {losses[-1]:.3f}, all finite; GradScaler scale {scale}"


# ----- run them all -----

checks = [('attention: SDPA vs plain branch', check_attention),
          ('train step, bf16 eager', lambda: check_train_step(False))]
if compile:
    checks.append(('train step, bf16 compiled', lambda: check_train_step(True)))
rows, t_start = [], time.time()
with tempfile.TemporaryDirectory() as tmp:
    data = write_data(os.path.join(tmp, 'data'))
    checks += [(f'sampling: {n_images} images x 15 steps + VAE decode',
                lambda: check_sampling(tmp)),
               (f'torchrun x{nproc}: 40 iters vs 20 + resume', lambda: check_resume(tmp, data)),
               ('fp16 + GradScaler (train.py)', lambda: check_fp16(tmp, data))]
    for name, check in checks:
        log(f"{name} ...")
        t0 = time.time()
        try:
            ok, detail = check()
        except Exception as e:  # one failing check should not hide the others
            ok, detail = False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        rows.append((name, 'pass' if ok else 'FAIL', f"{detail} [{time.time() - t0:.0f} s]"))

where = torch.cuda.get_device_name(device) if is_cuda else 'CPU'
print(f"## gpu_check on {where}{' (tiny)' if tiny else ''}, torch {torch.__version__}, "
      f"{time.time() - t_start:.0f} s\n")
print('| check | result | details |')
print('|---|---|---|')
for row in rows:
    print('| ' + ' | '.join(cell.replace('|', '/') for cell in row) + ' |')
sys.exit(0 if all(r[1] == 'pass' for r in rows) else 1)
