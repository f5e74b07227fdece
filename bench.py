"""
Measured speed, as tables of ratios taken in one run on this machine (the samplers' accuracy is
a test: tests/test_diffusion.py). Its first lines say which CPU (or GPU) and dtypes it measured;
figures from past runs: docs/speed.md.

    python bench.py                              # everything (on CPU the base config takes minutes)
    python bench.py --only model --configs small # one table
    python bench.py --only reference --dtypes float32 bfloat16  # also bf16 where it is emulated
    python bench.py --device=cuda                # on a GPU

Tables:
- peak: this machine's own matmul throughput in each dtype, square and tall like the MLP's: the
  yardstick of the other tables' shares of the peak.
- reference: the Denoiser (with the reference's cross-attention block, and with the default
  adaLN-Zero + text prior, eager and compiled) against a plain implementation of the reference
  architecture: a train step and the guided sampling loop.
- model: forward and forward+backward images/s of the default denoiser, eager and compiled, its
  FLOPs per image (torch.utils.flop_counter, corrected, see count_flops) and the achieved FLOP/s
  as a share of the peak of the same dtype.
- sample, eval, prepare: throughput of the other scripts on the demo's setup (config/tiny.py's
  denoiser on TAEF2's 32×16×16 latents, decoded to 128 px).
- fewstep: a flow map's 1-8 jumps against DPM-Solver++ at 1-15 steps, as speed-ups.
"""
import copy
import os
import platform
import sys
import time

import torch
from einops import rearrange
from torch.utils.flop_counter import (FlopCounterMode, conv_flop_count, sdpa_backward_flop_count,
                                      sdpa_flop_count)

from configurator import configure, fail, load_config
from diffusion import guided_denoiser, sample_dpmpp_2m, sigma_schedule
from model import PTDTYPES, Denoiser, autocast, resolve_dtype, sinusoidal_embedding

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
only = []  # tables to run, e.g. --only reference model; [] = all of TABLES
configs = ['small', 'base']
dtypes = ['float32', 'auto']  # auto: bf16 where the CPU has it natively (model.resolve_dtype)
device = 'cpu'
compile = True  # also time torch.compile'd models (each compiles on its first call: slow on CPU)
batch_size = 32  # for the small config; base uses base_batch_size on CPU, where it is slow
base_batch_size = 8
iters = 5  # timed iterations per cell, after warmup
rounds = 5  # reference: interleaved rounds of every model, the median is reported
seed = 0
# -----------------------------------------------------------------------------

TABLES = ('peak', 'reference', 'model', 'sample', 'fewstep', 'eval', 'prepare')
REFERENCE_BLOCK = dict(conditioning='cross', text_prior=0)  # the Denoiser as the reference model
MODEL_CONFIGS = {  # the two sizes timed: a small model and config/base.py's size
    'small': dict(n_channels=4, image_size=32, patch_size=2, embed_dim=256, n_layers=4,
                  text_emb_size=768),
    'base': dict(n_channels=4, image_size=32, patch_size=2, embed_dim=768, n_layers=12,
                 text_emb_size=768),
}
DTYPES = []  # the resolved dtypes measured, set by main()
DATASHEET_TFLOPS = {'H100': 989, 'H200': 989, 'A100': 312}  # dense bf16/fp16 (SXM): MFU's peak


def datasheet_peak(dtype):
    """FLOP/s of the GPU's datasheet for bf16/fp16, where this is a GPU named there; else None."""
    if not device.startswith('cuda') or dtype == 'float32':
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for gpu, t in DATASHEET_TFLOPS.items() if gpu in name), None)


def wanted(table):
    return not only or table in only


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timeit(fn, n=None, warmup=2):
    """Seconds per call of fn, the median of n (default iters) calls after warmup ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(n or iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n## {title}")
    for i, row in enumerate([header] + rows):
        print('| ' + ' | '.join(str(x).rjust(w) for x, w in zip(row, widths)) + ' |')
        if i == 0:
            print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')


def cpu_kind(cpuinfo='/proc/cpuinfo'):
    """'model name (AVX512 yes, AVX512-bf16 no, AMX no)': what decides the speed of each dtype on
    a CPU."""
    try:
        with open(cpuinfo) as f:
            first = f.read().split('\n\n')[0]  # the first processor's fields
    except OSError:  # not Linux
        return f"{platform.processor() or platform.machine()} (instruction sets unknown)"
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(':') for line in
                                                   first.splitlines())}
    has = lambda flag: 'yes' if flag in fields.get('flags', '').split() else 'no'
    return (f"{fields.get('model name', 'unknown CPU')} (AVX512 {has('avx512f')}, AVX512-bf16 "
            f"{has('avx512_bf16')}, AMX {has('amx_bf16')})")


def device_kind():
    """The first lines' description of what is measured."""
    if device.startswith('cuda'):
        name = f"{torch.cuda.get_device_name(device)} (compute capability " \
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
    else:
        name = f"{cpu_kind()}, {torch.get_num_threads()} threads"
    return f"bench.py on {device}: {name}, torch {torch.__version__}"


# ----- FLOP counting -----

def _conv_backward_flops(grad_out, x, w, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None, **kwargs):
    # torch's formula ignores groups; each of grad_input and grad_weight costs one forward conv
    return conv_flop_count(x, w, grad_out, transposed) * sum(output_mask[:2])


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


aten = torch.ops.aten
FLOP_FIXES = {  # what torch.utils.flop_counter gets wrong: depthwise conv backward, CPU SDPA
    aten.convolution_backward: _conv_backward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn):
    with FlopCounterMode(display=False, custom_mapping=FLOP_FIXES) as counter:
        fn()
    return counter.get_total_flops()


# ----- tables -----

def bench_peak():
    """FLOP/s of a square product and of a tall one shaped like the MLP's (8192 tokens, 1024 ->
    256) in each measured dtype: the ceiling the other tables divide by."""
    peaks, rows = {}, []
    square = 8192 if device.startswith('cuda') else 2048  # a GPU needs big products to fill
    for dtype in DTYPES:
        for m, k, n in ((square, square, square), (8192, 1024, 256)):
            a = torch.randn(m, k, device=device, dtype=PTDTYPES[dtype])
            b = torch.randn(k, n, device=device, dtype=PTDTYPES[dtype])
            flops = 2 * m * k * n / matmul_seconds(a, b)
            peaks[dtype] = max(peaks.get(dtype, 0), flops)
            rows.append([dtype, f"{m}×{k} @ {k}×{n}", f"{flops / 1e9:.0f}"])
    print_table('peak: GFLOP/s of one matmul', ['dtype', 'shape', 'GFLOP/s'], rows)
    return peaks


def matmul_seconds(a, b, n=10):
    """Seconds per a @ b. On a GPU, n back-to-back products between two CUDA events: a sync
    after each would add its latency to every product and understate the peak."""
    if not device.startswith('cuda'):
        return timeit(lambda: a @ b, n=n)
    a @ b  # warm-up: cuBLAS picks its kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / n


def bench_model(peaks):
    rows = []
    for name in configs:
        torch.manual_seed(seed)
        model = Denoiser(**MODEL_CONFIGS[name]).to(device)
        B = batch_size if name == 'small' or device != 'cpu' else base_batch_size
        x = torch.randn(B, 4, 32, 32, device=device)
        sigma, text = torch.rand(B, device=device), torch.randn(B, 768, device=device)
        print(f"{name}: {model.num_params() / 1e6:.2f}M parameters, batch {B}", flush=True)
        # graph breaks would make compile split the model into pieces: there should be none
        explanation = torch._dynamo.explain(model)(x, sigma, text)
        print(f"{name}: torch._dynamo.explain: {explanation.graph_count} graph, "
              f"{explanation.graph_break_count} graph breaks", flush=True)
        fwd_flops = count_flops(lambda: model(x, sigma, text)) / B
        train_flops = count_flops(lambda: model(x, sigma, text).sum().backward()) / B
        model.zero_grad(set_to_none=True)
        for dtype in DTYPES:
            for compiled in ([False, True] if compile else [False]):
                torch._dynamo.reset()
                net = torch.compile(model) if compiled else model

                def forward():
                    with torch.no_grad(), autocast(device, dtype):
                        net(x, sigma, text)

                def train_step():
                    with autocast(device, dtype):
                        loss = net(x, sigma, text).float().pow(2).mean()
                    loss.backward()
                t_fwd, t_train = timeit(forward), timeit(train_step)
                model.zero_grad(set_to_none=True)
                sheet = datasheet_peak(dtype)  # MFU as GPU papers quote it, where known
                rows.append([name, dtype, 'yes' if compiled else 'no', f"{B / t_fwd:.1f}",
                             f"{B / t_train:.1f}", f"{fwd_flops / 1e9:.2f}",
                             f"{fwd_flops * B / t_fwd / peaks[dtype]:.0%}",
                             f"{train_flops * B / t_train / peaks[dtype]:.0%}",
                             f"{train_flops * B / t_train / sheet:.0%}" if sheet else '-'])
                print('  ' + ' '.join(rows[-1]), flush=True)
    print_table('model: denoiser throughput (share of the same dtype\'s peak)',
                ['config', 'dtype', 'compiled', 'fwd img/s', 'fwd+bwd img/s', 'fwd GFLOP/img',
                 'fwd % peak', 'fwd+bwd % peak', 'MFU (datasheet)'], rows)


def tiny_model():
    """An (untrained: speed does not depend on the weights) denoiser of config/tiny.py's shape,
    on TAEF2's 32×16×16 latents of 128 px images."""
    c = load_config(os.path.join(ROOT, 'config', 'tiny.py'))
    shape = {k: c[k] for k in ('patch_size', 'embed_dim', 'n_layers', 'mlp_multiplier',
                               'head_dim') if k in c}
    torch.manual_seed(seed)
    return Denoiser(n_channels=32, image_size=16, text_emb_size=384, **shape).eval().to(device)


def bench_sample(peaks):
    """sample.py's three phases for 36 images at 15 steps with cfg (72 images per model call), on
    the tiny emoji model; and the denoising loop of the small config as a share of the peak."""
    from encoders import ImageCodec, TextEncoder
    from sample import Pipeline, make_noise
    prompts, steps, cfg = [f'prompt {i}' for i in range(36)], 15, 7.0
    rows = []
    for name, dtype in ((name, dtype) for name in ('tiny', 'small') for dtype in DTYPES):
        model = tiny_model() if name == 'tiny' else \
            Denoiser(**MODEL_CONFIGS['small']).eval().to(device)
        text_encoder = TextEncoder('minilm', device) if name == 'tiny' else None
        codec = ImageCodec('taef2' if name == 'tiny' else 'none', device, dtype)
        pipe = Pipeline(model, text_encoder, codec, None, device, dtype)
        noise = make_noise(range(36), pipe.latent_shape())
        if text_encoder is not None:
            t_text = timeit(lambda: pipe.encode_text(prompts), n=3, warmup=1)
            emb = pipe.encode_text(prompts)
        else:
            t_text, emb = float('nan'), torch.randn(36, 768, device=device)
        # guided at every step (cfg_min_sigma=0), so every model call is a forward of both halves
        t_denoise = timeit(lambda: pipe.sample_latents(emb, noise, cfg, steps, cfg_min_sigma=0.0),
                           n=3, warmup=1)
        x0 = pipe.sample_latents(emb, noise, cfg, steps, cfg_min_sigma=0.0)
        t_decode = timeit(lambda: pipe.decode(x0), n=3, warmup=1)
        # model calls: `steps` forwards of 72 images (the cond and uncond halves in one batch)
        flops = count_flops(lambda: model(torch.cat([noise, noise]).to(device),
                                          torch.rand(72, device=device),
                                          torch.cat([emb, emb]))) * steps
        rows.append([name, dtype, f"{t_text:.2f}", f"{t_denoise:.2f}", f"{t_decode:.3f}",
                     f"{t_text + t_denoise + t_decode:.2f}" if name == 'tiny' else '-',
                     f"{flops / t_denoise / peaks[dtype]:.0%}"])
        print('  ' + ' '.join(rows[-1]), flush=True)
    print_table('sample: 36 images, 15 steps, cfg 7 at every step (seconds)',
                ['model', 'dtype', 'text', 'denoise', 'decode', 'total', 'denoise % peak'], rows)


def bench_fewstep():
    """A flow map's jumps (config/tiny_fewstep.py: guidance in the weights, one forward a step)
    against the base model's DPM-Solver++ with cfg 4 at σ > 0.2, on the tiny emoji model: 64
    images, sampling and decoding, as ratios to 15 DPM-Solver++ steps."""
    from encoders import ImageCodec
    from sample import Pipeline, make_noise
    rows = []
    for dtype in DTYPES:
        model = tiny_model()
        model.add_flow_map()  # the speed of a map does not depend on its weights
        pipe = Pipeline(model, None, ImageCodec('taef2', device, dtype), None, device, dtype)
        noise, emb = make_noise(range(64), pipe.latent_shape()), torch.randn(64, 384)
        t_decode = timeit(lambda: pipe.decode(noise), n=3, warmup=1)
        cells = [('DPM-Solver++', k, 'dpmpp2m', 4.0) for k in (1, 2, 4, 8, 15)] + \
                [('flow map', k, 'flowmap', 1.0) for k in (1, 2, 4, 8)]
        times = {c: timeit(lambda c=c: pipe.sample_latents(emb, noise, c[3], c[1], c[2]), n=3,
                           warmup=1) for c in cells}
        t15 = times[cells[4]]
        for c in cells:
            rows.append([c[0], str(c[1]), dtype, f"{times[c]:.3f}", f"{t15 / times[c]:.1f}x",
                         f"{(t15 + t_decode) / (times[c] + t_decode):.1f}x"])
            print('  ' + ' '.join(rows[-1]), flush=True)
    print_table('fewstep: 64 images of the demo, seconds sampling; speed-up against 15 '
                'DPM-Solver++ steps at cfg 4, sampling alone and with decoding',
                ['sampler', 'steps', 'dtype', 'sampling s', 'sampling', 'with decode'], rows)


def make_random_vae(path, block_out_channels=(32, 64, 128, 128), latent_channels=4, seed=0):
    """Save a random-init AutoencoderKL to path (f = 2^(len(block_out_channels) - 1)): the real
    code path and cost of a small VAE, with no download. The default is the SD VAE at 1/4 width."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(block_out_channels)
    AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * n,
                  up_block_types=('UpDecoderBlock2D',) * n,
                  block_out_channels=tuple(block_out_channels), latent_channels=latent_channels,
                  layers_per_block=1, norm_num_groups=min(32, block_out_channels[0])
                  ).save_pretrained(path)
    return str(path)


def make_image_folder(path, n, size=256, seed=0):
    """n random-but-smooth JPEG photos of size x size px with .txt captions, as a folder source."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # blurred up: photo-like to JPEG
        image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        image.save(os.path.join(path, f'{i:06d}.jpg'), quality=90)
        with open(os.path.join(path, f'{i:06d}.txt'), 'w') as f:
            f.write(f'a blurry photo number {i}')
    return path


def time_prepare(source='emoji', n_images=0, image_size=32, vae='none', batch_size=64):
    """prepare.py on one setting, everything counted (loading the encoders, decoding, encoding,
    writing). source='folder' makes n_images random 256 px JPEGs; vae='random' is make_random_vae().
    Rows are image-caption pairs (the emoji set has 9 an image: 6 training, 1 val, 2 held-out)."""
    import tempfile
    from prepare import prepare
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(source=source, out_dir=os.path.join(tmp, 'out'), image_size=image_size,
                  device=device, text_encoder='minilm', batch_size=batch_size, limit=n_images)
        if source == 'folder':
            kw['input'] = make_image_folder(os.path.join(tmp, 'images'), n_images or 64, size=256)
        kw['vae'] = make_random_vae(os.path.join(tmp, 'vae')) if vae == 'random' else vae
        t = time.time()
        meta = prepare(**kw)
        seconds = time.time() - t
    rows = meta['n'] + meta['n_val'] + meta.get('n_heldout', 0)
    return dict(images=meta['items'], rows=rows, seconds=seconds, rows_per_s=rows / seconds,
                images_per_s=meta['items'] / seconds, encode_images_per_s=meta['items_per_s'])


def bench_prepare():
    """prepare.py's throughput: the emoji set in pixel space with MiniLM, and 256 px images through
    a small random VAE (f=8, a quarter of SD's width), both on this device."""
    rows = []
    folder = dict(source='folder', n_images=32, image_size=256, vae='random', batch_size=16)
    for label, kw in [('emoji, pixels + minilm', {}),
                      ('256 px folder, small VAE + minilm', folder)]:
        r = time_prepare(**kw)
        rows.append([label, r['images'], f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}",
                     f"{r['encode_images_per_s']:.1f}"])
        print('  ' + ' '.join(map(str, rows[-1])), flush=True)
    print_table('prepare', ['data', 'images', 'seconds', 'images/s', 'images/s (encoding loop)'],
                rows)


def bench_eval():
    """eval.py's scoring of 256 images (one row of its table) against the 1,886 distinct emoji:
    prompt fidelity and diversity; FID/KID's Inception features of the 256 images (one timed call,
    after a warm-up batch), and FID + KID of those features against 1,886 real features. The
    sampling it also does is sample.py's speed, above."""
    import metrics
    g = torch.Generator().manual_seed(seed)
    real = metrics.RealImages(torch.rand(1886, 3, 32, 32, generator=g))
    images = torch.rand(256, 3, 32, 32, generator=g)
    targets = torch.randint(real.K, (256,), generator=g)
    t = timeit(lambda: metrics.measure(images, targets, 2, real), n=5, warmup=1)
    rows = [['prompt fidelity, diversity', 256, real.K, f"{t:.3f}", f"{256 / t:.0f}"]]
    try:
        inception = metrics.InceptionFeatures(device=device)
    except FileNotFoundError as e:
        print(f"eval: FID/KID skipped: {e}")
    else:
        inception(images[:32])  # warm-up: oneDNN picks its kernels
        t = timeit(lambda: inception(images), n=1, warmup=0)
        rows.append(['Inception features (299 px)', 256, '', f"{t:.1f}", f"{256 / t:.1f}"])
        real_feats = metrics.RealFeatures(torch.rand(1886, 2048, generator=g, dtype=torch.float64))
        feats = torch.rand(256, 2048, generator=g, dtype=torch.float64)
        t = timeit(lambda: real_feats(feats), n=3, warmup=1)
        rows.append(['FID + KID (100 subsets of 256)', 256, real_feats.n, f"{t:.2f}",
                     f"{256 / t:.0f}"])
    print_table('eval: scoring', ['metric', 'images', 'real images', 'seconds', 'images/s'], rows)


# ----- the yardstick: a plain implementation of the reference architecture -----

class PlainBlock(torch.nn.Module):
    """The reference's block as its description gives it, with no fusion: separate q, k, v
    projections, SDPA for the self- and the cross-attention, and an MLP of 1×1 convolutions
    around the depthwise 3×3 conv, on (B, D, H, W) maps."""

    def __init__(self, dim, head_dim, mult):
        super().__init__()
        nn, self.h = torch.nn, dim // head_dim
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.q1, self.k1, self.v1 = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q2, self.k2, self.v2 = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.mlp = nn.Sequential(nn.Conv2d(dim, mult * dim, 1),
                                 nn.Conv2d(mult * dim, mult * dim, 3, padding=1, groups=mult * dim),
                                 nn.GELU(), nn.Conv2d(mult * dim, dim, 1))

    def attend(self, q, k, v):
        split = lambda t: rearrange(t, 'b n (h d) -> b h n d', h=self.h)
        y = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return rearrange(y, 'b h n d -> b n (h d)')

    def forward(self, x, context, grid):  # x (B, N, D), context (B, 2, D)
        h = self.norm1(x)
        x = x + self.attend(self.q1(h), self.k1(h), self.v1(h))
        h = self.norm2(x)
        x = x + self.attend(self.q2(h), self.k2(context), self.v2(context))
        h = rearrange(self.norm3(x), 'b (h w) d -> b d h w', h=grid[0])
        return x + rearrange(self.mlp(h), 'b d h w -> b (h w) d')


class PlainDenoiser(torch.nn.Module):
    """x (B, C, H, W), σ (B,), text (B, D_text) -> x0 (B, C, H, W), as Denoiser with
    conditioning='cross', text_prior=0: the same weights per layer (and a bias on the first 1×1
    conv, which the Denoiser leaves to the depthwise conv after it) and the same FLOPs."""

    def __init__(self, n_channels, image_size, patch_size, embed_dim, n_layers, text_emb_size,
                 mlp_multiplier=4, head_dim=64):
        super().__init__()
        nn, D, self.p = torch.nn, embed_dim, patch_size
        self.patch_in = nn.Linear(n_channels * patch_size ** 2, D)
        self.pos_emb = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2, D))
        self.sigma_mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.text_proj, self.context_norm = nn.Linear(text_emb_size, D), nn.LayerNorm(D)
        self.blocks = nn.ModuleList(PlainBlock(D, head_dim, mlp_multiplier)
                                    for _ in range(n_layers))
        self.norm_out, self.patch_out = nn.LayerNorm(D), nn.Linear(D, n_channels * patch_size ** 2)

    def forward(self, x, sigma, text_emb, cond=None):
        grid = (x.shape[2] // self.p, x.shape[3] // self.p)
        x = rearrange(x, 'b c (h p1) (w p2) -> b (h w) (c p1 p2)', p1=self.p, p2=self.p)
        x = self.patch_in(x) + self.pos_emb
        sigma_emb = self.sigma_mlp(sinusoidal_embedding(sigma, x.shape[-1]).to(x.dtype))
        context = self.context_norm(torch.stack([sigma_emb, self.text_proj(text_emb)], dim=1))
        for block in self.blocks:
            x = block(x, context, grid)
        x = self.patch_out(self.norm_out(x))
        return rearrange(x, 'b (h w) (c p1 p2) -> b c (h p1) (w p2)', h=grid[0], p1=self.p,
                         p2=self.p)


def bench_vs_reference(peaks):
    """The Denoiser against PlainDenoiser on the small config, in one run, interleaved: a training
    step (forward, MSE, backward, AdamW) of batch_size images, and the sampling loop of 16 images
    × 15 guided steps (a forward of 32 each). Ratios > 1: the Denoiser is faster."""
    from sample import compile_for_inference
    B, steps, rows = batch_size, 15, []
    x, sigma = torch.randn(B, 4, 32, 32, device=device), torch.rand(B, device=device)
    text = torch.randn(B, 768, device=device)
    nets = {'plain': PlainDenoiser(**MODEL_CONFIGS['small']),
            'cross': Denoiser(**MODEL_CONFIGS['small'], **REFERENCE_BLOCK),
            'default': Denoiser(**MODEL_CONFIGS['small'])}
    sampling_nets = dict(nets)
    if compile:  # as config/tiny.py trains and sample.py --compile samples (a frozen copy)
        nets['default, compiled'] = torch.compile(copy.deepcopy(nets['default']))
        sampling_nets['default, compiled'] = compile_for_inference(
            copy.deepcopy(nets['default']).to(device))
    opts = {k: torch.optim.AdamW(n.to(device).parameters(), lr=1e-4) for k, n in nets.items()}
    flops = count_flops(lambda: nets['plain'](x, sigma, text).sum().backward()) / B
    nets['plain'].zero_grad(set_to_none=True)
    for dtype in DTYPES:
        def train_step(k):
            with autocast(device, dtype):
                loss = (nets[k].train()(x, sigma, text).float() - x).square().mean()
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)

        def sample(k):
            denoise = guided_denoiser(sampling_nets[k].eval(), text[:16], cfg=7.0)
            with autocast(device, dtype):
                sample_dpmpp_2m(denoise, x[:16], sigma_schedule(steps))
        times = {k: [] for k in nets}
        for k in nets:  # warm up once: allocator, kernels, optimizer state
            train_step(k)
            sample(k)
        for _ in range(rounds):  # interleaved, so a busy moment hits every model alike
            for k in nets:
                times[k].append((timeit(lambda: train_step(k), n=1, warmup=0),
                                 timeit(lambda: sample(k), n=1, warmup=0)))
        med = {k: [sorted(t[i] for t in v)[len(v) // 2] for i in (0, 1)] for k, v in times.items()}
        for k in nets:
            tr, sa = med[k]
            rows.append([k, dtype, f"{B / tr:.1f}", f"{med['plain'][0] / tr:.2f}x",
                         f"{flops * B / tr / peaks[dtype]:.0%}", f"{sa:.2f}",
                         f"{med['plain'][1] / sa:.2f}x"])
            print('  ' + ' '.join(rows[-1]), flush=True)
    print_table('reference: the Denoiser vs a plain implementation of the reference (small config, '
                f'medians of {rounds} interleaved rounds)',
                ['model', 'dtype', 'train img/s', 'vs plain', 'train % peak', 'sample s',
                 'vs plain'], rows)


def main():
    for key, values, known in (('only', only, TABLES), ('configs', configs, MODEL_CONFIGS)):
        if unknown := [v for v in values if v not in known]:
            fail(f"--{key}: unknown {unknown[0]!r}, expected some of {' '.join(known)} "
                 f"(separated by spaces)")
    for d in dtypes:
        if d != 'auto' and d not in PTDTYPES:
            fail(f"--dtypes: expected 'auto' or some of {sorted(PTDTYPES)}, got {d!r}")
    for key in ('iters', 'rounds', 'batch_size', 'base_batch_size'):
        if globals()[key] < 1:
            fail(f"--{key} must be >= 1, got {globals()[key]}")
    if device != 'cpu' and not (device.startswith('cuda') and torch.cuda.is_available()):
        fail(f"--device={device}: expected cpu, or cuda where torch sees a GPU")
    DTYPES[:] = dict.fromkeys(resolve_dtype(d, device) for d in dtypes)  # in order, once each
    torch.set_float32_matmul_precision('high')  # TF32 on GPUs, as train.py does
    print(device_kind())
    print(f"dtypes measured: {', '.join(DTYPES)} (auto is {resolve_dtype('auto', device)} here)",
          flush=True)
    peaks = bench_peak() if any(map(wanted, ('peak', 'reference', 'model', 'sample'))) else None
    if wanted('reference'):
        bench_vs_reference(peaks)
    if wanted('model'):
        bench_model(peaks)
    if wanted('sample'):
        bench_sample(peaks)
    if wanted('fewstep'):
        bench_fewstep()
    if wanted('eval'):
        bench_eval()
    if wanted('prepare'):
        bench_prepare()


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    main()
