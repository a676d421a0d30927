"""Encode throughput of the two full-width tokenizers (ch=128, random weights) on CPU, 256x256 images.

    python benchmarks/bench_vq.py [--batch 4] [--reps 3] [--threads 2]

Prints images/s for vq.py as it is (channels-last, SDPA attention, inference_mode), for the same in
the default contiguous memory format, and for an original-style reference (contiguous, attention by
bmm + softmax, swish as x*sigmoid(x), torch.no_grad), the way latent-diffusion and LlamaGen run.
"""
import argparse
import contextlib
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import vq  # noqa: E402


def bmm_attention(self, x):
    """The originals' attention: explicit [hw, hw] weights, softmax, bmm."""
    b, c, h, w = x.shape
    y = self.norm(x)
    q, k, v = (proj(y).reshape(b, c, h * w) for proj in (self.q, self.k, self.v))
    a = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=2)
    return x + self.proj_out(torch.bmm(v, a.transpose(1, 2)).reshape(b, c, h, w))


@contextlib.contextmanager
def original_style():
    attn, silu = vq.AttnBlock.forward, vq.F.silu
    vq.AttnBlock.forward, vq.F.silu = bmm_attention, lambda x: x * torch.sigmoid(x)
    try:
        yield
    finally:
        vq.AttnBlock.forward, vq.F.silu = attn, silu


def best_images_per_s(variants, x, reps):
    """Variants run in turn, rep after rep, so load from other processes hits them alike; best time."""
    best = {}
    for _ in range(reps + 1):  # the first round warms up
        for name, fn in variants.items():
            t = time.perf_counter()
            fn(x)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t) if _ else float("inf")
    return {name: len(x) / t for name, t in best.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 256, 256) * 2 - 1
    print(f"encode, 256x256, batch {args.batch}, {args.threads} threads, best of {args.reps}: images/s")
    for name in ("sd-vq-f8", "llamagen-vq-ds8"):
        tok = vq.build_tokenizer(name)  # channels-last, as vq.py builds it
        flat = copy.deepcopy(tok).to(memory_format=torch.contiguous_format)

        def contiguous(x):
            with torch.inference_mode():
                return flat.quantize(flat.quant_conv(flat.encoder(x)))

        def reference(x):
            with original_style(), torch.no_grad():
                return flat.quantize(flat.quant_conv(flat.encoder(x)))
        speed = best_images_per_s({"vq.py": tok.encode, "vq.py contiguous": contiguous, "original-style": reference},
                                  x, args.reps)
        print(f"  {name:16s} " + "   ".join(f"{k} {v:5.2f}" for k, v in speed.items()), flush=True)


if __name__ == "__main__":
    main()
