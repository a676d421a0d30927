"""Encode throughput of the two full-width tokenizers (ch=128, random weights) on CPU, 256x256 images.

    python benchmarks/bench_vq.py [--batch 4] [--reps 5] [--threads 2]

Prints images/s, the median over reps, for vq.py as it is (contiguous tensors, SDPA attention,
inference_mode); for the same in the channels-last layout, whose GroupNorm loses fp32 accuracy when
activations have a large mean; and for an original-style reference (contiguous, attention by bmm +
softmax, swish as x*sigmoid(x), torch.no_grad), the way latent-diffusion and LlamaGen run.
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch

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


def median_images_per_s(variants, x, reps):
    """Variants run in turn, rep after rep, so load from other processes hits them alike; median time."""
    times = {name: [] for name in variants}
    for rep in range(reps + 1):  # the first round warms up
        for name, fn in variants.items():
            t = time.perf_counter()
            fn(x)
            if rep:
                times[name].append(time.perf_counter() - t)
    return {name: len(x) / statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 256, 256) * 2 - 1
    print(f"encode, 256x256, batch {args.batch}, {args.threads} threads, median of {args.reps}: images/s")
    for name in ("sd-vq-f8", "llamagen-vq-ds8"):
        tok = vq.build_tokenizer(name)
        cl = copy.deepcopy(tok).to(memory_format=torch.channels_last)

        def channels_last(x):
            with torch.inference_mode():
                return cl.quantize(cl.quant_conv(cl.encoder(x.contiguous(memory_format=torch.channels_last))))

        def reference(x):
            with original_style(), torch.no_grad():
                return tok.quantize(tok.quant_conv(tok.encoder(x)))
        encoders = {"vq.py": tok.encode, "channels-last": channels_last, "original-style": reference}
        speed = median_images_per_s(encoders, x, args.reps)
        print(f"  {name:16s} " + "   ".join(f"{k} {v:5.2f}" for k, v in speed.items()), flush=True)


if __name__ == "__main__":
    main()
