"""Peak memory of one guided sampling step at ImageNet's shape (32x32 latent, K = 16384, d = 8), measured as
the growth of this process's peak RSS (CPU), for the purr.py found first on PYTHONPATH.

    python benchmarks/sample_memory.py --model S/2 --batch-size 8
    PYTHONPATH=/path/to/older/checkout python benchmarks/sample_memory.py ...   # the same for another version
"""
import argparse
import inspect
import os
import resource
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # after PYTHONPATH
import torch  # noqa: E402

import purr  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="S/2")
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--cfg-scale", type=float, default=1.5)
args = p.parse_args()
a = {**purr.SETTINGS, "model": args.model, "objective": "purr", "latent_size": 32, "latent_channels": 8,
     "codebook_size": 16384, "num_classes": 1000}
model = purr.build_model(a).eval()
codebook, B = torch.randn(16384, 8), args.batch_size
y, z0 = torch.randint(0, 1000, (B,)), torch.randn(B, 8, 32, 32)
purr.sample_latents(model, codebook, y[:1], z0[:1], 0.8, args.cfg_scale, 1)  # warm: allocator, kernels


def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


before = rss()
purr.sample_latents(model, codebook, y, z0, 0.8, args.cfg_scale, 1)
K_wide = B * 32 * 32 * 16384 * 4 / 2 ** 30
print(f"{inspect.getsourcefile(purr)}: {args.model} batch {B} cfg {args.cfg_scale} fp32: "
      f"peak RSS grew {rss() - before:.2f} GiB during one guided step "
      f"(one fp32 [B,32,32,16384] tensor is {K_wide:.2f} GiB)")
