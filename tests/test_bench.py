"""
bench.py: its yardstick is the reference architecture, it names the CPU and dtype it measured, and
its GPU timing (simulated).

    python -m pytest -q tests/test_bench.py
"""
import pytest
import torch

from conftest import one_line_error, run_in_process
from model import Denoiser
import bench


# ----- bench.py -----

def test_bench_yardstick_is_the_reference_architecture():
    """bench.py's plain implementation has the Denoiser's reference block (conditioning='cross',
    text_prior=0): the same weights per layer but fc1's bias, the same FLOPs, the same output
    shape."""
    args = dict(n_channels=4, image_size=16, patch_size=2, embed_dim=64, n_layers=2, head_dim=32,
                text_emb_size=24)
    plain, denoiser = bench.PlainDenoiser(**args), Denoiser(**args, **bench.REFERENCE_BLOCK)
    assert plain.blocks[0].mlp[0].bias.numel() == 4 * 64
    extra = sum(block.mlp[0].bias.numel() for block in plain.blocks)
    assert sum(p.numel() for p in plain.parameters()) - extra == denoiser.num_params()
    x, sigma, text = torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 24)
    flops = [bench.count_flops(lambda: net(x, sigma, text)) for net in (plain, denoiser)]
    assert plain(x, sigma, text).shape == x.shape
    assert flops[1] == pytest.approx(flops[0], rel=0.01), flops


def test_bench_says_which_cpu_and_dtype_it_measured(tmp_path):
    info = tmp_path / 'cpuinfo'
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n")
    assert bench.cpu_kind(str(info)) == "AMD EPYC 7B13 (AVX512 no, AVX512-bf16 no, AMX no)"
    info.write_text("model name\t: Intel Xeon\nflags\t\t: avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert bench.cpu_kind(str(info)) == "Intel Xeon (AVX512 yes, AVX512-bf16 yes, AMX yes)"
    proc = run_in_process('bench.py', '--only', 'peak', '--dtypes', 'float32', '--iters=1')
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith('bench.py on cpu: ') and bench.cpu_kind() in first
    assert second.startswith('dtypes measured: float32 (auto is ')
    assert '## peak: GFLOP/s of one matmul' in proc.stdout
    assert '| float32 | 2048×2048 @' in proc.stdout
    assert 'nosuch' in one_line_error(run_in_process('bench.py', '--only', 'nosuch', check=False))
    for args, message in ((['--iters=0'], '--iters must be >= 1'),
                          (['--batch_size=0'], '--batch_size must be >= 1'),
                          (['--device=cuda'], '--device=cuda: expected cpu')):
        assert message in one_line_error(run_in_process('bench.py', *args, check=False))


def test_bench_times_gpu_matmuls_between_cuda_events_without_a_sync_each(monkeypatch):
    """On a GPU the peak is n back-to-back products between two events, one sync at the end."""
    import bench
    log = []

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            log.append('record')

        def elapsed_time(self, end):
            return 20.0  # ms between the events

    monkeypatch.setattr(bench, 'device', 'cuda:0')
    monkeypatch.setattr(torch.cuda, 'Event', Event)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a: log.append('sync'))
    a = torch.ones(4, 4)

    class Counting:
        def __matmul__(self, other):
            log.append('mm')
            return a
    assert bench.matmul_seconds(Counting(), a, n=10) == pytest.approx(0.002)
    assert log == ['mm', 'record'] + ['mm'] * 10 + ['record', 'sync']


def test_mfu_divides_by_the_datasheet_peak_of_a_known_gpu(monkeypatch):
    """On an H100 the model table's MFU column uses 989 TFLOP/s (bf16 dense), on an A100 312; on a
    CPU, in fp32 or on a GPU not in the table there is none (the measured peak still is)."""
    monkeypatch.setattr(bench, 'device', 'cuda:0')
    for gpu, peak in (('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                      ('Tesla T4', None)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None, gpu=gpu: gpu)
        assert bench.datasheet_peak('bfloat16') == peak
    assert bench.datasheet_peak('float32') is None
    monkeypatch.setattr(bench, 'device', 'cpu')
    assert bench.datasheet_peak('bfloat16') is None
