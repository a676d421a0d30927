"""purr: Purrception, variational flow matching over vector-quantized image latents.

A frozen VQ tokenizer maps an image to code indices c (one per latent position) and to the latent
z_1 = e_c. A DiT reads the interpolant z_t = t z_1 + (1 - t) z_0, z_0 ~ N(0, I), and predicts a
categorical posterior pi over the K codebook vectors at every position (Eq. 12), trained with
cross-entropy against c (Eq. 14). Sampling integrates the velocity (mu - z_t)/(1 - t) with
mu = sum_k pi_k e_k (Eq. 13), pi = softmax(logits / tau) (Eq. 15), then decodes the nearest codes.

Reading order: the DiT; Purrception (embed, interpolant, Eq. 14 in cross_entropy_z, Algorithm 1's loss in
purr_loss, Eq. 12 and 15 in posterior, Eq. 13 in posterior_mean and purr_velocity, Algorithm 2 in
algorithm2); the baselines; training (SETTINGS and DEMO, train); sampling (sample); then extract, bench and
the command line. The plumbing around them (data and the batch plan, processes and signals, checkpoints,
logs, image outputs) is in appendix.py.

    python purr.py train                      # built-in demo data + tiny tokenizer, a few CPU minutes
    python purr.py sample --tau 0.8           # grid of samples from the newest checkpoint
    torchrun --nproc_per_node=8 purr.py train --model XL/2 --data /imagenet/train --vq llamagen-vq-ds8 ...
"""
import argparse
import collections
import contextlib
import copy
import functools
import json
import math
import os
import re
import sys
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid
import vq as vqlib
from appendix import (DEMO_CLASSES, DIST_TIMEOUT, ImageFolder, Log, Progress, PurrError, RankBatches,
                      TokenFolder, Unreadable, checkpoint_paths, collate, default_precision, demo_dataset,
                      extract_tokens, full_fp32, heat_map, ignore_stop_signals, keep_freed_memory,
                      load_checkpoint, new_run_dir, on_rank_0, peak_memory, save_grid, save_run,
                      setup_distributed, split_batch, stop_requests, sum_over_ranks, tf32, timed, to_unit,
                      write_adm_npz)


# ==============================================================================================
# DiT backbone (Peebles & Xie 2023) with a categorical head: K logits for every latent position.

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    out = pos.reshape(-1, 1).double() * omega
    return torch.cat([out.sin(), out.cos()], 1)


def sincos_2d(dim, grid_size):
    """DiT's fixed 2-D table: first half encodes the column, second half the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], 1).float()


class TimestepEmbedder(nn.Module):
    """DiT's sinusoidal embedding of time_scale * t: 1000 t spans DiT's frequency range (max period 10^4) as
    its diffusion steps do; the authors' code embeds t itself (time_scale 1), as SiT does."""

    def __init__(self, hidden, freq_dim=256, time_scale=1000.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = self.time_scale * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], 1))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


class DiTBlock(nn.Module):
    """adaLN-Zero: the condition c regresses shift, scale and a zero-initialized gate per branch."""

    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def hidden(self, x, c):
        """The adaLN-modulated hidden state [B, tokens, hidden] that the linear map turns into the outputs."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x, c):
        return self.linear(self.hidden(x, c))


class DiT(nn.Module):
    """Input z [B,d,H,W], time t [B] in [0,1], labels y [B] (y = num_classes is the null class of
    classifier-free guidance; the training loop drops labels). Output in token order [B, tokens, p*p, out],
    each token's p x p latent positions (unpatchify puts them in latent order): out = K logits per position
    (Purrception; K + 1 for DFM) or d channels (the CFM baselines). Losses and mu are per position, so they
    work in token order and never copy the K-wide logits into image order. With vocab_size (DFM), z is token
    indices [B,H,W], read as the authors' code does: a learned embedding of each, then the patch conv. The
    K-way head is the largest tensor by far (p*p*K logits per token), so training and sampling never build it
    whole: forward(..., head=False) returns the final layer's hidden state instead (the logits are
    final_layer.linear of it; sampling's Logits applies it a chunk at a time), and forward(..., codes=c)
    returns the training loss computed from that hidden state (cross_entropy_z): inside forward, so that DDP
    and torch.compile see the head's weights used."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, num_classes=1000, codebook_size=16384, out_channels=None,
                 time_scale=1000.0, vocab_size=None):
        super().__init__()
        self.in_channels, self.num_classes, self.patch = in_channels, num_classes, patch_size
        self.grad_checkpoint = False
        self.out_channels = out_channels or codebook_size
        self.token_embedder = nn.Embedding(vocab_size, hidden_size) if vocab_size else None
        self.x_embedder = nn.Conv2d(hidden_size if vocab_size else in_channels, hidden_size, patch_size,
                                    stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        grid = input_size // patch_size
        # Frozen but a parameter, as in DiT (so it is counted, and averaged by the EMA).
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # ViT-style init everywhere, then DiT's special cases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        if self.token_embedder is not None:
            nn.init.normal_(self.token_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, t, y, codes=None, z_weight=0.0, head=True):
        """The outputs in token order; head=False: the final layer's hidden state [B, tokens, hidden]; codes
        [B,H,W] (Purrception's and DFM's training): (loss, cross-entropy, z-loss) of Eq. 14 and App. D against
        them, from the hidden state (cross_entropy_z), with z_weight the z-loss's weight."""
        if self.token_embedder is not None:
            z = self.token_embedder(z).permute(0, 3, 1, 2)
        x = self.x_embedder(z).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():  # recompute in backward: memory for compute
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        if head and codes is None:
            return self.final_layer(x, c).unflatten(2, (self.patch ** 2, -1))
        h = self.final_layer.hidden(x, c)
        if codes is None:
            return h
        linear = self.final_layer.linear
        return cross_entropy_z(h, linear.weight, linear.bias, patchify(codes, self.patch), z_weight)

    def forward_with_cfg(self, z, t, y, cfg_scale, lazy=False):
        """Classifier-free guidance on every output channel (all K logits): out_u + s (out_c - out_u). lazy:
        the guided logits as Logits, computed later a chunk at a time from the guided hidden state: the head
        is affine, so W (h_u + s (h_c - h_u)) + b = l_u + s (l_c - l_u), the same logits without two K-wide
        ones."""
        if cfg_scale == 1.0:
            out = self(z, t, y, head=not lazy)
        else:
            null = torch.full_like(y, self.num_classes)
            both = self(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null]), head=not lazy)
            cond, uncond = both.chunk(2)
            # in place when sampling, so guidance adds no output-sized tensor
            lerp = torch.lerp if torch.is_grad_enabled() else torch.Tensor.lerp_
            out = lerp(uncond, cond, cfg_scale)
        return Logits(out, self.final_layer.linear, self.patch) if lazy else out


def unpatchify(x):
    """Token order [B, tokens, p*p, C] -> latent order [B, C, H, W]."""
    B, N, pp, C = x.shape
    g, p = math.isqrt(N), math.isqrt(pp)
    return x.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


def patchify(c, p):
    """Latent order [B, H, W] (codes) -> token order [B, tokens, p*p]: the inverse of unpatchify."""
    B, H, W = c.shape
    return c.view(B, H // p, p, W // p, p).transpose(2, 3).reshape(B, -1, p * p)


# (depth, width, heads). DiT's S, B, L, XL; T and N are ours, for CPU runs (N is the demo's).
DIT_SIZES = {"N": (4, 128, 2), "T": (6, 256, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
             "XL": (28, 1152, 16)}
DiT_models = {f"{name}/{p}": functools.partial(DiT, depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for name, (d, h, n) in DIT_SIZES.items() for p in ((1, 2, 4) if name in "NT" else (2, 4, 8))}


# ==============================================================================================
# Purrception (Sec. 3). A tokenizer maps an image to codes c and to z_1 = e_c; z_t interpolates
# towards z_1 from noise z_0. The network's logits give the posterior pi over the K codes at every
# position (Eq. 12), tempered by tau (Eq. 15); its mean mu = sum_k pi_k e_k gives the velocity
# (Eq. 13). Training is cross-entropy against c (Eq. 14, Algorithm 1); sampling integrates the
# velocity (Algorithm 2).

Batch = collections.namedtuple("Batch", "c y z0 t u")  # codes, labels, noise z_0, times t, DFM's uniforms


def embed(codebook, c):
    """z_1 = e_c: codes [B,h,w] -> latents [B,d,h,w]."""
    return codebook[c].permute(0, 3, 1, 2)


def interpolant(z0, z1, t):
    """z_t = t z_1 + (1 - t) z_0, with t [B]."""
    t = t.view(-1, 1, 1, 1)
    return t * z1 + (1 - t) * z0


# Latent positions whose K logits exist at once: in the training loss (each of its chunks also adds a W-sized
# product to the weight's gradient, so fewer, larger ones), and in sampling's mu, entropy and draws.
LOSS_POSITIONS_PER_CHUNK = 4096
POSITIONS_PER_CHUNK = 1024


def cross_entropy_z(h, weight, bias, c, z_weight=1e-5, chunk=None):
    """Eq. 14, -log q(c | z_t) = -log pi_c averaged over positions, and App. D's z-loss z_weight (log Z)^2, Z
    = sum_k exp(logit_k), for the logits l = h W^T + b of the final layer: (their sum, the loss; the
    cross-entropy; the z-loss). h [..., hidden] (each token's hidden state), W [p*p*K, hidden], b [p*p*K],
    codes c [..., p*p] (each token's p*p positions). The logits are never held whole: CrossEntropyZ makes them
    a chunk of positions at a time (chunk, LOSS_POSITIONS_PER_CHUNK by default) and takes the gradient right
    there. Equal in value and gradient to F.cross_entropy and logsumexp on the whole logits (tested)."""
    chunk = chunk or LOSS_POSITIONS_PER_CHUNK
    if torch.is_grad_enabled() and any(x.requires_grad for x in (h, weight, bias)):
        return CrossEntropyZ.apply(h, weight, bias, c, z_weight, chunk)
    ce, zloss = cross_entropy_z_chunks(h, weight, bias, c, z_weight, chunk)[:2]
    return ce + zloss, ce, zloss


class CrossEntropyZ(torch.autograd.Function):
    """cross_entropy_z's autograd: the forward pass computes the loss and its gradients with respect to h, W
    and b chunk by chunk (cross_entropy_z_chunks), so no logits are kept for the backward pass or computed
    again; the backward pass scales them. Only the loss is differentiable; the cross-entropy and the z-loss
    are its two terms, for the log."""

    @staticmethod
    def forward(ctx, h, weight, bias, c, z_weight, chunk):
        ce, zloss, *grads = cross_entropy_z_chunks(h, weight, bias, c, z_weight, chunk, grads=True)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, zloss)
        return ce + zloss, ce, zloss

    @staticmethod
    def backward(ctx, g, g_ce, g_zloss):
        # In place: a second backward through the same graph fails loudly instead of scaling twice.
        grads = [x.mul_(g) if need else None for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        return *grads, None, None, None


def cross_entropy_z_chunks(h, weight, bias, c, z_weight, chunk, grads=False):
    """(cross-entropy, z-loss) of cross_entropy_z, and with grads the gradients of their sum with respect to
    h, W and b. The linear map runs as the DiT's would (bf16 under autocast); log Z, pi and the gradient of
    the logits in fp32, the one-hot subtracted in fp32 before the cast (in bf16, pi_c - 1 is 0 for pi_c >
    0.999)."""
    P, shape = c.shape[-1], h.shape  # positions per token
    h, c = h.reshape(-1, shape[-1]), c.reshape(-1, P)
    K, N, device = len(weight) // P, c.numel(), h.device.type
    autocast = torch.is_autocast_enabled(device) and h.dtype == torch.float32
    dtype = torch.get_autocast_dtype(device) if autocast else h.dtype  # the linear map's
    acc = torch.promote_types(dtype, torch.float32)  # log Z, pi and the gradients of W, b: fp32 at least
    h_, w_, b_ = h.to(dtype), weight.to(dtype), bias.to(dtype)
    ce, log_z = [], []
    if grads:
        grad_h = torch.empty_like(h_)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device)
        grad_b = torch.zeros(bias.shape, dtype=acc, device=h.device)
    rows = max(1, chunk // P)  # tokens per chunk
    with torch.autocast(device, enabled=False):
        for s in range(0, len(h_), rows):
            part, codes = h_[s:s + rows], c[s:s + rows].reshape(-1)
            logits = F.linear(part, w_, b_).view(-1, K)  # this chunk's positions x K
            pi = torch.softmax(logits, 1, dtype=acc)
            # log Z = l_j - log pi_j at the most probable code j, where pi_j >= 1/K is exact to fp32 rounding
            top, j = pi.max(1)
            lz = logits.gather(1, j[:, None])[:, 0].to(acc) - top.log()
            log_z.append(lz)
            ce.append(lz - logits.gather(1, codes[:, None])[:, 0].to(acc))  # -log pi_c = log Z - l_c
            if grads:
                # d(ce + zloss)/dl = (pi - onehot(c)) / N + 2 z_weight log Z pi / N
                g = pi.mul_(((1 + 2 * z_weight * lz) / N)[:, None])
                g[torch.arange(len(g), device=g.device), codes] -= 1 / N
                g = g.to(dtype).view(len(part), -1)  # [tokens, p*p*K], as the linear map's output
                grad_h[s:s + rows] = g @ w_
                if dtype == acc:
                    torch.addmm(grad_w, g.t(), part, out=grad_w)  # (FLOP counters miss addmm_)
                else:
                    grad_w += g.t() @ part  # each chunk's product rounded to bf16 once, as the DiT's would be
                grad_b += g.sum(0, dtype=acc)
                del g
            del logits, pi  # before the next chunk's: one chunk's K-wide tensors at a time
    ce, log_z = torch.cat(ce), torch.cat(log_z)
    losses = (ce.mean(), z_weight * log_z.pow(2).mean())
    if not grads:
        return losses
    return (*losses, grad_h.to(h.dtype).view(shape), grad_w.to(weight.dtype), grad_b.to(bias.dtype))


def purr_loss(model, batch, codebook, z_weight):
    """Algorithm 1 on a batch (its z_0 ~ N(0, I) and t ~ U(0, 1) from draw_noise): z_1 = e_c,
    z_t = t z_1 + (1 - t) z_0, cross-entropy of q(c | z_t) (Eq. 14) and the z-loss, which the model computes
    from its final hidden state against the codes (cross_entropy_z), never holding the logits."""
    z_t = interpolant(batch.z0, embed(codebook, batch.c), batch.t)
    loss, ce, zloss = model(z_t, batch.t, batch.y, codes=batch.c, z_weight=z_weight)
    return {"loss": loss, "ce": ce, "zloss": zloss}


class Logits:
    """A DiT's logits in token order, [B, tokens, p*p, K] (shape), never held whole: its final layer's hidden
    state h [B, tokens, hidden] and linear map, applied by chunks() a chunk of tokens at a time (under the
    caller's autocast, as in the DiT)."""

    def __init__(self, h, linear, patch):
        self.h, self.linear, self.patch = h, linear, patch
        self.shape = (*h.shape[:2], patch ** 2, linear.out_features // patch ** 2)

    def chunks(self, positions):
        """The logits [n, K] of about `positions` consecutive positions at a time, in token order."""
        for part in self.h.flatten(0, 1).split(max(1, positions // self.patch ** 2)):
            yield self.linear(part).view(-1, self.shape[-1])


def logit_chunks(logits):
    """Rows [n, K] of logits [..., K], POSITIONS_PER_CHUNK at a time: of a tensor, or made only now
    (Logits)."""
    if isinstance(logits, Logits):
        return logits.chunks(POSITIONS_PER_CHUNK)
    return logits.reshape(-1, logits.shape[-1]).split(POSITIONS_PER_CHUNK)


def posterior(logits, tau):
    """pi = softmax(logits / tau) (Eq. 15), in fp32: the categorical posterior q(c | z_t) = Cat(c | pi) of
    Eq. 12 at every position. logits [..., K]."""
    return torch.softmax(logits.float() / tau, -1)


def posterior_mean(logits, codebook, tau):
    """mu = sum_k pi_k e_k (Eq. 13) with pi = posterior(logits, tau). logits [..., K] or Logits -> mu [...,
    d]. In full fp32 whatever the autocast or TF32 setting, and by chunks of positions: a guided XL/2 batch of
    64 at K = 16384 has 2^30 logits, so each full fp32 copy of pi would be 4 GiB."""
    mu = []
    for part in logit_chunks(logits):  # Logits: made here, as the network would (bf16 under autocast)
        with torch.autocast(codebook.device.type, enabled=False), full_fp32():
            mu.append(posterior(part, tau) @ codebook.float())
    return torch.cat(mu).view(*logits.shape[:-1], -1)


def temperature(tau, t):
    """tau of Eq. 15 at time t: a number, or a schedule t -> tau (see tau_schedule)."""
    return tau(float(t)) if callable(tau) else tau


def network(model, z, t, y, cfg_scale, lazy=False):
    """The (guided) network output at time t, in token order [B, tokens, p*p, C]; cfg_scale a number, or a
    schedule t -> scale (cfg_interval); lazy: its logits as Logits, made a chunk at a time where they are
    used."""
    scale = cfg_scale(float(t)) if callable(cfg_scale) else cfg_scale
    t = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(len(z))
    return model.forward_with_cfg(z, t, y, scale, lazy=lazy)


def purr_velocity(model, codebook, y, tau, cfg_scale, on_logits=None):
    """v_t(z_t) = (mu_t(z_t) - z_t) / (1 - t) (Eq. 13). Guidance combines logits, not velocities: the
    guided posterior stays a distribution over codes, so mu stays in the codebook's convex hull and tau
    tempers guided logits as it tempers unguided ones. on_logits(t, logits) sees every evaluation (Logits: the
    K-wide logits are made only a chunk of positions at a time, in posterior_mean)."""
    def v(t, z):
        logits = network(model, z, t, y, cfg_scale, lazy=True)
        if on_logits is not None:
            on_logits(t, logits)
        mu = posterior_mean(logits, codebook, temperature(tau, t))  # d channels, not K, are reordered
        return (unpatchify(mu) - z) / (1 - t)
    return v


@torch.no_grad()
def algorithm2(v, z0, T):
    """Algorithm 2 (Euler): z_{s+1} = z_s + (1/T) v_{s/T}(z_s) for s = 0..T-1. It never evaluates t = 1,
    where 1/(1 - t) is singular, and its last step lands exactly on mu: z + (1/T)(mu - z)/(1/T) = mu."""
    z = z0
    for s in range(T):
        z = z + v(s / T, z) / T
    return z


ADAPTIVE = ("dopri5", "dopri8", "bosh3", "adaptive_heun")


@torch.no_grad()
def integrate(v, z0, T, method):
    """Other solvers (torchdiffeq) on Algorithm 2's grid t = s/T up to (T-1)/T, where 1/(1-t) <= T, then
    Algorithm 2's last step. Adaptive solvers integrate [0, (T-1)/T] to their tolerance, with a first
    step of 1/T and a step forced to end at (T-1)/T (torchdiffeq otherwise steps past the end).
    integrate(v, z0, T, "euler") equals algorithm2 (tested)."""
    from torchdiffeq import odeint
    z = z0
    if T > 1:
        grid = (torch.arange(T, dtype=torch.float64) / T).to(z0.device, torch.float32)
        opts = {}
        if method in ADAPTIVE:
            grid, opts = grid[[0, -1]], {"first_step": 1 / T, "step_t": grid[-1:]}
        z = odeint(v, z0, grid, method=method, rtol=1e-4, atol=1e-4, options=opts)[-1]
    t_last = torch.tensor((T - 1) / T, device=z.device)
    return z + v(t_last, z) / T


def entropy(logits, tau):
    """Per-position entropy of pi = softmax(logits / tau): the model's uncertainty about the code. logits
    [..., K] or Logits, by chunks of positions as posterior_mean."""
    logp = (torch.log_softmax(part.float() / tau, -1) for part in logit_chunks(logits))
    return torch.cat([-(lp.exp() * lp).sum(-1) for lp in logp]).view(logits.shape[:-1])


# ==============================================================================================
# The baselines of Sec. 4.1 on the same DiT, batch and sampler grid: CFM regresses the velocity
# z_1 - z_0; CFM-endpoint regresses z_1 and moves like Eq. 13 with its prediction in mu's place;
# DFM (Gat et al. 2024) predicts codes from masked codes and samples by discrete jumps.

def cfm_loss(model, batch, codebook, z_weight, endpoint=False):
    """MSE of the network's output against the velocity z_1 - z_0 (CFM), or against z_1 (CFM-endpoint)."""
    z1 = embed(codebook, batch.c)
    out = unpatchify(model(interpolant(batch.z0, z1, batch.t), batch.t, batch.y)).float()
    mse = (out - (z1 if endpoint else z1 - batch.z0)).pow(2).mean()
    return {"loss": mse, "mse": mse}


def cfm_velocity(model, codebook, y, tau, cfg_scale, on_logits=None, endpoint=False):
    """CFM's output is the velocity; CFM-endpoint's predicted z_1 takes mu's place in Eq. 13."""
    if endpoint:
        return lambda t, z: (unpatchify(network(model, z, t, y, cfg_scale)).float() - z) / (1 - t)
    return lambda t, z: unpatchify(network(model, z, t, y, cfg_scale)).float()


def dfm_path(c, t, u, K):
    """x_t = c with probability kappa(t) = t, else MASK (index K): the linear mixture path of the authors'
    code; u ~ U(0,1) per position."""
    return torch.where(u < 1 - t.view(-1, 1, 1), K, c)


def dfm_rate(t):
    """The jump intensity kappa'(t) / (1 - kappa(t)) = 1 / (1 - t) towards x_1."""
    return 1 / (1 - t)


def dfm_loss(model, batch, codebook, z_weight):
    """Cross-entropy of the K + 1 logits (MASK's too, as in the authors' code) against c, and the z-loss, from
    the model's final hidden state as purr_loss."""
    x_t = dfm_path(batch.c, batch.t, batch.u, len(codebook))
    loss, ce, zloss = model(x_t, batch.t, batch.y, codes=batch.c, z_weight=z_weight)
    return {"loss": loss, "ce": ce, "zloss": zloss}


def draw_codes(logits, tau, u, K=None):
    """x ~ Cat(softmax(logits / tau)) over the first K logits (default: all) at every position by the inverse
    CDF of uniforms u [...]: the draw is a function of u, so each image's codes come from its own generator.
    logits [..., C] or Logits; in fp32 chunks, as posterior_mean."""
    u, x, done = u.reshape(-1, 1), [], 0
    for part in logit_chunks(logits):
        part = part[:, :K]
        x.append(torch.searchsorted(posterior(part, tau).cumsum_(-1), u[done:done + len(part)], right=True))
        done += len(part)
    K = K or logits.shape[-1]
    return torch.cat(x).clamp_(max=K - 1).view(logits.shape[:-1])  # u past the rounded total: the last code


@torch.no_grad()
def dfm_sample(model, K, y, shape, seeds, tau=1.0, cfg_scale=1.0, num_steps=100):
    """Discrete Euler on the path from all-MASK (Gat et al. 2024; flow_matching's MixtureDiscreteEulerSolver):
    at t = s/T draw x1 ~ p(x_1 | x_t) over the K codes (x_1 is data: MASK's logit is dropped); where
    x_t != x1, jump to x1 with probability 1 - exp(-h kappa'/(1 - kappa)); the last step returns x1. Image b's
    uniforms come from its own generator, seeded with seeds[b]."""
    T = num_steps
    x = torch.full(shape, K, device=y.device)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    for s in range(T):
        t = s / T
        u = torch.stack([torch.rand(2, *shape[1:], generator=g) for g in gens], 1).to(y.device)  # draw, jump
        logits = network(model, x, t, y, cfg_scale, lazy=True)  # token order, K + 1 logits (MASK's last)
        u1 = patchify(u[0], math.isqrt(logits.shape[2]))
        x1 = unpatchify(draw_codes(logits, temperature(tau, t), u1, K)[..., None])[:, 0]
        if s == T - 1:
            return x1
        x = torch.where((u[1] < 1 - math.exp(-dfm_rate(t) / T)) & (x != x1), x1, x)


def check_dfm_checkpoint(ckpt, path):
    if ckpt["args"]["objective"] == "dfm" and "token_embedder.weight" not in ckpt["ema"]:
        raise PurrError(f"{path} holds purr's earlier DFM (kappa = t^3, codebook vectors in, K logits); DFM "
                        "is now the paper's (kappa = t, an embedding of the codes and MASK, K + 1 logits)")


# Each objective: its training loss, and its velocity (DFM: none, it samples by jumps).
Objective = collections.namedtuple("Objective", "loss velocity")
OBJECTIVES = {"purr": Objective(purr_loss, purr_velocity), "cfm": Objective(cfm_loss, cfm_velocity),
              "cfm-endpoint": Objective(functools.partial(cfm_loss, endpoint=True),
                                        functools.partial(cfm_velocity, endpoint=True)),
              "dfm": Objective(dfm_loss, None)}


@torch.no_grad()
def sample_latents(model, codebook, y, z0, tau=1.0, cfg_scale=1.0, num_steps=100, method="euler",
                   objective="purr", on_logits=None):
    """z_0 -> z_1 with the objective's velocity: Algorithm 2 for Euler, torchdiffeq for other methods."""
    v = OBJECTIVES[objective].velocity(model, codebook, y, tau, cfg_scale, on_logits)
    return algorithm2(v, z0, num_steps) if method == "euler" else integrate(v, z0, num_steps, method)


def sample_codes(model, tok, objective, y, z0, tau=1.0, cfg_scale=1.0, num_steps=100, method="euler",
                 on_logits=None, precision="fp32", seeds=None):
    """Noise z0 [B,d,h,w] -> code indices [B,h,w]: sample_latents and the nearest code of z_1, or DFM's jumps
    (which ignore z0; image b's draws from seeds[b], default b). bf16 runs the DiT in autocast; pi, mu, the
    ODE state and the tokenizer stay fp32."""
    with torch.autocast(z0.device.type, torch.bfloat16, enabled=precision == "bf16"):
        if objective == "dfm":
            seeds = range(len(y)) if seeds is None else seeds
            return dfm_sample(model, len(tok.codebook), y, z0[:, 0].shape, seeds, tau, cfg_scale, num_steps)
        z1 = sample_latents(model, tok.codebook, y, z0, tau, cfg_scale, num_steps, method, objective,
                            on_logits)
    return tok.quantize(z1)


def cfg_interval(cfg_scale, interval=None):
    """Guidance in a limited interval (Kynkaanniemi et al. 2024): the scale at time t is cfg_scale for t in
    [lo, hi] and 1 outside, where the conditional network runs alone (no unconditional pass, the batch is not
    doubled). None: cfg_scale at every t."""
    if interval is None:
        return cfg_scale
    lo, hi = interval
    return lambda t: cfg_scale if lo <= t <= hi else 1.0


def tau_schedule(kind, tau, tau_end=None):
    """tau(t) for sampling: 'constant' tau, or 'linear' from tau at t = 0 to tau_end at t = 1 (Sec. 5's open
    question of temperature schedules)."""
    if kind == "constant":
        return tau
    return lambda t: tau + (tau_end - tau) * t


# ==============================================================================================
# Training: Algorithm 1 over a dataset, as `purr.py train` runs it.

# Every setting of a run, with the defaults of a run on --data: the paper's recipe (App. C, and App. D's
# z-loss), with four choices of the authors' code. `purr.py train --help` shows each flag's default and
# the demo's; a checkpoint stores every value, and a resumed run takes them from it (RESUME_MAY_CHANGE below).
SETTINGS = dict(
    # the model and the objective (App. C, D), DiT's label dropout (for guidance)
    model="S/2", objective="purr", z_loss=1e-5, class_dropout=0.1,
    # optimisation (App. C): AdamW at a constant lr, batch 256, EMA 0.9999; the length is ours (the paper's
    # runs: 1M to 3.5M steps)
    steps=400_000, global_batch_size=256, lr=1e-4, warmup=0, decay=0.0,
    weight_decay=0.01, beta1=0.9, beta2=0.999, adam_eps=1e-6, ema_decay=0.9999,
    # the authors' code: time input t (DiT's 1000 t), torch_ema's warm-up, clipping, t ~ U(t_min, 1)
    time_scale=1.0, ema_warmup=True, max_grad_norm=1.0, t_min=1e-3,
    # data and the frozen tokenizer
    data=None, vq="llamagen-vq-ds8", vq_ckpt=None, image_size=256, demo_size=10_000,
    # how the same update is computed: accumulation, memory, precision ("auto": default_precision())
    grad_accum=1, micro_batch_size=0, grad_checkpoint=False, compile=False, precision="auto", num_workers=8,
    grad_compression="none",
    # logs, checkpoints, grids
    log_every=100, ckpt_every=50_000, keep=0, sample_every=0, seed=0,
)
# The built-in demo (no --data) must show the method in ~3 CPU minutes: the small N/4 (1.8M parameters, 4
# tokens per 8x8 latent: more steps per second beat a wider model or more tokens) for 3,000 steps at lr 3e-3
# decayed linearly to 0 over the last 30 % (the decay buys much of the quality), a short EMA (half-life ~70
# steps), DiT's time input 1000 t; App. C's 1e-4 and 0.9999 need far more steps (benchmarks/README.md).
DEMO = dict(model="N/4", steps=3000, global_batch_size=64, lr=3e-3, decay=0.3, ema_decay=0.99,
            time_scale=1000.0, ema_warmup=False, max_grad_norm=0.0, t_min=0.0, num_workers=0, ckpt_every=1000)
# What a checkpoint saved before these settings existed was trained with: it resumes and samples as it did.
LEGACY = dict(time_scale=1000.0, max_grad_norm=0.0, ema_warmup=False, t_min=0.0)
DEMO_TOKENIZER = dict(codebook_size=256, dim=8, patch=4, iters=8)  # vq.fit_tiny: K, d, patch, k-means steps
# What a resumed run may change: schedule, logging, disk, and how the same global batch is computed.
RESUME_MAY_CHANGE = ("steps", "lr", "warmup", "decay", "log_every", "ckpt_every", "sample_every", "keep",
                     "num_workers", "precision", "grad_accum", "micro_batch_size", "grad_checkpoint",
                     "compile", "grad_compression")


def learning_rate(cfg, step):
    """Linear warm-up over the first `warmup` steps, linear decay to 0 over the last `decay` fraction."""
    lr, steps = cfg["lr"], cfg["steps"]
    if step < cfg["warmup"]:
        lr *= (step + 1) / cfg["warmup"]
    if cfg["decay"] and step >= steps * (1 - cfg["decay"]):
        lr *= (steps - step) / (steps * cfg["decay"])
    return lr


def train_step(model, opt, micro, objective, codebook, z_weight, autocast, max_grad_norm=0.0):
    """One AdamW update from equal micro-batches (Batch) that together are this process's share of the
    global batch: the gradients of loss / N add up to the big batch's, and DDP all-reduces them once, on
    the last micro-batch (no_sync on the others). The global gradient norm (before clipping it to
    max_grad_norm, if > 0) is returned with the losses as `grad_norm`."""
    # DDP's gradients are views of its all-reduce buckets, which stay: zeroed in place, no copy is made of
    # them; a model alone frees its gradients until the backward pass, a lower peak.
    opt.zero_grad(set_to_none=not hasattr(model, "no_sync"))
    n, totals = len(micro), {}
    for i, batch in enumerate(micro):
        with model.no_sync() if i < n - 1 and hasattr(model, "no_sync") else contextlib.nullcontext():
            with autocast:
                losses = OBJECTIVES[objective].loss(model, batch, codebook, z_weight)
            (losses["loss"] / n).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / n
    totals["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf,
                                                   foreach=True)
    opt.step()
    return totals


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, as one multi-tensor update (not a kernel per parameter)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def ema_decay(cfg, n):
    """The decay of the EMA's n-th update (n = 1, 2, ...): ema_decay, or with ema_warmup torch_ema's
    min(ema_decay, (1 + n) / (10 + n)) (the authors' code): shorter early on, so the EMA forgets the random
    init sooner; at 0.9999 it binds for the first 90k updates."""
    return min(cfg["ema_decay"], (1 + n) / (10 + n)) if cfg["ema_warmup"] else cfg["ema_decay"]


def adamw(model, cfg):
    """AdamW with the run's settings (App. C's by default), fused: one kernel for all parameters, on CUDA and
    CPU alike (PyTorch's default on CPU loops over the parameters in Python, ~5x slower in the demo)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                             betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["adam_eps"], fused=True)


def train(args):
    """Algorithm 1 on the global batch of every step (its z_0, t and dropped labels drawn from the seed and
    the step, so any number of processes and micro-batches makes the same update), then the EMA; logs,
    checkpoints and a clean stop on a signal around it."""
    flags = vars(args)  # launch choices and the grids' guidance, stored in nothing
    rank, world, device = setup_distributed(flags.pop("dist_timeout", DIST_TIMEOUT))
    grid_cfg = cfg_interval(flags.pop("cfg_scale", 1.0), check_cfg_interval(flags.pop("cfg_interval", None)))
    ckpt, ckpt_path = find_resume(args, world, device)
    cfg, changed = resolve_config(args, ckpt)
    data, tok = open_data(cfg, device, ckpt_path)
    cfg.update(latent_shape(cfg, data, tok))
    model, ema, opt, step = build_training(cfg, ckpt, ckpt_path, device)
    del ckpt  # restored: XL/2's weights, EMA and AdamW state are ~12 GB of host memory per process
    global_batch, steps = cfg["global_batch_size"], cfg["steps"]
    per_rank, n_micro = split_batch(global_batch, world, cfg["grad_accum"], cfg["micro_batch_size"])
    rows = slice(rank * per_rank, (rank + 1) * per_rank)  # this process's share of the global batch
    ddp = f" ({torch.distributed.get_backend()}, DDP)" if torch.distributed.is_initialized() else ""
    layout = f"{world} process(es){ddp} x {n_micro} micro-batch(es) of {per_rank // n_micro} on {device}"
    run = announce(cfg, model, data, tok, layout, ckpt_path, step, changed) if rank == 0 else None
    net = distributed(model, cfg) if torch.distributed.is_initialized() else model
    net = torch.compile(net) if cfg["compile"] else net
    loader = training_loader(cfg, data, step, rank, world, rows, device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg["precision"] == "bf16")
    codebook, unreadable, last_saved = tok.codebook, Unreadable(data, world), ckpt_path
    log, pending = Log(run, world, global_batch, step), None
    with stop_requests() as stop:
        for x, y, bad, draws in loader:
            fresh = unreadable.fresh([tuple(b) for b in bad])  # (pinned batches come back as lists)
            micro = micro_batches(tok, x, y, draws, n_micro, device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            losses = train_step(net, opt, micro, cfg["objective"], codebook, cfg["z_loss"], autocast,
                                cfg["max_grad_norm"])
            step += 1
            # One all-reduce per step: a stop request, a non-finite loss, new unreadable files on any rank. It
            # is read at the next step, once that step is queued, so the host never waits for the device; one
            # process stops at once (it has no one to agree with).
            flags = (step, fresh, sum_over_ranks(world, device, bool(stop), ~torch.isfinite(losses["loss"]),
                                                 len(fresh), late=True))
            stopping = world == 1 and bool(stop)
            if pending:
                stopping |= read_flags(pending, unreadable, rank, last_saved)
            update_ema(ema, model, ema_decay(cfg, step))
            saving = step % cfg["ckpt_every"] == 0 or step == steps or stopping
            sampling = cfg["sample_every"] and step % cfg["sample_every"] == 0
            if saving or sampling:  # this step's flags now: nothing after a non-finite loss is kept
                stopping |= read_flags(flags, unreadable, rank, last_saved)
                saving, flags = saving or stopping, None
            pending = flags
            log.add(step, losses, len(unreadable.seen), final=step % cfg["log_every"] == 0 or step == steps)
            if saving:
                log.flush()
                last_saved = save_run(run, step, model, ema, opt, cfg, tok, rank, world, device, last_saved)
            if sampling and rank == 0:
                sample_grid(run, step, ema, tok, cfg, device, grid_cfg)
            if stopping:
                print_resume_command(cfg, step, last_saved, rank, world)
                break
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return run


def read_flags(flags, unreadable, rank, last_saved):
    """A step's flags, summed over ranks, once they reach the host (every rank reads them at the same step):
    new unreadable files are named, a non-finite loss stops the run before anything after it is saved.
    Returns whether a rank was asked to stop."""
    step, fresh, read = flags
    stopping, nonfinite, new_bad = read()
    if new_bad:
        unreadable.add(fresh, rank)
    if nonfinite:
        raise PurrError(f"the loss is not finite at step {step}; nothing after step {step - 1} is saved; the "
                        f"last good checkpoint is {last_saved or '(none)'}: resume from it with a lower --lr")
    return bool(stopping)


def distributed(model, cfg):
    """DDP, its gradients views of its all-reduce buckets (no second copy of them); --grad-compression bf16
    all-reduces them in bf16 (half the traffic between nodes, the sum rounded to bf16)."""
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    if cfg["grad_compression"] == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def training_loader(cfg, data, step, rank, world, rows, device):
    """This rank's `rows` of each global batch from `step` on, in the seeded plan of appendix.RankBatches, and
    the step's draws (TrainingBatches): made ahead of the step by the loader's workers, pinned on CUDA."""
    plan = RankBatches(len(data), step, cfg["steps"], cfg["global_batch_size"], rank, world, cfg["seed"])
    steps = zip(range(step, cfg["steps"]), plan)  # the items: (step, its (index, flip) pairs)
    return torch.utils.data.DataLoader(TrainingBatches(data, cfg, rows), sampler=steps, batch_size=None,
                                       collate_fn=TrainingBatches.as_is, num_workers=cfg["num_workers"],
                                       pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)


class TrainingBatches(torch.utils.data.Dataset):
    """Item (step, this rank's (index, flip) pairs) -> its images (or codes), labels with the dropped ones set
    to the null class, the unreadable files met, and the step's (z_0, t, DFM's uniforms) from draw_noise."""

    def __init__(self, data, cfg, rows):
        self.data, self.cfg, self.rows = data, cfg, rows

    def __getitem__(self, item):
        step, items = item
        x, y, bad = collate([self.data[i] for i in items])
        c = self.cfg
        z0, t, drop, u = draw_noise(c["global_batch_size"], self.rows, step, c["seed"], c["latent_size"],
                                    c["latent_channels"], c["class_dropout"], "cpu", c["t_min"])
        return x, torch.where(drop, c["num_classes"], y), bad, (z0, t, u)

    @staticmethod
    def as_is(batch):  # each item is a whole batch already
        return batch


def micro_batches(tok, x, y, draws, n, device):
    """A rank's batch from the loader as n micro-Batches on the device: codes c (images are encoded here, a
    micro-batch at a time), labels (the dropped ones already the null class), and z_0, t, DFM's uniforms."""
    x, y, *draws = (v.to(device, non_blocking=True) for v in (x, y, *draws))
    c = x.chunk(n)
    if x.dim() == 4:  # clone: inference-mode codes -> ordinary tensors, for autograd
        c = [tok.encode(to_unit(images)).clone() for images in c]
    return [Batch(*m) for m in zip(c, *(v.chunk(n) for v in (y, *draws)))]


def draw_noise(global_batch, rows, step, seed, size, d, class_dropout, device, t_min=0.0):
    """z_0, t ~ U(t_min, 1), label drops (and DFM's uniforms) of the whole global batch from (seed, step);
    each rank takes its rows, so the update does not depend on the number of processes or micro-batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    z0 = torch.randn(global_batch, d, size, size, generator=g)[rows]
    t = t_min + (1 - t_min) * torch.rand(global_batch, generator=g)[rows]
    drop = torch.rand(global_batch, generator=g)[rows] < class_dropout
    uniforms = torch.rand(global_batch, size, size, generator=g)[rows]
    return z0.to(device), t.to(device), drop.to(device), uniforms.to(device)


def find_resume(args, world, device):
    """(checkpoint, its path) for --resume (the newest under --results-dir by default), else (None, None).
    Rank 0 picks the newest file, every rank loads that one, and all must have the same step: a rank that
    cannot read it, or reads another step (the node's own copy), stops every rank with one line."""
    if not args.resume:
        return None, None
    newest = lambda: (checkpoint_paths(args.results_dir)[-1:] or [None])[0]  # noqa: E731
    path = on_rank_0(newest) if args.resume == "latest" else args.resume
    ckpt, error = None, ""
    try:
        ckpt = load_checkpoint(path)
    except PurrError as e:
        error = str(e)
    step = ckpt["step"] if ckpt else -1
    failed, differ = sum_over_ranks(world, device, bool(error), step != on_rank_0(lambda: step))
    if failed or differ:
        why = "another rank cannot read it" if failed else "the ranks read different steps from it"
        raise PurrError(error or f"--resume {path}: {why} (each node sees its own files): --results-dir and "
                        "--resume must be on a filesystem that every node sees")
    return ckpt, path


def resolve_config(args, ckpt):
    """The run's settings: the flags given, over the checkpoint's (on resume), over SETTINGS (and DEMO's
    differences without --data). On resume only RESUME_MAY_CHANGE may differ from the checkpoint; the changes
    are returned."""
    given = {k: v for k, v in vars(args).items() if k != "func"}
    saved = {k: v for k, v in saved_settings(ckpt).items() if k in SETTINGS} if ckpt else {}
    demo = saved.get("data", given.get("data")) is None
    cfg = {**SETTINGS, **(DEMO if demo else {}), **saved}
    changed = {k: v for k, v in given.items() if saved and k in SETTINGS and v != cfg[k]}
    k = next((k for k in changed if k not in RESUME_MAY_CHANGE), None)
    if k:
        raise PurrError(f"the checkpoint was trained with {flag(k)} {cfg[k]}, not {given[k]}: resume with "
                        "the same model and data (a resumed run may change only "
                        f"{', '.join(map(flag, RESUME_MAY_CHANGE))})")
    changed = [f"{flag(k)} {cfg[k]} -> {v}" for k, v in changed.items()]
    cfg.update(given)
    cfg["precision"] = default_precision() if cfg["precision"] == "auto" else cfg["precision"]
    if cfg["model"] not in DiT_models:
        raise PurrError(f"unknown --model {cfg['model']}; choose one of {', '.join(DiT_models)}")
    return cfg, changed


def saved_settings(ckpt):
    """A checkpoint's settings; one saved before a setting existed gets LEGACY's value, its behaviour then."""
    return {**LEGACY, **ckpt["args"]}


def flag(k):
    return "--" + k.replace("_", "-")


def open_data(cfg, device, resumed=None):
    """The training data and the frozen tokenizer, on the run's device. With no --data: the built-in demo
    images, a tiny tokenizer fitted on them (DEMO_TOKENIZER; a resumed run's is the one in its checkpoint),
    and all images (and flips) encoded once, on the CPU."""
    if cfg["data"] is None:
        images, labels = demo_dataset(cfg["demo_size"])
        tok = vqlib.load_tokenizer("tiny", resumed) if resumed else \
            vqlib.fit_tiny(to_unit(images), seed=cfg["seed"], **DEMO_TOKENIZER)
        tokens = torch.stack([tok.encode(to_unit(images)), tok.encode(to_unit(images.flip(3)))], 1)
        return TokenFolder(tokens.numpy(), labels, len(DEMO_CLASSES)), tok.to(device)
    if os.path.isfile(os.path.join(cfg["data"], "meta.json")):
        return open_tokens(cfg, device)
    data = ImageFolder(cfg["data"], cfg["image_size"])  # first: a missing folder is the error to report
    return data, vqlib.load_tokenizer(cfg["vq"], cfg["vq_ckpt"]).to(device)


def open_tokens(cfg, device):
    """A folder written by `purr.py extract`: memory-mapped tokens, no encoder in the training loop. Its
    tokenizer is the one it was extracted with (--vq-ckpt: where that file is now), and so is the run's."""
    folder = cfg["data"]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    done = np.load(os.path.join(folder, "done.npy"), mmap_mode="r")
    if not done.all():
        raise PurrError(f"{folder}: extraction is incomplete ({int(done.sum())}/{len(done)} images); "
                        "rerun the same 'purr.py extract' command to finish it")
    cfg.update(vq=meta["vq"], vq_ckpt=cfg["vq_ckpt"] or meta["vq_ckpt"])
    tok = vqlib.load_tokenizer(cfg["vq"], cfg["vq_ckpt"]).to(device)
    paths = (os.path.join(folder, f"{k}.npy") for k in ("tokens", "labels"))
    return TokenFolder(*paths, len(meta["classes"])), tok


def latent_shape(cfg, data, tok):
    """What the data and tokenizer fix: latent size and channels, codebook size, number of classes."""
    probe = data[(0, 0)][0]
    size = probe.shape[-1] // (tok.downsample if probe.dim() == 3 else 1)
    if size % int(cfg["model"].split("/")[1]):
        raise PurrError(f"--model {cfg['model']}: the latent size {size} is not divisible by its patch size")
    return {"latent_size": size, "latent_channels": tok.codebook.shape[1], "codebook_size": len(tok.codebook),
            "num_classes": data.num_classes}


def build_model(cfg):
    """The DiT of a run, from its settings: one place, so train and sample always agree."""
    d, K, objective = cfg["latent_channels"], cfg["codebook_size"], cfg["objective"]
    dfm = objective == "dfm"  # indices with MASK = K in, K + 1 logits out (the authors' DFM)
    return DiT_models[cfg["model"]](input_size=cfg["latent_size"], in_channels=d, codebook_size=K,
                                    num_classes=cfg["num_classes"], vocab_size=K + 1 if dfm else None,
                                    out_channels=d if objective.startswith("cfm") else K + 1 if dfm else None,
                                    time_scale=cfg["time_scale"])


def build_training(cfg, ckpt, path, device):
    """Model, EMA and AdamW (App. C), from the seed or restored from the checkpoint; and the step."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(device)
    model.grad_checkpoint = cfg["grad_checkpoint"]
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = adamw(model, cfg)
    if not ckpt:
        return model, ema, opt, 0
    differ = [f"{flag(k)} {ckpt['args'][k]}" for k in ("latent_size", "latent_channels", "codebook_size",
                                                       "num_classes") if ckpt["args"][k] != cfg[k]]
    if differ:
        raise PurrError(f"{path} was trained with {', '.join(differ)}: resume with the same model and data")
    check_dfm_checkpoint(ckpt, path)
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])  # its lr is set at every step from the run's settings
    return model, ema, opt, ckpt["step"]


def announce(cfg, model, data, tok, layout, ckpt_path, step, changed):
    """The run folder (a new one, or that of the resumed checkpoint) and the run's first line."""
    run = os.path.dirname(os.path.dirname(ckpt_path)) if ckpt_path else new_run_dir(cfg["results_dir"],
                                                                                   cfg["model"])
    print(f"purr train: {cfg['model']} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
          f"{len(data)} images, tokenizer {tok.name} (K={cfg['codebook_size']}, d={cfg['latent_channels']}, "
          f"latent {cfg['latent_size']}x{cfg['latent_size']}), {layout}, {cfg['precision']}, run folder {run}"
          + (f", resumed at step {step}" if ckpt_path else ""), flush=True)
    if changed:
        print("resume: " + ", ".join(changed), flush=True)
    return run


def sample_grid(run, step, ema, tok, cfg, device, cfg_scale=1.0, per_label=4):
    """--sample-every: a grid from the EMA weights in RUN/samples/STEP.png, its noise and labels drawn from
    the run's seed alone, so that successive grids differ by the training only (sample's default tau, 100
    Euler steps; train's --cfg-scale and --cfg-interval)."""
    labels = default_labels(cfg["num_classes"], grid=True)
    y = torch.tensor(labels).repeat_interleave(per_label).to(device)
    seeds, z0 = image_noise(cfg["seed"], range(len(y)), cfg["latent_channels"], cfg["latent_size"], device)
    with torch.no_grad():  # generators only: the training's random state is left as it was
        c = sample_codes(ema, tok, cfg["objective"], y, z0, tau=default_tau(cfg["objective"]),
                         cfg_scale=cfg_scale, precision=cfg["precision"], seeds=seeds)
    os.makedirs(os.path.join(run, "samples"), exist_ok=True)
    save_grid(vqlib.to_uint8(tok.decode(c)), len(labels), os.path.join(run, "samples", f"{step:07d}.png"))


def image_noise(seed, indices, d, size, device):
    """(the seeds, z_0 [B,d,size,size]) of images `indices`: image j's noise, and DFM's draws, come from
    (seed, j) alone, so they do not depend on the batch size or the number of processes."""
    seeds = [seed * 10_000_019 + j for j in indices]
    z0 = torch.stack([torch.randn(d, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return seeds, z0.to(device)


def print_resume_command(cfg, step, last_saved, rank, world):
    """The command that resumes the run: the checkpoint holds every setting, so it needs no other flag."""
    if rank == 0:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = f" --nnodes={world // per_node} --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT" \
            if world > per_node else ""
        launch = "python purr.py" if world == 1 else f"torchrun{nodes} --nproc_per_node={per_node} purr.py"
        where = " (on every node)" if nodes else ""
        print(f"purr train: stopped by signal at step {step}/{cfg['steps']}, saved {last_saved}; resume "
              f"with: {launch} train --resume {last_saved}{where}", flush=True)


# ==============================================================================================
# Sampling: Algorithm 2 for a batch of labels, as `purr.py sample` runs it.

def sample(args):
    """Images from a checkpoint's EMA weights, sharded over processes. Each image's noise comes from (seed,
    its index), so the images do not depend on the number of processes or the batch size."""
    ckpt_path = check_sample_args(args)
    rank, world, device = setup_distributed(args.dist_timeout)
    model, tok, cfg, step = load_sampler(ckpt_path, args.vq_ckpt, device)
    labels, y = sample_labels(args, cfg)
    args.tau = objective_tau(args, cfg)
    n, size, d = len(y), cfg["latent_size"], cfg["latent_channels"]
    shard = range(rank * n // world, (rank + 1) * n // world)  # this process's images
    net = compile_in_place(model) if args.compile else model
    tau = tau_schedule(args.tau_schedule, args.tau, args.tau_end)
    guidance = cfg_interval(args.cfg_scale, args.cfg_interval)
    if rank == 0:
        print(f"purr sample: {n} images from {ckpt_path} on {world} process(es), {device}, {args.precision}",
              file=sys.stderr, flush=True)
    images, entropies, progress = [], [], Progress("sample", n, len(shard), "images")
    full = min(args.batch_size, len(shard))
    for i in range(shard.start, shard.stop, args.batch_size):
        idx = range(i, min(i + args.batch_size, shard.stop))
        # --compile: a last, smaller batch is padded (the next images' noise, the last label), one graph
        padded = range(i, i + full) if args.compile else idx
        seeds, z0 = image_noise(args.seed, padded, d, size, device)
        record = entropy_recorder(tau, args.entropy_t, entropies) if args.entropy_map else None
        c = sample_codes(net, tok, cfg["objective"], y[[min(j, n - 1) for j in padded]].to(device), z0, tau,
                         guidance, args.num_steps, args.method, record, args.precision, seeds)
        c = c[:len(idx)]
        if record:
            entropies[-1] = entropies[-1][:len(idx)]
        images.append(vqlib.to_uint8(tok.decode(c)).cpu())
        if rank == 0:
            progress.update(len(idx))
    pixels = size * tok.downsample
    images = torch.cat(images) if images else torch.zeros(0, 3, pixels, pixels, dtype=torch.uint8)
    np.save(f"{args.out}.rank{rank}.npy", images.permute(0, 2, 3, 1).numpy())
    if args.entropy_map:  # each rank's share, merged by rank 0 as the images are
        h = torch.cat(entropies or [torch.zeros(0, size, size)])
        np.save(f"{args.out}.rank{rank}.entropy.npy", h.cpu().numpy())
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        schedule = f" -> {args.tau_end} ({args.tau_schedule})" if args.tau_schedule != "constant" else ""
        interval = f" for t in [{args.cfg_interval[0]}, {args.cfg_interval[1]}]" if args.cfg_interval else ""
        recipe = (f"{n} samples from {ckpt_path} (EMA, step {step}, {cfg['objective']}), tau={args.tau}"
                  f"{schedule} cfg={args.cfg_scale}{interval} {args.method} x{args.num_steps} "
                  f"seed={args.seed}")
        write_samples(args, world, labels, y, recipe, device)
        if args.entropy_map:
            write_entropy_map(args, world, labels, cfg["codebook_size"], pixels)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def write_entropy_map(args, world, labels, K, pixels):
    """Rank 0 merges the ranks' entropies into a grid beside the samples, 0 black .. log K white."""
    shards = [f"{args.out}.rank{r}.entropy.npy" for r in range(world)]
    h = torch.from_numpy(np.concatenate([np.load(s) for s in shards])) / math.log(K)
    path = os.path.splitext(args.out)[0] + "_entropy.png"
    save_grid(heat_map(h, pixels), len(labels), path)
    for s in shards:
        os.remove(s)
    print(f"entropy of pi at t={args.entropy_t} (0 black .. log K white) -> {path}")


def compile_in_place(model):
    """torch.compile of what sampling runs. It calls forward_with_cfg, which calls the module itself, and
    torch.compile(model) is a wrapper whose forward_with_cfg is the eager module's: compile the call."""
    model.compile()
    return model


def check_sample_args(args):
    """One line for each bad flag; the checkpoint to sample from."""
    if (args.tau is not None and args.tau <= 0) or (args.tau_end is not None and args.tau_end <= 0):
        raise PurrError(f"--tau {args.tau}: the softmax temperature must be > 0 (the paper uses 0.8-0.9)")
    if (args.tau_schedule == "linear") != (args.tau_end is not None):
        raise PurrError("--tau-schedule linear goes from --tau at t = 0 to --tau-end at t = 1: give both, "
                        "or neither")
    check_cfg_interval(args.cfg_interval)
    if args.num_steps < 1:
        raise PurrError(f"--num-steps {args.num_steps}: need at least 1 integration step (default 100)")
    last = (args.num_steps - 1) / args.num_steps  # the sampler's last evaluation of pi, t = (T - 1)/T
    if args.entropy_map and not 0 <= args.entropy_t <= last:
        raise PurrError(f"--entropy-t {args.entropy_t}: with --num-steps {args.num_steps} the sampler "
                        f"evaluates pi at t from 0 to {last:g}; choose t in that range")
    if not args.out.endswith((".png", ".npz")):
        raise PurrError(f"--out {args.out}: write a grid (.png) or an ADM sample batch (.npz)")
    if args.fid_ref and not os.path.isfile(args.fid_ref):
        raise PurrError(f"--fid-ref {args.fid_ref} not found; make it with "
                        "'python fid.py --save-stats VAL_DIR ref.npz'")
    ckpt_path = args.ckpt or (checkpoint_paths(args.results_dir) or [None])[-1]
    if ckpt_path is None:
        raise PurrError(f"no checkpoint under {args.results_dir}/; train first ('python purr.py train') or "
                        "pass --ckpt PATH")
    return ckpt_path


def check_cfg_interval(interval):
    """--cfg-interval LO HI, or one line; returned as given."""
    if interval and not 0 <= interval[0] <= interval[1] <= 1:
        raise PurrError(f"--cfg-interval {interval[0]:g} {interval[1]:g}: guidance applies for t in "
                        "[LO, HI]; give 0 <= LO <= HI <= 1")
    return interval


def objective_tau(args, cfg):
    """--method and --tau for the checkpoint's objective -> the tau to sample at. DFM jumps by discrete Euler
    steps only, and samples at tau = 1 (its model's own distribution) unless --tau is given; others at 0.8."""
    dfm = cfg["objective"] == "dfm"
    if dfm and args.method != "euler":
        raise PurrError(f"--method {args.method}: DFM samples by discrete Euler jumps (--method euler); "
                        "the ODE solvers are for purr, cfm and cfm-endpoint")
    return args.tau if args.tau is not None else default_tau(cfg["objective"])


def default_tau(objective):
    return 1.0 if objective == "dfm" else 0.8


def sample_labels(args, cfg):
    """(the labels shown, one per image): a grid has one row per label; a batch for FID cycles through
    the labels, so classes are balanced."""
    classes, grid = cfg["num_classes"], args.out.endswith(".png")
    labels = args.class_labels or default_labels(classes, grid)
    if args.entropy_map and cfg["objective"] != "purr":
        raise PurrError(f"--entropy-map shows the entropy of Purrception's posterior over codes; this "
                        f"{cfg['objective']} checkpoint has none")
    if not all(0 <= label < classes for label in labels):
        raise PurrError(f"--class-labels must lie in [0, {classes - 1}]")
    n = args.num_samples or 8 * len(labels)
    y = torch.tensor(labels).repeat_interleave(math.ceil(n / len(labels)))[:n] if grid else \
        torch.tensor(labels)[torch.arange(n) % len(labels)]
    return labels, y


def default_labels(classes, grid):
    """Every class for a small label set or an FID batch; a grid of a large one shows 8 classes (ImageNet's:
    DiT's sample classes, dog, otter, ...), evenly spread otherwise."""
    if classes <= 16 or not grid:
        return list(range(classes))
    if classes == 1000:
        return [207, 360, 387, 974, 88, 979, 417, 279]
    return [i * (classes - 1) // 7 for i in range(8)]


def entropy_recorder(tau, at, out):
    """An on_logits hook: appends to `out` the entropy of pi at the first evaluation with t >= at, in image
    order."""
    done = False

    def record(t, logits):
        nonlocal done
        if not done and t >= at:
            out.append(unpatchify(entropy(logits, temperature(tau, t))[..., None])[:, 0])
            done = True
    return record


def write_samples(args, world, labels, y, recipe, device):
    """Rank 0 merges the ranks' shards into the grid or the ADM batch, then scores it against --fid-ref on
    the device it sampled on (the Inception's convolutions and the metrics' products in full fp32)."""
    shards = [f"{args.out}.rank{r}.npy" for r in range(world)]
    if args.out.endswith(".png"):
        images = torch.from_numpy(np.concatenate([np.load(s) for s in shards])).permute(0, 3, 1, 2)
        save_grid(images, len(labels), args.out)
    else:
        write_adm_npz(args.out, shards, y.numpy())
    for s in shards:
        os.remove(s)
    print(f"purr sample: {recipe} -> {args.out}", flush=True)
    if args.fid_ref:
        model = fid.load_inception().to(device)
        results = fid.metrics(fid.statistics(args.out, model), fid.statistics(args.fid_ref, model), device)
        print(f"vs {args.fid_ref}: {recipe}\n" + "\n".join(fid.report(results)), flush=True)


def load_sampler(ckpt_path, vq_ckpt=None, device="cpu"):
    """EMA model, tokenizer, settings and step of a checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    cfg, spec = saved_settings(ckpt), ckpt["vq"]
    tok = vqlib.load_tokenizer("tiny", ckpt_path) if spec["name"] == "tiny" else \
        vqlib.load_tokenizer(spec["name"], vq_ckpt or spec["ckpt"])
    check_dfm_checkpoint(ckpt, ckpt_path)
    model = build_model(cfg)
    model.load_state_dict(ckpt["ema"])
    return model.eval().to(device), tok.to(device), cfg, ckpt["step"]


# ==============================================================================================
# Commands: `purr.py extract` and `bench`, the command line. The rest of the plumbing (data and the batch
# plan, processes and signals, checkpoints and logs, image outputs) is in appendix.py.

# `purr.py extract`: encode an image folder once (the loop, resumable, is appendix.extract_tokens).

@torch.inference_mode()
def extract(args):
    """Encode every image and its horizontal flip once into the token folder --out, read by open_tokens."""
    rank, world, device = setup_distributed(args.dist_timeout)
    data = ImageFolder(args.data, args.image_size)
    tok = vqlib.load_tokenizer(args.vq, args.vq_ckpt).to(device)
    if len(tok.codebook) > 65536:
        raise PurrError(f"{args.vq} has {len(tok.codebook)} codes: more than uint16 tokens can hold")
    meta = {"vq": args.vq, "vq_ckpt": os.path.abspath(args.vq_ckpt), "image_size": args.image_size,
            "classes": data.classes}
    extract_tokens(data, tok, args.out, meta, args.batch_size, args.num_workers, rank, world, device)


# ----------------------------------------------------------------------------------------------
# `purr.py bench`: speed and memory on random tokens of ImageNet's shape.

# Peak dense (not 2:4 sparse) bf16 and TF32 tensor throughput (TFLOP/s) of common GPUs, for the MFU that bench
# prints, by a part of torch.cuda.get_device_name(): the first that matches. The PCIe and NVL cards have
# fewer SMs or lower clocks than the SXM ones ("NVIDIA H100 80GB HBM3"); GH200's GPU is an H100 SXM's.
PEAK_TFLOPS = [("H100 PCIe", (756, 378)), ("H100 NVL", (835, 418)), ("H200 NVL", (835, 418)),
               ("H100", (989, 494)), ("H200", (989, 494)), ("A100", (312, 156)), ("GB200", (2500, 1250)),
               ("B200", (2250, 1100)), ("L40S", (362, 183))]


def peak_tflops(device_name, precision):
    """The dense peak of this GPU at the step's precision (TF32 for fp32), or None for a GPU not listed."""
    return next((p[precision == "fp32"] for part, p in PEAK_TFLOPS if part.lower() in device_name.lower()),
                None)


def bench(args):
    """Training: ms per step (forward + backward + AdamW) with the FLOP count and MFU. With --sample:
    sampling throughput with guidance (a 50k FID run's size). Both report peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf32(True)
    check_cfg_interval(args.cfg_interval)
    cfg = {**SETTINGS, "model": args.model, "objective": args.objective, "latent_size": args.latent_size,
           "latent_channels": args.latent_channels, "codebook_size": args.codebook_size, "num_classes": 1000}
    model = build_model(cfg).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    codebook = torch.randn(args.codebook_size, args.latent_channels, device=device)
    B, s, d, K = args.batch_size, args.latent_size, args.latent_channels, args.codebook_size
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    options = (" compiled" if args.compile else "") + (" grad-checkpoint" if args.grad_checkpoint else "")
    head = (f"bench {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M) {args.objective} "
            f"K={K} latent {s}x{s}x{d} batch {B} {args.precision}{options} on {where}")
    if args.sample:
        y, z0 = torch.randint(0, 1000, (B,), device=device), torch.randn(B, d, s, s, device=device)
        tok = types.SimpleNamespace(codebook=codebook, quantize=lambda z: vqlib.nearest_code(z, codebook))
        net = (compile_in_place(model) if args.compile else model).eval()
        ms = timed(device, args.warmup, args.steps, lambda n: sample_codes(
            net, tok, args.objective, y, z0, 1.0, cfg_interval(args.cfg_scale, args.cfg_interval), n, "euler",
            None, args.precision))
        print(f"{head}, sampling with cfg {args.cfg_scale}: {ms:.1f} ms per network evaluation "
              f"({1000 / ms:.2f} NFE/s), {1000 * B / ms / 100:.3f} images/s at 100 Euler steps, "
              f"{peak_memory(device)}")
        return
    fast = torch.compile(model) if args.compile else model
    opt, ema = adamw(model, cfg), copy.deepcopy(model).requires_grad_(False)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def step(net):  # a training step on a fresh random batch, with the EMA update
        batch = Batch(torch.randint(0, K, (B, s, s), device=device),
                      torch.randint(0, 1000, (B,), device=device), torch.randn(B, d, s, s, device=device),
                      torch.rand(B, device=device), torch.rand(B, s, s, device=device))
        train_step(net, opt, [batch], args.objective, codebook, 1e-5, autocast)
        update_ema(ema, model, 0.9999)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:  # one untimed step of the eager model
        step(model)
    ms = timed(device, args.warmup, args.steps, lambda n: [step(fast) for _ in range(n)], per_call=True)
    tflops = counter.get_total_flops() / ms / 1e9
    peak = peak_tflops(where, args.precision) if device.type == "cuda" else None
    outside = 100 * (1 - matmul_share(device, lambda: step(fast)))
    print(f"{head}: {ms:.1f} ms/step, {1000 * B / ms:.1f} img/s, {counter.get_total_flops() / 1e12:.3g} "
          f"TFLOP/step, {tflops:.3g} TFLOP/s{f', MFU {100 * tflops / peak:.1f}%' if peak else ''}, "
          f"{outside:.0f}% of the step outside matrix multiplies, {peak_memory(device)}")


MATMUL = re.compile(r"aten::.*(mm|conv|attention)")  # mm, addmm, bmm, convolutions, attention, and backward


def matmul_share(device, run, n=3):
    """The fraction of n profiled run()s' wall time spent in matrix multiplies (device time on CUDA): one
    measurement for both, so a busy machine cannot put it outside [0, 1]."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return sum(getattr(e, key) for e in prof.key_averages() if MATMUL.match(e.key)) / wall_us


# ----------------------------------------------------------------------------------------------
# The command line.

# The help of train's flags, one per setting, grouped as SETTINGS is.
SETTING_HELP = {
    "the model and the objective": dict(
        model="DiT config: " + ", ".join(DiT_models), objective="purr (Eq. 14) or a baseline of Sec. 4.1",
        z_loss="weight of (log Z)^2 (App. D)", class_dropout="label drop rate, for guidance"),
    "optimisation (App. C)": dict(
        steps="", global_batch_size="", lr="peak learning rate", warmup="steps of linear lr warm-up",
        decay="last fraction of the steps, lr decaying linearly to 0", weight_decay="AdamW's weight decay",
        beta1="AdamW's beta_1", beta2="AdamW's beta_2", adam_eps="AdamW's eps", ema_decay=""),
    "the authors' code": dict(
        time_scale="the DiT embeds time_scale * t (DiT: 1000; the authors' code: 1)",
        ema_warmup="decay min(--ema-decay, (1 + n)/(10 + n)) at update n, as torch_ema does",
        max_grad_norm="clip the global gradient norm to this (0: no clipping)",
        t_min="training t ~ U(t_min, 1)"),
    "data and tokenizer": dict(
        data="image folder, one sub-folder per class, or a token folder from 'extract' (None: the demo)",
        vq="tokenizer: sd-vq-f8 | llamagen-vq-ds8 | tiny", vq_ckpt="the tokenizer's official checkpoint file",
        image_size="", demo_size="images in the built-in demo set"),
    "computing the same update": dict(
        grad_accum="micro-batches per process and step",
        micro_batch_size="images per micro-batch (another way to give --grad-accum; 0: one micro-batch)",
        grad_checkpoint="recompute the DiT blocks' activations in the backward pass (less memory, ~1/3 more "
                        "compute)",
        compile="torch.compile the model", num_workers="",
        precision="bf16 autocast for the DiT; auto: bf16 where the hardware has it fast",
        grad_compression="bf16: DDP all-reduces the gradients in bf16 (half the traffic between nodes)"),
    "logs, checkpoints, grids": dict(
        log_every="", ckpt_every="", keep="keep the newest N checkpoints of the run (0: all)",
        sample_every="every N steps, a grid from the EMA weights in RUN/samples/ (same noise and labels)",
        seed=""),
}
CHOICES = {"objective": list(OBJECTIVES), "precision": ["auto", "bf16", "fp32"],
           "grad_compression": ["none", "bf16"]}


def add_setting(p, k, text):
    """The flag of setting k; its help shows the default and, where it differs, the demo's."""
    default, demo = SETTINGS[k], DEMO.get(k, SETTINGS[k])
    kind = {bool: {"action": argparse.BooleanOptionalAction}, int: {"type": int}, float: {"type": float}}
    shown = f"default: {default}" + (f"; demo: {demo}" if demo != default else "")
    p.add_argument(flag(k), help=f"{text} ({shown})".lstrip(), choices=CHOICES.get(k),
                   **kind.get(type(default), {}))


CFG_INTERVAL_HELP = "guidance only for t in [LO, HI]; elsewhere the conditional network alone (default: 0 1)"


def parser():
    p = argparse.ArgumentParser(prog="purr.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    # A setting's flag has no default of its own: the run's are SETTINGS, DEMO's or its checkpoint's.
    t = sub.add_parser("train", help="train a DiT with the Purrception objective",
                       argument_default=argparse.SUPPRESS,
                       epilog="Defaults: App. C's recipe with --data; the demo's where they differ (purr.py: "
                              "SETTINGS, DEMO).")
    for title, helps in SETTING_HELP.items():
        group = t.add_argument_group(title)
        for k, text in helps.items():
            add_setting(group, k, text)
    grids = t.add_argument_group("the --sample-every grids' guidance (stored in nothing)")
    grids.add_argument("--cfg-scale", type=float, help="(default: 1, no guidance)")
    grids.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help=CFG_INTERVAL_HELP)
    t.add_argument("--results-dir", default="results")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="checkpoint to resume (default: newest); it holds every setting")
    t.set_defaults(func=train)
    s = sub.add_parser("sample", help="sample images from a checkpoint's EMA weights")
    s.add_argument("--ckpt", help="checkpoint (default: the newest under --results-dir)")
    s.add_argument("--results-dir", default="results")
    s.add_argument("--vq-ckpt", help="tokenizer file, if it moved since training")
    s.add_argument("--tau", type=float, help="softmax temperature (Eq. 15): 0.8, DFM 1 (paper: 0.8-0.9)")
    s.add_argument("--tau-schedule", default="constant", choices=["constant", "linear"],
                   help="linear: tau(t) from --tau at t = 0 to --tau-end at t = 1")
    s.add_argument("--tau-end", type=float, help="tau at t = 1 of --tau-schedule linear")
    s.add_argument("--cfg-scale", type=float, default=1.0)
    s.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help=CFG_INTERVAL_HELP)
    s.add_argument("--num-steps", type=int, default=100)
    s.add_argument("--method", default="euler", choices=["euler", "midpoint", "rk4", "dopri5"])
    s.add_argument("--num-samples", type=int, help="default: 8 per class label")
    s.add_argument("--class-labels", type=int, nargs="+")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default="samples.png", help=".png: a grid, one row per label; .npz: ADM batch")
    s.add_argument("--fid-ref", help="reference .npz (fid.py --save-stats, or ADM's reference batch): print "
                                     "FID, sFID, IS, precision, recall and KID of the samples")
    s.add_argument("--entropy-map", action="store_true", help="also save the entropy of pi per position")
    s.add_argument("--entropy-t", type=float, default=0.5, help="the time t of the entropy map")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--precision", choices=["bf16", "fp32"], default=default_precision(),
                   help="bf16 autocast for the DiT; pi, mu and the ODE state stay fp32")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.set_defaults(func=sample)
    e = sub.add_parser("extract", help="encode an image folder (and flips) once into a token folder")
    e.add_argument("--data", required=True, help="image folder, one sub-folder per class")
    e.add_argument("--vq", default="llamagen-vq-ds8")
    e.add_argument("--vq-ckpt", required=True)
    e.add_argument("--out", required=True, help="token folder, then 'purr.py train --data TOKENS_DIR'")
    e.add_argument("--image-size", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--num-workers", type=int, default=8)
    e.set_defaults(func=extract)
    for launched in (t, s, e):
        launched.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT, metavar="MIN",
                              help="minutes a process waits for the others (under torchrun): longer than a "
                                   "checkpoint's save (default: %(default)s)")
    b = sub.add_parser("bench", help="time training steps on random tokens: ms/step, img/s, peak memory")
    b.add_argument("--model", default="B/2", choices=list(DiT_models))
    b.add_argument("--objective", default="purr", choices=OBJECTIVES)
    b.add_argument("--batch-size", type=int, default=32, help="images per process, or per micro-batch")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--latent-size", type=int, default=32)
    b.add_argument("--latent-channels", type=int, default=8)
    b.add_argument("--codebook-size", type=int, default=16384)
    b.add_argument("--precision", choices=["bf16", "fp32"], default=default_precision())
    b.add_argument("--compile", action="store_true")
    b.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing of the DiT blocks")
    b.add_argument("--sample", action="store_true", help="time sampling (Euler, guided) instead of training")
    b.add_argument("--cfg-scale", type=float, default=1.5, help="with --sample: guidance doubles the batch")
    b.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help=CFG_INTERVAL_HELP)
    b.set_defaults(func=bench)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():  # a CPU run's K-wide tensors come from malloc; a GPU run's do not
        keep_freed_memory()
    try:
        args.func(args)
    except (PurrError, vqlib.TokenizerError, fid.FIDError) as e:
        sys.exit(f"purr {args.cmd}: error: {e}")


if __name__ == "__main__":
    main()
