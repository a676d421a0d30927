"""fid: the numbers of an ImageNet table (FID, sFID, Inception Score, precision and recall, KID) from one
pass of the standard TF-FID Inception-v3, in plain torch.

    python fid.py SAMPLES REF              # each: image folder, ADM sample batch .npz, or statistics .npz
    python fid.py --save-stats A out.npz   # ADM's reference-batch fields: mu, sigma, mu_s, sigma_s, arr_0

The network is the 2015-12-05 TensorFlow Inception graph as pytorch-fid and torch-fidelity port it (no
torchvision needed). Preprocessing defaults to torch-fidelity's TF1 resize, as in the paper and ADM's
evaluator. Each metric follows one reference: FID is TTUR's formula (ADM, torch-fidelity and pytorch-fid
agree); sFID, precision and recall are ADM's evaluator's (guided-diffusion evaluations/evaluator.py); IS and
KID are torch-fidelity's.
"""
import argparse
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from appendix import full_fp32

WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name
WEIGHTS_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the same file
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS
PREPROCESS = ("fidelity", "pytorch-fid")
IMAGE_EXTS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # compared lower-case (ImageNet's .JPEG)
REF_IMAGES = 10_000  # images an ADM reference batch holds in arr_0, for precision and recall


class FIDError(Exception):
    """A problem with the user's files: printed as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------
# Network. Module names are torchvision's, so the official state dict loads strictly.

class Conv(nn.Module):
    """torchvision's BasicConv2d: conv without bias, BN with TF's eps 1e-3, ReLU."""

    def __init__(self, cin, cout, k, s=1, p=0):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def chain(x, *mods):
    for m in mods:
        x = m(x)
    return x


def avg3(x):  # TF's average pool leaves the zero padding out of the mean
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


ROW, COL = dict(k=(1, 7), p=(0, 3)), dict(k=(7, 1), p=(3, 0))  # factorized 7x7
ROW3, COL3 = dict(k=(1, 3), p=(0, 1)), dict(k=(3, 1), p=(1, 0))  # factorized 3x3


class BlockA(nn.Module):  # Mixed_5b-5d: pytorch-fid's FIDInceptionA
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1, self.branch_pool = Conv(cin, 64, 1), Conv(cin, pool, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, p=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, p=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, p=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(avg3(x))], 1)


class BlockB(nn.Module):  # Mixed_6a: torchvision's InceptionB
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = Conv(cin, 384, 3, s=2), Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, s=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):  # Mixed_6b-6e: FIDInceptionC
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1, self.branch_pool = Conv(cin, 192, 1), Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **ROW)
        self.branch7x7_3 = Conv(c7, 192, **COL)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **COL)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **ROW), Conv(c7, c7, **COL)
        self.branch7x7dbl_5 = Conv(c7, 192, **ROW)

    def forward(self, x):
        dbl = [getattr(self, f"branch7x7dbl_{i}") for i in range(1, 6)]
        return torch.cat([self.branch1x1(x), chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, *dbl), self.branch_pool(avg3(x))], 1)


class BlockD(nn.Module):  # Mixed_7a: torchvision's InceptionD
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, s=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, **ROW)
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, **COL), Conv(192, 192, 3, s=2)

    def forward(self, x):
        b7 = [getattr(self, f"branch7x7x3_{i}") for i in range(1, 5)]
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2), chain(x, *b7),
                          F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):  # Mixed_7b: FIDInceptionE_1 (avg pool); Mixed_7c: FIDInceptionE_2 (max pool)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block max-pools (a slip there, kept: it defines FID)
        self.branch1x1, self.branch_pool = Conv(cin, 320, 1), Conv(cin, 192, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **ROW3), Conv(384, 384, **COL3)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, p=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **ROW3), Conv(384, 384, **COL3)

    def forward(self, x):
        b3, d3 = self.branch3x3_1(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pool)], 1)


def resize_tf1(x, size=299):
    """TF1 bilinear resize (align_corners=False): src = dst * in/out, no half-pixel offset. The same float32
    ops in the same order as torch-fidelity's interpolate_compat_tensorflow, so the result is bit-exact."""
    def grid(n):
        pos = (torch.arange(size, dtype=torch.float32, device=x.device)
               * torch.tensor(n / size, dtype=torch.float32))
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n - 1), pos - lo.float()
    (ylo, yhi, dy), (xlo, xhi, dx) = grid(x.shape[2]), grid(x.shape[3])
    top, bot = x[:, :, ylo], x[:, :, yhi]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bot = bot[..., xlo] + (bot[..., xhi] - bot[..., xlo]) * dx
    return top + (bot - top) * dy[:, None]


class InceptionV3(nn.Module):
    """FID Inception-v3: uint8 [N, 3, H, W] -> {"pool": [N, 2048] (FID, precision/recall, KID), "spatial":
    [N, 2023] (sFID), "logits": [N, 1008] (IS)}, float32."""

    def __init__(self, preprocess="fidelity"):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise FIDError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        self.preprocess = preprocess
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, s=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, p=1), Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a, self.Mixed_6b, self.Mixed_6c = BlockB(288), BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e, self.Mixed_7a = BlockC(768, 160), BlockC(768, 192), BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # IS's logits; its bias too, so that the official file loads strictly

    def normalize(self, x):
        if self.preprocess == "fidelity":
            return (resize_tf1(x.float()) - 128) / 128
        return 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1

    @torch.no_grad()
    def forward(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise FIDError(f"expected uint8 images [N, 3, H, W], got {x.dtype} {list(x.shape)}")
        with full_fp32():
            x = chain(self.normalize(x), self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
            x = chain(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
            x = chain(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d)
            # ADM's mixed_6/conv is Mixed_6d's 1x1 branch, the first 192 channels of its output. sFID keeps
            # 7 of them, flattened in TF's NHWC order, so that mu_s and sigma_s compare with ADM's reference
            # batches.
            spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
            pool = chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c).mean((2, 3))
            # the fc without its bias: ADM's softmax/logits/MatMul, torch-fidelity's logits_unbiased
            return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}


# ----------------------------------------------------------------------------------------------
# Weights: --inception PATH, else torch's hub cache (either project's name), else download.

def find_weights(path=None):
    if path is not None:
        if not Path(path).is_file():
            raise FIDError(f"{path}: Inception weights file not found")
        return Path(path)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (WEIGHTS, WEIGHTS_FIDELITY):
        if (cache / name).is_file():
            return cache / name
    try:  # download_url_to_file writes a temp file and renames it: no half-written weights in the cache
        cache.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cache / WEIGHTS))
    except Exception as e:  # offline, proxy, read-only cache: the user's fix is the same
        raise FIDError(f"Inception weights not found and download failed ({type(e).__name__}): put {WEIGHTS} "
                       f"(from {WEIGHTS_URL}) in {cache}/ or pass --inception PATH") from None
    return cache / WEIGHTS


def load_inception(path=None, preprocess="fidelity"):
    """The FID Inception (eval mode, CPU) with the official weights, loaded strictly (fp16 files as
    float32)."""
    path, fix = find_weights(path), f"get a fresh copy of {WEIGHTS} from {WEIGHTS_URL}"
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FIDError(f"{path}: unreadable or truncated weights file ({type(e).__name__}); {fix}") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise FIDError(f"{path}: not a state dict of tensors; {fix}")
    model = InceptionV3(preprocess)
    # num_batches_tracked only counts training steps: files with and without it hold the same weights
    want = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd = {k: v.float() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    shapes = [f"{k} {list(sd[k].shape)} != {list(s)}"
              for k, s in want.items() if k in sd and sd[k].shape != s]
    for what, bad in (("missing keys", sorted(want.keys() - sd.keys())),
                      ("unexpected keys", sorted(sd.keys() - want.keys())), ("wrong shapes", shapes)):
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise FIDError(f"{path}: not the FID Inception weights, "
                           f"{what}: {', '.join(bad[:3])}{more}; {fix}")
    model.load_state_dict(sd, strict=False)  # checked above: only num_batches_tracked may be absent
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Image sources: (count, iterator of uint8 [B, 3, H, W] batches), checked before any network runs.

def to_rgb(img):
    """8-bit RGB. 16-bit and float greys (I;16, I, F) are scaled from 0..65535 and 0..1 first: PIL's
    convert("RGB") clips them to white. A palette with transparency goes through RGBA, as PIL asks."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        scale = 255 if img.mode == "F" else 255 / 65535
        img = Image.fromarray((np.asarray(img, np.float64) * scale).clip(0, 255).round().astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def center_crop(img, size):
    """ADM's center crop (guided-diffusion's center_crop_arr; purr's training crop is the same), RGB first:
    halve with a box filter while the image is at least 2x too large, bicubic to a short side of `size`, the
    center square."""
    img = to_rgb(img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), Image.BICUBIC)
    y, x = (img.height - size) // 2, (img.width - size) // 2
    return np.asarray(img)[y:y + size, x:x + size]


def _read_image(f, crop=None):
    try:
        with Image.open(f) as im:
            if crop:
                return center_crop(im, crop)
            return np.asarray(to_rgb(im))
    except Exception as e:
        raise FIDError(f"{f}: cannot read image ({type(e).__name__})") from None


def _folder(root, batch_size, limit, crop):
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())[:limit]
    if not files:
        raise FIDError(f"{root}: no images ({'/'.join(e[1:] for e in IMAGE_EXTS)}) in this folder")

    def batches():
        size = None
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
            for i in range(0, len(files), batch_size):
                imgs = list(pool.map(_read_image, files[i:i + batch_size], [crop] * batch_size))
                size = size or imgs[0].shape
                for f, im in zip(files[i:], imgs):
                    if im.shape != size:
                        raise FIDError(f"{f}: size {im.shape[1]}x{im.shape[0]} differs from {files[0]}'s "
                                       f"{size[1]}x{size[0]}; pass --center-crop 256 (ADM's crop)")
                yield torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    return len(files), batches()


def _npz(path, batch_size, limit):
    """Streams arr_0 (N x H x W x 3 uint8, ADM's layout) out of the zip: 50k images need not fit in memory."""
    try:
        f = zipfile.ZipFile(path).open("arr_0.npy")
        fmt = np.lib.format
        shape, fortran, dtype = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                                 else fmt.read_array_header_2_0)(f)
    except KeyError:
        raise FIDError(f"{path}: no arr_0 (images) nor mu and sigma (statistics) in this .npz") from None
    except Exception as e:
        raise FIDError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None
    if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or fortran:
        raise FIDError(f"{path}: arr_0 must be N x H x W x 3 uint8 images (ADM's layout), "
                       f"got {dtype} {list(shape)}")
    n = min(shape[0], limit or shape[0])

    def batches():
        with f:
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                a = np.frombuffer(f.read(b * shape[1] * shape[2] * 3), np.uint8).reshape(b, *shape[1:])
                yield torch.from_numpy(a.copy()).permute(0, 3, 1, 2)
    return n, batches()


def images(src, batch_size=50, num_images=None, crop=None):
    """A folder (recursive; its images center-cropped to `crop` if given), an ADM sample batch .npz, or a
    uint8 [N, 3, H, W] tensor, as batches."""
    if torch.is_tensor(src):
        if src.dtype != torch.uint8 or src.ndim != 4 or src.shape[1] != 3:
            raise FIDError(f"expected uint8 images [N, 3, H, W], got {src.dtype} {list(src.shape)}")
        x = src[:num_images]
        n, batches = len(x), (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    elif Path(src).is_dir():
        n, batches = _folder(src, batch_size, num_images, crop)
    elif str(src).endswith(".npz") and Path(src).is_file():
        n, batches = _npz(src, batch_size, num_images)
    else:
        raise FIDError(f"{src}: not found (expected a folder of images or an .npz file)")
    if num_images is not None and n < num_images:
        raise FIDError(f"{src}: {num_images} images asked for, {n} found")
    return n, batches


# ----------------------------------------------------------------------------------------------
# Features, statistics and the metrics.

def features(src, model, batch_size=50, num_images=None, progress_s=15.0, crop=None, keep=0):
    """InceptionV3's {"pool", "spatial", "logits"} of images(src) as float32 arrays [N, D], and with keep > 0
    "images": `keep` of them evenly spaced, N x H x W x 3 uint8 (ADM's arr_0). A progress line on stderr every
    progress_s seconds."""
    n, batches = images(src, batch_size, num_images, crop)
    device, name = next(model.parameters()).device, "tensor" if torch.is_tensor(src) else src
    kept = np.arange(min(keep, n)) * n // max(min(keep, n), 1)
    out, shown, done, t0, last = {}, [], 0, time.time(), time.time()
    for x in batches:
        for k, v in model(x.to(device)).items():
            out.setdefault(k, np.empty((n, v.shape[1]), np.float32))[done:done + len(x)] = v.cpu().numpy()
        shown.append(x[kept[(kept >= done) & (kept < done + len(x))] - done].permute(0, 2, 3, 1).numpy())
        done += len(x)
        if time.time() - last > progress_s and done < n:
            last, rate = time.time(), done / (time.time() - t0)
            print(f"fid: {name}: {done}/{n} images, {rate:.1f} images/s, "
                  f"{(n - done) / rate / 60:.1f} min left", file=sys.stderr, flush=True)
    return {**out, "images": np.concatenate(shown)} if keep else out


def read_stats(path):
    """The statistics of an .npz (ours or ADM's reference batch: mu, sigma, mu_s, sigma_s, images in arr_0;
    pytorch-fid's: mu, sigma), "arr_0": whether it holds images; None when path is not a statistics file."""
    if torch.is_tensor(path) or not str(path).endswith(".npz") or not Path(path).is_file():
        return None
    try:
        with np.load(path) as f:
            if "mu" in f and "sigma" in f:
                n = int(f["num_images"]) if "num_images" in f else None
                return {**{k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in f},
                        "num_images": n, "name": str(path), "arr_0": "arr_0" in f}
    except Exception as e:
        raise FIDError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None


def statistics(src, model=None, batch_size=50, num_images=None, progress_s=15.0, crop=None):
    """What the metrics take of src: mu, sigma, mu_s, sigma_s, num_images, and the features pool and logits
    (of a statistics file: pool, of its arr_0 images). model: load_inception() by default."""
    stats = read_stats(src)
    if stats is not None and not stats.pop("arr_0"):
        return stats
    if stats is not None:  # precision, recall and KID compare with the reference images' own features
        feats = features(src, model or load_inception(), batch_size, None, progress_s)
        return {**stats, "pool": feats["pool"]}
    return summarize(features(src, model or load_inception(), batch_size, num_images, progress_s, crop),
                     "tensor" if torch.is_tensor(src) else str(src))


def summarize(feats, name):
    """statistics() of features(): the moments of the pool and the spatial features, and the features."""
    if len(feats["pool"]) < 2:
        raise FIDError(f"{name}: a covariance needs at least 2 images, got {len(feats['pool'])}")
    spatial = moments(feats["spatial"])
    return {**moments(feats["pool"]), "mu_s": spatial["mu"], "sigma_s": spatial["sigma"], "name": name,
            "pool": feats["pool"], "logits": feats["logits"]}


def moments(feats):
    """{"mu", "sigma", "num_images"} of features [N, D]: mean and covariance in float64."""
    return {"mu": feats.mean(0, dtype=np.float64), "sigma": np.cov(feats, rowvar=False),
            "num_images": len(feats)}


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, handled as pytorch-fid (TTUR) does."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape}, {mu2.shape}; "
                         f"sigma {sigma1.shape}, {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularize both covariances
        print(f"fid: singular covariance product, adding {eps} to the diagonals", file=sys.stderr)
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # round-off leaves a small imaginary part; a large one means broken input
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10, seed=2020):
    """torch-fidelity's IS: exp(E_x KL(p(y|x) || p(y))) in float64 over each of `splits` parts of the images
    in a fixed shuffled order; (mean, std) over the parts. One image repeated scores 1."""
    shuffled = logits[np.random.RandomState(seed).permutation(len(logits))]
    log_p = torch.from_numpy(shuffled).double().log_softmax(1)
    scores = [(part.exp() * (part - part.exp().mean(0).log())).sum(1).mean().exp().item()
              for part in log_p.tensor_split([i * len(log_p) // splits for i in range(1, splits)])]
    return float(np.mean(scores)), float(np.std(scores))


@full_fp32()
def kid(feats1, feats2, subsets=100, subset_size=1000, seed=2020, device="cpu"):
    """torch-fidelity's KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3 between subset_size features
    of feats1 (the samples) and of feats2, drawn without replacement from one RandomState; (mean, std) over
    subsets. The kernels are float32 as torch-fidelity's, their sums float64 (torch-fidelity's: float32)."""
    rng, m, mmd = np.random.RandomState(seed), subset_size, []
    for _ in range(subsets):
        x = torch.from_numpy(feats1[rng.choice(len(feats1), m, replace=False)]).to(device)
        y = torch.from_numpy(feats2[rng.choice(len(feats2), m, replace=False)]).to(device)
        kxx, kyy, kxy = ((a @ b.T / a.shape[1] + 1).pow(3).double() for a, b in ((x, x), (y, y), (x, y)))
        within = kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()
        mmd.append((within / (m * (m - 1)) - 2 * kxy.sum() / m ** 2).item())
    return float(np.mean(mmd)), float(np.std(mmd))


def squared_distances(a, b):
    """ADM's DistanceBlock: |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)


def manifold_radii(feats, k=3, batch=5000):
    """ADM's ManifoldEstimator radii: each feature's squared distance to its k-th nearest neighbour in feats
    (itself the 0th), from batch x batch blocks of distances: never an N x N matrix."""
    radii = []
    for a in feats.split(batch):
        nearest = torch.full((len(a), k + 1), torch.inf, device=a.device)
        for b in feats.split(batch):
            nearest = torch.cat([nearest, squared_distances(a, b)], 1).topk(k + 1, 1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


@full_fp32()
def precision_recall(ref, samples, k=3, batch=5000, device="cpu"):
    """ADM's improved precision and recall (Kynkäänniemi et al. 2019) on features [N, D]: precision, the
    fraction of samples within the k-NN radius of some reference; recall, of references within that of some
    sample. Distances in float32 (ADM's: float16 where that does not overflow)."""
    ref, samples = torch.from_numpy(ref).to(device), torch.from_numpy(samples).to(device)
    r_ref, r_samples = manifold_radii(ref, k, batch), manifold_radii(samples, k, batch)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    samples_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for i in range(0, len(ref), batch):
        for j in range(0, len(samples), batch):
            d = squared_distances(ref[i:i + batch], samples[j:j + batch])
            samples_in[j:j + batch] |= (d <= r_ref[i:i + batch, None]).any(0)
            ref_in[i:i + batch] |= (d <= r_samples[j:j + batch]).any(1)
    return samples_in.float().mean().item(), ref_in.float().mean().item()


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def metrics(samples, ref, device=None):
    """Every metric of samples against ref (statistics() of each), as {name: (value, its convention)}; a
    metric whose inputs a side lacks has (the reason, None). KID, precision and recall run on `device`
    (default: a GPU when there is one), in full fp32."""
    device = device or default_device()
    def lacking(sides, key, what):
        return next((f"{s['name']} has no {what}" for s in sides if key not in s), None)
    out = {"FID": (frechet_distance(samples["mu"], samples["sigma"], ref["mu"], ref["sigma"]),
                   "pool_3 (2048-d); TTUR's formula, as ADM, torch-fidelity and pytorch-fid")}
    why = lacking((samples, ref), "mu_s", "mu_s, sigma_s (remake it with fid.py --save-stats)")
    out["sFID"] = (why, None) if why else (
        frechet_distance(samples["mu_s"], samples["sigma_s"], ref["mu_s"], ref["sigma_s"]),
        "mixed_6/conv[..., :7] (17x17x7); ADM's evaluator")
    why = lacking((samples,), "logits", "images (a statistics file: IS needs the samples themselves)")
    splits = min(10, len(samples.get("logits", ())))
    out["IS"] = (why, None) if why else (inception_score(samples["logits"], splits),
                                         f"{splits} shuffled splits, fc without bias; torch-fidelity")
    why = lacking((samples, ref), "pool", "images (arr_0) to take pool features of")
    n, m = len(samples.get("pool", ())), len(ref.get("pool", ()))
    why = why or (min(n, m) <= 3 and f"{min(n, m)} images on a side: precision and recall need over k = 3")
    pr = (None, None) if why else precision_recall(ref["pool"], samples["pool"], device=device)
    convention = f"k=3 pool_3 manifolds, {m} reference, {n} sample images; ADM's"
    for name, v in zip(("precision", "recall"), pr):
        out[name] = (why, None) if why else (v, convention)
    size = min(1000, n, m)
    out["KID"] = (why, None) if why else (kid(samples["pool"], ref["pool"], subset_size=size, device=device),
                                          f"(x.y/2048 + 1)^3, 100 subsets of {size}; torch-fidelity")
    return out


def report(results):
    """One line per metric: name, value, convention (or why it was not computed)."""
    lines = []
    for name, (value, convention) in results.items():
        if convention is None:
            lines.append(f"{name:<9}  not computed: {value}")
        else:
            v = f"{value[0]:.6g} ± {value[1]:.2g}" if isinstance(value, tuple) else f"{value:.6g}"
            lines.append(f"{name:<9}  {v:<20}  {convention}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="FID, sFID, IS, precision, recall and KID of samples A vs B.")
    p.add_argument("A", help="folder of images, ADM sample batch .npz (arr_0), or statistics .npz (mu, ...)")
    p.add_argument("B", help="the same kinds as A, e.g. ADM's reference batch; with --save-stats: the output")
    p.add_argument("--save-stats", action="store_true",
                   help=f"write ADM's reference-batch fields of A to B: mu, sigma, mu_s, sigma_s of all its "
                        f"images, {REF_IMAGES} of them evenly spaced (arr_0), num_images")
    p.add_argument("--inception", help=f"path of {WEIGHTS} (default: torch hub cache, else download)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--preprocess", choices=PREPROCESS, default="fidelity",
                   help="fidelity: torch-fidelity's and ADM's TF1 resize (the paper's); "
                        "pytorch-fid: torch resize")
    p.add_argument("--center-crop", type=int, metavar="SIZE",
                   help="center-crop folder images to SIZE^2 as ADM does (ImageNet val: 256)")
    p.add_argument("--device", default=default_device(), help="default: a GPU when there is one")
    p.add_argument("--num-images", type=int,
                   help="use the first N images of each image source, e.g. 10000 for FID-10k "
                        "(not of statistics)")
    a = p.parse_args(argv)
    srcs = [a.A] if a.save_stats else [a.A, a.B]
    try:
        stats = [read_stats(x) for x in srcs]
        for x, s in zip(srcs, stats):  # a wrong path, an empty folder, a bad layout: fails before the weights
            if s is None:
                images(x, a.batch_size, a.num_images, a.center_crop)
        todo = [s for s in stats if s is None or s["arr_0"]]
        model = load_inception(a.inception, a.preprocess).to(a.device) if todo else None
        if a.save_stats:
            if stats[0] is not None:
                raise FIDError(f"{a.A} holds statistics already; --save-stats takes images")
            f = features(a.A, model, a.batch_size, a.num_images, crop=a.center_crop, keep=REF_IMAGES)
            s = summarize(f, a.A)
            fields = {k: s[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "num_images")}
            np.savez(a.B, **fields, arr_0=f["images"])
            print(f"fid: wrote the statistics of {s['num_images']} images, {len(f['images'])} of them as "
                  f"arr_0, to {a.B}", file=sys.stderr)
        else:
            stats = [statistics(x, model, a.batch_size, a.num_images, crop=a.center_crop) for x in srcs]
            print("\n".join(report(metrics(*stats, device=a.device))))
    except FIDError as e:
        sys.exit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main()
