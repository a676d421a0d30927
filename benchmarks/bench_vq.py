"""Encode throughput of the two full-width tokenizers (ch=128, random weights) on CPU, 256x256 images.

    python benchmarks/bench_vq.py [--batch 4] [--reps 3] [--threads 2]

Prints images/s for vq.py as it is (SDPA attention, inference_mode), with channels-last memory
format, and for an original-style reference (attention by bmm + softmax, swish as x*sigmoid(x),
torch.no_grad), which is how latent-diffusion and LlamaGen run the same weights.
"""
import argparse
import contextlib
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


def images_per_s(fn, x, reps):
    fn(x)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return len(x) / min(times)


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
        tok = vq.build_tokenizer(name)
        ours = images_per_s(tok.encode, x, args.reps)
        with original_style():
            ref_fn = lambda x: tok.quantize(tok.quant_conv(tok.encoder(x)))  # noqa: E731
            with torch.no_grad():
                ref = images_per_s(ref_fn, x, args.reps)
        tok.to(memory_format=torch.channels_last)
        cl = images_per_s(lambda x: tok.encode(x.contiguous(memory_format=torch.channels_last)), x, args.reps)
        print(f"  {name:16s} vq.py {ours:6.2f}   channels-last {cl:6.2f}   original-style {ref:6.2f}", flush=True)


if __name__ == "__main__":
    main()
