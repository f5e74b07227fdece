"""train.py as a user runs it: loss, grids, exact resume, DDP, budgets, faults; GPU logic
simulated on a CPU."""
import ast
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ROOT, one_line_error, run_in_process, run_script, tiny_denoiser,
                      write_prepared)

TRAIN_TINY = ['--embed_dim=32', '--n_layers=2', '--head_dim=16', '--mlp_multiplier=2',
              '--patch_size=2', '--batch_size=8', '--gradient_accumulation_steps=1',
              '--dtype=float32', '--learning_rate=3e-3', '--warmup_iters=2', '--eval_samples=16',
              '--n_sample=4', '--sample_steps=4', '--log_interval=1']


def train(data_dir, out_dir, *args, check=True, ddp=0, env=None, in_process=False):
    """train.py on the tiny settings: in a process of its own (under torchrun with ddp processes),
    or in this one (in_process) where no step runs, such as a bad flag."""
    args = ['train.py', *TRAIN_TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', *args]
    if in_process:
        return run_in_process(*args, check=check)
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ddp}'] \
        if ddp else []
    return run_script(*launcher, *args, check=check, env=env)


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)  # the safe loader does


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """One short training run on the squares, shared by the tests below: (data dir, out dir,
    stdout)."""
    root = tmp_path_factory.mktemp('train')
    data = write_prepared(root / 'data')
    proc = train(data, root / 'out', '--max_iters=40', '--eval_interval=20', '--ckpt_interval=20')
    return data, str(root / 'out'), proc.stdout


def test_train_loss_goes_down_and_writes_sample_grids(tiny_run):
    data, out, stdout = tiny_run
    val = [float(v) for v in re.findall(r'val loss ([\d.]+)', stdout)]
    assert len(val) == 3  # iters 0, 20, 40
    assert val[2] < 0.5 * val[0], val
    grid = Image.open(os.path.join(out, 'samples', 'iter_000040.png'))
    assert grid.size == (2 * 17 + 1, 2 * 17 + 1)  # 4 images of 16 px in a 2×2 grid, 1 px padding
    prompts = open(os.path.join(out, 'samples', 'prompts.txt')).read().split('\n')
    # val rows 0, 2, 5, 7
    assert prompts[:4] == ['a red square', 'a blue square', 'a green square', 'a yellow square']
    ckpt = load_ckpt(out)
    assert set(ckpt) == {'model', 'ema', 'optimizer', 'scaler', 'model_args', 'iter_num',
                         'budget_iters', 'best_val_loss', 'config', 'data_meta', 'rng',
                         'data_state', 'dtype', 'objective', 'baked_cfg', 'teacher'}
    assert ckpt['objective'] == 'x0' and ckpt['baked_cfg'] == 0
    assert ckpt['iter_num'] == 40 and ckpt['best_val_loss'] == pytest.approx(min(val), abs=1e-4)
    assert ckpt['data_state'] == {'epoch': 8, 'pos': 0, 'n_train': 40}  # 8 epochs of 40
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])


def test_train_same_seed_is_identical_and_resume_is_exact(tmp_path):
    """N steps, a resume, N more steps: bitwise the 2N steps straight, data order (across an epoch
    boundary), noise, EMA and optimizer state included; an architecture flag given to the resume
    cannot change the checkpoint's model, and a note says so."""
    data = write_prepared(tmp_path / 'data')
    # 16 rows a step, 40 an epoch
    args = ['--max_iters=6', '--lr_decay_iters=6', '--gradient_accumulation_steps=2']
    train(data, tmp_path / 'a', *args)
    train(data, tmp_path / 'b', *args)
    train(data, tmp_path / 'c', *args[1:], '--max_iters=3')
    proc = train(data, tmp_path / 'c', *args, '--init_from=resume', '--n_layers=3')
    assert ("note: resuming keeps the checkpoint's architecture: n_layers=2, not 3\n"
            in proc.stdout), proc.stdout
    a, b, c = load_ckpt(tmp_path / 'a'), load_ckpt(tmp_path / 'b'), load_ckpt(tmp_path / 'c')
    for other in (b, c):
        for key in ('model', 'ema'):
            assert_same_state(a[key], other[key])
        for p in a['optimizer']['state']:
            assert_same_state(a['optimizer']['state'][p], other['optimizer']['state'][p])
        assert other['data_state'] == a['data_state'] == {'epoch': 2, 'pos': 16, 'n_train': 40}
        assert torch.equal(other['rng'][0]['torch'], a['rng'][0]['torch'])


# σ < 1e-8 and no text dropout: the loss is then a function of the rows alone, the same whichever
# process or micro-step draws its random numbers


NO_NOISE = ['--max_iters=1', '--beta_a=1e-3', '--beta_b=1e9', '--p_uncond=0', '--grad_clip=0',
            '--warmup_iters=0']


@pytest.fixture(scope='module')
def first_step_grads(tmp_path_factory):
    """The gradients of one step on the same global batch of 8 rows, split three ways. AdamW's first
    moment after one step is (1 - beta1)·g, so the checkpoint holds them."""
    root = tmp_path_factory.mktemp('grads')
    data = write_prepared(root / 'data')
    runs = {'ddp': (['--batch_size=4', '--gradient_accumulation_steps=2'], 2),  # 2 processes × 4
            # 1 process, 2 micro-steps
            'accumulate': (['--batch_size=4', '--gradient_accumulation_steps=2'], 0),
            'one_batch': (['--batch_size=8', '--gradient_accumulation_steps=1'], 0)}
    grads = {}
    for name, (args, ddp) in runs.items():
        train(data, root / name, *NO_NOISE, *args, ddp=ddp)
        state = load_ckpt(root / name)['optimizer']['state']
        grads[name] = torch.cat([state[p]['exp_avg'].flatten() for p in sorted(state)]) / (1 - 0.9)
    grads['ddp_ranks'] = len(load_ckpt(root / 'ddp')['rng'])
    return grads


def test_ddp_on_two_processes_matches_one_process(first_step_grads):
    g = first_step_grads
    assert g['accumulate'].abs().max() > 1e-2
    torch.testing.assert_close(g['ddp'], g['accumulate'], rtol=1e-4, atol=1e-6)
    assert g['ddp_ranks'] == 2  # the checkpoint holds each rank's random state


def test_gradient_accumulation_matches_a_bigger_batch(first_step_grads):
    g = first_step_grads
    torch.testing.assert_close(g['accumulate'], g['one_batch'], rtol=1e-4, atol=1e-6)


def test_train_errors_are_one_line(tmp_path, tiny_run):
    data, out, _ = tiny_run
    cases = [  # each overrides the good settings before it
        (['--batch_sise=8'], "error: unknown config key 'batch_sise' (did you mean batch_size?)"),
        ([f'--data_dir={tmp_path}/missing'], f"error: {tmp_path}/missing: no such directory"),
        (['--dtype=bf16'],
         "error: dtype must be 'auto' or one of ['bfloat16', 'float16', 'float32'], got 'bf16'"),
        (['--sample_cfg_min_sigma=1.5'], "error: sample_cfg_min_sigma must be in [0, 1)"),
        *(([f'--{k}={v}'], f"error: {k} must be") for k, v in (
            ('eval_interval', 0), ('log_interval', 0), ('ckpt_interval', 0), ('n_sample', 0),
            ('gradient_accumulation_steps', 0), ('learning_rate', -1), ('beta_a', 0),
            ('eval_samples', 0), ('seed', 99999999999999999999999), ('p_uncond', 1))),
        (['--device=cuda'], "error: device must be cpu, or cuda where torch sees a GPU"),
        ([f'--out_dir={out}'], f"error: {out}/ckpt.pt exists; resume it (--init_from=resume)"),
        ([f'--init_from={tmp_path}/nothing.pt'],
         f"error: no checkpoint at '{tmp_path}/nothing.pt'"),
    ]
    for args, message in cases:  # in this process; the NaN-loss test runs train.py in its own
        proc = train(data, tmp_path / 'o', *args, check=False, in_process=True)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith(message), (args, proc.stderr)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_prepared(tmp_path / 'data')
    train(data, tmp_path / 'o', '--max_iters=2')
    proc = train(data, tmp_path / 'o', '--init_from=resume', '--max_iters=20', '--log_interval=5',
                 '--learning_rate=1e30', '--warmup_iters=0', '--grad_clip=0', check=False)
    assert 'error: the loss is nan' in one_line_error(proc)
    ckpt = load_ckpt(tmp_path / 'o')
    assert ckpt['iter_num'] == 2 and all(v.isfinite().all() for v in ckpt['model'].values())


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_within_an_iteration_with_a_checkpoint(tmp_path, sig):
    data = write_prepared(tmp_path / 'data')
    proc = subprocess.Popen([sys.executable, 'train.py', *TRAIN_TINY, f'--data_dir={data}',
                             f'--out_dir={tmp_path}/o', '--max_iters=100000',
                             '--eval_interval=100000'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith('iter 3:'):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert 'interrupted; continue with' in out
    assert load_ckpt(tmp_path / 'o')['iter_num'] in (3, 4)  # the iteration under way ends


def test_wandb_logs_offline(tmp_path):
    pytest.importorskip('wandb')  # optional: not in requirements.txt
    data = write_prepared(tmp_path / 'data')
    train(data, tmp_path / 'o', '--max_iters=2', '--wandb_log=True',
          env={'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'})
    runs = [d for d in os.listdir(tmp_path / 'wandb') if d.startswith('offline-run-')]
    assert len(runs) == 1 and os.listdir(tmp_path / 'wandb' / runs[0] / 'files')


def test_finetune_widens_the_input_exactly_and_resizes_the_positional_table(tmp_path, tiny_run):
    """init_from=<ckpt> with --outpaint: the new input channels start at zero, so at step 0 the
    widened model computes exactly what the base model did, whatever the masked image. With data at
    twice the size, the positional table is resized (bilinear) and training goes on at the new
    size."""
    from diffusion import masked_input, random_masks
    from model import denoiser_from_checkpoint, resize_positional_table
    data, base_out, _ = tiny_run
    base = denoiser_from_checkpoint(load_ckpt(base_out))
    train(data, tmp_path / 'wide', f'--init_from={base_out}/ckpt.pt', '--outpaint=True',
          '--max_iters=0')
    wide = denoiser_from_checkpoint(load_ckpt(tmp_path / 'wide'))
    assert wide.cond_channels == 4
    assert load_ckpt(tmp_path / 'wide')['model_args']['cond_channels'] == 4
    g = torch.Generator().manual_seed(0)
    x, known = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    text = torch.randn(4, 8, generator=g)
    sigma = torch.rand(4, generator=g)
    cond = masked_input(known, random_masks(4, 16, 16, g))
    torch.testing.assert_close(wide(x, sigma, text, cond=cond), base(x, sigma, text), rtol=1e-5,
                               atol=1e-6)

    data32 = write_prepared(tmp_path / 'data32', size=32)
    train(data32, tmp_path / 'big', f'--init_from={base_out}', '--max_iters=0')
    big = load_ckpt(tmp_path / 'big')
    assert big['model_args']['image_size'] == 32
    torch.testing.assert_close(big['ema']['pos_emb'],
                               resize_positional_table(base.pos_emb.detach(), (16, 16)))
    train(data32, tmp_path / 'big', '--init_from=resume', '--max_iters=3')
    assert load_ckpt(tmp_path / 'big')['iter_num'] == 3


# ===== train.py on GPUs and under torchrun, simulated on CPU =====


def train_functions(*names, **namespace):
    """Functions of train.py (a script, not importable), compiled on their own over namespace."""
    tree = ast.parse(open(os.path.join(ROOT, 'train.py')).read())
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert sorted(d.name for d in defs) == sorted(names)
    exec(compile(ast.Module(defs, type_ignores=[]), 'train.py', 'exec'), namespace)
    return [namespace[name] for name in names]


@pytest.mark.parametrize('device, env, expected', [
    ('cuda:1', {}, 'cuda:1'),  # one process on the second GPU
    ('cuda', {}, 'cuda:3'),  # the current device, made explicit
    ('cuda:0', {'RANK': '1', 'LOCAL_RANK': '1', 'WORLD_SIZE': '2'}, 'cuda:1'),  # torchrun's rank
])
def test_train_sets_the_cuda_device_with_or_without_torchrun(tmp_path, device, env, expected):
    """train.py calls torch.cuda.set_device for any CUDA device, so that its random state (saved
    for an exact resume) and 'cuda' tensors are its own GPU's. Run on CPU, set_device faked."""
    data = write_prepared(tmp_path / 'data')
    argv = ['train.py', f'--device={device}', f'--data_dir={data}', f'--out_dir={tmp_path}/o']
    code = ("import runpy, sys, torch\n"
            "torch.cuda.is_available = lambda: True\n"
            "torch.cuda.get_device_capability = lambda *a: (9, 0)\n"
            "torch.cuda.get_arch_list = lambda: ['sm_90']\n"
            "torch.cuda.current_device = lambda: 3\n"
            "def set_device(d): print('set_device', d); sys.exit(0)\n"
            "torch.cuda.set_device = set_device\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    proc = run_script('-c', code, env=env or None)
    assert proc.stdout.splitlines() == [f'set_device {expected}'], proc.stdout + proc.stderr


def test_rng_state_is_that_of_this_processs_gpu(monkeypatch):
    """The random state saved and restored for an exact resume: the CPU generator's and that of
    the process's own GPU (an explicit device, not whichever is current)."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'get_rng_state',
                        lambda d='cuda': calls.append(('get', d)) or 'gpu state')
    monkeypatch.setattr(torch.cuda, 'set_rng_state',
                        lambda s, d='cuda': calls.append(('set', s, d)))
    from model import rng_state, set_rng_state
    state = rng_state('cuda:1')
    first = torch.rand(3)
    set_rng_state(state, 'cuda:1')
    assert torch.equal(torch.rand(3), first) and state['cuda'] == 'gpu state'
    assert calls == [('get', 'cuda:1'), ('set', 'gpu state', 'cuda:1')]
    set_rng_state({'torch': state['torch'], 'cuda': None}, 'cuda:1')  # written on a CPU
    assert len(calls) == 2
    assert rng_state('cpu')['cuda'] is None and len(calls) == 2


def test_ema_update_in_one_foreach_lerp_equals_the_per_parameter_loop():
    model, ema = tiny_denoiser(), tiny_denoiser().requires_grad_(False)
    for e in ema.parameters():
        e.add_(torch.randn(e.shape, generator=torch.Generator().manual_seed(e.numel())))
    reference = [p.detach().clone() for p in ema.parameters()]
    update_ema, = train_functions('update_ema', torch=torch, ema_decay=0.999, ema_warmup=10,
                                  ema_params=list(ema.parameters()),
                                  model_params=list(model.parameters()))
    for it in (0, 3, 50, 20000):  # warming up, then capped at ema_decay
        update_ema(it)
        decay = min(0.999, (1 + it) / (10 + it))
        for e, p in zip(reference, model.parameters()):
            e.lerp_(p.detach(), 1 - decay)  # the loop it replaces
        for e, r in zip(ema.parameters(), reference):
            assert torch.equal(e, r)
    assert 0.01 < (reference[0] - next(model.parameters())).abs().max() < 0.5  # on its way there


def test_global_batch_splits_over_any_number_of_processes():
    split, = train_functions('split_global_batch', math=math)
    # (global batch, processes, accumulation steps in total) -> (micro-batch, micro-steps) a process
    assert split(16, 1, 1) == (16, 1) and split(256, 1, 4) == (64, 4)
    assert split(256, 2, 4) == (64, 2) and split(256, 4, 4) == (64, 1)  # accumulation steps divide
    assert split(16, 2, 1) == (8, 1) and split(16, 4, 1) == (4, 1)  # the micro-batch is split
    assert split(256, 8, 4) == (32, 1) and split(48, 2, 3) == (12, 2)  # neither divides the other
    assert split(7, 2, 1) is None and split(2, 4, 1) is None and split(5, 2, 5) is None
    from configurator import load_config
    for path in sorted(os.listdir(os.path.join(ROOT, 'config'))):
        scope = load_config(os.path.join(ROOT, 'config', path))
        batch, accum = scope.get('batch_size', 64), scope.get('gradient_accumulation_steps', 1)
        for world in (1, 2, 4):
            micro_batch, steps = split(batch * accum, world, accum)
            assert micro_batch * steps * world == batch * accum, (path, world)
            assert micro_batch <= batch, (path, world)


def test_ddp_with_fewer_micro_steps_than_processes_trains_like_one_process(tmp_path):
    """config/tiny.py's global batch of 16 in one micro-step: 2 processes take 8 rows each. With
    the noise off (NO_NOISE), 3 steps on 2 processes give the weights of 3 steps on one."""
    data = write_prepared(tmp_path / 'data')
    args = ['config/tiny.py', *TRAIN_TINY, '--batch_size=16', '--sample_prompts=()',
            '--compile=False', '--max_minutes=0', f'--data_dir={data}', *NO_NOISE, '--max_iters=3',
            '--eval_interval=1000']
    one = run_script('train.py', *args, f'--out_dir={tmp_path}/one')
    two = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                     'train.py', *args, f'--out_dir={tmp_path}/two')
    assert one.stdout.startswith('global batch 16 = 1 × 1 × 16 rows (processes × micro-steps')
    assert two.stdout.startswith('global batch 16 = 2 × 1 × 8 rows (processes × micro-steps')
    a, b = load_ckpt(tmp_path / 'one'), load_ckpt(tmp_path / 'two')
    assert a['iter_num'] == b['iter_num'] == 3 and len(b['rng']) == 2
    assert max(s['exp_avg'].abs().max() for s in a['optimizer']['state'].values()) > 1e-3
    # but for the weights on sin(1000·σ·f), whose gradients (∝ σ < 1e-8) come from each rank's
    # own random σ and which Adam turns into steps of ~lr all the same, all agree (9e-8 apart)
    for key in ('model', 'ema'):
        for name in a[key]:
            x, y = a[key][name], b[key][name]
            if name == 'sigma_mlp.0.weight':
                x, y = x[:, x.shape[1] // 2:], y[:, y.shape[1] // 2:]  # the cos features only
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_ddp_batch_that_cannot_split_is_one_line(tmp_path):
    data = write_prepared(tmp_path / 'data')
    proc = train(data, tmp_path / 'o', '--batch_size=3', ddp=2, check=False)
    message = ("error: the global batch of 3 * 1 rows does not split evenly over 2 processes; "
               "make it a multiple of 2")
    assert proc.returncode != 0 and proc.stderr.count(message) == 1  # from rank 0 only
    assert 'File "' + os.path.join(ROOT, 'train.py') not in proc.stderr  # no train.py traceback


def test_a_2x_sample_after_a_short_finetune_is_an_image_not_noise(tmp_path, tiny_run):
    """The tiny squares model (16 px) fine-tuned briefly at 32 px, then sampled at 32 px: the right
    shape, smooth like the data rather than like noise, and each image in the colour its prompt
    names."""
    from diffusion import generate
    from model import denoiser_from_checkpoint
    data, base_out, _ = tiny_run
    data32 = write_prepared(tmp_path / 'data32', size=32)
    train(data32, tmp_path / 'big', f'--init_from={base_out}/ckpt.pt', '--max_iters=30',
          '--warmup_iters=0')
    model = denoiser_from_checkpoint(load_ckpt(tmp_path / 'big'))
    text = np.load(os.path.join(data32, 'val_text_emb.npy'))[:4]
    text = torch.from_numpy(text.astype(np.float32))
    x = generate(model, text, cfg=3.0, steps=15, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 32, 32)

    def roughness(img):  # mean absolute difference between neighbouring pixels
        return ((img[..., 1:, :] - img[..., :-1, :]).abs().mean()
                + (img[..., 1:] - img[..., :-1]).abs().mean()) / 2
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * x.std()
    assert roughness(x) < 0.4 * roughness(noise), (roughness(x), roughness(noise))
    r, g, b = x.mean((2, 3)).T  # val rows 0-3: a red, a green, a blue and a yellow square on white
    assert r[0] > max(g[0], b[0]) and g[1] > max(r[1], b[1]) and b[2] > max(r[2], g[2])
    assert min(r[3], g[3]) > b[3]


def test_a_resume_onto_other_data_refuses_in_one_line(tmp_path, tiny_run):
    """A resume goes on with its own data: another --data_dir is refused, and so is its own data
    dir grown or shrunk since (the saved data position would mean nothing there)."""
    data, out, _ = tiny_run
    small = write_prepared(tmp_path / 'small', n=12)
    proc = train(small, out, '--init_from=resume', '--max_iters=80', check=False, in_process=True)
    assert f"--data_dir='{small}', but the run in {out} has data_dir='{data}'" in \
        one_line_error(proc)
    run = tmp_path / 'run'
    train(small, run, '--max_iters=1')
    write_prepared(small, n=20)  # the same dir, other data
    proc = train(small, run, '--init_from=resume', '--max_iters=80', check=False, in_process=True)
    assert 'trained on 12 rows' in one_line_error(proc) and '20' in one_line_error(proc)


def test_a_time_budget_fixes_max_iters_once_and_a_resume_keeps_it(tmp_path):
    """max_minutes: the run times its steps, fixes max_iters, says so, ends there and saves the
    number, which a resume keeps whatever max_iters it is given. With no C++ compiler, compile
    falls back to eager with a note."""
    data = write_prepared(tmp_path / 'data')
    proc = train(data, tmp_path / 'o', '--max_minutes=0.25', '--max_iters=1000000',
                 '--warmup_iters=30', '--log_interval=100', '--compile=True', '--eval_interval=10',
                 env={'CXX': 'no-such-compiler'})
    assert 'note: no C++ compiler' in proc.stdout
    fits = [int(m) for m in re.findall(r'time budget 0.25 min: .* -> max_iters = (\d+)',
                                       proc.stdout)]
    # fitted at iter 30 (the warm-up), then again at each evaluation the run still reaches
    for i, chosen in enumerate(fits):
        assert chosen > 30
        assert (40 + 10 * i < chosen) == (i + 1 < len(fits)), fits
    ckpt = load_ckpt(tmp_path / 'o')
    assert ckpt['iter_num'] == ckpt['budget_iters'] == chosen
    again = train(data, tmp_path / 'o', '--init_from=resume', '--max_iters=1000000')
    assert 'time budget' not in again.stdout and load_ckpt(tmp_path / 'o')['iter_num'] == chosen


def test_fit_time_budget_spends_what_is_left_on_steps_and_evaluations():
    """At the end of the warm-up, 10 steps were timed at 0.25 s: of the 60 s, 10 s are gone and
    2 s go to the last evaluation, so 48 s at 0.25 s + 2 s / 8 a step is 96 more steps."""
    clock = type('clock', (), {'time': staticmethod(lambda: 1000.0)})
    ns = dict(time=clock, torch=torch, max_minutes=1.0, eval_interval=8, warmup_iters=20,
              first_iter=30, iter_num=50, budget_from=(40, 997.5, 0.0), budget_iters=None,
              eval_total=0.0, eval_seconds=2.0, t_start=990.0, max_iters=10 ** 6, ddp=False,
              master_process=False, device='cpu')
    fit, = train_functions('fit_time_budget', **ns)
    ns = fit.__globals__  # the namespace it reads and sets
    fit()
    assert ns['max_iters'] == ns['budget_iters'] == 50 + 96
    assert ns['budget_from'] == (50, 1000.0, 0.0)  # the pace is measured again from here
    ns.update(iter_num=57, t_start=900.0)  # not an evaluation: nothing changes
    fit()
    assert ns['max_iters'] == 146
    ns.update(iter_num=64)  # an evaluation, over the budget already: one more step, then the end
    fit()
    assert ns['max_iters'] == 65


def test_flow_map_tuning_resumes_exactly_and_keeps_its_teacher(tmp_path, tiny_run):
    """Distillation from a trained checkpoint: 4 steps straight, or 2, a resume and 2 more, give
    the same weights bitwise; the frozen teacher is the starting model's EMA and stays so; the
    jump input, zero at the start, has learnt."""
    _, base, _ = tiny_run
    args = [f'--init_from={base}', '--objective=flowmap', '--teacher_cfg=3.0', '--p_uncond=0',
            '--max_iters=4', '--lr_decay_iters=4', '--sample_steps=2']
    train(write_prepared(tmp_path / 'data'), tmp_path / 'a', *args)
    data = write_prepared(tmp_path / 'data2')
    train(data, tmp_path / 'b', *args[:-2], '--max_iters=2', '--lr_decay_iters=4',
          '--sample_steps=2')
    train(data, tmp_path / 'b', *args[1:], '--init_from=resume')  # the same settings, resumed
    a, b, start = load_ckpt(tmp_path / 'a'), load_ckpt(tmp_path / 'b'), load_ckpt(base)
    for key in ('model', 'ema', 'teacher'):
        assert_same_state(a[key], b[key])
    jump = {k for k in a['teacher'] if k.startswith('gap_mlp.')}
    assert jump and not a['teacher']['gap_mlp.2.weight'].any()  # the teacher: exactly the base
    assert_same_state({k: v for k, v in a['teacher'].items() if k not in jump}, start['ema'])
    assert a['objective'] == 'flowmap' and a['baked_cfg'] == 3.0 and a['model_args']['flow_map']
    assert a['model']['gap_mlp.2.weight'].any()


def test_a_resume_keeps_what_the_run_is_and_refuses_a_contradiction(tmp_path, tiny_run):
    """A few-step run resumed without its config goes on as the few-step run it is (objective,
    teacher and baked guidance from the checkpoint); a flag that contradicts it is one line."""
    _, base, _ = tiny_run
    data = write_prepared(tmp_path / 'data')
    train(data, tmp_path / 'fm', f'--init_from={base}', '--objective=flowmap',
          '--teacher_cfg=3.0', '--max_iters=2')
    proc = train(data, tmp_path / 'fm', '--init_from=resume', '--max_iters=3')
    ckpt = load_ckpt(tmp_path / 'fm')
    assert ckpt['objective'] == 'flowmap' and ckpt['baked_cfg'] == 3.0, proc.stdout
    assert ckpt['teacher'] is not None and ckpt['iter_num'] == 3
    for flag, kept in (('--objective=x0', "objective='flowmap'"),
                       ('--teacher_cfg=5', 'teacher_cfg=3.0')):
        proc = train(data, tmp_path / 'fm', '--init_from=resume', flag, check=False,
                     in_process=True)
        assert kept in one_line_error(proc) and flag[2:].split('=')[0] in one_line_error(proc)


def test_a_run_directory_has_one_writer(tmp_path):
    """While a train.py holds a run directory, a second one on it refuses in one line naming the
    holder, before touching anything; the lock goes with its process."""
    import fcntl
    data = write_prepared(tmp_path / 'data')
    (tmp_path / 'o').mkdir()
    with open(tmp_path / 'o' / 'lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('pid 4242 on somehost\n')
        held.flush()
        proc = train(data, tmp_path / 'o', '--max_iters=1', check=False)
        assert 'is in use by another train.py (pid 4242 on somehost)' in one_line_error(proc)
        assert not (tmp_path / 'o' / 'ckpt.pt').exists()
    train(data, tmp_path / 'o', '--max_iters=1')  # free again
    assert load_ckpt(tmp_path / 'o')['iter_num'] == 1


def test_resume_in_another_dtype_works_and_says_so(tmp_path):
    """A bf16 checkpoint has no loss scale (its GradScaler is off); resumed in fp16 it starts a new
    scale instead of failing on the empty state; the note names both dtypes."""
    data = write_prepared(tmp_path / 'data')
    train(data, tmp_path / 'o', '--max_iters=2', '--dtype=bfloat16')
    assert load_ckpt(tmp_path / 'o')['dtype'] == 'bfloat16'
    proc = train(data, tmp_path / 'o', '--init_from=resume', '--max_iters=4', '--dtype=float16')
    assert 'note: resuming a bfloat16 run in float16' in proc.stdout
    ckpt = load_ckpt(tmp_path / 'o')
    assert ckpt['iter_num'] == 4 and ckpt['dtype'] == 'float16' and ckpt['scaler']['scale'] > 0


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    """SIGINT during the imports (before the training loop's handler) ends the run with one line."""
    import time
    data = write_prepared(tmp_path / 'data')
    proc = subprocess.Popen([sys.executable, 'train.py', *TRAIN_TINY, f'--data_dir={data}',
                             f'--out_dir={tmp_path}/o'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # importing torch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip() == 'error: interrupted before training began', err


def test_the_stop_flag_group_gets_the_ddp_timeout(tmp_path):
    """On GPUs the per-step stop flag goes through a gloo group: it must wait ddp_timeout_minutes
    like the NCCL group, not gloo's default 30 minutes. Run on a CPU with CUDA and the process
    groups faked; train.py stops at its first use of autocast, after both groups exist."""
    data = write_prepared(tmp_path / 'data')
    argv = ['train.py', '--device=cuda', '--ddp_timeout_minutes=7', f'--data_dir={data}',
            f'--out_dir={tmp_path}/o']
    code = ("import runpy, sys, torch, torch.distributed as dist, model\n"
            "torch.cuda.is_available = lambda: True\n"
            "torch.cuda.current_device = lambda: 0\n"
            "torch.cuda.set_device = lambda d: None\n"
            "torch.cuda.get_device_capability = lambda *a: (9, 0)\n"
            "torch.cuda.get_arch_list = lambda: ['sm_90']\n"
            "dist.init_process_group = lambda **k: print('init', k['timeout'])\n"
            "dist.new_group = lambda **k: print('group', k.get('backend'), k.get('timeout'))\n"
            "model.autocast = lambda *a: sys.exit(0)\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    proc = run_script('-c', code, env={'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '2'})
    assert proc.stdout.splitlines() == ['init 0:07:00', 'group gloo 0:07:00'], proc.stdout


def test_a_gpu_without_kernels_for_it_is_one_line_before_any_work(tmp_path):
    """A V100 under a wheel built for sm_75 and newer: one line naming the GPU, not a 'no kernel
    image' traceback at the first operation. Simulated: CUDA faked on a CPU."""
    data = write_prepared(tmp_path / 'data')
    argv = ['train.py', '--device=cuda', f'--data_dir={data}', f'--out_dir={tmp_path}/o']
    code = ("import runpy, sys, torch\n"
            "torch.cuda.is_available = lambda: True\n"
            "torch.cuda.get_device_capability = lambda *a: (7, 0)\n"
            "torch.cuda.get_arch_list = lambda: ['sm_75', 'sm_80', 'sm_90']\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    proc = run_script('-c', code, check=False)
    assert 'no kernels for this GPU (sm_70' in one_line_error(proc)
    assert not os.path.exists(tmp_path / 'o')


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """torch.save failing with ENOSPC while a checkpoint is written: one line saying the disk is
    full and which checkpoint is the last good one; no temporary file is left behind. The full
    disk is simulated: torch.save raises as it would, from the second checkpoint on."""
    data = write_prepared(tmp_path / 'data')
    argv = ['train.py', *TRAIN_TINY, f'--data_dir={data}', f'--out_dir={tmp_path}/o',
            '--max_iters=4', '--ckpt_interval=2', '--eval_interval=100']
    code = ("import errno, runpy, sys, torch\n"
            "save, calls = torch.save, []\n"
            "def full(obj, f, *a, **k):\n"
            "    calls.append(f)\n"
            "    if len(calls) > 1:\n"
            "        open(f, 'wb').write(b'half')\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return save(obj, f, *a, **k)\n"
            "torch.save = full\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    proc = run_script('-c', code, check=False)
    assert f"no space left on {tmp_path / 'o'}" in one_line_error(proc)
    assert load_ckpt(tmp_path / 'o')['iter_num'] == 2  # the last one written whole
    assert not [f for f in os.listdir(tmp_path / 'o') if f.endswith('.tmp')]
