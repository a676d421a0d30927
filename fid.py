"""fid: Fréchet Inception Distance with the standard TF-FID Inception-v3, in plain torch.

    python fid.py A B                      # A, B: image folder, ADM sample batch .npz, or statistics .npz
    python fid.py --save-stats A out.npz   # statistics once, reused by later FID-10k/50k runs

The network is the 2015-12-05 TensorFlow Inception graph as pytorch-fid and torch-fidelity port it (no
torchvision needed). Preprocessing defaults to torch-fidelity's TF1 resize, as in the paper and ADM's evaluator.
"""
import argparse
import contextlib
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

from appendix import IMAGE_EXTS, center_crop  # shared with purr's training data

WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name
WEIGHTS_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the same file
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS
PREPROCESS = ("fidelity", "pytorch-fid")


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
        return torch.cat([self.branch3x3(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
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
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2), chain(x, *b7), F.max_pool2d(x, 3, 2)], 1)


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
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n - 1), pos - lo.float()
    (ylo, yhi, dy), (xlo, xhi, dx) = grid(x.shape[2]), grid(x.shape[3])
    top, bot = x[:, :, ylo], x[:, :, yhi]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bot = bot[..., xlo] + (bot[..., xhi] - bot[..., xlo]) * dx
    return top + (bot - top) * dy[:, None]


class InceptionV3(nn.Module):
    """FID Inception-v3: uint8 [N, 3, H, W] -> float32 [N, 2048] pool features."""

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
        self.fc = nn.Linear(2048, 1008)  # unused for FID; present so the official file loads strictly

    def normalize(self, x):
        if self.preprocess == "fidelity":
            return (resize_tf1(x.float()) - 128) / 128
        return 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1

    @torch.no_grad()
    def forward(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise FIDError(f"expected uint8 images [N, 3, H, W], got {x.dtype} {list(x.shape)}")
        # TF32 convolutions (default on Ampere and later) would move the features by ~1e-3
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if x.is_cuda else contextlib.nullcontext():
            x = chain(self.normalize(x), self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
            x = chain(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
            x = chain(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
            return x.mean((2, 3))


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
    """The FID Inception (eval mode, CPU) with the official weights, loaded strictly (fp16 files as float32)."""
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
    shapes = [f"{k} {list(sd[k].shape)} != {list(s)}" for k, s in want.items() if k in sd and sd[k].shape != s]
    for what, bad in (("missing keys", sorted(want.keys() - sd.keys())),
                      ("unexpected keys", sorted(sd.keys() - want.keys())), ("wrong shapes", shapes)):
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise FIDError(f"{path}: not the FID Inception weights, {what}: {', '.join(bad[:3])}{more}; {fix}")
    model.load_state_dict(sd, strict=False)  # checked above: only num_batches_tracked may be absent
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Image sources: (count, iterator of uint8 [B, 3, H, W] batches), checked before any network runs.

def _read_image(f, crop=None):
    try:
        with Image.open(f) as im:
            if crop:
                return center_crop(im, crop)
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise FIDError(f"{f}: cannot read image ({type(e).__name__})") from None


def _folder(root, batch_size, limit, crop):
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:limit]
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
        raise FIDError(f"{path}: arr_0 must be N x H x W x 3 uint8 images (ADM's layout), got {dtype} {list(shape)}")
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
# Statistics and the distance.

def features(src, model, batch_size=50, num_images=None, progress_s=15.0, crop=None):
    """Inception features [N, 2048] float32 of images(src); a progress line on stderr every progress_s seconds."""
    n, batches = images(src, batch_size, num_images, crop)
    device, name = next(model.parameters()).device, "tensor" if torch.is_tensor(src) else src
    out, done, t0, last = np.empty((n, 2048), np.float32), 0, time.time(), time.time()
    for x in batches:
        out[done:done + len(x)] = model(x.to(device)).cpu().numpy()
        done += len(x)
        if time.time() - last > progress_s and done < n:
            last, rate = time.time(), done / (time.time() - t0)
            print(f"fid: {name}: {done}/{n} images, {rate:.1f} images/s, {(n - done) / rate / 60:.1f} min left",
                  file=sys.stderr, flush=True)
    return out


def read_stats(path):
    """{"mu", "sigma", "num_images"} of a statistics .npz (ours, pytorch-fid's, or ADM's reference batch, whose
    mu/sigma win over its arr_0), or None when path is not one."""
    if torch.is_tensor(path) or not str(path).endswith(".npz") or not Path(path).is_file():
        return None
    try:
        with np.load(path) as f:
            if "mu" in f and "sigma" in f:
                n = int(f["num_images"]) if "num_images" in f else None
                return {"mu": f["mu"].astype(np.float64), "sigma": f["sigma"].astype(np.float64), "num_images": n}
    except Exception as e:
        raise FIDError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None


def statistics(src, model=None, batch_size=50, num_images=None, progress_s=15.0, crop=None):
    """{"mu", "sigma", "num_images"} of a statistics .npz, or of images(src) through model (load_inception())."""
    stats = read_stats(src)
    if stats is not None:
        return stats
    feats = features(src, model or load_inception(), batch_size, num_images, progress_s, crop)
    if len(feats) < 2:
        raise FIDError(f"{src}: a covariance needs at least 2 images, got {len(feats)}")
    return moments(feats)


def moments(feats):
    """{"mu", "sigma", "num_images"} of features [N, D]: mean and covariance in float64."""
    return {"mu": feats.mean(0, dtype=np.float64), "sigma": np.cov(feats, rowvar=False), "num_images": len(feats)}


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, handled as pytorch-fid (TTUR) does."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Fréchet Inception Distance between A and B.")
    p.add_argument("A", help="folder of images, ADM sample batch .npz (arr_0), or statistics .npz (mu, sigma)")
    p.add_argument("B", help="the same kinds as A; with --save-stats: the output .npz")
    p.add_argument("--save-stats", action="store_true", help="write A's mu, sigma and num_images to B")
    p.add_argument("--inception", help=f"path of {WEIGHTS} (default: torch hub cache, else download)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--preprocess", choices=PREPROCESS, default="fidelity",
                   help="fidelity: torch-fidelity's and ADM's TF1 resize (the paper's); pytorch-fid: torch resize")
    p.add_argument("--center-crop", type=int, metavar="SIZE",
                   help="center-crop folder images to SIZE^2 as ADM does (ImageNet val: 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-images", type=int,
                   help="use the first N images of each image source, e.g. 10000 for FID-10k (not of statistics)")
    a = p.parse_args(argv)
    srcs = [a.A] if a.save_stats else [a.A, a.B]
    try:
        stats = [read_stats(x) for x in srcs]
        todo = [x for x, s in zip(srcs, stats) if s is None]
        for x in todo:  # a wrong path, an empty folder or a bad layout fails before the weights load
            images(x, a.batch_size, a.num_images, a.center_crop)
        model = load_inception(a.inception, a.preprocess).to(a.device) if todo else None
        stats = [s or statistics(x, model, a.batch_size, a.num_images, crop=a.center_crop) for x, s in zip(srcs, stats)]
        if a.save_stats:
            np.savez(a.B, **{k: v for k, v in stats[0].items() if v is not None})
            print(f"fid: wrote the statistics of {stats[0]['num_images']} images to {a.B}", file=sys.stderr)
        else:
            print(f"{frechet_distance(stats[0]['mu'], stats[0]['sigma'], stats[1]['mu'], stats[1]['sigma']):.6f}")
    except FIDError as e:
        sys.exit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main()
