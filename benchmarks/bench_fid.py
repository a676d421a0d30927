"""Inception feature throughput of fid.py on uint8 images (256x256, batch 50), for comparing machines
and peers. Speed does not depend on the weights' values, so this runs on the random-weight fixture in
the official layout.

    python benchmarks/bench_fid.py [--images 200] [--fixtures ../shared/fixtures]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fid  # noqa: E402


def throughput(name, fn, x, batch):
    with torch.inference_mode():
        fn(x[:batch])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            fn(x[i:i + batch])
        dt = time.perf_counter() - t0
    print(f"{name:>15}: {len(x) / dt:6.2f} images/s ({len(x)} images {tuple(x.shape[2:])}, batch {batch}, "
          f"cpu x{torch.get_num_threads()})", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--fixtures", default=os.environ.get("PURR_FIXTURES", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures")))
    a = p.parse_args()
    weights = os.path.join(a.fixtures, "inception_random_fp16.pth")
    x = torch.randint(0, 256, (a.images, 3, a.size, a.size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = fid.load_inception(weights).eval()
    throughput("fid.py", ours, x, a.batch_size)


if __name__ == "__main__":
    main()
