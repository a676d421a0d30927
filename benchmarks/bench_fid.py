"""fid.py's costs on CPU, for comparing machines and peers: the Inception pass (uint8 256x256, batch 50), each
metric beyond FID per 1,000 images, and precision/recall's time and memory. Speed does not depend on the
weights' values, so this runs on the random-weight fixture in the official layout.

    python benchmarks/bench_fid.py [--images 200] [--metric-images 1000] [--pr-images 8000]
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fid  # noqa: E402


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def throughput(model, x, batch):
    with torch.inference_mode():
        model(x[:batch])  # warm-up
        dt = timed(lambda: [model(x[i:i + batch]) for i in range(0, len(x), batch)])
    print(f"Inception pass: {len(x) / dt:6.2f} images/s ({len(x)} images {tuple(x.shape[2:])}, "
          f"batch {batch}, cpu x{torch.get_num_threads()}): {1000 * dt / len(x):.0f} s per 1,000 images",
          flush=True)


def metric_costs(model, n):
    """Seconds each metric takes on n images' features (theirs: the pool, spatial and logits of n 64x64
    images, repeated with noise so that covariances are full rank)."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        f = model(torch.randint(0, 256, (50, 3, 64, 64), dtype=torch.uint8, generator=g))
    f = {k: (v.repeat(n // 50, 1) * (1 + 0.1 * torch.rand(n, v.shape[1], generator=g))).numpy()
         for k, v in f.items()}
    s = fid.moments(f["spatial"])
    costs = {"sFID moments (2023-d covariance)": timed(fid.moments, f["spatial"]),
             "sFID distance (one 2023-d sqrtm; FID's is alike)":
                 timed(fid.frechet_distance, s["mu"], s["sigma"], s["mu"], s["sigma"]),
             "IS (torch-fidelity, 10 splits)": timed(fid.inception_score, f["logits"]),
             "KID (100 subsets of 1000: fixed cost)": timed(fid.kid, f["pool"], f["pool"][::-1].copy(),
                                                            subset_size=min(1000, n)),
             f"precision/recall ({n} vs {n})": timed(fid.precision_recall, f["pool"], f["pool"][::-1].copy())}
    for name, t in costs.items():
        print(f"{name:>52}: {t:6.2f} s", flush=True)


def pr_scaling(n, d=2048):
    """Precision/recall of n vs n: seconds, the multiply-adds (radii n^2 d twice, the cross sweep n^2 d) and
    the rate, peak memory over the features; and what ADM's setting (10k reference, 50k samples) costs."""
    x, y = (torch.randn(n, d, generator=torch.Generator().manual_seed(s)).numpy() for s in (1, 2))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dt = timed(fid.precision_recall, x, y)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    macs, adm = 3 * n * n * d, (10_000 ** 2 + 50_000 ** 2 + 10_000 * 50_000) * d
    print(f"precision/recall {n} vs {n}: {dt:.1f} s, {macs / 1e12:.3f} T multiply-adds "
          f"({macs / dt / 1e9:.1f} G/s), peak memory +{peak:.0f} MiB over the features; "
          f"ADM's 10k vs 50k: {adm / 1e12:.2f} T multiply-adds, "
          f"~{adm / (macs / dt) / 60:.1f} min at this rate, features {60_000 * d * 4 / 2 ** 20:.0f} MiB",
          flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--metric-images", type=int, default=1000)
    p.add_argument("--pr-images", type=int, default=8000)
    p.add_argument("--fixtures", default=os.environ.get("PURR_FIXTURES", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures")))
    a = p.parse_args()
    pr_scaling(a.pr_images)  # first: its peak memory is not hidden by the Inception pass's
    model = fid.load_inception(os.path.join(a.fixtures, "inception_random_fp16.pth"))
    x = torch.randint(0, 256, (a.images, 3, a.size, a.size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    throughput(model, x, a.batch_size)
    metric_costs(model, a.metric_images)


if __name__ == "__main__":
    main()
