"""The denoiser: shapes, the conditioning, exact fine-tuning starts, precision and checkpoints."""
import math

import pytest
import torch

from conftest import tiny_denoiser
from diffusion import generate, training_loss
from model import Denoiser, load_checkpoint, resize_positional_table, resolve_dtype


def test_denoiser_shapes_and_nonsquare_grid():
    model = tiny_denoiser(image_size=(16, 8))
    x, sigma, text = torch.randn(3, 3, 16, 8), torch.rand(3), torch.randn(3, 8)
    assert model(x, sigma, text).shape == (3, 3, 16, 8)
    # each sample is computed independently of the others in the batch
    torch.testing.assert_close(model(x[:1], sigma[:1], text[:1]), model(x, sigma, text)[:1],
                               rtol=1e-4, atol=1e-5)


def test_base_config_sizes():
    """The reference's block at its size has its published ~101M parameters; the default block
    adds the per-sample adaLN modulations."""
    with torch.device('meta'):
        reference = Denoiser(conditioning='cross', text_prior=0)
        default = Denoiser()
    assert 100e6 < reference.num_params() < 103e6
    assert 120e6 < default.num_params() < 128e6


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
    table = model.pos_emb.detach()
    assert resize_positional_table(table, (8, 8)) is table  # same size: the same table
    bigger = resize_positional_table(table, (16, 16))
    assert bigger.shape == (1, 16, 16, 64)
    # bilinear: a 2x upsample keeps the mean; the model runs at the size it implies
    assert abs(bigger.mean().item() - table.mean().item()) < 1e-2 * table.abs().mean().item()
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
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.rand(2),
                                               torch.randn(2, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ----- the conditioning -----


CONDITIONING_OPTIONS = [dict(), dict(conditioning='cross', text_prior=0),
                        dict(conditioning='cross'), dict(text_prior=0)]


def test_adaln_zero_blocks_start_as_the_identity():
    """With zero-initialised modulation every gate is 0, so each block returns its input
    exactly; the first training step moves the gates off zero."""
    model = tiny_denoiser()
    x, cond = torch.randn(2, 64, 64), torch.randn(2, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(x, cond, (8, 8)), x, rtol=0, atol=0)
    text = torch.randn(2, 8)
    training_loss(model, torch.randn(2, 3, 16, 16), text, 'x0', 1.0, 1.0, 0.15).backward()
    assert model.blocks[0].modulation.weight.grad.abs().sum() > 0


def test_text_prior_starts_at_zero_and_follows_the_caption():
    """The prior's output layer starts at zero: at first the caption's grid changes nothing; once
    it has learnt, it moves the tokens, at any grid size (its 8x8 grid resized)."""
    model = tiny_denoiser(text_prior=8)
    x, sigma, text = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 8)
    before = model(x, sigma, text)
    torch.nn.init.normal_(model.prior_in.weight)
    assert torch.equal(model(x, sigma, text), before)  # zero-initialised output
    torch.nn.init.normal_(model.prior_out.weight)
    assert not torch.allclose(model(x, sigma, text), before, atol=1e-3)
    assert model(torch.randn(2, 3, 48, 48), sigma, text).shape == (2, 3, 48, 48)  # 24x24 tokens


@pytest.mark.parametrize('options', CONDITIONING_OPTIONS, ids=lambda o: str(o) or 'default')
def test_conditioning_options_train_save_reload_and_sample(options, tmp_path):
    from model import denoiser_from_checkpoint
    model = tiny_denoiser(**options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, text = torch.randn(8, 3, 16, 16), torch.randn(8, 8)
    losses = []
    for _ in range(5):
        loss = training_loss(model, x0, text, 'x0', 1.0, 2.5, 0.15)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    args = dict(n_channels=3, image_size=16, patch_size=2, embed_dim=64, n_layers=2, head_dim=32,
                mlp_multiplier=2, text_emb_size=8, **options)
    torch.save({'model': model.state_dict(), 'model_args': args}, tmp_path / 'ckpt.pt')
    reloaded = denoiser_from_checkpoint(torch.load(tmp_path / 'ckpt.pt', weights_only=True))
    g = torch.Generator().manual_seed(0)
    out = generate(reloaded, text[:2], cfg=3.0, steps=3, generator=g)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(out, generate(model.eval(), text[:2], cfg=3.0, steps=3, generator=g))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_finetune_from_builds_the_model_its_args_describe():
    """A fine-tune at a new size, with new inputs and another dropout: the model trained is the
    model that its saved args rebuild, and step 0 computes what the checkpoint's model did."""
    from model import denoiser_from_checkpoint, finetune_from
    args = dict(n_channels=3, image_size=16, patch_size=2, embed_dim=64, n_layers=2, head_dim=32,
                mlp_multiplier=2, text_emb_size=8, conditioning='adaln', text_prior=8)
    old = tiny_denoiser(**{k: v for k, v in args.items() if k not in ('image_size',)})
    ckpt = {'model': old.state_dict(), 'ema': old.state_dict(), 'model_args': args}
    model, new_args = finetune_from(ckpt, (32, 32), cond_channels=4, dropout=0.25)
    assert new_args['image_size'] == 32 and new_args['cond_channels'] == 4
    assert new_args['dropout'] == 0.25 == model.blocks[0].attn.dropout
    rebuilt = denoiser_from_checkpoint({'model': model.state_dict(), 'model_args': new_args})
    x, sigma, text = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 8)
    cond = torch.randn(2, 4, 32, 32)
    torch.testing.assert_close(rebuilt(x, sigma, text, cond), model.eval()(x, sigma, text, cond))
    same, _ = finetune_from(ckpt, (16, 16), cond_channels=4)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(same.eval()(x, sigma, text, torch.randn(2, 4, 16, 16)),
                               old.eval()(x, sigma, text), rtol=1e-5, atol=1e-6)


def test_cross_attention_attends_to_the_context():
    """The reference block's cross-attention: a softmax over the context's keys, per head."""
    model = tiny_denoiser(conditioning='cross', text_prior=0)
    cross = model.blocks[0].cross
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 2, 64)
    w_q, w_k, w_v = cross.qkv.weight.chunk(3)  # (D, D) each
    q = (x @ w_q.T).view(2, 5, 2, 32).transpose(1, 2)  # (B, h, N, d)
    k, v = ((ctx @ w.T).view(2, 2, 2, 32).transpose(1, 2) for w in (w_k, w_v))
    w = (q @ k.transpose(-1, -2) / 32 ** 0.5).softmax(-1)  # (B, h, N, L)
    expected = (w @ v).transpose(1, 2).reshape(2, 5, 64)
    torch.testing.assert_close(cross(x, ctx), expected, rtol=1e-5, atol=1e-5)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    """bf16 on CPUs with native bf16 and on GPUs from compute capability 8; fp16 (with a
    GradScaler) on older GPUs; fp32 on CPUs that would only emulate bf16."""
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True)
    assert resolve_dtype('auto', 'cpu') == 'bfloat16'
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    assert resolve_dtype('auto', 'cpu') == 'float32'
    assert resolve_dtype('float16', 'cpu') == 'float16'  # as asked
    for capability, expected in (((7, 0), 'float16'), ((7, 5), 'float16'), ((8, 0), 'bfloat16'),
                                 ((9, 0), 'bfloat16')):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None, c=capability: c)
        assert resolve_dtype('auto', 'cuda:0') == expected


@pytest.mark.parametrize('content', [b'\x00' * 100 + bytes(range(256)), b'PK\x03\x04garbage'])
def test_a_file_that_is_not_a_checkpoint_is_named_and_never_loaded_unsafely(tmp_path, content):
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(tmp_path))
    message = str(err.value)
    assert 'not a nanoTLD checkpoint' in message and str(path) in message
    assert 'weights_only=False' not in message and '\n' not in message
    torch.save({'weights': torch.zeros(2)}, path)  # a real torch file, but not ours
    with pytest.raises(ValueError, match='not a nanoTLD checkpoint'):
        load_checkpoint(str(path))


@pytest.mark.parametrize('fast', [True, False])
def test_the_cpu_attention_fast_path_computes_what_sdpa_does(monkeypatch, fast):
    """The one switch: with or without the bf16 training path, the same values and gradients."""
    import model as model_module
    monkeypatch.setattr(model_module, 'CPU_BF16_TRAINING_ATTENTION', fast)
    q, k, v = (torch.randn(2, 4, 16, 32, requires_grad=True) for _ in range(3))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model_module.attention(q, k, v)
    out.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    expected = torch.softmax(q.detach() @ k.detach().transpose(-1, -2) / 32 ** 0.5, -1) @ v.detach()
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    (torch.softmax(q2 @ k2.transpose(-1, -2) / 32 ** 0.5, -1) @ v2).sum().backward()
    for g, t in zip(grads, (q2, k2, v2)):
        torch.testing.assert_close(g, t.grad, atol=5e-2, rtol=5e-2)


def test_a_gpu_that_torch_cannot_use_is_named_in_one_line(monkeypatch):
    """A driver too old for the wheel's CUDA (torch sees no GPU though one is there), or a GPU the
    wheel has no kernels for (a V100, sm_70, under a CUDA 13 wheel): gpu_problem() says so."""
    import model
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(model.os.path, 'exists', lambda p: p == '/proc/driver/nvidia')
    assert 'an NVIDIA GPU is here but torch' in model.gpu_problem()
    monkeypatch.setattr(model.os.path, 'exists', lambda p: False)
    monkeypatch.setattr(model.shutil, 'which', lambda name: None)
    assert model.gpu_problem() is None  # no GPU at all: nothing to say
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    wheel = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120', 'compute_120']
    monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: wheel)
    for capability, problem in (((7, 0), True), ((7, 5), False), ((8, 9), False),
                                ((12, 1), False), ((6, 1), True)):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: capability)
        why = model.gpu_problem()
        assert (why is not None) == problem, (capability, why)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: (7, 0))
    assert 'no kernels for this GPU (sm_70' in model.gpu_problem()
