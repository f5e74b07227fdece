"""
metrics.py: FID and KID against independent implementations (torchmetrics, torch-fidelity, exact
Gaussians), the Inception features, prompt fidelity and CLIP score.

    python -m pytest -q tests/test_metrics.py
"""
import math
import os

import numpy as np
import pytest
import torch

from conftest import _toy_emojis
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
    assert metrics.prompt_fidelity(real, real.features(val), targets) == (1.0, 1.0, 0.0)
    # a noisy copy is still recognised: the metric measures which emoji, not exact pixels
    g = torch.Generator().manual_seed(1)
    noisy = (val + 0.1 * torch.randn(val.shape, generator=g)).clamp(0, 1)
    assert metrics.prompt_fidelity(real, real.features(noisy), targets)[0] == 1.0
    # noise with uniformly drawn targets scores chance, 1/K and 5/K, within 4 standard errors
    N = 3000
    top1, top5, se = metrics.prompt_fidelity(
        real, real.features(torch.rand(N, 3, 32, 32, generator=g)),
        torch.randint(real.K, (N,), generator=g), n_per_prompt=3)
    for got, p in ((top1, real.chance(1)), (top5, real.chance(5))):
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / N), (got, p)
    # top-5's standard error over the N / 3 prompts: that of a binomial mean, within 15%
    assert se == pytest.approx(math.sqrt(top5 * (1 - top5) / 3 / (N / 3)), rel=0.15)
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
