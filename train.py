"""
Train the denoiser on the latents and text embeddings that prepare.py wrote.

One process (a CPU, or one GPU):
    python train.py config/tiny.py                      # the emoji demo: ~10 minutes on 2 CPU cores
    python train.py config/base.py                      # the ~101M model on one GPU
    python train.py config/tiny.py --init_from=resume   # go on exactly where out_dir/ckpt.pt stopped

torchrun on one node, 2 GPUs (or 2 CPU processes, which use gloo):
    torchrun --standalone --nproc_per_node=2 train.py config/base.py

torchrun on two nodes with 8 GPUs each; run one line on each node. gradient_accumulation_steps is
the total over all processes, so it must divide by 16 (prepend NCCL_IB_DISABLE=1 without Infiniband):
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \
        train.py config/base.py --batch_size=16 --gradient_accumulation_steps=16
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 \
        train.py config/base.py --batch_size=16 --gradient_accumulation_steps=16
"""
import copy
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare
from configurator import configure
from diffusion import add_noise, generate, make_mask, masked_input, random_masks, training_loss, trained_size
from model import PTDTYPES, Denoiser, denoiser_from_checkpoint, load_checkpoint, resolve_dtype

# -----------------------------------------------------------------------------
# default config values, for the ~101M model on one GPU; config/*.py and --key=value override them
# I/O
out_dir = 'out'
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint path to fine-tune from
eval_interval = 1000  # iters between val losses and sample grids
ckpt_interval = 1000  # iters between checkpoints (one is also written at the end and on Ctrl-C)
log_interval = 10
# wandb logging
wandb_log = False  # wandb is imported only when this is on; WANDB_MODE=offline works
wandb_project = 'nanotld'
wandb_run_name = 'run'
# data
data_dir = 'data/prepared/emoji32'  # prepare.py's output
batch_size = 64  # per process and micro-step
gradient_accumulation_steps = 1  # in total over all processes: the global batch is batch_size * this
# model (the image size, channels and text width come from the data)
patch_size = 2
embed_dim = 768
n_layers = 12
mlp_multiplier = 4
head_dim = 64
dropout = 0.0
outpaint = False  # add the masked image and the mask as inputs, and learn to fill the masked region
# diffusion
beta_a = 1.0  # training noise levels σ ~ Beta(beta_a, beta_b)
beta_b = 2.5
p_uncond = 0.15  # how often the text is dropped to ∅ = 0, for classifier-free guidance
# AdamW optimizer
learning_rate = 3e-4
max_iters = 100_000
weight_decay = 0.01  # not on norms, biases and embeddings
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip gradients at this norm, 0 to disable
# learning rate schedule: linear warmup, then cosine decay to min_lr
warmup_iters = 1000
lr_decay_iters = None  # None: max_iters
min_lr = 3e-5
# EMA of the weights, used for evaluation, samples and by sample.py
ema_decay = 0.999
ema_warmup = 10  # decay at iter t is min(ema_decay, (1+t)/(ema_warmup+t)): a short average at first
# evaluation
eval_samples = 512  # val rows in the val loss
eval_sigmas = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed noise levels, so val losses compare across iters and runs
n_sample = 16  # val captions in the sample grid
sample_prompts = ()  # or your own prompts for the grid (text-to-image only), encoded once at the start
sample_cfg = 5.0
sample_cfg_min_sigma = 0.2  # guide only the steps from σ > this, as sample.py does
sample_steps = 20
# system
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # or 'cpu', 'cuda:1', ...
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: bf16 where the hardware has it, see below
compile = False  # torch.compile: a win on GPUs, a loss on CPUs (../shared/PERF.md)
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])  # the settings as given: logged and saved in checkpoints
# -----------------------------------------------------------------------------

# DDP and device setup
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a torchrun process?
if ddp:
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if gradient_accumulation_steps % ddp_world_size:
        sys.exit(f"error: gradient_accumulation_steps={gradient_accumulation_steps} is the total over all "
                 f"processes and must be divisible by the {ddp_world_size} processes")
    gradient_accumulation_steps //= ddp_world_size
else:
    ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
master_process = ddp_rank == 0  # logs, evaluates and writes the checkpoints
global_batch = batch_size * gradient_accumulation_steps * ddp_world_size
torch.manual_seed(seed + ddp_rank)  # noise levels, noise, CFG dropout and masks differ per rank
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
dtype = resolve_dtype(dtype, device)  # auto: bf16 where the hardware has it, fp16 + GradScaler on older GPUs
if dtype not in PTDTYPES:
    sys.exit(f"error: dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
if not 0 <= sample_cfg_min_sigma < 1:
    sys.exit(f"error: sample_cfg_min_sigma must be in [0, 1), the noise level below which guidance is off, "
             f"got {sample_cfg_min_sigma}")
ptdtype = PTDTYPES[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from != 'resume' and os.path.exists(ckpt_path):  # never overwrite a run by accident
    sys.exit(f"error: {ckpt_path} exists; continue it with --init_from=resume, or choose another --out_dir")
if master_process:
    os.makedirs(os.path.join(out_dir, 'samples'), exist_ok=True)

# data: memory-mapped arrays from prepare.py; the global batch is a slice of a seeded permutation
if master_process and data_dir == 'data/prepared/emoji32' and not os.path.exists(data_dir):
    print(f"{data_dir} is missing: preparing the emoji set first (a minute or two)")
    prepare.prepare(source='emoji')  # so that a fresh clone trains with one command
if ddp:
    dist.barrier()  # the other ranks wait for the data
data = prepare.load_prepared(data_dir)  # a missing or inconsistent file is a one-line error
meta = data.meta
scale_factor = float(meta['scale_factor'])  # model space = latents * scale_factor (about unit variance)
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
    """This rank's micro-batch: (B, C, H, W) model-space latents and (B, D_text) text embeddings.
    Micro-batch k of the global batch goes to micro-step k // world_size on rank k % world_size,
    so 2 ranks × 1 micro-step train on the same rows as 1 rank × 2 micro-steps."""
    k = micro_step * ddp_world_size + ddp_rank
    idx = np.sort(rows[k * batch_size:(k + 1) * batch_size].numpy())  # sorted reads are kinder to a memmap
    return load_rows(data.latents, data.text_emb, idx)


def load_rows(latents, text_emb, idx):
    x0 = data.to_tensor(latents[idx], device) * scale_factor  # (B, C, H, W)
    return x0, data.to_tensor(text_emb[idx], device)  # (B, D_text)


# the model: from scratch, resumed, or fine-tuned from another checkpoint
iter_num, best_val_loss, epoch, data_pos = 0, float('inf'), 0, 0
ckpt = None
if init_from == 'scratch':
    model_args = dict(n_channels=n_channels, image_size=H if H == W else (H, W), patch_size=patch_size,
                      embed_dim=embed_dim, n_layers=n_layers, mlp_multiplier=mlp_multiplier, head_dim=head_dim,
                      dropout=dropout, text_emb_size=meta['text_dim'], cond_channels=cond_channels)
    model = Denoiser(**model_args)
else:
    try:
        ckpt = load_checkpoint(ckpt_path if init_from == 'resume' else init_from, 'cpu')
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    # the checkpoint's data must be compatible: same text encoder, same image codec
    for key in ('text_encoder', 'text_dim', 'vae'):
        if ckpt.get('data_meta', {}).get(key) != meta.get(key):
            sys.exit(f"error: {data_dir} has {key}={meta.get(key)!r} but the checkpoint was trained "
                     f"with {key}={ckpt.get('data_meta', {}).get(key)!r}")
    model_args = dict(ckpt['model_args'])
    if model_args['n_channels'] != n_channels:
        sys.exit(f"error: {data_dir} has {n_channels} channels, the checkpoint's model {model_args['n_channels']}")
    if init_from == 'resume':  # continue exactly: the same weights, optimizer, RNG and data position
        model = Denoiser(**model_args)
        model.load_state_dict(ckpt['model'])
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        epoch, data_pos = ckpt['data_state']['epoch'], ckpt['data_state']['pos']
    else:  # fine-tune: start from the EMA weights, at this data's image size, with new inputs if asked
        model = denoiser_from_checkpoint(ckpt, ema=True).train()
        if trained_size(model) != (H, W):
            model.resize_pos_emb((H, W))  # bilinear: the new grid starts where the old one was
        if model.cond_channels == 0 and cond_channels > 0:
            model.widen_input(cond_channels)  # zero-initialised: step 0 computes what the old model did
        model_args.update(image_size=H if H == W else (H, W), cond_channels=cond_channels, dropout=dropout)
if trained_size(model) != (H, W):
    sys.exit(f"error: the checkpoint's model is for {trained_size(model)} inputs but {data_dir} has {(H, W)}; "
             f"fine-tune it at the new size with --init_from=PATH instead of resuming")
if model.cond_channels != cond_channels:
    sys.exit(f"error: the checkpoint's model is {'an' if model.cond_channels else 'not an'} outpainting model: "
             f"train it with --outpaint={bool(model.cond_channels)}")
model.to(device)
raw_model = model  # the plain module: its state_dict has no '_orig_mod.' or 'module.' prefixes
ema = copy.deepcopy(model).requires_grad_(False).eval()  # fp32 EMA of the weights
if init_from == 'resume':
    ema.load_state_dict(ckpt['ema'])
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
    scaler.load_state_dict(ckpt['scaler'])
    if len(ckpt['rng']) == ddp_world_size:  # each rank goes on with its own random stream
        torch.set_rng_state(ckpt['rng'][ddp_rank]['torch'])
        if device_type == 'cuda' and ckpt['rng'][ddp_rank]['cuda'] is not None:
            torch.cuda.set_rng_state(ckpt['rng'][ddp_rank]['cuda'])
    elif master_process:
        print(f"note: resuming on {ddp_world_size} processes from {len(ckpt['rng'])}: the data order goes on "
              f"exactly, the random noise streams start afresh")
resumed_at = iter_num if init_from == 'resume' else -1
ckpt = None  # free the memory
if master_process:
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {n_train} training rows of {(n_channels, H, W)}, "
          f"global batch {global_batch}, {dtype} on {device}" + (f", {ddp_world_size} processes" if ddp else ""))

if compile:
    if master_process:
        print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)
    # the depthwise conv's (C, 1, 3, 3) weight gets a channels-last gradient: the same memory, strides
    # differ only on the size-1 dim, and DDP warns about it on every backward
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')

# the validation set: fixed rows, noise and (for outpainting) masks; and the prompts of the sample grid
val_idx = np.linspace(0, n_val - 1, min(eval_samples, n_val)).round().astype(int)  # spread over the set
sample_idx = np.linspace(0, n_val - 1, min(n_sample, n_val)).round().astype(int)
if sample_prompts and not outpaint and master_process:
    from encoders import TextEncoder
    if not all(isinstance(p, str) for p in sample_prompts):
        sys.exit(f"error: sample_prompts must be strings, got {sample_prompts!r}")
    sample_prompts = list(sample_prompts)
    sample_text = TextEncoder(meta['text_encoder'], device)(sample_prompts)  # (n, D_text)
else:  # the val captions, and for an outpainting model the left halves of their images
    sample_prompts = [data.val_captions[i] for i in sample_idx]
    sample_text = load_rows(data.val_latents, data.val_text_emb, sample_idx)[1]
codec = None  # the image decoder for the sample grids, loaded on first use


# helpers
@torch.no_grad()
def estimate_loss(net):
    """Val loss: the MSE of net's x0 prediction on held-out captions at the fixed noise levels eval_sigmas,
    with fixed noise. For outpainting, only the region to generate counts, as in training."""
    g = torch.Generator().manual_seed(seed)
    err_sum, weight_sum = 0.0, 0.0
    for i in range(0, len(val_idx), batch_size):
        x0, text = load_rows(data.val_latents, data.val_text_emb, val_idx[i:i + batch_size])
        noise = torch.randn(x0.shape, generator=g).to(device)
        mask = random_masks(len(x0), H, W, g).to(device) if outpaint else torch.ones_like(x0[:, :1])
        cond = masked_input(x0, mask) if outpaint else None
        for s in eval_sigmas:
            sigma = torch.full((len(x0),), s, device=device)
            with ctx:
                pred = net(add_noise(x0, sigma, noise), sigma, text, cond=cond)
            err_sum += (((pred.float() - x0) ** 2) * mask).sum().item()
            weight_sum += mask.expand_as(x0).sum().item()
    return err_sum / weight_sum


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
    for e, p in zip(ema.parameters(), raw_model.parameters()):
        e.lerp_(p, 1 - decay)  # e = decay·e + (1-decay)·p


def save_checkpoint():
    """Write out_dir/ckpt.pt atomically: to ckpt.pt.tmp, then a rename, so a crash mid-write keeps the
    old one. Every rank calls this, since the random states of all ranks are gathered into it."""
    rng = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    rngs = [rng]
    if ddp:
        rngs = [None] * ddp_world_size
        dist.all_gather_object(rngs, rng)
    if master_process:
        checkpoint = {
            'model': raw_model.state_dict(),
            'ema': ema.state_dict(),
            'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(),
            'model_args': model_args,
            'iter_num': iter_num,
            'best_val_loss': best_val_loss,
            'config': config,
            'data_meta': meta,
            'rng': rngs,  # one per rank
            'data_state': {'epoch': epoch, 'pos': data_pos},  # the next row of permutation(epoch)
        }
        torch.save(checkpoint, ckpt_path + '.tmp')
        os.replace(ckpt_path + '.tmp', ckpt_path)
        print(f"saved checkpoint to {ckpt_path} (iter {iter_num})")


@torch.no_grad()
def sample_grid(net, path):
    """Sample the fixed val prompts with net (the EMA model) and save them as a PNG grid. An outpainting
    model gets the left half of each prompt's val image and fills in the right half."""
    global codec
    if codec is None:
        from encoders import ImageCodec
        codec = ImageCodec(meta['vae'], device)
    known = mask = None
    if outpaint:
        known = load_rows(data.val_latents, data.val_text_emb, sample_idx)[0]
        mask = make_mask('right', H, W).to(device).expand(len(known), 1, H, W)
    g = torch.Generator(device).manual_seed(seed)  # the same noise every time: the grids compare
    with ctx:
        x0 = generate(net, sample_text, cfg=sample_cfg, steps=sample_steps, generator=g, known=known, mask=mask,
                      cfg_min_sigma=sample_cfg_min_sigma)
    images = codec.decode(x0.float() / scale_factor)  # (B, 3, H_img, W_img) in [-1, 1]
    from torchvision.utils import save_image
    save_image((images.float() + 1) / 2, path, nrow=math.ceil(math.sqrt(len(images))), padding=1)


interrupted = False  # set by a signal on this rank; stop_requested is its agreed value over all ranks
stop_requested = False


def request_stop(signum, frame):
    """Ctrl-C (or a cluster's SIGTERM) stops at the end of the current iteration, after a checkpoint."""
    global interrupted
    if not interrupted and master_process:
        print("\nstopping: a checkpoint is written at the end of this iteration (Ctrl-\\ quits without one)")
    interrupted = True


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
t0 = time.time()
while True:
    # evaluate, sample and checkpoint; not again at the iteration we resumed at
    last = iter_num >= max_iters or stop_requested
    if iter_num != resumed_at:
        if master_process and not stop_requested and (iter_num % eval_interval == 0 or last):
            val_loss = estimate_loss(ema)
            best_val_loss = min(best_val_loss, val_loss)
            path = os.path.join(out_dir, 'samples', f'iter_{iter_num:06d}.png')
            sample_grid(ema, path)
            print(f"iter {iter_num}: val loss {val_loss:.4f} (EMA), samples in {path}")
            if wandb_log:
                wandb.log({'iter': iter_num, 'val/loss': val_loss}, step=iter_num)
        if iter_num % ckpt_interval == 0 or last:
            save_checkpoint()
    if last:
        if stop_requested and master_process:
            print(f"interrupted; continue with: python train.py {' '.join(sys.argv[1:])} --init_from=resume")
        break
    t0 = time.time()

    # set the learning rate for this iteration
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # forward and backward, with gradient accumulation over micro-steps
    rows = next_rows()
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        x0, text = get_batch(rows, micro_step)
        cond = weight = None
        if outpaint:  # learn to fill the masked region from the rest (1 = generate, 0 = known)
            weight = random_masks(len(x0), H, W).to(device)  # (B, 1, H, W)
            cond = masked_input(x0, weight)
        with ctx:
            loss = training_loss(model, x0, text, beta_a, beta_b, p_uncond, cond=cond, weight=weight)
            loss = loss / gradient_accumulation_steps  # the mean over the global batch
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    update_ema(iter_num)
    iter_num += 1

    # the global batch's loss and any rank's stop request, the same on all ranks
    stats = torch.stack([loss_sum, torch.tensor(float(interrupted), device=device)])
    if ddp:
        dist.all_reduce(stats)
    lossf, stop_requested = stats[0].item() / ddp_world_size, stats[1].item() > 0
    if not math.isfinite(lossf):  # stop before a broken model can overwrite the last good checkpoint
        if ddp:
            dist.destroy_process_group()
        sys.exit(f"error: the loss is {lossf} at iter {iter_num}; stopped without saving. "
                 f"{ckpt_path} is the last good checkpoint (try a lower learning_rate, or dtype='float32')")

    # log
    if iter_num % log_interval == 0 and master_process:
        dt = time.time() - t0
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
              f"{global_batch / dt:.0f} images/s")
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': lossf, 'lr': lr, 'images_per_s': global_batch / dt},
                      step=iter_num)

if ddp:
    dist.barrier()  # rank 0 may still be writing the checkpoint: tear gloo/NCCL down together
    dist.destroy_process_group()
