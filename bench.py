"""
Measured speed and sampler accuracy, as tables of ratios taken in one run on this machine.

    python bench.py                              # everything (on CPU the base config takes minutes)
    python bench.py --only=model --configs=small # one table
    python bench.py --device=cuda                # on a GPU

Tables:
- peak: this machine's own fp32 and bf16 matmul throughput (2048² matmuls), the yardstick below.
- model: forward and forward+backward images/s of the denoiser, fp32 and bf16 autocast, eager
  and compiled, its FLOPs per image (torch.utils.flop_counter, corrected, see count_flops) and the
  achieved FLOP/s as a fraction of the peak of the same dtype.
- samplers: RMS error against the exact probability-flow solution on Gaussian data.
- prepare, sample, eval: throughput of the other scripts on the tiny emoji setup.
"""
import runpy
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

from configurator import configure
from diffusion import SAMPLERS, GaussianData
from model import Denoiser

# -----------------------------------------------------------------------------
only = ''  # comma list of tables to run: peak,model,samplers,prepare,sample,eval ('' = all)
configs = 'small,base'
device = 'cpu'
compile = True  # also time torch.compile'd models (the first call of each compiles, ~1 min on CPU)
batch_size = 32  # for the small config; base uses base_batch_size on CPU, where it is slow
base_batch_size = 8
iters = 5  # timed iterations per cell, after warmup
seed = 0
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])

# the two configs of the core issue: PERF.md's small model, and config/base.py's ~101M one
MODEL_CONFIGS = {
    'small': dict(n_channels=4, image_size=32, patch_size=2, embed_dim=256, n_layers=4, text_emb_size=768),
    'base': dict(n_channels=4, image_size=32, patch_size=2, embed_dim=768, n_layers=12, text_emb_size=768),
}


def wanted(table):
    return not only or table in only.split(',')


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timeit(fn, n=iters, warmup=2):
    """Seconds per call of fn, the median of n calls after warmup ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(n):
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


# ----- FLOP counting -----

def _conv_backward_flops(grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask, out_shape=None, **kwargs):
    # torch's formula ignores groups; each of grad_input and grad_weight costs one forward conv
    return conv_flop_count(x, w, grad_out, transposed) * sum(output_mask[:2])


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


aten = torch.ops.aten
FLOP_FIXES = {  # what torch.utils.flop_counter gets wrong (PERF.md): depthwise conv backward, CPU SDPA
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
    """fp32 and bf16 matmul FLOP/s at 2048²: the ceiling that the model's numbers are divided by."""
    n, peaks = 2048, {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        peaks[dtype] = 2 * n ** 3 / timeit(lambda: a @ b, n=10)
    print_table('peak: matmul 2048²', ['dtype', 'GFLOP/s'],
                [[str(d).removeprefix('torch.'), f"{p / 1e9:.0f}"] for d, p in peaks.items()])
    return peaks


def bench_model(peaks):
    rows = []
    for name in configs.split(','):
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
        for dtype in (torch.float32, torch.bfloat16):
            for compiled in ([False, True] if compile else [False]):
                torch._dynamo.reset()
                net = torch.compile(model) if compiled else model
                autocast = torch.autocast(device.split(':')[0], dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

                def forward():
                    with torch.no_grad(), autocast:
                        net(x, sigma, text)

                def train_step():
                    with autocast:
                        loss = net(x, sigma, text).float().pow(2).mean()
                    loss.backward()
                t_fwd = timeit(forward)
                t_train = timeit(train_step)
                model.zero_grad(set_to_none=True)
                peak = peaks[dtype]
                rows.append([name, str(dtype).removeprefix('torch.'), 'yes' if compiled else 'no',
                             f"{B / t_fwd:.1f}", f"{B / t_train:.1f}", f"{fwd_flops / 1e9:.2f}",
                             f"{fwd_flops * B / t_fwd / peak:.0%}", f"{train_flops * B / t_train / peak:.0%}"])
                print('  ' + ' '.join(rows[-1]), flush=True)
    print_table('model: denoiser throughput (share of the same dtype\'s matmul peak)',
                ['config', 'dtype', 'compiled', 'fwd img/s', 'fwd+bwd img/s', 'fwd GFLOP/img',
                 'fwd % peak', 'fwd+bwd % peak'], rows)


def tiny_model():
    """An (untrained: speed does not depend on the weights) denoiser of config/tiny.py's shape."""
    c = runpy.run_path('config/tiny.py')
    torch.manual_seed(seed)
    return Denoiser(n_channels=3, image_size=32, patch_size=c['patch_size'], embed_dim=c['embed_dim'],
                    n_layers=c['n_layers'], mlp_multiplier=c['mlp_multiplier'], head_dim=c['head_dim'],
                    text_emb_size=384).eval().to(device)


def bench_sample(peaks):
    """sample.py's three phases for 36 images at 15 steps with cfg (72 images per model call), on the
    tiny emoji model; and the denoising loop of the small config as a share of the bf16 peak."""
    from sample import Pipeline, make_noise
    from encoders import ImageCodec, TextEncoder
    prompts, steps, cfg = [f'prompt {i}' for i in range(36)], 15, 7.0
    rows = []
    for name in ('tiny', 'small'):
        model = tiny_model() if name == 'tiny' else Denoiser(**MODEL_CONFIGS['small']).eval().to(device)
        text_encoder = TextEncoder('minilm', device) if name == 'tiny' else None
        pipe = Pipeline(model, text_encoder, ImageCodec('none', device), 1.0, device, dtype='auto')
        shape = pipe.latent_shape()
        noise = make_noise(range(36), shape)
        if text_encoder is not None:
            t_text = timeit(lambda: pipe.encode_text(prompts), n=3, warmup=1)
            emb = pipe.encode_text(prompts)
        else:
            t_text, emb = float('nan'), torch.randn(36, 768, device=device)
        # guided at every step (cfg_min_sigma=0), so every model call is a forward of both halves
        t_denoise = timeit(lambda: pipe.denoise(emb, noise, cfg, steps, cfg_min_sigma=0.0), n=3, warmup=1)
        x0 = pipe.denoise(emb, noise, cfg, steps, cfg_min_sigma=0.0)
        t_decode = timeit(lambda: pipe.decode(x0), n=3, warmup=1)
        # model calls: `steps` forwards of 72 images (the cond and uncond halves in one batch)
        flops = count_flops(lambda: model(torch.cat([noise, noise]).to(device), torch.rand(72, device=device),
                                          torch.cat([emb, emb]))) * steps
        peak = peaks[torch.bfloat16 if pipe.dtype == 'bfloat16' else torch.float32]
        rows.append([name, pipe.dtype, f"{t_text:.2f}", f"{t_denoise:.2f}", f"{t_decode:.3f}",
                     f"{t_text + t_denoise + t_decode:.2f}" if name == 'tiny' else '-',
                     f"{flops / t_denoise / peak:.0%}"])
        print('  ' + ' '.join(rows[-1]), flush=True)
    print_table('sample: 36 images, 15 steps, cfg 7 at every step (seconds)',
                ['model', 'dtype', 'text', 'denoise', 'decode', 'total', 'denoise % peak'], rows)


def bench_prepare():
    """prepare.py's throughput: the emoji set in pixel space with MiniLM, and 256 px images through a
    small random VAE (f=8, a quarter of SD's width), both on this device."""
    import prepare
    rows = []
    for label, kw in [('emoji, pixels + minilm', dict()),
                      ('256 px folder, small VAE + minilm', dict(source='folder', n_images=32, image_size=256,
                                                                 vae='random', batch_size=16))]:
        r = prepare.bench_prepare(device=device, **kw)
        rows.append([label, r['images'], f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}",
                     f"{r['encode_images_per_s']:.1f}"])
        print('  ' + ' '.join(map(str, rows[-1])), flush=True)
    print_table('prepare', ['data', 'images', 'seconds', 'images/s', 'images/s (encoding loop)'], rows)


def bench_eval():
    """eval.py's scoring (features, nearest emoji, diversity) of 256 images against the 1,886 distinct
    emoji; the sampling it also does is sample.py's speed, above."""
    import eval as evaluate
    g = torch.Generator().manual_seed(seed)
    ref = evaluate.Reference(torch.rand(1886, 3, 32, 32, generator=g))
    images, targets = torch.rand(256, 3, 32, 32, generator=g), torch.randint(ref.K, (256,), generator=g)
    t = timeit(lambda: evaluate.measure(images, targets, 2, ref), n=5, warmup=1)
    print_table('eval: scoring', ['images', 'reference', 'seconds', 'images/s'],
                [[256, ref.K, f"{t:.3f}", f"{256 / t:.0f}"]])


def bench_samplers():
    data = GaussianData()
    steps = [5, 10, 15, 25, 50]
    rows = [[name] + [f"{data.error(SAMPLERS[name], n):.2e}" for n in steps] for name in ('ddim', 'dpmpp2m')]
    print_table('samplers: RMS error vs the exact ODE solution, Gaussian data (std 0.5-1.5)',
                ['sampler'] + [f"{n} steps" for n in steps], rows)


if __name__ == '__main__':
    torch.set_float32_matmul_precision('high')  # TF32 on GPUs, as train.py does
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = bench_peak() if wanted('peak') or wanted('model') or wanted('sample') else None
    if wanted('model'):
        bench_model(peaks)
    if wanted('samplers'):
        bench_samplers()
    if wanted('sample'):
        bench_sample(peaks)
    if wanted('eval'):
        bench_eval()
    if wanted('prepare'):
        bench_prepare()
