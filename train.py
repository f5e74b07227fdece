"""
Train the denoiser on the latents and text embeddings that prepare.py wrote.

One process (a CPU, or one GPU):
    python train.py config/tiny.py                      # the emoji demo, within 10 min on 2 cores
    python train.py config/base.py                      # the base model on one GPU
    python train.py config/tiny.py --init_from=resume   # go on exactly where out_dir/ckpt.pt ended

torchrun on one node, 2 GPUs (or 2 CPU processes, which use gloo):
    torchrun --standalone --nproc_per_node=2 train.py config/base.py

torchrun on two nodes of 8 GPUs, one line on each with its --node_rank (NCCL_IB_DISABLE=1 without
Infiniband). out_dir and the data on a filesystem all nodes share (or the data copied to each).
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 \
        --master_port=29500 train.py config/base.py

The global batch, batch_size * gradient_accumulation_steps, is the same on any number of processes:
with fewer micro-steps than processes, the micro-batch is split (the first log line says how).
"""
import signal
import sys

# Ctrl-C before the training loop (in the imports, preparing the data): one line, no traceback
signal.signal(signal.SIGINT, lambda *_: sys.exit("error: interrupted before training began"))

import copy  # after the handler: importing torch takes seconds
import errno
import fcntl
import math
import os
import re
import shutil
import time
import warnings
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import prepare
from diffusion import (CFG_MIN_SIGMA, generate, make_mask, random_masks, to_device, trained_size,
                       training_loss, x0_error)
from encoders import ImageCodec, TextEncoder
from model import (Denoiser, autocast, finetune_from, gpu_problem, load_checkpoint, resolve_dtype,
                   rng_state, set_rng_state)
from prepare import Prepared, incompatibility, latent_norm, replacing
from sample import decode_latents, save_grid

# -----------------------------------------------------------------------------
# default config values, for the base model on one GPU; config/*.py and --key=value override them
# I/O
out_dir = 'out'
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint to fine-tune from
eval_interval = 1000  # iters between val losses and sample grids
ckpt_interval = 1000  # iters between checkpoints (one is also written at the end and on Ctrl-C)
log_interval = 10  # iters between log lines: the loss is read from the device only then
# wandb logging
wandb_log = False  # wandb is imported only when this is on; WANDB_MODE=offline works
wandb_project = 'nanotld'
wandb_run_name = 'run'
# data
data_dir = 'data/prepared/emoji128-taef2'  # prepare.py's output; the emoji set's on first use
batch_size = 64  # rows a micro-step: the global batch is batch_size * gradient_accumulation_steps
gradient_accumulation_steps = 1  # micro-steps in total over all processes (see the docstring)
# model (the image size, channels and text width come from the data)
patch_size = 2
embed_dim = 768
n_layers = 12
mlp_multiplier = 4
head_dim = 64
dropout = 0.0
conditioning = 'adaln'  # 'adaln' (adaLN-Zero from σ and text) or 'cross' (the reference's)
text_prior = 16  # > 0: the text mapped to a token grid of this width, added to the input tokens
outpaint = False  # add the masked image and the mask as inputs, and learn to fill the masked region
# diffusion
beta_a = 1.0  # training noise levels σ ~ Beta(beta_a, beta_b)
beta_b = 2.5
p_uncond = 0.15  # how often the text is dropped to ∅ = 0, for classifier-free guidance
objective = 'x0'  # 'x0': diffusion; 'flowmap': tune a trained model to sample in a few steps
teacher_cfg = 4.0  # flowmap: distil the model guided at this scale (1: guide at sampling)
derivative_ramp = 0.2  # flowmap: du/dt's weight in the target rises to 1 over this part of the run
# AdamW optimizer
learning_rate = 3e-4
max_iters = 100_000
max_minutes = 0.0  # > 0: a time budget; max_iters is then fitted to the measured step time
weight_decay = 0.01  # not on norms, biases and embeddings
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip gradients at this norm, 0 to disable
# learning rate schedule: linear warmup, then cosine decay to min_lr
warmup_iters = 1000
lr_decay_iters = 0  # 0: max_iters
min_lr = 3e-5
# EMA of the weights, used for evaluation, samples and by sample.py
ema_decay = 0.999
ema_warmup = 10  # decay at iter t is min(ema_decay, (1+t)/(ema_warmup+t)): a short average at first
# evaluation
eval_samples = 512  # val rows in the val loss
eval_sigmas = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed noise levels: val losses compare across runs
n_sample = 16  # val captions in the sample grid
sample_prompts = ()  # or your own prompts for the grid (text-to-image only), encoded at the start
sample_cfg = 5.0
sample_cfg_min_sigma = CFG_MIN_SIGMA  # guide only the steps from σ > this, as sample.py does
sample_steps = 20
# system
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # or 'cpu', 'cuda:1', ...
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: bf16 where the hardware has it
compile = False  # torch.compile: fuses what runs between the matmuls
ddp_timeout_minutes = 30  # how long a rank waits for the others (rank 0 evaluates alone)
# -----------------------------------------------------------------------------
config = configurator.configure(globals(), sys.argv[1:])  # as given: logged, saved in checkpoints
# -----------------------------------------------------------------------------
RUN_KEYS = ('data_dir', 'objective', 'teacher_cfg', 'outpaint')  # a resume
# keeps these from its checkpoint: they say what the run is, not how it goes on
t_start = time.time()  # a time budget counts from here: preparing data and compiling included

# DDP and device setup
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a torchrun process?
ddp_rank = int(os.environ.get('RANK', 0))
ddp_local_rank = int(os.environ.get('LOCAL_RANK', 0))
ddp_world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = ddp_rank == 0  # logs, evaluates and writes the checkpoints


def fail(message):
    """A setting that every rank finds wrong alike: one line from rank 0, exit status 1 from all."""
    if master_process:
        configurator.fail(message)
    sys.exit(1)


def split_global_batch(rows, world_size, accum_steps):
    """(micro-batch, micro-steps) of each process: the fewest micro-steps, at least
    accum_steps / world_size, that split the global batch evenly; None if none does."""
    for steps in range(math.ceil(accum_steps / world_size), rows // world_size + 1):
        if rows % (world_size * steps) == 0:
            return rows // (world_size * steps), steps
    return None


# settings that no library call checks: one line each, before any work
for key, ok, expected in (
        *((k, globals()[k] >= 1, '>= 1') for k in (
            'eval_interval', 'ckpt_interval', 'log_interval', 'batch_size', 'n_sample',
            'gradient_accumulation_steps', 'eval_samples', 'sample_steps')),
        ('warmup_iters', warmup_iters >= 0, '>= 0'),
        *((k, globals()[k] > 0, '> 0') for k in ('learning_rate', 'beta_a', 'beta_b')),
        ('min_lr', 0 <= min_lr <= learning_rate, 'in [0, learning_rate]'),
        ('seed', 0 <= seed < 2 ** 62, 'in [0, 2**62)'),
        ('p_uncond', 0 <= p_uncond < 1, 'in [0, 1)'),
        ('sample_cfg_min_sigma', 0 <= sample_cfg_min_sigma < 1, 'in [0, 1)'),
        ('objective', objective in ('x0', 'flowmap') and not (objective != 'x0' and outpaint),
         "'x0' or 'flowmap' (not with outpaint)"),
        ('derivative_ramp', 0 <= derivative_ramp <= 1, 'in [0, 1]'),
        ('device', device == 'cpu' or device.startswith('cuda') and torch.cuda.is_available(),
         'cpu, or cuda where torch sees a GPU')):
    if not ok:
        fail(f"{key} must be {expected}, got {globals()[key]!r}")
if (why := gpu_problem()) and device.startswith('cuda'):
    fail(why)  # a GPU with no kernels for it fails at its first op
elif why and master_process:
    print(f"warning: {why}")  # loud: the run goes on, on the CPU
global_batch = batch_size * gradient_accumulation_steps  # rows a step, however many processes
split = split_global_batch(global_batch, ddp_world_size, gradient_accumulation_steps)
if split is None:  # checked before the process group starts, so that no rank waits for another
    fail(f"the global batch of {batch_size} * {gradient_accumulation_steps} rows does not split "
         f"evenly over {ddp_world_size} processes; make it a multiple of {ddp_world_size}")
micro_batch, micro_steps = split  # each process: micro_steps micro-batches of micro_batch rows
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cuda':  # one GPU per process, its index explicit: for 'cuda' ops and its RNG
    index = ddp_local_rank if ddp else torch.device(device).index
    device = f'cuda:{torch.cuda.current_device() if index is None else index}'
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True  # the depthwise conv's shapes never change
torch.manual_seed(seed + ddp_rank)  # noise levels, noise, CFG dropout and masks differ per rank
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # tf32 on GPUs
try:
    dtype = resolve_dtype(dtype, device)  # auto: bf16 where native, fp16 + GradScaler on old GPUs
except ValueError as e:
    fail(e)
if compile and device_type == 'cpu' and not shutil.which(os.environ.get('CXX', 'c++')):
    compile = False  # inductor's CPU kernels are C++
    if master_process:
        print("note: no C++ compiler (c++ or $CXX) found: training without torch.compile")
if ddp:
    # rank 0 loads the grids' VAE and evaluates while the others wait
    timeout = timedelta(minutes=ddp_timeout_minutes)
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo', timeout=timeout,
                            device_id=torch.device(device) if device_type == 'cuda' else None)
    # the stop flag goes through gloo on the CPU each step: no wait for the GPU. Multi-node: gloo
    # binds to the address the hostname resolves to; GLOO_SOCKET_IFNAME=eth0 names the interface
    cpu_group = dist.new_group(backend='gloo', timeout=timeout) if device_type == 'cuda' else None
ctx = autocast(device, dtype)  # none for float32

# the run directory: one writer at a time, and never a run replaced by accident
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if master_process:
    try:
        os.makedirs(os.path.join(out_dir, 'samples'), exist_ok=True)
        lock = open(os.path.join(out_dir, 'lock'), 'a+')  # held until this process ends
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"{out_dir} is in use by another train.py ({lock.read().strip() or 'unknown'})")
    except OSError as e:
        fail(f"cannot write to {out_dir}: {e.strerror}")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    lock.flush()
    if init_from != 'resume' and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists; resume it (--init_from=resume) or pick another --out_dir")
ckpt = None
if init_from != 'scratch':
    try:
        ckpt = load_checkpoint(ckpt_path if init_from == 'resume' else init_from, 'cpu')
    except (FileNotFoundError, ValueError) as e:
        fail(e)
if init_from == 'resume':  # what the run is comes from its checkpoint; a contradiction is an error
    given = configurator.given_keys(sys.argv[1:])
    saved = dict(ckpt.get('config') or {}, objective=ckpt.get('objective', 'x0'))
    if ckpt.get('baked_cfg'):
        saved['teacher_cfg'] = ckpt['baked_cfg']
    for k in RUN_KEYS:
        if k in given and k in saved and config[k] != saved[k]:
            fail(f"--{k}={config[k]!r}, but the run in {out_dir} has {k}={saved[k]!r}: a resume "
                 f"goes on with the run's own (leave {k} out, or fine-tune with "
                 f"--init_from={ckpt_path})")
        globals()[k] = config[k] = saved.get(k, config[k])

# data: memory-mapped arrays from prepare.py; the global batch is a slice of a seeded permutation
emoji_data = re.fullmatch(r'data/prepared/emoji(\d+)(-taef2)?', os.path.normpath(data_dir))
if master_process and emoji_data and not os.path.isfile(os.path.join(data_dir, 'meta.json')):
    print(f"{data_dir} is missing: preparing the emoji set first")  # a fresh clone trains at once
    try:
        prepare.prepare(source='emoji', image_size=int(emoji_data[1]), out_dir=data_dir,
                        vae='taef2' if emoji_data[2] else 'none')
    except ValueError as e:
        fail(e)
if ddp:
    dist.barrier()  # the other ranks wait for the data
try:
    data = Prepared(data_dir)
except ValueError as e:  # a missing, empty or inconsistent file
    fail(e)
meta = data.meta
shift, scale = latent_norm(meta)  # model space = (latents - shift) · scale: about unit variance
n_channels, H, W = meta['latent_shape']
n_train, n_val = len(data.latents), len(data.val_latents)
cond_channels = n_channels + 1 if outpaint else 0  # masked image + mask


def permutation(ep):
    """The order of the training rows in epoch ep: a function of the seed and the epoch alone."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1000 + ep))


def next_rows():
    """The rows of the next global batch: the next slice of the epoch's permutation. Every rank
    computes the same rows; get_batch() picks this rank's micro-batches out of them."""
    global epoch, data_pos, perm
    rows, need = [], global_batch
    while need:
        take = perm[data_pos:data_pos + need]
        rows.append(take)
        need, data_pos = need - len(take), data_pos + len(take)
        if data_pos == n_train:  # next epoch, next permutation
            epoch, data_pos = epoch + 1, 0
            perm = permutation(epoch)
    return torch.cat(rows)


def get_batch(rows, micro_step):
    """This rank's micro-batch: micro-batch k of the global batch goes to rank k % world_size,
    so 2 ranks × 1 micro-step train on the same rows as 1 rank × 2 micro-steps."""
    k = micro_step * ddp_world_size + ddp_rank
    idx = np.sort(rows[k * micro_batch:(k + 1) * micro_batch].numpy())  # sorted: kinder to a memmap
    return load_rows(data.latents, data.text_emb, idx)


def load_rows(latents, text_emb, idx):
    """Rows idx -> (B, C, H, W) model-space latents, (B, D_text) text embeddings on the device;
    to a GPU from pinned memory without blocking, overlapping the work queued before it."""
    x0, text = (data.to_tensor(latents[idx]) - shift) * scale, data.to_tensor(text_emb[idx])
    return to_device(x0, device), to_device(text, device)


# the model: from scratch, resumed, or fine-tuned from another checkpoint
iter_num, best_val_loss, epoch, data_pos = 0, float('inf'), 0, 0
budget_iters = None  # max_iters as fixed by the time budget, once measured
if init_from == 'scratch':
    model_args = dict(n_channels=n_channels, image_size=H if H == W else (H, W),
                      patch_size=patch_size, embed_dim=embed_dim, n_layers=n_layers,
                      mlp_multiplier=mlp_multiplier, head_dim=head_dim, dropout=dropout,
                      text_emb_size=meta['text_dim'], cond_channels=cond_channels,
                      conditioning=conditioning, text_prior=text_prior)
    try:
        model = Denoiser(**model_args)
    except ValueError as e:
        fail(e)
else:
    if why := incompatibility(ckpt.get('data_meta', {}), data):  # another text encoder or codec
        fail(why)
    model_args = dict(ckpt['model_args'])
    if init_from == 'resume':  # continue exactly: same weights, optimizer, RNG and data position
        if master_process and (kept := [k for k, v in model_args.items() if config.get(k, v) != v]):
            print("note: resuming keeps the checkpoint's architecture: " + ', '.join(
                f"{k}={model_args[k]!r}, not {config[k]!r}" for k in kept))
        state = ckpt['data_state']
        if state.get('n_train') != n_train:  # its data position would mean nothing here
            fail(f"the checkpoint was trained on {state.get('n_train')} rows, {data_dir} has "
                 f"{n_train}: resume on the same data, or fine-tune with --init_from={ckpt_path}")
        model = Denoiser(**model_args)
        model.load_state_dict(ckpt['model'])
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        epoch, data_pos, budget_iters = state['epoch'], state['pos'], ckpt['budget_iters']
        max_iters = budget_iters or max_iters  # a budgeted run ends where it was going to
    else:  # fine-tune: from the EMA weights, at this data's image size, with new inputs if asked
        model, model_args = finetune_from(ckpt, (H, W), cond_channels, dropout,
                                          flow_map=objective == 'flowmap')
if trained_size(model) != (H, W):
    fail(f"the checkpoint's model is for {trained_size(model)} inputs but {data_dir} has "
         f"{(H, W)}; fine-tune it at the new size with --init_from=PATH, not by resuming")
if model.cond_channels != cond_channels:
    fail(f"the checkpoint's model is {'an' if model.cond_channels else 'not an'} outpainting "
         f"model: train it with --outpaint={bool(model.cond_channels)}")
model.to(device)
raw_model = model  # the plain module: its state_dict has no '_orig_mod.' or 'module.' prefixes
perm = permutation(epoch)

# AdamW with weight decay on the weight matrices only: not on norms, biases or the positional table
decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != 'pos_emb']
no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != 'pos_emb')]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=True)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))  # fp16 needs loss scaling
if init_from == 'resume':
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt['scaler'] and scaler.is_enabled():  # a bf16 or fp32 run has none: fp16 starts afresh
        scaler.load_state_dict(ckpt['scaler'])
    if master_process and ckpt.get('dtype', dtype) != dtype:
        print(f"note: resuming a {ckpt['dtype']} run in {dtype}: the weights, optimizer and data "
              f"order go on exactly, the arithmetic differs from here")
    if len(ckpt['rng']) == ddp_world_size:  # each rank goes on with its own random stream
        set_rng_state(ckpt['rng'][ddp_rank], device)
    elif master_process:
        print(f"note: resuming on {ddp_world_size} processes from {len(ckpt['rng'])}: the data "
              f"order goes on exactly, the random noise streams start afresh")
if master_process:
    print(f"global batch {global_batch} = {ddp_world_size} × {micro_steps} × {micro_batch} rows "
          f"(processes × micro-steps × micro-batch), {dtype} on {device}; "
          f"{raw_model.num_params() / 1e6:.2f}M parameters, {n_train} rows of {(n_channels, H, W)}")

if compile:
    model = torch.compile(model)
    if master_process:
        print("compiling the model on the first step")
if ddp:  # DDP broadcasts rank 0's weights, so every rank's EMA below starts from them
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None,
                gradient_as_bucket_view=True)
    # the depthwise conv's (C, 1, 3, 3) weight gets a channels-last gradient: the same memory,
    # strides differ only on the size-1 dim, and DDP warns about it on every backward
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
ema = copy.deepcopy(raw_model).requires_grad_(False).eval()  # fp32 EMA of the weights
if init_from == 'resume':
    ema.load_state_dict(ckpt['ema'])  # in place: the parameter lists below stay valid
ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())
teacher = None  # flow-map distillation: the frozen starting model, saved for a resume
baked_cfg = teacher_cfg if objective == 'flowmap' and teacher_cfg != 1 else 0.0  # in the weights
if objective == 'flowmap':
    teacher = copy.deepcopy(raw_model).requires_grad_(False).eval()
    if init_from == 'resume':
        teacher.load_state_dict(ckpt['teacher'])
resumed_at = iter_num if init_from == 'resume' else -1
ckpt = None  # free the memory

# the validation set: fixed rows, noise and (for outpainting) masks; and the sample grid's prompts
val_idx = np.linspace(0, n_val - 1, min(eval_samples, n_val)).round().astype(int)  # the whole set
sample_idx = np.linspace(0, n_val - 1, min(n_sample, n_val)).round().astype(int)
if sample_prompts and not outpaint and master_process:
    if not all(isinstance(p, str) for p in sample_prompts):
        fail(f"sample_prompts must be strings, got {sample_prompts!r}")
    sample_prompts = list(sample_prompts)
    sample_text = TextEncoder(meta['text_encoder'], device)(sample_prompts)  # (n, D_text)
else:  # the val captions, and for an outpainting model the left halves of their images
    sample_prompts = [data.val_captions[i] for i in sample_idx]
    sample_text = load_rows(data.val_latents, data.val_text_emb, sample_idx)[1]
codec = ImageCodec(meta['vae'], device) if master_process else None  # decodes the sample grids


# helpers
@torch.no_grad()
def estimate_loss(net):
    """Val loss: the x0 error of net (of a flow map: its jump to σ itself) on the val rows at
    the fixed eval_sigmas, noise and outpainting masks: it compares across runs and objectives."""
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, len(val_idx), batch_size):
        x0, text = load_rows(data.val_latents, data.val_text_emb, val_idx[i:i + batch_size])
        noise = torch.randn(x0.shape, generator=g).to(device)
        mask = random_masks(len(x0), H, W, g).to(device) if outpaint else None
        for s in eval_sigmas:
            with ctx:
                sigma = torch.full((len(x0),), s, device=device)
                total += x0_error(net, x0, text, sigma, noise, mask).item() * len(x0)
            count += len(x0)
    return total / count


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def update_ema(it):
    decay = min(ema_decay, (1 + it) / (ema_warmup + it))
    torch._foreach_lerp_(ema_params, model_params, 1 - decay)  # e = decay·e + (1-decay)·p, fused


def save_checkpoint():
    """Write out_dir/ckpt.pt atomically, so a crash mid-write keeps the old one. Every rank calls
    this: the random states of all ranks are gathered into it."""
    rngs = [rng_state(device)] * ddp_world_size  # one per rank: this one's, then all gathered
    if ddp:
        dist.all_gather_object(rngs, rngs[ddp_rank])
    if master_process:
        checkpoint = dict(
            model=raw_model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(), model_args=model_args, iter_num=iter_num,
            budget_iters=budget_iters, best_val_loss=best_val_loss, config=config,
            data_meta=meta, rng=rngs, data_state=dict(epoch=epoch, pos=data_pos, n_train=n_train),
            dtype=dtype,  # as resolved: a resume in another dtype says so
            objective=objective,  # sample.py picks its sampler by it
            baked_cfg=baked_cfg,  # guidance in the weights: sample at cfg 1
            teacher=None if teacher is None else teacher.state_dict())
        try:
            with replacing(ckpt_path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as e:  # torch.save wraps the OSError in a RuntimeError
            full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in str(e)
            fail(f"no space left on {os.path.abspath(out_dir)}: {ckpt_path} is the last "
                 f"checkpoint written" if full else f"cannot write {ckpt_path}: {e}")
        print(f"saved checkpoint to {ckpt_path} (iter {iter_num})")


@torch.no_grad()
def sample_grid(net, path):
    """Sample the fixed val prompts with net (the EMA model) and save them as a PNG grid. An
    outpainting model gets the left half of each prompt's val image and fills in the right half."""
    known = mask = None
    if outpaint:
        known = load_rows(data.val_latents, data.val_text_emb, sample_idx)[0]
        mask = make_mask('right', H, W).to(device).expand(len(known), 1, H, W)
    g = torch.Generator(device).manual_seed(seed)  # the same noise every time: the grids compare
    with ctx:
        x0 = generate(net, sample_text, cfg=1.0 if baked_cfg else sample_cfg, steps=sample_steps,
                      generator=g, known=known, mask=mask, cfg_min_sigma=sample_cfg_min_sigma,
                      sampler='dpmpp2m' if objective == 'x0' else 'flowmap')
    images = decode_latents(codec, x0, (shift, scale))  # (B, 3, H_img, W_img) in [0, 1]
    save_grid(images, math.ceil(math.sqrt(len(images))), path, padding=1)


def fit_time_budget():
    """max_iters for a time budget: the steps are timed after the compile and warm-up, max_iters is
    fixed in the warm-up (before the cosine decay starts), then fitted again at each evaluation to
    the pace since, so that the steps and evaluations left end the run near max_minutes."""
    global budget_from, budget_iters, max_iters
    if budget_iters is None and iter_num == first_iter + 10:
        budget_from = (iter_num, time.time(), eval_total)  # (iter, time, evaluation seconds)
    if not budget_from or not (iter_num == first_iter + min(max(warmup_iters, 20), 60)
                               or budget_iters and iter_num % eval_interval == 0):
        return
    seconds = time.time() - budget_from[1] - (eval_total - budget_from[2])
    step_seconds = seconds / (iter_num - budget_from[0])
    left = max_minutes * 60 - (time.time() - t_start) - eval_seconds  # the final eval's too
    chosen = iter_num + max(1, int(left / (step_seconds + eval_seconds / eval_interval)))
    chosen = torch.tensor(chosen, device=device)
    if ddp:
        dist.broadcast(chosen, 0)  # every rank runs rank 0's number of steps
    max_iters = budget_iters = int(chosen)
    budget_from = (iter_num, time.time(), eval_total)
    if master_process:
        print(f"time budget {max_minutes:g} min: {step_seconds * 1000:.0f} ms a step, "
              f"{eval_seconds:.1f} s an evaluation -> max_iters = {max_iters}")


objective_args = dict(objective=objective, outpaint=outpaint, beta_a=beta_a, beta_b=beta_b,
                      p_uncond=p_uncond, teacher=teacher, teacher_cfg=teacher_cfg,
                      student=raw_model)


def ramp_at(it):
    """A flow map's du/dt weight: 0 to 1 linearly over derivative_ramp of the run."""
    return min(1.0, it / max(1.0, derivative_ramp * max_iters))


interrupted = False  # a signal on this rank; stop_requested() is what all ranks agree on


def request_stop(signum, frame):
    """Ctrl-C (or a cluster's SIGTERM) stops after this iteration, with a checkpoint."""
    global interrupted
    if not interrupted and master_process:
        print("\nstopping after this iteration, with a checkpoint (Ctrl-\\ quits without one)")
    interrupted = True


def stop_requested():
    if not ddp:
        return interrupted
    flag = torch.tensor(float(interrupted), device='cpu' if cpu_group else device)
    dist.all_reduce(flag, group=cpu_group)
    return flag.item() > 0


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

# logging
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
if master_process:
    with open(os.path.join(out_dir, 'samples', 'prompts.txt'), 'w') as f:
        f.write('\n'.join(sample_prompts) + '\n')  # the grids' prompts, row by row
    print(f"sample prompts: {sample_prompts}")

# training loop
t_log, first_iter, lr = time.time(), iter_num, get_lr(iter_num)
eval_seconds = eval_total = 0.0  # the last evaluation's seconds, and all of them
budget_from, stop = None, False  # (iter, time, eval_total) where the step timing began
loss_sum, loss_count = torch.zeros((), device=device), 0  # on the device: read only to log
while True:
    # evaluate, sample and checkpoint; not again at the iteration we resumed at
    due_eval = iter_num % eval_interval == 0 or iter_num >= max_iters or stop
    due_ckpt = (iter_num % ckpt_interval == 0 and iter_num > 0) or iter_num >= max_iters or stop
    if loss_count and (due_ckpt or iter_num % log_interval == 0):  # the loss since the last log
        if ddp:
            dist.all_reduce(loss_sum)
        lossf = loss_sum.item() / ddp_world_size / loss_count
        loss_sum.zero_()
        if not math.isfinite(lossf):  # stop before a broken model overwrites the last good one
            fail(f"the loss is {lossf} at iter {iter_num}; stopped without saving. {ckpt_path} is "
                 f"the last good checkpoint (try a lower learning_rate, or dtype='float32')")
        if master_process:
            dt, t_log = (time.time() - t_log) / loss_count, time.time()
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                  f"{global_batch / dt:.0f} images/s")
            if wandb_log:
                wandb.log({'iter': iter_num, 'train/loss': lossf, 'lr': lr,
                           'images_per_s': global_batch / dt}, step=iter_num)
        loss_count = 0
    if iter_num != resumed_at:
        if master_process and not stop and due_eval:
            t_eval = time.time()
            val_loss = estimate_loss(ema)
            best_val_loss = min(best_val_loss, val_loss)
            path = os.path.join(out_dir, 'samples', f'iter_{iter_num:06d}.png')
            sample_grid(ema, path)
            print(f"iter {iter_num}: val loss {val_loss:.4f} (EMA), samples in {path}")
            if wandb_log:
                wandb.log({'iter': iter_num, 'val/loss': val_loss}, step=iter_num)
            eval_seconds, t_log = time.time() - t_eval, t_log + time.time() - t_eval
            eval_total += eval_seconds
        if due_ckpt:
            save_checkpoint()
    if iter_num >= max_iters or stop:
        if stop and master_process:
            print(f"interrupted; continue with: python train.py {' '.join(sys.argv[1:])} "
                  f"--init_from=resume")
        break

    if max_minutes:
        fit_time_budget()

    # set the learning rate for this iteration
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # forward and backward, with gradient accumulation over micro-steps
    rows = next_rows()
    for micro_step in range(micro_steps):
        if ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = (micro_step == micro_steps - 1)
        x0, text = get_batch(rows, micro_step)
        with ctx:
            loss = training_loss(model, x0, text, ramp=ramp_at(iter_num), **objective_args)
            loss = loss / micro_steps  # the mean over the global batch, once averaged over ranks
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    update_ema(iter_num)
    iter_num, loss_count = iter_num + 1, loss_count + 1
    stop = stop_requested()  # any rank's Ctrl-C or SIGTERM, the same on all ranks

if ddp:
    dist.barrier()  # rank 0 may still be writing the checkpoint: tear gloo/NCCL down together
    dist.destroy_process_group()
