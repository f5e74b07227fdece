"""
One end-to-end run, as a user goes through it: prepare a few emoji at 128 px with the real
offline text encoder and the shipped TAEF2, train config/tiny.py's latent model for 50 steps,
sample from it, tune a flow map from it for 10 steps and sample that, evaluate it. About a minute
on 2 cores.

    python -m pytest -q test_smoke.py     # the whole suite: python -m pytest -q tests test_smoke.py
"""
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))
from conftest import run_script  # noqa: E402


def test_prepare_train_sample_evaluate(tmp_path):
    data, out = tmp_path / 'emoji', tmp_path / 'out'
    run_script('prepare.py', '--limit=48', f'--out_dir={data}', '--dtype=float32')
    meta = json.load(open(data / 'meta.json'))
    assert meta['latent_shape'] == [32, 16, 16] and meta['text_dim'] == 384 and meta['n'] > 200

    proc = run_script('train.py', 'config/tiny.py', f'--data_dir={data}', f'--out_dir={out}',
                      '--max_minutes=0', '--max_iters=50', '--eval_interval=50',
                      '--log_interval=25', '--compile=False', '--dtype=float32',
                      '--sample_steps=4', '--warmup_iters=5')
    losses = [float(line.split('val loss ')[1].split()[0]) for line in proc.stdout.splitlines()
              if 'val loss' in line]
    assert len(losses) == 2 and losses[1] < losses[0], proc.stdout  # iters 0 and 50
    assert os.path.isfile(out / 'samples' / 'iter_000050.png')

    proc = run_script('sample.py', f'--out_dir={out}', '--prompt', 'a red apple', '--cfg', '7',
                      '--n=2', '--steps=8', '--dtype=float32')
    path = next(line.split(' ', 1)[1] for line in proc.stdout.splitlines()
                if line.startswith('wrote '))
    grid = np.asarray(Image.open(path).convert('RGB'))
    assert path.startswith(str(out)) and grid.shape[0] >= 128 and grid.std() > 5  # not blank

    # few steps: config/tiny_fewstep.py tunes a flow map from it; sample.py takes its sampler
    fewstep = tmp_path / 'fewstep'
    run_script('train.py', 'config/tiny_fewstep.py', f'--init_from={out}', f'--data_dir={data}',
               f'--out_dir={fewstep}', '--max_minutes=0', '--max_iters=10', '--eval_interval=10',
               '--compile=False', '--dtype=float32', '--warmup_iters=2')
    proc = run_script('sample.py', f'--out_dir={fewstep}', '--prompt', 'a red apple', '--n=2',
                      '--steps=2', '--dtype=float32')
    assert '2 flowmap steps, cfg 1' in proc.stdout

    run_script('eval.py', f'--out_dir={out}', '--n_prompts=8', '--n_per_prompt=2', '--steps=4',
               '--fid=False', '--dtype=float32')
    results = json.load(open(out / 'eval.json'))
    assert 'val' in json.dumps(results) and 'top5' in json.dumps(results)
