"""
A one-shot check of the GPU paths, printed as a markdown table, one row as each check ends.

    python gpu_check.py                          # on a GPU, at the base model's size
    python gpu_check.py --device=cpu --tiny --compile=False   # the same checks, tiny, on a CPU
    python gpu_check.py --max_minutes=20                      # more time for a slower GPU

- attention: F.scaled_dot_product_attention against softmax(q kᵀ / √d) v in fp32 matmuls, at the
  model's self-attention (N keys) and cross-attention (2 keys) shapes, in fp32 and in the dtype
  'auto' picks: output and gradients.
- train step: config/base.py's model, batch 64, the 'auto' dtype, fused AdamW, eager: images/s
  and peak GPU memory. Not an upper bound for train.py: config/base.py compiles, which should be
  faster.
- sampling: n_images images x 15 steps at cfg 7 through sample.load_pipeline (text encoding, the
  solver, the VAE decode), each part timed. Nothing is downloaded: the VAE is a random one of SD's
  architecture, the text encoder a small random CLIP, both saved to a temporary directory.
- resume: torchrun of train.py config/base.py on synthetic 4x32x32 latents, 20 iterations
  straight and 10 + a resume to 20: the saved RNG states and data position must be bitwise equal,
  the loss of iteration 11 equal (on a CPU, the weights too; on a GPU within a tolerance, as
  flash-attention's backward is not deterministic there).
- fp16: train.py --dtype=float16 gives finite losses, takes optimizer steps, keeps its loss scale.
- train.py: a short torchrun run of config/base.py as it is (compiled unless --compile=False),
  with TORCH_LOGS=recompiles: its images/s and the recompiles after the first step and after an
  evaluation (there should be none).

Each check builds its own data; a failing check is a FAIL row with its error, the others still
run; each row ends with the seconds its check took. Every child process gets the time that is
left; after max_minutes the run stops, whatever hangs (torchrun's workers included), with the
rows it has. The exit status is 1 if a check failed or did not run.
"""
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from configurator import config_keys, configure, fail
from diffusion import training_loss
from model import Denoiser, autocast, resolve_dtype

# -----------------------------------------------------------------------------
device = 'cuda'
tiny = False  # tiny models and data, for a CPU
compile = True  # train.py's run compiled, as config/base.py has it
nproc = 1  # torchrun processes for the resume check, one GPU each
train_steps = 10  # timed train steps, after 3 warmup ones
n_images = 36  # images sampled at once
max_minutes = 9.0  # stop after this long with the rows so far, exit status 1; fits a cold H100
seed = 0
# -----------------------------------------------------------------------------
DEFAULTS = {k: globals()[k] for k in config_keys(globals())}  # the settings: the names above

ROOT = os.path.dirname(os.path.abspath(__file__))
GRACE_S = 10  # past max_minutes, before the watchdog ends a check that hangs in this process
TERM_WAIT_S = 5  # after SIGTERM, before SIGKILL: torchrun stops its workers (< GRACE_S)
TINY = dict(n_channels=4, image_size=8, patch_size=2, embed_dim=32, n_layers=2, mlp_multiplier=2,
            head_dim=16, text_emb_size=16)
TINY_ARGS = ['--embed_dim=32', '--n_layers=2', '--head_dim=16', '--mlp_multiplier=2',
             '--batch_size=8', '--gradient_accumulation_steps=2', '--n_sample=4',
             '--sample_steps=4']
SMALL_ARGS = ['--batch_size=32', '--gradient_accumulation_steps=2']  # resume, fp16: 64 rows a step
ARCH = TINY  # main() sets it: TINY or config/base.py's architecture
deadline = math.inf  # time.time() at which the run stops
running = set()  # child processes: killed, with their own children, at the time limit
current = []  # the name of the check that is running


def time_left():
    return deadline - time.time()


def is_cuda():
    return device.startswith('cuda')


def sync():
    if is_cuda():
        torch.cuda.synchronize()


def base_architecture():
    """config/base.py's Denoiser settings, for its data: 4x32x32 latents, 768-d CLIP text."""
    scope = {}
    exec(open(os.path.join(ROOT, 'config', 'base.py')).read(), scope)
    arch = {k: v for k, v in scope.items() if k in inspect.signature(Denoiser).parameters}
    return dict(arch, n_channels=4, image_size=32, text_emb_size=768)


# ----- attention: SDPA against its definition -----

def plain_attention(q, k, v):
    """softmax(q kᵀ / √d) v with plain matmuls: what SDPA's fused kernels compute."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def attention_error(dtype, keys):
    """The largest |SDPA - definition| relative to the largest |definition|, for the output and
    the gradients of q, k, v: SDPA under autocast in dtype, the definition in fp32."""
    heads, d = ARCH['embed_dim'] // ARCH['head_dim'], ARCH['head_dim']
    tokens = (ARCH['image_size'] // ARCH['patch_size']) ** 2
    shapes = [(8, heads, tokens, d)] + [(8, heads, keys, d)] * 2  # (B, h, N, d), (B, h, L, d) x 2
    qkv = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    grad_out = torch.randn(shapes[0], device=device)  # the output's shape, that of q
    results = []
    for attend, ctx in ((F.scaled_dot_product_attention, autocast(device, dtype)),
                        (plain_attention, autocast(device, 'float32'))):
        with ctx:
            out = attend(*qkv)
        results.append([out, *torch.autograd.grad(out, qkv, grad_out)])
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
               for a, b in zip(*results))


def check_attention(tmp):
    torch.manual_seed(seed)
    low = resolve_dtype('auto', device)
    low = 'bfloat16' if low == 'float32' else low  # a CPU without native bf16: bf16 all the same
    tokens = (ARCH['image_size'] // ARCH['patch_size']) ** 2
    errors = [(dtype, keys, attention_error(dtype, keys), tolerance)
              for dtype, tolerance in (('float32', 1e-3), (low, 3e-2)) for keys in (tokens, 2)]
    return all(e <= t for *_, e, t in errors), ', '.join(
        f"{dtype} {keys} keys: {e:.1e} (<= {t:.0e})" for dtype, keys, e, t in errors)


# ----- the train step, eager, in the model alone -----

def check_train_step(tmp):
    batch, dtype = 8 if tiny else 64, resolve_dtype('auto', device)  # config/base.py's batch
    torch.manual_seed(seed)
    model = Denoiser(**ARCH).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.split(':')[0], enabled=dtype == 'float16')
    C, S, D = ARCH['n_channels'], ARCH['image_size'], ARCH['text_emb_size']
    x0, text = torch.randn(batch, C, S, S, device=device), torch.randn(batch, D, device=device)

    def step():
        with autocast(device, dtype):
            loss = training_loss(model, x0, text, 'x0', 1.0, 2.5, 0.15)  # train.py's defaults
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    sync()
    if is_cuda():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(train_steps)]
    sync()
    rate = batch * train_steps / (time.perf_counter() - t0)
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if is_cuda() else 'n/a'
    ok = all(math.isfinite(v.item()) for v in losses)
    return ok, (f"{rate:.0f} images/s, peak memory {memory}, batch {batch}, {dtype}, "
                f"{train_steps} steps")


# ----- sampling through sample.py, with a random VAE and text encoder -----

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
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return path


def check_sampling(tmp):
    from sample import load_pipeline, make_noise
    # SD's VAE (f = 8, 128-256-512-512 wide, 2 layers a block); tiny: f = 2
    vae = make_vae(os.path.join(tmp, 'sd_vae'), (8, 8) if tiny else (128, 256, 512, 512),
                   1 if tiny else 2)
    clip = make_clip(os.path.join(tmp, 'clip'), ARCH['text_emb_size'])
    torch.manual_seed(seed)
    state = Denoiser(**ARCH).state_dict()
    path = os.path.join(tmp, 'ckpt.pt')
    torch.save(dict(model=state, ema=state, model_args=ARCH, iter_num=0, config={},
                    data_meta=dict(text_encoder=clip, vae=vae, scale_factor=0.18215)), path)
    pipe = load_pipeline(path, device=device, dtype='auto')
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
    ok = tuple(images.shape) == shape and bool(images.isfinite().all())
    return ok, (f"{t_text + t_solve + t_decode:.2f} s for {n_images} images of {shape[-1]} px "
                f"(text {t_text:.3f} s, 15 steps {t_solve:.2f} s, VAE decode {t_decode:.2f} s), "
                f"{pipe.dtype}")


# ----- child processes: train.py, with timeouts and their own error lines -----

def run_child(cmd, env=None):
    """Run cmd until it ends or the time left runs out -> (returncode, stdout and stderr in the
    order written); returncode None when it was stopped, with all it started (see kill)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
    running.add(proc)
    try:
        output, _ = proc.communicate(timeout=max(1.0, time_left()))
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        kill(proc)
        try:  # the rest of the output; a process that escaped kill may hold the pipe open
            return None, proc.communicate(timeout=2)[0]
        except subprocess.TimeoutExpired as e:
            proc.stdout.close()
            return None, (e.output or b'').decode(errors='replace')  # bytes, read so far
    finally:
        running.discard(proc)


def kill(proc):
    """Stop a child and everything it started. SIGTERM first: torchrun forwards it to its
    workers and waits for them. Then SIGKILL to what is left: torchrun starts each worker in a
    session of its own, out of the child's process group, so the workers are found by their
    parent links, taken before the child ends and its workers become orphans."""
    family = descendants(proc.pid)
    proc.terminate()  # nothing, if it has ended
    try:
        proc.wait(timeout=TERM_WAIT_S)
    except subprocess.TimeoutExpired:
        family.update(descendants(proc.pid))  # still running, its pid still its own
    for pid, start in family.items():
        stat = proc_stat(pid)
        if stat and stat[1] == start:  # the same process, not a later one with its pid
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:  # the child, and the rest of its group: what an ended worker left behind, say
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=TERM_WAIT_S)  # a process stuck in the driver may outlive SIGKILL
    except subprocess.TimeoutExpired:
        pass


def proc_stat(pid):
    """(parent pid, start time) from /proc/<pid>/stat, None for a process that is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()  # after the name, which may hold ')'
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid):
    """{pid: start time} of pid's children, theirs, and so on, from the parent pids in /proc
    (no psutil here; no /proc, none). The start time tells a process from a later one that
    reuses its pid."""
    children = {}
    for name in os.listdir('/proc') if os.path.isdir('/proc') else []:
        stat = proc_stat(name) if name.isdigit() else None
        if stat:
            children.setdefault(stat[0], []).append((int(name), stat[1]))
    found, todo = {}, [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            found[child] = start
            todo.append(child)
    return found


def child_error(output):
    """A failed child's own error line: its 'error: ...' line, else its exception's line, not
    torchrun's report after it (its traceback, the ===== banner) or log lines (E1203 ...)."""
    lines = [re.sub(r'^\[rank\d+\]: ?', '', line).rstrip() for line in output.splitlines()]
    end = next((i for i, line in enumerate(lines) if 'ChildFailedError' in line), len(lines))
    lines = [line for line in lines[:end]
             if line.strip() and not set(line) <= set('=-') and not line[0].isspace()
             and not line.startswith('Traceback') and not re.match(r'[DIWEF]\d{4} ', line)]
    errors = [line for line in lines if line.startswith('error: ')]
    exceptions = [line for line in lines if re.match(r'[\w.]*(Error|Exception|Exit)\b', line)]
    return (errors or exceptions or lines or ['(no output)'])[-1]


def write_data(path):
    """Synthetic prepared data in the format prepare.Prepared reads: random latents of unit
    variance in model space, random text embeddings, more rows than a run's first epoch. 4x32x32
    latents with a small random VAE (f = 8) for the sample grids; tiny: 3x8x8 pixels (no VAE)."""
    from prepare import Prepared
    rng = np.random.default_rng(seed)
    n, n_val = (200, 16) if tiny else (1024, 64)
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
                latent_dtype='float16')
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    Prepared(path)  # the format is still the one train.py reads
    return path


def train(out_dir, data, *args, torchrun=False, env=None):
    """train.py config/base.py on the synthetic data -> (ok, its output, or its error line)."""
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = [sys.executable, *(launcher if torchrun else []), 'train.py', 'config/base.py',
           f'--device={device}', '--compile=False', f'--out_dir={out_dir}', f'--data_dir={data}',
           '--eval_interval=1000', '--ckpt_interval=1000', '--log_interval=1',
           '--warmup_iters=10', '--lr_decay_iters=40', '--eval_samples=64', *args,
           *(TINY_ARGS if tiny else [])]
    t0 = time.time()
    code, output = run_child(cmd, env)
    if code is None:
        return False, f"stopped at the time limit after {time.time() - t0:.0f} s: " + (
            child_error(output))
    return code == 0, output if code == 0 else child_error(output)


def logged_losses(output):
    """{iteration: loss} from train.py's log lines."""
    return {int(i): float(v) for i, v in re.findall(r'iter (\d+): loss ([^,\s]+)', output)}


def equal(a, b):
    """Bitwise equality of nested checkpoint entries: tensors, dicts, lists, numbers, None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def weights_difference(a, b):
    """The largest |a - b| over the weights and EMA of two checkpoints."""
    return max((a[k][n].float() - b[k][n].float()).abs().max().item()
               for k in ('model', 'ema') for n in a[k])


# ----- train.py: torchrun with a resume, fp16, and a compiled run -----

def check_resume(tmp):
    """20 iterations straight against 10 + a resume to 20. What is deterministic on any device
    must be equal bitwise: the random states each rank saved (CPU and CUDA), the data position."""
    data = write_data(os.path.join(tmp, 'data'))
    runs = [('straight', ['--max_iters=20']), ('resumed', ['--max_iters=10']),
            ('resumed', ['--max_iters=20', '--init_from=resume'])]
    losses = {}
    for out, args in runs:
        ok, output = train(os.path.join(tmp, out), data, *SMALL_ARGS, *args, torchrun=True)
        if not ok:
            return False, f"torchrun train.py ({out}, {' '.join(args)}) failed: {output}"
        losses.setdefault(out, {}).update(logged_losses(output))
    a, b = (torch.load(os.path.join(tmp, out, 'ckpt.pt'), 'cpu', weights_only=True)
            for out in ('straight', 'resumed'))
    states = a['iter_num'] == b['iter_num'] == 20 and equal(a['rng'], b['rng'])
    position = equal(a['data_state'], b['data_state'])
    la, lb = losses['straight'].get(11, math.nan), losses['resumed'].get(11, math.nan)
    weights = weights_difference(a, b)
    if is_cuda():  # flash attention's backward and the upsample's use atomics: not bitwise
        same_loss, exact = math.isclose(la, lb, rel_tol=2e-3), True
    else:
        same_loss, exact = la == lb, weights == 0
    ok = states and position and same_loss and exact
    return ok, (f"RNG states {'bitwise equal' if states else 'DIFFER'}, data position "
                f"{'bitwise equal' if position else 'DIFFERS'} after 20 iterations; loss at "
                f"iteration 11 {la:.4f} vs {lb:.4f} straight; weights max abs difference "
                f"{weights:.1e}")


def check_fp16(tmp):
    """fp16 autocast and a GradScaler: finite losses, optimizer steps taken (a step with inf or
    NaN gradients is skipped) and a loss scale that did not collapse (it halves on each skip)."""
    data, n = write_data(os.path.join(tmp, 'data')), 10
    ok, output = train(os.path.join(tmp, 'fp16'), data, f'--max_iters={n}', '--dtype=float16',
                       *SMALL_ARGS)
    if not ok:
        return False, f"train.py --dtype=float16 failed: {output}"
    losses = list(logged_losses(output).values()) or [math.nan]
    ckpt = torch.load(os.path.join(tmp, 'fp16', 'ckpt.pt'), 'cpu', weights_only=True)
    steps = max((int(s['step']) for s in ckpt['optimizer']['state'].values()), default=0)
    scale = ckpt['scaler'].get('scale', 0.0)
    ok = len(losses) == n and all(map(math.isfinite, losses)) and steps >= n // 2 and scale >= 1
    return ok, (f"losses {losses[0]:.3f} -> {losses[-1]:.3f}; {steps} of {n} optimizer steps "
                f"taken; GradScaler scale {scale:g}")


def check_train_run(tmp):
    """config/base.py as it is (batch, accumulation, compile), under torchrun as on a cluster:
    DDP, clipping, the EMA and the data loading included. TORCH_LOGS=recompiles logs every
    compile after a function's first: one at every evaluation would be a compile each time."""
    data = write_data(os.path.join(tmp, 'data'))
    t0 = time.time()
    ok, output = train(os.path.join(tmp, 'run'), data, '--max_iters=30', '--eval_interval=15',
                       '--log_interval=5', f'--compile={compile}', torchrun=True,
                       env={'TORCH_LOGS': 'recompiles'})
    if not ok:
        return False, f"torchrun train.py failed: {output}"
    lines = output.splitlines()
    recompiles = [i for i, line in enumerate(lines) if 'Recompiling function' in line]
    evals = [i for i, line in enumerate(lines) if re.search(r'iter [1-9]\d*: val loss', line)]
    after_eval = [i for i in recompiles if evals and i > evals[0]]
    tails = [line.split('[__recompiles]')[1].strip() for line in lines if '[__recompiles]' in line]
    why = [tail[2:] for tail in tails if tail.startswith('- ')][:1]  # the first guard that failed
    rates = re.findall(r'(\d+) images/s', output) or ['?']
    return bool(evals) and not recompiles, (
        f"{rates[-1]} images/s at the last log line, {'compiled' if compile else 'eager'}; "
        f"{len(recompiles)} recompiles after the first step, {len(after_eval)} after the "
        f"evaluation at iteration 15{''.join(f' ({w})' for w in why)}; "
        f"{time.time() - t0:.0f} s in all, with the start and any compiling")


# ----- run them all, each row as it ends -----

def checks():
    return [('attention: SDPA vs its definition', check_attention),
            ('train step, eager (the model alone)', check_train_step),
            (f'sampling: {n_images} images x 15 steps + VAE decode', check_sampling),
            (f'torchrun x{nproc}: 20 iters vs 10 + resume', check_resume),
            ('fp16 + GradScaler (train.py)', check_fp16),
            ('train.py config/base.py, torchrun x1, 30 iters', check_train_run)]


def watchdog(tmp, done):
    """The time limit for what no timeout reaches: a hung CUDA call or collective in this
    process. Unless the checks are done by then, it stops the children, says which check it
    stopped, and exits 1."""
    if done.wait(max(0.0, time_left() + GRACE_S)):
        return
    for proc in list(running):
        kill(proc)
    print(f"stopped: the time limit of {max_minutes} minutes ran out in '{(current or [''])[-1]}'",
          flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os._exit(1)


def run_checks(todo, tmp):
    """Run the checks in turn, printing each row as it ends -> the number that passed."""
    passed = 0
    for i, (name, check) in enumerate(todo):
        if time_left() <= 0:
            print(f"stopped: the time limit of {max_minutes} minutes ran out; not run: "
                  f"{', '.join(n for n, _ in todo[i:])}", flush=True)
            break
        print(f"{name} ...", file=sys.stderr, flush=True)
        current.append(name)
        t0 = time.time()
        check_tmp = os.path.join(tmp, str(i))
        os.makedirs(check_tmp)
        try:
            ok, detail = check(check_tmp)
        except Exception as e:  # one failing check should not hide the others
            ok, detail = False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        passed += ok
        shutil.rmtree(check_tmp, ignore_errors=True)  # a base model's checkpoints: GBs
        cells = (name, 'pass' if ok else 'FAIL', f"{detail} [{time.time() - t0:.0f} s]")
        print('| ' + ' | '.join(c.replace('|', '/') for c in cells) + ' |', flush=True)
    return passed


def main(argv):
    global ARCH, deadline
    globals().update(configure(dict(DEFAULTS), argv))
    if device != 'cpu' and not re.fullmatch(r'cuda(:\d+)?', device):
        fail(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if is_cuda() and (torch.device(device).index or 0) >= torch.cuda.device_count():
        fail(f"no CUDA GPU {device!r} here (torch sees {torch.cuda.device_count()}); to run the "
             f"checks on the CPU: python gpu_check.py --device=cpu --tiny")
    if not (max_minutes > 0 and nproc >= 1 and n_images >= 1 and train_steps >= 1):
        fail("max_minutes, nproc, n_images and train_steps must be positive")
    deadline = time.time() + 60 * max_minutes
    ARCH = TINY if tiny else base_architecture()
    where = torch.cuda.get_device_name(device) if is_cuda() else 'CPU'
    print(f"## gpu_check on {where}{' (tiny)' if tiny else ''}, torch {torch.__version__}\n\n"
          f"| check | result | details |\n|---|---|---|", flush=True)
    todo, t0 = checks(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        done = threading.Event()
        threading.Thread(target=watchdog, args=(tmp, done), daemon=True).start()
        try:
            passed = run_checks(todo, tmp)
        finally:
            done.set()
    print(f"\n{passed} of {len(todo)} checks passed in {time.time() - t0:.0f} s", flush=True)
    sys.exit(0 if passed == len(todo) else 1)


if __name__ == '__main__':
    main(sys.argv[1:])
