"""A quality metric for the built-in demo data that needs no download: a small CNN classifier trained
on fresh demo images (seed 1; the generators train on seed 0). Its 64-d penultimate features give a
Fréchet distance to real held-out images (seed 2), its predictions the class accuracy of
class-conditional samples.

    python benchmarks/demo_metric.py               # train (~1 min on 2 CPU cores) or load, score fresh
                                                   # real images
    python benchmarks/demo_metric.py SAMPLES.npz   # score an ADM batch from
                                                   # `purr.py sample --out SAMPLES.npz`
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fid  # noqa: E402
import appendix  # noqa: E402

TRAIN_SEED, HELD_OUT_SEED = 1, 2
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "demo_classifier.pt")


def conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class Classifier(nn.Module):
    """32x32 -> three conv stages (32, 64, 128 channels, each halving the size) -> 64-d features -> 10 logits.
    The features are taken before the ReLU, so no unit is constantly 0 and their covariance has full
    rank. The real held-out statistics (ref_mu, ref_sigma) are buffers: the cache file carries them."""

    def __init__(self, feat=64, classes=len(appendix.DEMO_CLASSES)):
        super().__init__()
        self.body = nn.Sequential(conv(3, 32), conv(32, 32), nn.MaxPool2d(2),
                                  conv(32, 64), conv(64, 64), nn.MaxPool2d(2),
                                  conv(64, 128), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128 * 16, feat))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feat, classes))
        self.register_buffer("ref_mu", torch.zeros(feat, dtype=torch.float64))
        self.register_buffer("ref_sigma", torch.eye(feat, dtype=torch.float64))

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def train_classifier(n=8000, epochs=4, batch=128, seed=0):
    torch.manual_seed(seed)
    images, labels = appendix.demo_dataset(n, seed=TRAIN_SEED)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (n // batch))
    for _ in range(epochs):
        for idx in torch.randperm(n)[:n // batch * batch].view(-1, batch):
            loss = F.cross_entropy(clf(appendix.to_unit(images[idx]))[1], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


@torch.no_grad()
def features_and_predictions(clf, images, batch=500):
    """uint8 [N,3,32,32] -> (float64 features [N,64], predicted labels [N])."""
    out = [clf(appendix.to_unit(images[i:i + batch])) for i in range(0, len(images), batch)]
    return torch.cat([f for f, _ in out]).double().numpy(), torch.cat([l.argmax(1) for _, l in out])


def load_classifier(cache=None, n_ref=2000, **train):
    """The classifier from `cache` (default benchmarks/results/demo_classifier.pt), trained and saved
    there first if missing (train: train_classifier's arguments), with the statistics of n_ref real
    held-out images."""
    cache = cache or CACHE
    if os.path.isfile(cache):
        clf = Classifier()
        clf.load_state_dict(torch.load(cache, weights_only=True))
        return clf.eval()
    t0 = time.time()
    clf = train_classifier(**train)
    images, labels = appendix.demo_dataset(n_ref, seed=HELD_OUT_SEED)
    feats, pred = features_and_predictions(clf, images)
    ref = fid.moments(feats)
    clf.ref_mu.copy_(torch.from_numpy(ref["mu"]))
    clf.ref_sigma.copy_(torch.from_numpy(ref["sigma"]))
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    torch.save(clf.state_dict(), cache)
    print(f"demo classifier: trained in {time.time() - t0:.0f} s, held-out accuracy "
          f"{(pred == labels).float().mean():.4f} ({n_ref} images) -> {cache}", flush=True)
    return clf


def demo_fd_and_accuracy(clf, images, labels):
    """Fréchet distance of the images' features to the real held-out ones, and the fraction of images
    the classifier assigns to their intended labels."""
    feats, pred = features_and_predictions(clf, images)
    ours = fid.moments(feats)
    fd = fid.frechet_distance(ours["mu"], ours["sigma"], clf.ref_mu.numpy(), clf.ref_sigma.numpy())
    return fd, (pred == labels).float().mean().item()


def load_samples(path):
    """An ADM sample batch (arr_0: N x 32 x 32 x 3 uint8, arr_1: labels) -> (uint8 [N,3,32,32],
    labels [N])."""
    with np.load(path) as f:
        if "arr_1" not in f:
            raise SystemExit(f"{path}: no labels (arr_1); write it with 'purr.py sample --out {path}'")
        images, labels = f["arr_0"], f["arr_1"]
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise SystemExit(f"{path}: arr_0 is {images.dtype} {images.shape}, "
                         "not N x 32 x 32 x 3 uint8 demo images")
    if len(images) < 2 or len(labels) != len(images):
        raise SystemExit(f"{path}: {len(images)} images and {len(labels)} labels; "
                         "need >= 2 images, one label each")
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels.astype(np.int64)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", nargs="?", help="ADM .npz from 'purr.py sample --out SAMPLES.npz' (default: "
                   "score 2,000 fresh real demo images)")
    a = p.parse_args()
    clf = load_classifier()
    if a.samples:
        fd, acc = demo_fd_and_accuracy(clf, *load_samples(a.samples))
        print(f"demo FD {fd:.2f}  accuracy {acc:.4f}")
    else:
        images, labels = appendix.demo_dataset(2000, seed=HELD_OUT_SEED + 1)
        fd, acc = demo_fd_and_accuracy(clf, images, labels)
        print(f"fresh real demo images (seed {HELD_OUT_SEED + 1}, 2000): accuracy {acc:.4f}, FD {fd:.3f}")
