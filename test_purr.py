"""purr's tests, by subject: the DiT; the loss; the sampler; the baselines; training; sampling from
checkpoints; long runs (several processes, resume, signals, checkpoints, images, extract, bench, precision);
the authors' code; the tokenizers (vq.py); FID (fid.py); benchmarks/. python -m pytest -q test_purr.py (CPU,
minutes). The tokenizer and FID equivalence tests build their random-weight checkpoints from a seed
(fixtures/seeded.py) against the goldens in fixtures/; they also run on the official-layout files of
$PURR_FIXTURES (default ../shared/fixtures) where present."""
import argparse
import contextlib
import copy
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import appendix
import fid
import purr
import vq as vqlib
from fixtures import seeded

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("PURR_FIXTURES", os.path.join(HERE, "..", "shared", "fixtures"))
torch.set_num_threads(2)


def run_cli(*args, script="purr.py"):
    """One of the repository's command lines (purr.py's by default) in a fresh Python, as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=HERE, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def train_cli(root, *flags, quick=False):
    """purr.py train in this process, into root; returns the run's folder. quick: 100 demo images in batches
    of 8 and a 16-code tiny tokenizer fitted in 2 iterations (not DEMO_TOKENIZER's 256 codes in 8)."""
    argv = ["train", "--results-dir", str(root), "--num-workers", "0"]
    with pytest.MonkeyPatch.context() as mp:
        if quick:
            mp.setattr(purr, "DEMO_TOKENIZER", {**purr.DEMO_TOKENIZER, "codebook_size": 16, "iters": 2})
            argv += ["--demo-size", "100", "--global-batch-size", "8"]
        a = purr.parser().parse_args([*argv, *flags])
        return a.func(a)


def torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "purr.py"), *args]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        # gloo's start-up on a loaded 2-core machine now and then aborts a worker ("terminate called without
        # an active exception", SIGABRT): that launch failure is retried once, nothing else.
        if proc.returncode == 0 or "SIGABRT" not in proc.stderr or "terminate called" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[:1500] + "\n...\n" + proc.stderr[-1500:]


def final_state(root):
    return torch.load(appendix.checkpoint_paths(str(root))[-1], weights_only=True)


def with_perturbed_ema(ckpt_path, out):
    """A copy of a checkpoint whose EMA weights (the ones sample uses) are perturbed, so that its samples
    depend on their noise (a 2-step model's pi is uniform); the live weights stay as trained."""
    ckpt, g = torch.load(ckpt_path, weights_only=True), torch.Generator().manual_seed(0)
    ckpt["ema"] = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in ckpt["ema"].items()}
    torch.save(ckpt, out)
    return str(out)


def record_training(mp, signal_at=None):
    """Patches purr (with the MonkeyPatch mp) so that a run records the micro-batches (c, y, z0, t, u) each
    train_step receives and every model it builds with its weights before training; signal_at: the run is
    sent SIGTERM during that step."""
    steps, built, real_step, real_build = [], [], purr.train_step, purr.build_model

    def step(model, opt, micro, *rest):
        steps.append([purr.Batch(*(v.clone() if torch.is_tensor(v) else v for v in b)) for b in micro])
        if len(steps) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(model, opt, micro, *rest)

    def build(a):
        model = real_build(a)
        built.append((model, copy.deepcopy(model.state_dict())))
        return model
    mp.setattr(purr, "train_step", step)
    mp.setattr(purr, "build_model", build)
    return steps, built


def perturbed_dit(K=16, d=4, size=4, patch=1, dims=purr.DIT_SIZES["T"], seed=0):
    """A DiT of 3 classes (dims: (depth, width, heads), T's by default) whose zero-initialized layers are
    perturbed, so that its outputs depend on z, t and y."""
    torch.manual_seed(seed)
    depth, width, heads = dims
    model = purr.DiT(input_size=size, patch_size=patch, in_channels=d, hidden_size=width, depth=depth,
                     num_heads=heads, num_classes=3, codebook_size=K)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


NARROW = (2, 64, 2)  # two blocks of width 64: quicker than T's six of 256


def token_order(x):
    """[B, H, W, C] -> token order with p = 1, [B, H*W, 1, C]: what a patch-1 DiT returns."""
    return x.flatten(1, 2)[:, :, None]


class Fixed(torch.nn.Module):
    """A patch-1 'network' returning a fixed output, given [B,h,w,C] (for checking a loss or a sampler step by
    hand)."""

    def __init__(self, out):
        super().__init__()
        self.out, self.inputs = out, []

    def forward(self, z, t, y):
        self.inputs.append((z.clone(), t.clone()))
        return token_order(self.out)

    def forward_with_cfg(self, z, t, y, cfg_scale, lazy=False):
        return self(z, t, y)


class TF32Seen(TorchDispatchMode):
    """Records torch.backends.cuda.matmul.allow_tf32 at every matrix product run inside: the CPU never uses
    TF32, so the setting is observed, not its effect."""

    def __init__(self):
        super().__init__()
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.matmul):  # matmul: under inference_mode
            self.products.append(torch.backends.cuda.matmul.allow_tf32)
        return func(*args, **(kwargs or {}))


def smooth_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """The last checkpoint of 2 demo steps on 200 images in batches of 4."""
    run = train_cli(tmp_path_factory.mktemp("ckpt"), "--steps", "2", "--demo-size", "200",
                    "--global-batch-size", "4")
    return os.path.join(run, "checkpoints", "0000002.pt")


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A quick demo run of --steps 3 with --class-dropout 1 and --ema-decay 0.75, sent SIGTERM during its
    first step: (its folder, the micro-batches of each step, the weights it started from, what it printed)."""
    root, out = tmp_path_factory.mktemp("interrupted"), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        steps, built = record_training(mp, signal_at=1)
        run = train_cli(root, "--steps", "3", "--class-dropout", "1", "--ema-decay", "0.75", "--ckpt-every",
                        "1000", quick=True)
    return run, steps, built[0][1], out.getvalue()


# What the original tokenizers and Inception compute (fixtures/make_goldens.py), on weights built from a seed
# (fixtures/seeded.py) and saved as the official files are; and on the random-weight files of $PURR_FIXTURES.
GOLDENS = {"sd-vq-f8": "sd_vqf8_ch32_golden.pt", "llamagen-vq-ds8": "llamagen_vq8_ch32_golden.pt",
           "inception": "inception_golden.pt"}
SHARED = {"sd-vq-f8": ("sd_vqf8_ch32_random.ckpt", "sd_vqf8_ch32_golden.pt"),
          "llamagen-vq-ds8": ("llamagen_vq8_ch32_random.pt", "llamagen_vq8_ch32_golden.pt"),
          "inception": ("inception_random_fp16.pth", "inception_random_golden.pt")}
HAVE_SHARED = all((Path(FIXTURES) / f).is_file() for files in SHARED.values() for f in files)
SOURCES = ["seeded", "shared"] if HAVE_SHARED else ["seeded"]


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """official(source, name) -> (checkpoint path, golden) for a tokenizer or "inception"; seeded files are
    written once per session."""
    @functools.lru_cache(maxsize=None)
    def case(source, name):
        if source == "shared":
            ckpt, golden = (Path(FIXTURES) / f for f in SHARED[name])
            return str(ckpt), torch.load(golden, weights_only=True)
        golden = torch.load(Path(HERE, "fixtures", GOLDENS[name]), weights_only=True)
        return str(seeded.write(golden["recipe"], tmp_path_factory.mktemp("seeded") / name)), golden
    return case


# --- DiT ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,millions", [("S/2", 58.2), ("B/2", 180.9), ("L/2", 525.3), ("XL/2", 750.7)])
def test_parameter_counts_with_16384_way_head(name, millions):
    with torch.device("meta"):
        model = purr.DiT_models[name](input_size=32, in_channels=8, codebook_size=16384, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - millions) < 0.1, n
    if name == "XL/2":
        assert abs(n - 750e6) / 750e6 < 0.01  # paper, Table 1


def test_sincos_position_table_matches_dit_formula():
    table = purr.sincos_2d(8, 3)  # DiT: first half from the column (w), second from the row (h)
    row, col = 2, 1
    omega = 1 / 10000 ** (np.arange(2) / 2)
    expect = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                             np.sin(row * omega), np.cos(row * omega)])
    assert np.allclose(table[row * 3 + col].numpy(), expect, atol=1e-6)


def test_time_embedding_is_dits_formula():
    emb, t = purr.TimestepEmbedder(8, freq_dim=16), torch.tensor([0.0, 0.25, 0.7, 1.0])
    fed = []
    emb.mlp[0].register_forward_pre_hook(lambda m, inputs: fed.append(inputs[0]))
    emb(t)
    freqs = torch.exp(-math.log(10000) * torch.arange(8, dtype=torch.float64) / 8)
    args = 1000 * t.double()[:, None] * freqs  # DiT: t in [0, 1000], max period 10^4, [cos | sin]
    assert torch.allclose(fed[0].double(), torch.cat([args.cos(), args.sin()], 1), atol=1e-3)


@pytest.mark.parametrize("patch", [1, 2])
def test_dit_emits_K_logits_per_latent_position(patch):
    model = perturbed_dit(K=16, d=4, size=8, patch=patch)
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3]))
    assert out.shape == (2, (8 // patch) ** 2, patch ** 2, 16) and purr.unpatchify(out).shape == (2, 16, 8, 8)
    fresh = purr.DiT_models[f"T/{patch}"](input_size=8, in_channels=4, codebook_size=16)
    zero_init_head = fresh(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    assert torch.count_nonzero(zero_init_head) == 0
    assert set(purr.DiT_models) >= {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}


def test_unpatchify_puts_each_token_output_on_its_own_patch():
    p, K, g = 2, 3, 4  # token (i, j), sub-position (a, b), logit k -> latent position (p i + a, p j + b)
    model = purr.DiT_models["T/2"](input_size=p * g, in_channels=4, codebook_size=K)
    i, j, a, b, k = torch.meshgrid(*(torch.arange(n) for n in (g, g, p, p, K)), indexing="ij")
    code = (i * g + j) * 1000 + a * 100 + b * 10 + k  # the final layer's output, laid out [token, (a, b, k)]
    model.final_layer.register_forward_hook(lambda *_: code.reshape(1, g * g, p * p * K).float())
    out = purr.unpatchify(model(torch.randn(1, 4, p * g, p * g), torch.rand(1), torch.tensor([0])))[0]
    for (ii, jj, aa, bb, kk) in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (3, 3, 1, 1, 1), (2, 0, 0, 1, 0)]:
        assert out[kk, p * ii + aa, p * jj + bb] == (ii * g + jj) * 1000 + aa * 100 + bb * 10 + kk
    c = torch.randint(0, 100, (2, p * g, p * g))  # patchify puts codes in the same token order
    assert torch.equal(purr.unpatchify(purr.patchify(c, p)[..., None])[:, 0], c)
    assert purr.patchify(c, p)[1, 1 * g + 2, 1 * p + 0] == c[1, p * 1 + 1, p * 2 + 0]


def test_dit_condition_is_time_plus_label_embedding():
    model = perturbed_dit(dims=NARROW)
    z, t = torch.randn(4, 4, 4, 4), torch.tensor([0.1, 0.5, 0.5, 0.9])
    y = torch.tensor([0, 1, 2, 3])  # 3: null
    fed = []
    model.blocks[0].register_forward_pre_hook(lambda m, inputs: fed.append(inputs[1]))
    model(z, t, y)
    assert model.y_embedder.num_embeddings == 4  # num_classes + the null class
    assert torch.allclose(fed[0], model.t_embedder(t) + model.y_embedder(y), atol=1e-6)
    assert not torch.allclose(fed[0][1], fed[0][2])  # the same t, another label


def test_cfg_guides_every_logit():
    model = perturbed_dit()
    z, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 2])
    null = torch.full_like(y, 3)
    expect = model(z, t, null) + 1.5 * (model(z, t, y) - model(z, t, null))
    assert torch.allclose(model.forward_with_cfg(z, t, y, 1.5), expect, atol=1e-5)


# --- The Purrception loss (Eq. 14) + z-loss -----------------------------------------------------------------

def plain_loss(logits, c, z_weight):
    """Eq. 14 and App. D's z-loss as written, on the whole logits [..., K] (fp32 at least): (cross-entropy,
    z-loss). What the fused head (cross_entropy_z) must equal."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    return F.cross_entropy(flat, c.reshape(-1)), z_weight * torch.logsumexp(flat, -1).pow(2).mean()


def test_loss_equals_hand_computed_cross_entropy_and_z_loss():
    h = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])  # two tokens of one position; W = I, b = 0: logits = h
    c = torch.tensor([[0], [1]])
    lz = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(2 * math.exp(0.5) + math.exp(3))]
    ce_hand = ((lz[0] - 2.0) + (lz[1] - 0.5)) / 2
    z_hand = 1e-5 * (lz[0] ** 2 + lz[1] ** 2) / 2
    loss, ce, zl = purr.cross_entropy_z(h, torch.eye(3), torch.zeros(3), c)
    assert abs(ce.item() - ce_hand) < 1e-6 and abs(zl.item() - z_hand) < 1e-10
    assert abs(loss.item() - ce_hand - z_hand) < 1e-6


@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("K", [37, 38], ids=["purr", "dfm"])  # DFM: K + 1 logits, codes among the first K
def test_fused_head_equals_the_formula_on_the_whole_logits_in_value_and_gradient(precision, K):
    """cross_entropy_z on the hidden state, weight and bias of a head of p*p = 4 positions per token, in chunks
    that do not divide the 30 tokens, against the formula on the logits of the same linear map (under bf16
    autocast, as the DiT computes them: bf16 logits, the formula in fp32)."""
    torch.manual_seed(0)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    h = torch.randn(2, 15, 16, dtype=dtype).requires_grad_()
    weight = (0.5 * torch.randn(4 * K, 16, dtype=dtype)).requires_grad_()
    bias = torch.randn(4 * K, dtype=dtype).requires_grad_()
    c = torch.randint(0, 37, (2, 15, 4))
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            if fused:
                loss, ce, zl = purr.cross_entropy_z(h, weight, bias, c, z_weight=0.1, chunk=7 * 4)
            else:
                logits = F.linear(h, weight, bias).unflatten(-1, (4, K))
        if not fused:
            ce, zl = plain_loss(logits, c, 0.1)
            loss = ce + zl
        (3 * loss).backward()
        results.append((ce.detach(), zl.detach(), *(x.grad.clone() for x in (h, weight, bias))))
        h.grad = weight.grad = bias.grad = None
    tol = {"fp64": 1e-12, "fp32": 1e-6, "bf16": 1e-2}[precision]
    (ce, zl, *grads), (ce_ref, zl_ref, *grads_ref) = results
    assert abs(ce - ce_ref) < tol * ce_ref and abs(zl - zl_ref) < tol * zl_ref
    for g, want in zip(grads, grads_ref):  # h, W, b
        assert g.dtype == want.dtype and torch.allclose(g, want, atol=tol * want.abs().max(), rtol=0)
    assert not ce.requires_grad and not zl.requires_grad  # only the loss carries the gradient


def test_fused_head_gradient_cannot_be_taken_twice_and_no_grad_computes_none():
    h, weight, bias = (torch.randn(*s, requires_grad=True) for s in ((3, 8), (12, 8), (12,)))
    c = torch.randint(0, 12, (3, 1))
    loss = purr.cross_entropy_z(h, weight, bias, c)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # the gradients are computed once, in the forward pass
        loss.backward()
    with torch.no_grad():
        assert torch.allclose(purr.cross_entropy_z(h, weight, bias, c)[0], loss)


def dit_loss_and_formula(objective, precision):
    """A perturbed DiT of the objective (purr: K = 16 logits; dfm: K + 1) and one batch: (the loss and the
    gradient of every parameter) from the objective's loss (the fused head) and from the formula on the
    model's whole logits, and what the model read."""
    K, size = 16, 4
    a = {**purr.SETTINGS, "model": "T/2", "objective": objective, "latent_size": size, "latent_channels": 4,
         "codebook_size": K, "num_classes": 3}
    torch.manual_seed(0)
    model = purr.build_model(a)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    codebook, c = torch.randn(K, 4), torch.randint(0, K, (3, size, size))
    batch = purr.Batch(c, torch.tensor([0, 1, 3]), torch.randn(3, 4, size, size), torch.tensor([0.1, 0.5, 0.9]),
                       torch.rand(3, size, size))
    seen = []
    model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].clone()))
    results = []
    for fused in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            if fused:
                losses = purr.OBJECTIVES[objective].loss(model, batch, codebook, 0.1)
            else:
                logits = model(seen[-1], batch.t, batch.y)
        if not fused:
            ce, zl = plain_loss(logits, purr.patchify(c, 2), 0.1)
            losses = {"loss": ce + zl, "ce": ce, "zloss": zl}
        losses["loss"].backward()
        results.append(({k: v.item() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results, seen[0], batch, codebook


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("objective", ["purr", "dfm"])
def test_training_loss_is_the_formula_through_the_dit_in_value_and_every_gradient(objective, precision):
    """Purrception's loss at the interpolant (DFM's at its masked codes), computed by the DiT from its final
    hidden state, equals the formula on its whole logits, in value and in the gradient of every parameter."""
    ((fused, grads), (ref, grads_ref)), x_t, batch, codebook = dit_loss_and_formula(objective, precision)
    if objective == "purr":
        t = batch.t.view(-1, 1, 1, 1)
        assert torch.allclose(x_t, t * codebook[batch.c].permute(0, 3, 1, 2) + (1 - t) * batch.z0)
    else:
        assert torch.equal(x_t, purr.dfm_path(batch.c, batch.t, batch.u, 16))
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert all(abs(fused[k] - ref[k]) <= tol * abs(ref[k]) for k in ("loss", "ce", "zloss"))
    assert grads.keys() == grads_ref.keys() and "final_layer.linear.weight" in grads
    for n, g in grads.items():
        assert (g - grads_ref[n]).norm() <= tol * grads_ref[n].norm() + 1e-9, n


def test_training_never_makes_more_than_a_chunk_of_logits(monkeypatch):
    """A training step's forward and backward passes through the DiT (bf16 autocast) make no tensor of logits
    (K or p*p*K wide) larger than one chunk of positions: LOSS_POSITIONS_PER_CHUNK = 16 of the 512."""
    K, width = 40, 64  # no other layer's output is K or 4K wide
    model = perturbed_dit(K=K, d=4, size=8, patch=2, dims=(2, width, 2)).train()
    codebook = torch.randn(K, 4)
    batch = purr.Batch(torch.randint(0, K, (8, 8, 8)), torch.randint(0, 3, (8,)), torch.randn(8, 4, 8, 8),
                       torch.rand(8), None)

    class LargestLogits(TorchDispatchMode):  # rows x K of the largest K-wide tensor (not the weight's)
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                wide = isinstance(o, torch.Tensor) and o.dim() > 1 and o.shape[-1] in (K, 4 * K)
                if wide and width not in o.shape:
                    LargestLogits.largest = max(LargestLogits.largest, o.numel())
            return out
    monkeypatch.setattr(purr, "LOSS_POSITIONS_PER_CHUNK", 16)
    with LargestLogits():
        with torch.autocast("cpu", torch.bfloat16):
            loss = purr.purr_loss(model, batch, codebook, 1e-5)["loss"]
        loss.backward()
    assert 0 < LargestLogits.largest <= 16 * K < 8 * 64 * K
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_bf16_loss_gradient_of_confident_positions_is_exact():
    """pi_c in 0.99..0.9999 (the common case as t -> 1): the correct class's entry pi_c - 1 must not
    cancel in bf16. Reference: fp32 F.cross_entropy + z-loss on the same (bf16-rounded) logits."""
    torch.manual_seed(0)
    K, N = 256, 2000
    c = torch.randint(0, K, (N,))
    logits = torch.randn(N, K)
    target_pi = 1 - 10 ** -torch.empty(N).uniform_(2, 4)  # pi_c from 0.99 to 0.9999
    rest = torch.logsumexp(logits.scatter(1, c[:, None], -math.inf), 1)
    logits[torch.arange(N), c] = rest + torch.log(target_pi / (1 - target_pi))
    h = logits.bfloat16().float().requires_grad_()  # W = I, b = 0: the logits are h, in bf16 under autocast
    with torch.autocast("cpu", torch.bfloat16):
        loss = purr.cross_entropy_z(h, torch.eye(K), torch.zeros(K), c[:, None], z_weight=1e-5)[0]
    loss.backward()
    ref = h.detach().clone().requires_grad_()
    sum(plain_loss(ref, c, 1e-5)).backward()
    got, want = h.grad[torch.arange(N), c], ref.grad[torch.arange(N), c]
    assert ((got - want).abs() / want.abs()).median() < 0.02


# --- The sampler (Eq. 13, 15, Algorithm 2) ------------------------------------------------------------------

def image_order(out):
    """A DiT output in token order [B, tokens, p*p, C] -> channels-last latent order [B, H, W, C]."""
    return purr.unpatchify(out).permute(0, 2, 3, 1)


def euler_by_hand(model, codebook, y, z, tau, T, steps=None):
    """Algorithm 2 written out: Euler steps z += v(s/T, z) / T for s = 0..T-1 (the first `steps` of them), v
    Eq. 13's velocity (mu - z) / (1 - t), mu from Eq. 15's posterior at temperature tau (or tau(t))."""
    for s in range(T if steps is None else steps):
        t = s / T
        temperature = tau(t) if callable(tau) else tau
        pi = torch.softmax(image_order(model(z, torch.full((len(z),), t), y)) / temperature, -1)
        z = z + ((pi @ codebook).permute(0, 3, 1, 2) - z) / (1 - t) / T
    return z


class OneHotPosterior(torch.nn.Module):
    """A network whose posterior is one-hot on given codes, whatever z_t; records the times it sees."""

    def __init__(self, c, K):
        super().__init__()
        self.logits, self.times = 30.0 * F.one_hot(c, K).float(), []

    def forward_with_cfg(self, z, t, y, cfg_scale, lazy=False):
        self.times.append(t.max().item())
        return token_order(self.logits)


def test_small_tau_makes_mu_the_argmax_code():
    torch.manual_seed(0)  # not a draw whose two largest logits are within ~tau of each other
    logits, codebook = torch.randn(2, 3, 3, 16), torch.randn(16, 4)
    mu = purr.posterior_mean(logits, codebook, tau=1e-3)
    assert torch.allclose(mu, codebook[logits.argmax(-1)], atol=1e-4)
    assert not torch.allclose(purr.posterior_mean(logits, codebook, 1.0), mu, atol=1e-2)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_euler_sampler_is_algorithm2(T):
    model, codebook = perturbed_dit(), torch.randn(16, 4)
    y, z0 = torch.tensor([0, 1]), torch.randn(2, 4, 4, 4)
    got = purr.sample_latents(model, codebook, y, z0, tau=0.7, num_steps=T, method="euler")
    assert torch.allclose(got, euler_by_hand(model, codebook, y, z0, 0.7, T), atol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_torchdiffeq_euler_equals_the_euler_loop(T):
    model, codebook = perturbed_dit(), torch.randn(16, 4)
    y, z0 = torch.tensor([0, 1]), torch.randn(2, 4, 4, 4)
    v = purr.purr_velocity(model, codebook, y, 0.7, 1.0)
    assert torch.allclose(purr.integrate(v, z0, T, "euler"), purr.algorithm2(v, z0, T), atol=1e-5)


def test_linear_tau_schedule_tempers_each_step_with_tau_of_t():
    model, codebook, T = perturbed_dit(), torch.randn(16, 4), 4
    y, z0 = torch.tensor([0, 1]), torch.randn(2, 4, 4, 4)
    tau = purr.tau_schedule("linear", 0.5, 1.5)
    assert [tau(t) for t in (0, 0.5, 1)] == [0.5, 1.0, 1.5] and purr.tau_schedule("constant", 0.8) == 0.8
    z = euler_by_hand(model, codebook, y, z0, lambda t: 0.5 + t, T)  # tau(s/T) in Eq. 15
    got = purr.sample_latents(model, codebook, y, z0, tau=tau, num_steps=T)
    assert torch.allclose(got, z, atol=1e-5)
    constant = purr.sample_latents(model, codebook, y, z0, tau=0.5, num_steps=T)
    assert not torch.allclose(got, constant, atol=1e-3)


def test_last_euler_step_lands_on_mu():
    model, codebook, T = perturbed_dit(), torch.randn(16, 4), 4
    y, z0 = torch.tensor([0, 1]), torch.randn(2, 4, 4, 4)
    z = euler_by_hand(model, codebook, y, z0, 0.8, T, steps=T - 1)  # T-1 steps of the T-step grid, then mu:
    mu_last = purr.posterior_mean(image_order(model(z, torch.full((2,), (T - 1) / T), y)), codebook, 0.8)
    mu_last = mu_last.permute(0, 3, 1, 2)
    got = purr.sample_latents(model, codebook, y, z0, tau=0.8, num_steps=T)
    assert torch.allclose(got, mu_last, atol=1e-5)


def test_guided_sampling_is_the_formula_on_the_in_place_path():
    """Sampling (no autograd) guides in place: one Euler step lands on mu of the logits u + s (c - u)."""
    model, codebook = perturbed_dit(), torch.randn(16, 4)
    y, z0, t = torch.tensor([0, 2]), torch.randn(2, 4, 4, 4), torch.zeros(2)
    cond, uncond = (image_order(model(z0, t, labels)) for labels in (y, torch.full_like(y, 3)))
    mu = purr.posterior_mean(uncond + 1.5 * (cond - uncond), codebook, 0.8).permute(0, 3, 1, 2)
    got = purr.sample_latents(model, codebook, y, z0, tau=0.8, cfg_scale=1.5, num_steps=1)
    assert torch.allclose(got, mu, atol=1e-5)


def test_mu_is_full_fp32_under_bf16_autocast_and_global_tf32(monkeypatch):
    """mu = pi E is a full fp32 product: not bf16 under autocast, nor TF32 with TF32 on globally (purr's GPU
    setting); the global setting comes back after."""
    logits, codebook = (3 * torch.randn(2, 3, 3, 64)).bfloat16(), torch.randn(64, 4)
    want = torch.softmax(logits.double() / 0.8, -1) @ codebook.double()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    with torch.autocast("cpu", torch.bfloat16), TF32Seen() as seen:
        mu = purr.posterior_mean(logits, codebook, 0.8)
    assert mu.dtype == torch.float32 and torch.allclose(mu.double(), want, atol=1e-5)
    assert seen.products and not any(seen.products) and torch.backends.cuda.matmul.allow_tf32


def test_guided_bf16_sampling_keeps_one_K_wide_tensor_and_fp32_state(monkeypatch):
    """Under bf16 no fp32 tensor as large as the [B,h,w,K] posterior is ever made (mu by chunks), and
    the ODE state stays fp32, close to the fp32 run."""
    B, K, size = 2, 64, 8
    model, codebook = perturbed_dit(K=K, d=4, size=size, patch=2), torch.randn(K, 4)
    y, z0 = torch.tensor([0, 1]), torch.randn(B, 4, size, size)

    class LargestFp32(TorchDispatchMode):  # the largest fp32 tensor with K channels
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.shape[-1:] == (K,):
                    LargestFp32.largest = max(LargestFp32.largest, o.numel())
            return out
    monkeypatch.setattr(purr, "POSITIONS_PER_CHUNK", 16)  # so one chunk is far smaller than B*h*w*K
    with torch.autocast("cpu", torch.bfloat16), LargestFp32():
        z = purr.sample_latents(model, codebook, y, z0, tau=0.8, cfg_scale=1.5, num_steps=3)
    assert z.dtype == torch.float32 and LargestFp32.largest < B * size * size * K
    z32 = purr.sample_latents(model, codebook, y, z0, tau=0.8, cfg_scale=1.5, num_steps=3)
    assert torch.allclose(z, z32, atol=0.05 * z32.abs().max().item())


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "dopri5"])
def test_one_hot_posterior_returns_true_indices_and_never_evaluates_t_1(method):
    tok = vqlib.fit_tiny(torch.rand(64, 3, 16, 16) * 2 - 1, codebook_size=32, iters=3)
    c = torch.randint(0, 32, (3, 4, 4))
    net = OneHotPosterior(c, 32)
    z = purr.sample_latents(net, tok.codebook, torch.zeros(3, dtype=torch.long), torch.randn(3, 8, 4, 4),
                            tau=0.8, num_steps=10, method=method)
    assert torch.equal(tok.quantize(z), c)
    assert max(net.times) < 1


# --- The baselines (Sec. 4.1): CFM, CFM-endpoint, DFM -------------------------------------------------------

@pytest.fixture(scope="module")
def dfm_ckpt(tmp_path_factory):
    """A 2-step demo DFM checkpoint whose EMA weights are perturbed, so that its samples depend on the
    draws."""
    root = tmp_path_factory.mktemp("dfm")
    run = train_cli(root, "--objective", "dfm", "--steps", "2", "--demo-size", "200", "--global-batch-size",
                    "4")
    return with_perturbed_ema(os.path.join(run, "checkpoints", "0000002.pt"), root / "perturbed.pt")


def dfm_sample_cli(ckpt, out, *flags):
    purr.main(["sample", "--ckpt", ckpt, "--num-steps", "3", "--num-samples", "5", "--class-labels", "3",
               "--out", str(out), *flags])
    return np.load(out)["arr_0"]


def test_each_objective_loss_equals_its_formula():
    codebook, c = torch.randn(6, 2), torch.tensor([[[0, 5], [3, 3]]])
    z0, t, y = torch.randn(1, 2, 2, 2), torch.tensor([0.3]), torch.tensor([0])
    u = torch.tensor([[[0.1, 0.99], [0.5, 0.2]]])
    z1 = codebook[c].permute(0, 3, 1, 2)
    out = torch.randn(1, 2, 2, 2)
    for objective, target in (("cfm", z1 - z0), ("cfm-endpoint", z1)):
        net = Fixed(out)
        losses = purr.OBJECTIVES[objective].loss(net, purr.Batch(c, y, z0, t, u), codebook, 1e-5)
        assert torch.allclose(losses["loss"], ((out.permute(0, 3, 1, 2) - target) ** 2).mean())
        assert torch.allclose(net.inputs[0][0], 0.3 * z1 + 0.7 * z0)  # the same interpolant as Purrception
    # DFM (and Purrception): test_training_loss_is_the_formula_through_the_dit_in_value_and_every_gradient.
    # kappa(0.3) = 0.3: positions with u < 0.7 read MASK (index K = 6); u = 0.99 keeps c = 5
    assert torch.equal(purr.dfm_path(c, t, u, 6), torch.tensor([[[6, 5], [6, 6]]]))


def test_baseline_samplers_first_steps_by_hand():
    codebook, T = torch.randn(6, 2), 4
    z0, y, out = torch.randn(1, 2, 2, 2), torch.tensor([0]), torch.randn(1, 2, 2, 2)
    v = out.permute(0, 3, 1, 2)
    # CFM: the output is the velocity; CFM-endpoint: (z1_hat - z_t)/(1 - t). T Euler steps of a constant
    # output:
    z = purr.sample_latents(Fixed(out), codebook, y, z0, num_steps=T, objective="cfm")
    assert torch.allclose(z, z0 + v, atol=1e-5)
    net = Fixed(out)
    z = purr.sample_latents(net, codebook, y, z0, num_steps=T, objective="cfm-endpoint")
    assert torch.allclose(net.inputs[1][0], z0 + (v - z0) / T, atol=1e-6) and torch.allclose(z, v, atol=1e-5)


def test_dfm_path_and_jump_rate_match_flow_matching():
    pytest.importorskip("flow_matching",
                        reason="flow-matching (test-only, requirements-test.txt) not installed")
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    K, c, t = 16, torch.randint(0, 16, (4, 5, 5)), torch.rand(4)
    torch.manual_seed(1)
    theirs = MixtureDiscreteProbPath(PolynomialConvexScheduler(n=1.0)).sample(
        x_0=torch.full_like(c, K), x_1=c, t=t).x_t
    torch.manual_seed(1)
    assert torch.equal(purr.dfm_path(c, t, torch.rand(c.shape), K), theirs)
    t = torch.tensor([0.0, 0.3, 0.8])  # kappa(t) = t: x_t = c with probability t
    x = purr.dfm_path(torch.zeros(3, 200, 200, dtype=torch.long), t, torch.rand(3, 200, 200), K)
    assert torch.allclose(x.eq(0).float().mean((1, 2)), t, atol=0.01) and set(x.unique().tolist()) == {0, K}
    s = PolynomialConvexScheduler(n=1.0)(torch.tensor([0.0, 0.1, 0.5, 0.9]))
    assert torch.allclose(purr.dfm_rate(torch.tensor([0.0, 0.1, 0.5, 0.9])), s.d_alpha_t / (1 - s.alpha_t))


def test_dfm_sampler_steps_by_hand():
    """T = 2 from all-MASK, image b's uniforms (draw, jump) from seed b: at t = 0 draw x1 from the K codes by
    the inverse CDF (MASK's logit, here the largest, dropped); jump to it with probability
    1 - exp(-h / (1 - t)) = 1 - exp(-1/2); at t = 1/2 return a fresh draw."""
    logits = torch.randn(2, 3, 3, 7)
    logits[..., 6] = 10.0
    net, y = Fixed(logits), torch.tensor([0, 1])
    got = purr.dfm_sample(net, 6, y, (2, 3, 3), seeds=[5, 9], tau=0.5, num_steps=2)
    cdf = torch.softmax(logits[..., :6] / 0.5, -1).cumsum(-1)
    u = [[torch.rand(2, 3, 3, generator=g) for _ in range(2)]
         for g in (torch.Generator().manual_seed(s) for s in (5, 9))]
    draw = lambda s: torch.stack([(cdf[b] <= u[b][s][0][..., None]).sum(-1) for b in range(2)])  # noqa: E731
    jump = torch.stack([u[b][0][1] < 1 - math.exp(-0.5) for b in range(2)])
    assert torch.equal(net.inputs[0][0], torch.full((2, 3, 3), 6)) and net.inputs[1][1].eq(0.5).all()
    assert 0 < jump.sum() < 18 and torch.equal(net.inputs[1][0], torch.where(jump, draw(0), 6))
    assert torch.equal(got, draw(1))
    c = torch.randint(0, 6, (2, 3, 3))  # a posterior one-hot on c is reached by DFM too
    one_hot = Fixed(50.0 * F.one_hot(c, 7))
    assert torch.equal(purr.dfm_sample(one_hot, 6, y, (2, 3, 3), [0, 1], num_steps=5), c)


def test_dfm_model_reads_an_embedding_of_the_codes_and_mask_and_predicts_k_plus_1_logits():
    a = {**purr.SETTINGS, "model": "T/2", "objective": "dfm", "latent_size": 4, "latent_channels": 8,
         "codebook_size": 16, "num_classes": 3}
    model = purr.build_model(a)
    assert model.token_embedder.weight.shape == (17, 256) and model.x_embedder.in_channels == 256
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()
    x, t, y = torch.randint(0, 17, (2, 4, 4)), torch.rand(2), torch.tensor([0, 1])
    out = model(x, t, y)
    assert out.shape == (2, 4, 4, 17)
    x2 = x.clone()
    x2[0, 0, 0] = (x[0, 0, 0] + 1) % 17  # one token changes the logits through its embedding
    assert not torch.allclose(model(x2, t, y)[0], out[0]) and torch.equal(model(x2, t, y)[1], out[1])
    assert purr.build_model({**a, "objective": "purr"}).token_embedder is None


def test_dfm_samples_do_not_depend_on_the_batch_size(dfm_ckpt, tmp_path):
    images = [dfm_sample_cli(dfm_ckpt, tmp_path / f"{b}.npz", "--batch-size", str(b)) for b in (2, 5)]
    assert np.array_equal(*images) and len(np.unique(images[0], axis=0)) == 5  # one label: the draws differ


def test_dfm_samples_at_tau_1_unless_tau_is_given(dfm_ckpt, tmp_path, capsys):
    default = dfm_sample_cli(dfm_ckpt, tmp_path / "default.npz")
    assert "dfm), tau=1.0 " in capsys.readouterr().out
    assert np.array_equal(default, dfm_sample_cli(dfm_ckpt, tmp_path / "one.npz", "--tau", "1"))
    assert not np.array_equal(default, dfm_sample_cli(dfm_ckpt, tmp_path / "hot.npz", "--tau", "3"))
    assert "dfm), tau=3.0 " in capsys.readouterr().out


def test_dfm_refuses_other_methods_and_old_checkpoints(dfm_ckpt, tmp_path):
    assert_one_line_error(run_cli("sample", "--ckpt", dfm_ckpt, "--method", "midpoint"), "--method midpoint",
                          "DFM")
    ckpt = torch.load(dfm_ckpt, weights_only=True)
    for k in ("model", "ema"):  # the earlier DFM's layout: no token embedding
        ckpt[k] = {n: v for n, v in ckpt[k].items() if not n.startswith("token_embedder")}
    torch.save(ckpt, tmp_path / "old.pt")
    assert_one_line_error(run_cli("sample", "--ckpt", str(tmp_path / "old.pt")), "old.pt", "earlier DFM")
    with pytest.raises(appendix.PurrError, match="earlier DFM"):
        train_cli(tmp_path, "--resume", str(tmp_path / "old.pt"), "--steps", "3")


@pytest.mark.slow  # trains or starts torchrun
@pytest.mark.parametrize("objective", purr.OBJECTIVES)
def test_short_run_of_each_objective_lowers_its_loss(objective, tmp_path):
    run = train_cli(tmp_path, "--objective", objective, "--steps", "80", "--demo-size", "1000", "--log-every",
                    "20", "--global-batch-size", "32")
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], log


# --- Training: the demo, settings, AdamW, EMA, lr schedule, class dropout, train_step, bad arguments --------

class NoSync(torch.nn.Module):
    """A stand-in for DDP: records, per forward, whether it ran outside no_sync (so its gradients are
    reduced)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.synced, self.inside = module, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        yield
        self.inside = False

    def forward(self, *args, **kwargs):
        self.synced.append(not self.inside)
        return self.module(*args, **kwargs)


def test_demo_data_is_deterministic_and_balanced():
    a, la = appendix.demo_dataset(40, seed=3)
    b, lb = appendix.demo_dataset(40, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (40, 3, 32, 32) and torch.equal(a, b) and torch.equal(la, lb)
    assert torch.bincount(la).tolist() == [4] * 10
    assert not torch.equal(a, appendix.demo_dataset(40, seed=4)[0])


def test_global_batch_plan_is_a_new_permutation_each_epoch():
    epochs = [torch.cat([appendix.global_batch_plan(10, s, 5, seed=1)[0] for s in (2 * e, 2 * e + 1)])
              for e in (0, 1)]
    assert all(sorted(order.tolist()) == list(range(10)) for order in epochs) and not torch.equal(*epochs)
    assert torch.equal(appendix.global_batch_plan(10, 1, 5, 1)[0], appendix.global_batch_plan(10, 1, 5, 1)[0])


def test_learning_rate_warms_up_and_decays_linearly_to_zero():
    cfg = {"lr": 1.0, "steps": 10, "warmup": 2, "decay": 0.5}
    assert [purr.learning_rate(cfg, s) for s in range(10)] == pytest.approx(
        [0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    assert [purr.learning_rate({**cfg, "warmup": 0, "decay": 0.0}, s) for s in range(10)] == [1.0] * 10


def test_ema_update_moves_by_one_minus_decay():
    ema, model = perturbed_dit(dims=NARROW, seed=0), perturbed_dit(dims=NARROW, seed=1)
    before = [p.clone() for p in ema.parameters()]
    purr.update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-6)


def test_data_settings_are_app_c_and_adamw_is_built_with_them():
    """With --data: App. C's recipe (constant lr 1e-4, batch 256, EMA 0.9999, z-loss 1e-5; DiT's label
    dropout), and the optimizer as built is AdamW at that lr, weight decay 0.01, betas (0.9, 0.999), eps 1e-6.
    """
    cfg, _ = purr.resolve_config(purr.parser().parse_args(["train", "--data", "imagenet/train"]), None)
    app_c = {"lr": 1e-4, "warmup": 0, "decay": 0.0, "global_batch_size": 256, "ema_decay": 0.9999,
             "z_loss": 1e-5, "class_dropout": 0.1, "objective": "purr"}
    assert {k: cfg[k] for k in app_c} == app_c
    cfg.update(model="T/1", latent_size=4, latent_channels=4, codebook_size=16, num_classes=3)  # a small DiT
    opt = purr.build_training(cfg, None, None, torch.device("cpu"))[2]
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.AdamW and not group["amsgrad"]
    hyper = (group["lr"], group["weight_decay"], group["betas"], group["eps"])
    assert hyper == (1e-4, 0.01, (0.9, 0.999), 1e-6)


def test_every_setting_is_a_flag_whose_help_shows_both_defaults_and_reaches_the_run():
    """Each entry of SETTINGS is a train flag; --help prints its default and the demo's where they differ; a
    flag given overrides both, AdamW's settings included."""
    train = next(a for a in purr.parser()._actions if a.dest == "cmd").choices["train"]
    flags = {a.dest: a for a in train._actions}
    assert set(purr.SETTINGS) <= set(flags) and set(purr.DEMO) <= set(purr.SETTINGS)
    assert "(default: 0.0001; demo: 0.003)" in " ".join(flags["lr"].help.split())
    assert flags["weight_decay"].help.endswith("(default: 0.01)")
    given = ["--weight-decay", "0.05", "--beta1", "0.8", "--beta2", "0.95", "--adam-eps", "1e-8",
             "--lr", "2e-4"]
    for kind in ([], ["--data", "d"]):
        cfg, _ = purr.resolve_config(purr.parser().parse_args(["train", *kind, *given]), None)
        cfg.update(model="T/1", latent_size=4, latent_channels=4, codebook_size=16, num_classes=3)
        group = purr.build_training(cfg, None, None, torch.device("cpu"))[2].param_groups[0]
        hyper = (group["lr"], group["weight_decay"], group["betas"], group["eps"])
        assert hyper == (2e-4, 0.05, (0.8, 0.95), 1e-8)
        assert cfg["steps"] == (400_000 if kind else 3000)


def test_fused_adamw_equals_the_per_parameter_loop_and_keeps_app_c_settings():
    """The fused optimizer makes the updates of PyTorch's reference loop (foreach=False), to fp32 rounding."""
    fast, ref = perturbed_dit(dims=NARROW, seed=0).train(), perturbed_dit(dims=NARROW, seed=0).train()
    opt = purr.adamw(fast, {**purr.SETTINGS, "lr": 1e-3})
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6,
                                foreach=False)
    assert opt.defaults["fused"] and {k: opt.defaults[k] for k in ("weight_decay", "betas", "eps")} == \
        {"weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-6}
    codebook = torch.randn(16, 4)
    for step in range(3):
        torch.manual_seed(step)
        b = purr.Batch(torch.randint(0, 16, (4, 4, 4)), torch.randint(0, 3, (4,)), torch.randn(4, 4, 4, 4),
                       torch.rand(4), None)
        for model, o in ((fast, opt), (ref, ref_opt)):
            purr.train_step(model, o, [b], "purr", codebook, 1e-5, contextlib.nullcontext())
    for p, q in zip(fast.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
    start = perturbed_dit(dims=NARROW, seed=0)
    assert not torch.allclose(fast.final_layer.linear.weight, start.final_layer.linear.weight)


def test_train_step_accumulates_the_full_batch_gradient():
    """SGD at lr 1 moves each weight by minus its gradient: three micro-batches must move it as the whole
    batch does, report the whole batch's mean losses, and let DDP reduce only on the last micro-batch."""
    K = 16
    codebook, c, y = torch.randn(K, 4), torch.randint(0, K, (6, 4, 4)), torch.tensor([0, 1, 2, 3, 0, 1])
    z0, t = torch.randn(6, 4, 4, 4), torch.rand(6)
    whole, split = perturbed_dit(K=K, dims=NARROW), NoSync(perturbed_dit(K=K, dims=NARROW))
    results = []
    thirds = [purr.Batch(*b, None) for b in zip(c.chunk(3), y.chunk(3), z0.chunk(3), t.chunk(3))]
    for net, micro in ((whole, [purr.Batch(c, y, z0, t, None)]), (split, thirds)):
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        results.append(purr.train_step(net, opt, micro, "purr", codebook, 1e-2, contextlib.nullcontext()))
    for a, b in zip(whole.parameters(), split.module.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])
    assert split.synced == [False, False, True]


@pytest.mark.slow  # trains or starts torchrun
def test_class_dropout_1_gives_the_model_only_the_null_class(interrupted_run):
    seen = interrupted_run[1]
    assert len(seen) == 1
    assert torch.equal(torch.cat([b.y for b in seen[0]]), torch.full((8,), 10))  # 10 classes: 10 is null


@pytest.mark.slow  # trains or starts torchrun
def test_class_dropout_0_gives_the_model_the_true_labels(tmp_path, monkeypatch):
    seen = record_training(monkeypatch)[0]
    train_cli(tmp_path, "--steps", "1", "--class-dropout", "0", quick=True)
    idx, _ = appendix.global_batch_plan(100, 0, 8, 0)
    assert torch.equal(torch.cat([b.y for b in seen[0]]), idx % 10)  # demo labels: index mod 10


@pytest.mark.slow  # trains or starts torchrun
def test_train_ema_after_one_step_is_decay_times_start_plus_the_rest(interrupted_run):
    run, _, start, _ = interrupted_run
    ckpt = appendix.load_checkpoint(os.path.join(run, "checkpoints", "0000001.pt"))
    for k, v in ckpt["model"].items():
        assert torch.allclose(ckpt["ema"][k], 0.75 * start[k] + 0.25 * v, atol=1e-6), k
    assert not torch.equal(ckpt["model"]["final_layer.linear.weight"], start["final_layer.linear.weight"])


@pytest.mark.slow  # trains or starts torchrun
def test_short_demo_training_lowers_the_loss_and_samples(tmp_path):
    run = train_cli(tmp_path, "--steps", "150", "--demo-size", "2000", "--log-every", "25",
                    "--global-batch-size", "32")
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert log[0]["step"] == 25 and log[-1]["step"] == 150
    assert log[-1]["ce"] < 0.6 * math.log(256) and log[-1]["ce"] < 0.75 * log[0]["ce"], log
    assert all(r["zloss"] > 0 for r in log)
    ckpt = torch.load(os.path.join(run, "checkpoints", "0000150.pt"), weights_only=True)
    assert {"model", "ema", "opt", "args", "step", "vq"} <= set(ckpt) and ckpt["step"] == 150
    out = tmp_path / "grid.png"
    purr.main(["sample", "--results-dir", str(tmp_path), "--num-steps", "5", "--num-samples", "20",
               "--out", str(out)])
    assert Image.open(out).size == (2 + 2 * 34, 2 + 10 * 34)  # one row per class


def test_train_sample_every_writes_ema_grids_of_the_same_noise_and_labels(tmp_path, monkeypatch):
    """The grids of steps 2 and 4 (ema = model: --ema-decay 0) come from one z_0 and labels, and differ."""
    drawn, sample_codes = [], purr.sample_codes

    def recording(model, tok, objective, y, z0, *args, **kw):
        drawn.append((y.clone(), z0.clone()))
        return sample_codes(model, tok, objective, y, z0, *args, **kw)
    monkeypatch.setattr(purr, "sample_codes", recording)
    run = train_cli(tmp_path, "--steps", "4", "--sample-every", "2", "--ema-decay", "0", "--lr", "3e-2",
                    quick=True)
    grids = sorted(Path(run, "samples").iterdir())
    assert [g.name for g in grids] == ["0000002.png", "0000004.png"] and len(drawn) == 2
    assert torch.equal(drawn[0][0], drawn[1][0]) and torch.equal(drawn[0][1], drawn[1][1])
    first, second = (np.asarray(Image.open(g)) for g in grids)
    assert first.shape == second.shape and not np.array_equal(first, second)


@pytest.mark.slow  # trains or starts torchrun
def test_global_batch_that_does_not_split_is_one_line(tmp_path):
    proc = run_cli("train", "--global-batch-size", "10", "--grad-accum", "4", "--results-dir", str(tmp_path))
    assert_one_line_error(proc, "--global-batch-size 10", "10 per process", "4 equal micro-batches")
    proc = run_cli("train", "--global-batch-size", "8", "--micro-batch-size", "3", "--results-dir",
                   str(tmp_path))
    assert_one_line_error(proc, "micro-batches of 3")


@pytest.mark.slow  # trains or starts torchrun
def test_bad_train_arguments_give_one_line_errors(tmp_path):
    assert_one_line_error(run_cli("train", "--model", "Q/3"), "unknown --model Q/3", "XL/2")
    assert_one_line_error(run_cli("train", "--data", str(tmp_path / "missing"), "--vq", "tiny",
                                  "--vq-ckpt", "x"), "missing", "no such folder")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert_one_line_error(run_cli("train", "--data", str(tmp_path / "empty"), "--vq", "tiny", "--vq-ckpt",
                                  "x"), "no images")


# --- Sampling from checkpoints: the sample command, entropy maps, bad arguments -----------------------------

def test_default_grid_labels_exist_for_any_class_count():
    for classes in (3, 16, 17, 100, 999, 1000):
        labels = purr.default_labels(classes, grid=True)
        assert len(set(labels)) == len(labels) == min(classes, 8 if classes > 16 else classes)
        assert all(0 <= l < classes for l in labels)
    assert purr.default_labels(100, grid=False) == list(range(100))


def test_entropy_is_that_of_the_tempered_posterior():
    logits = 2 * torch.randn(2, 3, 3, 16)
    p = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(purr.entropy(logits, 0.5), -(p * p.log()).sum(-1), atol=1e-5)


def test_sample_uses_the_ema_weights(tiny_ckpt, tmp_path):
    ckpt = appendix.load_checkpoint(with_perturbed_ema(tiny_ckpt, tmp_path / "ckpt.pt"))
    model = purr.load_sampler(str(tmp_path / "ckpt.pt"))[0]
    key = "final_layer.linear.weight"
    assert not torch.equal(ckpt["ema"][key], ckpt["model"][key])
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())


def test_sampled_images_do_not_depend_on_the_batch_size(tiny_ckpt, tmp_path):
    ckpt = with_perturbed_ema(tiny_ckpt, tmp_path / "ckpt.pt")
    for b in (2, 5):
        purr.main(["sample", "--ckpt", ckpt, "--num-steps", "2", "--num-samples", "7", "--batch-size", str(b),
                   "--class-labels", "3", "--out", str(tmp_path / f"{b}.npz")])
    images = [np.load(tmp_path / f"{b}.npz")["arr_0"] for b in (2, 5)]
    assert np.array_equal(*images) and len(np.unique(images[0], axis=0)) == 7  # one label: the noise differs


@pytest.mark.slow  # trains or starts torchrun
def test_entropy_map_is_written_beside_the_samples(tiny_ckpt, tmp_path):
    purr.main(["sample", "--ckpt", tiny_ckpt, "--num-steps", "4", "--num-samples", "20", "--entropy-map",
               "--out", str(tmp_path / "s.png")])
    emap = np.asarray(Image.open(tmp_path / "s_entropy.png"))
    assert emap.shape == np.asarray(Image.open(tmp_path / "s.png")).shape
    # A 2-step model's pi is still uniform: entropy log K, the top of the scale (white) at every position.
    assert emap[2:34, 2:34].min() >= 240 and (emap[:2] == 0).all()


def test_entropy_map_is_refused_without_a_posterior_over_codes(tmp_path):
    run = train_cli(tmp_path, "--steps", "1", "--demo-size", "200", "--global-batch-size", "4", "--objective",
                    "cfm-endpoint")
    ckpt = os.path.join(run, "checkpoints", "0000001.pt")
    assert_one_line_error(run_cli("sample", "--ckpt", ckpt, "--entropy-map"), "--entropy-map", "cfm-endpoint")


def test_entropy_map_past_the_last_evaluated_time_is_one_line(tmp_path):
    common = ["sample", "--ckpt", str(tmp_path / "none.pt"), "--num-steps", "4", "--entropy-map",
              "--entropy-t"]
    with pytest.raises(SystemExit, match=r"--entropy-t 0.8: .* from 0 to 0.75"):
        purr.main([*common, "0.8"])
    with pytest.raises(SystemExit, match="none.pt not found"):  # t = 3/4, the last evaluation, is fine
        purr.main([*common, "0.75"])


@pytest.mark.slow  # trains or starts torchrun
def test_bad_sample_arguments_give_one_line_errors(tiny_ckpt, tmp_path):
    assert_one_line_error(run_cli("sample", "--ckpt", tiny_ckpt, "--tau", "0"), "--tau")
    assert_one_line_error(run_cli("sample", "--ckpt", tiny_ckpt, "--num-steps", "0"), "--num-steps")
    assert_one_line_error(run_cli("sample", "--ckpt", str(tmp_path / "nope.pt")), "nope.pt", "not found")
    assert_one_line_error(run_cli("sample", "--results-dir", str(tmp_path / "empty")), "no checkpoint")


# --- Long runs: several processes, resume, signals, checkpoints, images, extract, bench, precision ----------

def assert_trained_alike(ref_root, *roots):
    """The runs in roots end at the weights of the run in ref_root (to fp32 rounding), which training
    moved."""
    ref = final_state(ref_root)
    for root in roots:
        other = final_state(root)
        for k in ref["model"]:
            assert torch.allclose(other["model"][k], ref["model"][k], atol=1e-5), (root, k)
    start = purr.build_model(ref["args"]).state_dict()
    assert not torch.allclose(ref["model"]["final_layer.linear.weight"], start["final_layer.linear.weight"])


def loss_and_grads(net, batch, codebook, bf16=False):
    """The Purrception loss of one batch (its forward under bf16 autocast if asked) and the gradients it gives
    net's parameters, by name."""
    net.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = purr.OBJECTIVES["purr"].loss(net, batch, codebook, 1e-5)["loss"]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def demo_folder(root, n, seed):
    """n demo images as PNG files in ImageNet layout (a folder per class) under root; returns the images."""
    images, labels = appendix.demo_dataset(n, seed=seed)
    for i, (x, y) in enumerate(zip(images, labels)):
        os.makedirs(root / appendix.DEMO_CLASSES[y], exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / appendix.DEMO_CLASSES[y] / f"{i:03d}.png")
    return images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Demo images as PNG files in ImageNet layout, and a tiny tokenizer file fitted on them."""
    root = tmp_path_factory.mktemp("imgs")
    images = demo_folder(root / "data", 40, seed=5)
    tok = vqlib.fit_tiny(appendix.to_unit(images), codebook_size=64, iters=5)
    torch.save({"name": "tiny", "config": tok.config(), "state": tok.state_dict()}, root / "tiny.pt")
    return root


def damaged_folder(root):
    """Demo PNGs in ImageNet layout, with a truncated JPEG, an empty file, a CMYK JPEG and a palette PNG."""
    images = demo_folder(root, 24, seed=7)
    im = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    im.save(root / "circle" / "truncated.JPEG", quality=95)
    data = (root / "circle" / "truncated.JPEG").read_bytes()
    (root / "circle" / "truncated.JPEG").write_bytes(data[:len(data) // 2])
    (root / "square" / "empty.jpg").write_bytes(b"")
    im.convert("CMYK").save(root / "triangle" / "cmyk.JPEG")
    im.convert("P", palette=Image.ADAPTIVE).save(root / "diamond" / "palette.png")
    return ["circle/truncated.JPEG", "square/empty.jpg"]


# Several processes: each rank draws its slice of one global batch, so any split trains alike.

def test_draw_noise_slices_one_draw_per_step_of_the_global_batch():
    full = purr.draw_noise(8, slice(0, 8), 3, 1, 4, 2, 0.5, "cpu")
    halves = [purr.draw_noise(8, slice(r * 4, (r + 1) * 4), 3, 1, 4, 2, 0.5, "cpu") for r in range(2)]
    assert all(torch.equal(f, torch.cat([h[i] for h in halves])) for i, f in enumerate(full))
    again, next_step = (purr.draw_noise(8, slice(0, 8), step, 1, 4, 2, 0.5, "cpu") for step in (3, 4))
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert not torch.equal(full[0], next_step[0])  # new noise each step


def test_rank_batches_slice_the_global_batch_plan():
    idx, flip = appendix.global_batch_plan(50, 2, 8, 1)
    ranks = [list(appendix.RankBatches(50, 2, 3, 8, r, 2, 1)) for r in range(2)]
    assert ranks[0][0] + ranks[1][0] == list(zip(idx.tolist(), flip.tolist()))


def test_logged_losses_are_means_over_processes_and_steps(tmp_path, monkeypatch):
    """Rank 0 logs 1 and 3 over two steps; the other rank's sum, 12 (5 and 7), comes by a stand-in all-reduce.
    """
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(12.0))
    log = appendix.Log(str(tmp_path), 2, 8, 0)
    log.add(1, {"loss": torch.tensor(1.0)}, 0, final=False)
    log.add(2, {"loss": torch.tensor(3.0)}, 0, final=True)
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss"] == 4.0


@pytest.mark.slow  # trains or starts torchrun
def test_two_processes_give_the_same_update_as_one(tmp_path):
    # fp32: bf16 rounds a batch of 4 and one of 8 differently (a CPU with AVX512-BF16 defaults to bf16)
    common = ["--steps", "3", "--global-batch-size", "8", "--demo-size", "200", "--log-every", "1",
              "--precision", "fp32"]
    torchrun(2, "train", *common, "--results-dir", str(tmp_path / "two"))
    train_cli(tmp_path / "one", *common)
    assert final_state(tmp_path / "two")["step"] == final_state(tmp_path / "one")["step"] == 3
    assert_trained_alike(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # trains or starts torchrun
def test_three_splits_of_the_global_batch_give_the_same_weights(tmp_path):
    common = ["--steps", "3", "--global-batch-size", "8", "--demo-size", "200", "--log-every", "1",
              "--precision", "fp32"]  # fp32: bf16 rounds batches of other sizes differently
    torchrun(2, "train", *common, "--grad-accum", "2", "--results-dir", str(tmp_path / "two_by_two"))
    train_cli(tmp_path / "one_by_four", *common, "--grad-accum", "4")
    train_cli(tmp_path / "one", *common)
    assert_trained_alike(tmp_path / "one", tmp_path / "two_by_two", tmp_path / "one_by_four")


@pytest.mark.slow  # trains or starts torchrun
def test_sampling_across_ranks_writes_one_balanced_adm_batch(tiny_ckpt, tmp_path, capsys):
    ckpt = with_perturbed_ema(tiny_ckpt, tmp_path / "ckpt.pt")
    common = ["sample", "--ckpt", ckpt, "--num-steps", "3", "--num-samples", "13", "--batch-size", "4",
              "--entropy-map"]
    torchrun(2, *common, "--out", str(tmp_path / "two.npz"))
    purr.main([*common, "--out", str(tmp_path / "one.npz")])
    assert re.search(r"^sample: 13/13 images, [\d.]+ images/s, done$", capsys.readouterr().err, re.M)
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert two["arr_0"].shape == (13, 32, 32, 3) and two["arr_0"].dtype == np.uint8
    assert np.array_equal(two["arr_1"], np.arange(13) % 10)
    assert np.array_equal(two["arr_0"], one["arr_0"])  # the same images and entropies on any number of ranks
    assert np.array_equal(*(np.asarray(Image.open(tmp_path / f"{n}_entropy.png")) for n in ("two", "one")))
    shards_gone = ["ckpt.pt", "one.npz", "one_entropy.png", "two.npz", "two_entropy.png"]
    assert sorted(os.listdir(tmp_path)) == shards_gone


# Resume: where the run stopped, with only what may change changed.

def test_resume_with_other_data_or_tokenizer_settings_is_one_line(tiny_ckpt, tmp_path):
    for flag, value in (("--demo-size", "300"), ("--vq", "tiny"), ("--image-size", "64"), ("--data", "/in")):
        match = f"trained with {flag} .*, not {value}: resume with the same"
        with pytest.raises(appendix.PurrError, match=match):
            train_cli(tmp_path, "--resume", tiny_ckpt, flag, value)


def test_a_resumed_demo_run_keeps_its_checkpoints_tokenizer(tmp_path, monkeypatch):
    run = train_cli(tmp_path, "--steps", "1", quick=True)  # a 16-code tokenizer, not DEMO_TOKENIZER's 256
    monkeypatch.setattr(vqlib, "fit_tiny", None)  # a resumed run fits nothing
    train_cli(tmp_path, "--resume", os.path.join(run, "checkpoints", "0000001.pt"), "--steps", "2")
    first, last = (appendix.load_checkpoint(os.path.join(run, "checkpoints", f"000000{i}.pt"))
                   for i in (1, 2))
    assert all(torch.equal(v, last["vq"]["state"][k]) for k, v in first["vq"]["state"].items())


@pytest.mark.slow  # trains or starts torchrun
def test_resume_is_exact(tmp_path):
    common = ["--global-batch-size", "8", "--demo-size", "200", "--ckpt-every", "2"]
    train_cli(tmp_path / "straight", "--steps", "4", *common)
    run = train_cli(tmp_path / "resumed", "--steps", "2", *common)
    assert train_cli(tmp_path / "resumed", "--steps", "4", "--resume", *common) == run
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["opt"]["state"][i]["exp_avg_sq"], b["opt"]["state"][i]["exp_avg_sq"])
               for i in a["opt"]["state"])


@pytest.mark.slow  # trains or starts torchrun
def test_resume_with_a_new_lr_trains_at_it(tmp_path):
    common = ["--global-batch-size", "4", "--demo-size", "200", "--decay", "0", "--lr", "1e-3"]
    train_cli(tmp_path, "--steps", "1", *common)
    common[-1] = "1e-5"
    train_cli(tmp_path, "--steps", "2", "--resume", *common)
    ckpt = final_state(tmp_path)
    assert ckpt["opt"]["param_groups"][0]["lr"] == 1e-5 and ckpt["args"]["lr"] == 1e-5
    # and a flag not given on resume keeps the checkpoint's value, not the default
    train_cli(tmp_path, "--steps", "3", "--resume", "--global-batch-size", "4", "--demo-size", "200")
    assert final_state(tmp_path)["opt"]["param_groups"][0]["lr"] == 1e-5


# Signals: a preempted run saves and stops, and resumes as if never stopped.

def test_stop_requests_records_signals_and_restores_handlers():
    outside = []
    guard = lambda signum, frame: outside.append(signum)  # noqa: E731 (no signal may reach the default)
    original = {s: signal.signal(s, guard) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        with appendix.stop_requests() as got:
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                os.kill(os.getpid(), s)
        assert got == [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1] and outside == []
        assert all(signal.getsignal(s) is guard for s in original)
    finally:
        for s, handler in original.items():
            signal.signal(s, handler)


@pytest.mark.slow  # trains or starts torchrun
def test_signal_in_train_finishes_the_step_saves_and_stops(interrupted_run):
    run, seen, _, out = interrupted_run
    assert len(seen) == 1 and os.listdir(os.path.join(run, "checkpoints")) == ["0000001.pt"]
    assert appendix.load_checkpoint(os.path.join(run, "checkpoints", "0000001.pt"))["step"] == 1
    assert "stopped by signal at step 1/3" in out


@pytest.mark.slow  # trains or starts torchrun
def test_the_printed_resume_command_launches_as_the_run_was_launched(monkeypatch, capsys):
    """One process: python; one node: torchrun with its processes; several nodes: per node, with the
    rendezvous flags, to run on every node."""
    nodes = "--nnodes=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT"
    for world, per_node, want in ((1, 1, "with: python purr.py train --resume x.pt"),
                                  (2, 2, "with: torchrun --nproc_per_node=2 purr.py train --resume x.pt"),
                                  (32, 8, f"with: torchrun {nodes} --nproc_per_node=8 purr.py train --resume "
                                          "x.pt (on every node)")):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
        purr.print_resume_command({"steps": 9}, 5, "x.pt", 0, world)
        assert capsys.readouterr().out.strip().endswith(want)
    purr.print_resume_command({"steps": 9}, 5, "x.pt", 1, 2)  # rank 0 alone prints it
    assert capsys.readouterr().out == ""


def test_sigterm_saves_exits_0_and_the_printed_resume_equals_no_interruption(tmp_path):
    """The resume command train prints after a signal needs nothing but the checkpoint: the demo's size and
    tiny tokenizer come back from it (else a refitted tokenizer on the default 10,000 images would train)."""
    common = ["--global-batch-size", "8", "--demo-size", "200", "--ckpt-every", "1000", "--log-every", "1",
              "--num-workers", "0"]
    # in a fresh process, as the cut run, so that the two compare bit for bit
    straight = run_cli("train", "--steps", "40", "--results-dir", str(tmp_path / "straight"), *common)
    assert straight.returncode == 0
    cmd = [sys.executable, os.path.join(HERE, "purr.py"), "train", "--steps", "40", "--results-dir",
           str(tmp_path / "cut"), *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in proc.stdout:  # wait until training is under way, then preempt
        if line.startswith("step 3 "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    reached = appendix.load_checkpoint(appendix.checkpoint_paths(str(tmp_path / "cut"))[-1])["step"]
    assert 3 <= reached < 40 and f"stopped by signal at step {reached}/40" in out
    resumed = run_cli(*re.search(r"resume with: python purr.py (.*)$", out, re.M).group(1).split())
    assert resumed.returncode == 0 and " 200 images, tokenizer tiny (K=256," in resumed.stdout, resumed.stderr
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "cut")
    assert a["step"] == b["step"] == 40
    assert all(torch.equal(v, b["vq"]["state"][k]) for k, v in a["vq"]["state"].items())  # the codebook
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


# Checkpoints: a failed or bad save never replaces a good checkpoint.

def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save failing half-way (as a full disk or a quota makes it fail) leaves the previous checkpoint,
    and nothing at all, under the new file's final name or beside it."""
    first, second = str(tmp_path / "0000001.pt"), str(tmp_path / "0000002.pt")
    appendix.save_checkpoint({"step": 1}, first)
    real = torch.save

    def half_save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file "
                           "data/0")
    monkeypatch.setattr(torch, "save", half_save)
    for path in (second, first):  # a new name, and over an existing checkpoint
        with pytest.raises(appendix.PurrError, match="cannot write checkpoint.*0000001.pt is intact"):
            appendix.save_checkpoint({"step": 2, "big": torch.zeros(1000)}, path)
        assert sorted(os.listdir(tmp_path)) == ["0000001.pt"]
        assert torch.load(first, weights_only=True) == {"step": 1}


@pytest.mark.slow  # trains or starts torchrun
def test_keep_leaves_the_newest_checkpoints(tmp_path):
    run = train_cli(tmp_path, "--steps", "4", "--ckpt-every", "1", "--keep", "2", "--global-batch-size", "4",
                    "--demo-size", "200")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000003.pt", "0000004.pt"]


@pytest.mark.slow  # trains or starts torchrun
def test_save_into_a_full_disk_is_one_line_and_keeps_the_previous(tmp_path):
    run = train_cli(tmp_path, "--steps", "1", "--global-batch-size", "4", "--demo-size", "200")
    first = os.path.join(run, "checkpoints", "0000001.pt")
    os.symlink("/dev/full", os.path.join(run, "checkpoints", "0000002.pt.tmp"))  # writes fail with ENOSPC
    proc = run_cli("train", "--steps", "2", "--resume", "--results-dir", str(tmp_path), "--demo-size", "200")
    assert_one_line_error(proc, "cannot write checkpoint", "0000002.pt", "GiB free", "0000001.pt is intact")
    assert appendix.load_checkpoint(first)["step"] == 1
    assert not os.path.lexists(first.replace("1.pt", "2.pt.tmp"))


@pytest.mark.slow  # trains or starts torchrun
def test_truncated_checkpoint_is_a_clear_error_and_the_previous_survives(tmp_path):
    run = train_cli(tmp_path, "--steps", "2", "--ckpt-every", "1", "--global-batch-size", "4", "--demo-size",
                    "200")
    first, last = (os.path.join(run, "checkpoints", f"000000{i}.pt") for i in (1, 2))
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    assert_one_line_error(run_cli("sample", "--ckpt", last), "cannot be read", "truncated", first)
    assert_one_line_error(run_cli("train", "--resume", "--results-dir", str(tmp_path), "--demo-size", "200"),
                          "truncated", first)
    assert appendix.load_checkpoint(first)["step"] == 1
    assert_one_line_error(run_cli("train", "--resume", first, "--model", "T/1", "--results-dir",
                                  str(tmp_path), "--demo-size", "200"), "--model N/4", "resume with the same")


@pytest.mark.slow  # trains or starts torchrun
def test_non_finite_loss_stops_with_one_line_and_no_bad_checkpoint(tmp_path):
    proc = run_cli("train", "--steps", "30", "--ckpt-every", "1", "--lr", "1e12", "--global-batch-size", "8",
                   "--demo-size", "200", "--results-dir", str(tmp_path))
    assert_one_line_error(proc, "not finite at step", "last good checkpoint")
    saved = appendix.checkpoint_paths(str(tmp_path))
    assert saved and all(torch.isfinite(v).all()
                         for p in saved for v in appendix.load_checkpoint(p)["model"].values())
    assert os.path.basename(saved[-1]) in proc.stderr


# Images: ADM's crop of any mode; an unreadable file is named and replaced, too many stop the run.

def test_center_crop_equals_adms_center_crop_arr():
    def adm(pil_image, image_size):  # guided-diffusion's image_datasets.center_crop_arr
        while min(*pil_image.size) >= 2 * image_size:
            pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
        scale = image_size / min(*pil_image.size)
        pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
        arr = np.array(pil_image.convert("RGB"))
        crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
        return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]
    x = ((smooth_images(1, 64)[0] + torch.rand(3, 64, 64) * 0.3).permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5
    im = Image.fromarray(x.round().byte().numpy()).resize((150, 97))
    for size in (40, 64):  # with and without halving first
        assert np.array_equal(appendix.center_crop(im, size), adm(im, size))


def test_center_crop_converts_to_rgb_before_resizing():
    """ADM converts to RGB first: a palette image resized as it is would be resized nearest-neighbour."""
    x = (smooth_images(1, 64)[0].permute(1, 2, 0) + 1) * 127.5
    palette = Image.fromarray(x.round().byte().numpy()).resize((96, 64)).quantize(64)  # 'P', 96x64
    out = appendix.center_crop(palette, 40)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert np.array_equal(out, appendix.center_crop(palette.convert("RGB"), 40))


def test_16_bit_float_alpha_palette_and_cmyk_images_read_as_their_grey(tmp_path):
    """A 0..1 grey ramp in every mode crops to the 8-bit ramp's crop (PIL's convert('RGB') clips I;16, I and F
    to white); folders named like images are no images."""
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))
    grey = Image.fromarray((255 * ramp).round().astype(np.uint8))
    palette = grey.convert("P", palette=Image.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    modes = {"I;16": Image.fromarray((65535 * ramp).round().astype(np.uint16)),
             "I": Image.fromarray((65535 * ramp).round().astype(np.int32)),
             "F": Image.fromarray(ramp.astype(np.float32)),
             "LA": Image.merge("LA", [grey, grey]), "P": palette, "CMYK": grey.convert("CMYK")}
    want = appendix.center_crop(grey, 32)
    for mode, im in modes.items():
        for crop in (appendix.center_crop, fid.center_crop):  # training's reading and FID's
            assert im.mode == mode and np.abs(crop(im, 32).astype(int) - want).max() <= 1, (mode, crop)
    (tmp_path / "grey" / "folder.png").mkdir(parents=True)
    modes["I;16"].save(tmp_path / "grey" / "ramp.png")  # PNG keeps the 16 bits
    data = appendix.ImageFolder(str(tmp_path), 32)
    assert len(data) == 1 and abs(data[(0, 0)][0].float().mean().item() - 127.5) < 1
    n, batches = fid.images(str(tmp_path / "grey"), 4)  # an uncropped folder, as fid.py reads it
    assert n == 1 and abs(next(batches).float().mean().item() - 127.5) < 1


@pytest.mark.parametrize("module, never", [("vq", ("fid", "purr")), ("fid", ("vq", "purr", "appendix")),
                                           ("appendix", ("vq", "fid", "purr"))])
def test_dependencies_run_one_way(module, never):
    """The tokenizers, FID and the plumbing stand alone: vq.py takes its crop from appendix.py, which knows
    nothing of the method; fid.py has its own."""
    code = f"import sys, {module}; print(' '.join(m for m in {never!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == []


def test_unreadable_images_stop_the_run_past_a_thousandth_of_the_data():
    files = [(f"{i}.png", 0) for i in range(20_000)]
    folder = type("Folder", (), {"files": files, "__len__": lambda self: len(files)})()
    unreadable = appendix.Unreadable(folder, 1)
    unreadable.add([(i, "broken") for i in range(20)], 0)  # 0.1 %: the run goes on
    with pytest.raises(appendix.PurrError, match=r"21 unreadable images in --data \(more than 20\)"):
        unreadable.add([(20, "broken")], 0)


def test_an_unreadable_files_replacement_carries_its_own_label(tmp_path):
    damaged_folder(tmp_path)
    data = appendix.ImageFolder(str(tmp_path), 32)
    i = next(i for i, (f, _) in enumerate(data.files) if f.endswith("truncated.JPEG"))  # circle's last file
    x, y, bad = data[(i, 0)]
    assert [j for j, _ in bad] == [i] and data.labels[i + 1] != data.labels[i]
    assert y == data.labels[i + 1] and torch.equal(x, data[(i + 1, 0)][0])


@pytest.mark.slow  # trains or starts torchrun
def test_unreadable_images_are_named_once_replaced_and_runs_agree(image_folder, tmp_path):
    bad = damaged_folder(tmp_path / "data")
    tiny = str(image_folder / "tiny.pt")
    # fp32: bf16 rounds the per-process batches differently
    common = ["train", "--data", str(tmp_path / "data"), "--vq", "tiny", "--vq-ckpt", tiny, "--image-size",
              "32", "--model", "T/2", "--steps", "6", "--global-batch-size", "8", "--log-every", "3",
              "--num-workers", "0", "--precision", "fp32"]
    proc = run_cli(*common, "--results-dir", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stderr
    named = [l for l in proc.stderr.splitlines() if l.startswith("unreadable image")]
    assert sorted(l.split()[2] for l in named) == sorted(str(tmp_path / "data" / b) for b in bad), named
    (log_file,) = Path(tmp_path, "one").rglob("log.jsonl")
    log = [json.loads(l) for l in open(log_file)]
    assert log[-1]["unreadable"] == 2
    torchrun(2, *common, "--results-dir", str(tmp_path / "two"))
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert all(torch.allclose(one["model"][k], two["model"][k], atol=1e-5) for k in one["model"])
    proc = run_cli("extract", "--data", str(tmp_path / "data"), "--vq", "tiny", "--vq-ckpt", tiny, "--out",
                   str(tmp_path / "tok"), "--image-size", "32", "--num-workers", "0")
    assert proc.returncode == 0 and proc.stderr.count("unreadable image") == 2, proc.stderr
    assert np.load(tmp_path / "tok" / "done.npy").all()


@pytest.mark.slow  # trains or starts torchrun
def test_too_many_unreadable_images_stop_with_one_line(image_folder, tmp_path):
    damaged_folder(tmp_path / "data")
    for i in range(5):
        (tmp_path / "data" / "star" / f"broken{i}.png").write_bytes(b"not an image")
    proc = run_cli("train", "--data", str(tmp_path / "data"), "--vq", "tiny", "--vq-ckpt",
                   str(image_folder / "tiny.pt"), "--image-size", "32", "--model", "T/2", "--steps", "8",
                   "--global-batch-size", "32", "--num-workers", "0", "--results-dir", str(tmp_path / "r"))
    *named, last = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(named) == 7
    assert last.startswith("purr train: error: 7 unreadable images")
    assert "more than 5" in last and "broken0.png" in last


# Extract: the data's tokens, encoded once for every run.

@pytest.mark.slow  # trains or starts torchrun
def test_extract_tokens_equal_direct_encoding_and_train_the_same(image_folder, tmp_path):
    data, tiny = str(image_folder / "data"), str(image_folder / "tiny.pt")
    purr.main(["extract", "--data", data, "--vq", "tiny", "--vq-ckpt", tiny, "--out", str(tmp_path / "tok"),
               "--image-size", "32", "--batch-size", "16", "--num-workers", "0"])
    tokens = np.load(tmp_path / "tok" / "tokens.npy")
    folder, tok = appendix.ImageFolder(data, 32), vqlib.load_tokenizer("tiny", tiny)
    x = torch.stack([folder[(i, 0)][0] for i in range(len(folder))])
    assert tokens.dtype == np.uint16 and tokens.shape == (40, 2, 8, 8)
    assert np.array_equal(tokens[:, 0], tok.encode(appendix.to_unit(x)).numpy())
    assert np.array_equal(tokens[:, 1], tok.encode(appendix.to_unit(x.flip(3))).numpy())
    assert np.array_equal(np.load(tmp_path / "tok" / "labels.npy"), folder.labels.numpy())
    first = []
    for src in (data, str(tmp_path / "tok")):
        run = train_cli(tmp_path / os.path.basename(src), "--data", src, "--vq", "tiny", "--vq-ckpt", tiny,
                        "--image-size", "32", "--model", "T/2", "--steps", "1", "--global-batch-size", "8",
                        "--log-every", "1")
        first.append(json.loads(open(os.path.join(run, "log.jsonl")).readline())["loss"])
    assert first[0] == pytest.approx(first[1], rel=1e-6)


@pytest.mark.slow  # trains
def test_a_token_folder_trains_and_samples_with_the_tokenizer_it_was_extracted_with(official, image_folder,
                                                                                     tmp_path, monkeypatch):
    """`train --data TOKENS` needs no tokenizer flag: the run and its checkpoints take the folder's (here
    LlamaGen's layout at width 32), and `sample` finds it again."""
    path, golden = official("seeded", "llamagen-vq-ds8")
    real = vqlib.load_tokenizer
    monkeypatch.setattr(vqlib, "load_tokenizer", lambda name, ckpt: real(name, ckpt, **golden["config"]))
    tokens = str(tmp_path / "tok")
    purr.main(["extract", "--data", str(image_folder / "data"), "--vq", "llamagen-vq-ds8", "--vq-ckpt", path,
               "--out", tokens, "--image-size", "32", "--num-workers", "0"])
    train_cli(tmp_path, "--data", tokens, "--model", "N/1", "--steps", "1", "--global-batch-size", "4")
    ckpt = final_state(tmp_path)
    assert ckpt["vq"] == {"name": "llamagen-vq-ds8", "ckpt": os.path.abspath(path)}
    assert (ckpt["args"]["vq"], ckpt["args"]["codebook_size"], ckpt["args"]["latent_size"]) == \
        ("llamagen-vq-ds8", 16384, 4)
    purr.main(["sample", "--results-dir", str(tmp_path), "--num-steps", "2", "--num-samples", "2",
               "--class-labels", "0", "--out", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (2 + 2 * 34, 2 + 34)


@pytest.mark.slow  # trains or starts torchrun
def test_interrupted_extract_resumes_and_incomplete_tokens_are_refused(image_folder, tmp_path):
    args = ["extract", "--data", str(image_folder / "data"), "--vq", "tiny", "--vq-ckpt",
            str(image_folder / "tiny.pt"), "--out", str(tmp_path / "tok"), "--image-size", "32",
            "--batch-size", "16", "--num-workers", "0"]
    purr.main(args)
    done = np.load(tmp_path / "tok" / "done.npy", mmap_mode="r+")
    complete = np.load(tmp_path / "tok" / "tokens.npy").copy()
    done[5:20] = False
    done.flush()
    assert_one_line_error(run_cli("train", "--data", str(tmp_path / "tok")), "incomplete", "25/40")
    purr.main(args)
    assert np.load(tmp_path / "tok" / "done.npy").all()
    assert np.array_equal(np.load(tmp_path / "tok" / "tokens.npy"), complete)


# Speed: bench, precision, gradient checkpointing, torch.compile.

def test_bench_prints_step_time_throughput_flops_and_memory(capsys):
    common = ["bench", "--model", "T/2", "--latent-size", "8", "--codebook-size", "64", "--batch-size", "4",
              "--steps", "2", "--warmup", "1", "--precision", "fp32"]
    purr.main(common)
    out = capsys.readouterr().out
    assert "ms/step" in out and "img/s" in out and "TFLOP/step" in out and "GiB peak" in out
    outside = int(re.search(r"(\d+)% of the step outside matrix multiplies", out).group(1))
    assert 0 < outside < 100
    purr.main([*common, "--sample"])
    out = capsys.readouterr().out
    assert "NFE/s" in out and "images/s at 100 Euler steps" in out and "cfg 1.5" in out


def test_precision_default_follows_the_hardware():
    fast = (torch.cuda.is_bf16_supported() if torch.cuda.is_available()
            else torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert appendix.default_precision() == ("bf16" if fast else "fp32")
    assert purr.parser().parse_args(["sample"]).precision == appendix.default_precision()


def test_grad_checkpoint_gives_the_same_loss_and_gradients():
    model, K = perturbed_dit(K=32, d=4, size=4, patch=2), 32
    batch = purr.Batch(torch.randint(0, K, (2, 4, 4)), torch.tensor([0, 1]), torch.randn(2, 4, 4, 4),
                       torch.rand(2), None)
    codebook = torch.randn(K, 4)
    results = []
    for checkpointing in (False, True):
        model.grad_checkpoint = checkpointing
        results.append(loss_and_grads(model, batch, codebook))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    assert loss == loss_checkpointed
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads.values(), grads_checkpointed.values()))


def test_bf16_training_step_matches_fp32():
    """One step from the same weights and batch: the loss within 1 % and every parameter gradient
    within 5 % of its fp32 norm (bf16 keeps 8 bits of mantissa)."""
    model, K = perturbed_dit(K=64, d=4, size=4, patch=1), 64
    codebook, c = torch.randn(K, 4), torch.randint(0, K, (4, 4, 4))
    y, z0, t = torch.tensor([0, 1, 2, 3]), torch.randn(4, 4, 4, 4), torch.rand(4)
    batch = purr.Batch(c, y, z0, t, None)
    (loss32, grads32), (loss16, grads16) = (loss_and_grads(model, batch, codebook, bf16)
                                            for bf16 in (False, True))
    assert abs(loss16 / loss32 - 1) < 0.01
    for n, g in grads32.items():
        assert (grads16[n] - g).norm() <= 0.05 * g.norm() + 1e-8, n


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_step_equals_eager():
    model, K = perturbed_dit(K=32, d=4, size=4, patch=2), 32
    codebook, c = torch.randn(K, 4), torch.randint(0, K, (2, 4, 4))
    batch = purr.Batch(c, torch.tensor([0, 1]), torch.randn(2, 4, 4, 4), torch.rand(2), None)
    nets = (model, torch.compile(copy.deepcopy(model)))  # the copy before any backward: no gradients
    (l_eager, g_eager), (l_comp, g_comp) = (loss_and_grads(net, batch, codebook) for net in nets)
    assert abs(l_eager - l_comp) < 1e-5 * abs(l_eager)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_eager.values(), g_comp.values()))


@pytest.mark.slow  # trains or starts torchrun
def test_sample_and_bench_compile_run_the_compiled_network(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """--compile compiles what sampling runs (forward_with_cfg), not a wrapper it never calls: dynamo's
    backend is swapped for one that counts the runs of the graphs it captured (no C++ compiler needed)."""
    runs, real = [], torch.compile
    backend = lambda gm, inputs: lambda *a: runs.append(1) or gm(*a)  # noqa: E731
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: real(*a, **{**kw, "backend": backend}))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    purr.main(["sample", "--ckpt", tiny_ckpt, "--num-steps", "3", "--num-samples", "2", "--compile",
               "--out", str(tmp_path / "s.png")])
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0 and len(runs) >= 3, runs
    runs.clear()
    purr.main(["bench", "--model", "T/2", "--latent-size", "8", "--codebook-size", "64", "--batch-size", "2",
               "--steps", "2", "--warmup", "1", "--precision", "fp32", "--sample", "--compile"])
    assert "compiled" in capsys.readouterr().out and len(runs) >= 3
    torch._dynamo.reset()


# --- The authors' code: github razvanmatisan/purrception de66f96 --------------------------------------------

# Their training choices as settings: clipping, EMA warm-up, t's lower end, AdamW's eps, the time input.

THEIR_SETTINGS = ("time_scale", "max_grad_norm", "ema_warmup", "t_min", "adam_eps")


def test_ema_warmup_decays_as_torch_ema():
    on, off = {"ema_decay": 0.9999, "ema_warmup": True}, {"ema_decay": 0.9999, "ema_warmup": False}
    assert [purr.ema_decay(on, n) for n in (1, 2, 1000)] == [2 / 11, 3 / 12, 1001 / 1010]
    assert purr.ema_decay(on, 10 ** 6) == purr.ema_decay(off, 1) == 0.9999


def test_draw_noise_t_min():
    t0 = purr.draw_noise(64, slice(0, 64), 3, 1, 2, 2, 0.0, "cpu")[1]
    t = purr.draw_noise(64, slice(0, 64), 3, 1, 2, 2, 0.0, "cpu", t_min=0.25)[1]
    assert t.min() >= 0.25 and torch.allclose(t, 0.25 + 0.75 * t0)


def test_settings_absent_from_an_old_checkpoint_keep_its_behaviour():
    """A checkpoint saved before time_scale, max_grad_norm, ema_warmup and t_min existed resumes and samples
    as it was trained (1000 t, no clipping, no warm-up, t ~ U(0, 1)); new runs take today's defaults."""
    old = {"args": {k: v for k, v in purr.SETTINGS.items() if k not in purr.LEGACY} | {"data": "d"}}
    cfg, _ = purr.resolve_config(purr.parser().parse_args(["train", "--resume", "x.pt"]), old)
    assert {k: cfg[k] for k in THEIR_SETTINGS} == {"time_scale": 1000.0, "max_grad_norm": 0.0,
                                                   "ema_warmup": False, "t_min": 0.0, "adam_eps": 1e-6}
    a = {"model": "N/2", "latent_size": 4, "latent_channels": 4, "codebook_size": 8, "num_classes": 2,
         "objective": "purr"}
    assert purr.build_model(purr.saved_settings({"args": a})).t_embedder.time_scale == 1000.0
    new = {k: [purr.resolve_config(purr.parser().parse_args(["train", *f]), None)[0][s]
               for s in THEIR_SETTINGS] for k, f in (("demo", []), ("data", ["--data", "d"]))}
    assert new == {"demo": [1000.0, 0.0, False, 0.0, 1e-6], "data": [1.0, 1.0, True, 1e-3, 1e-6]}  # README


def test_max_grad_norm_clips_the_global_norm_as_by_hand():
    """SGD, so the update is the gradient itself (Adam's first step would hide its scale)."""
    torch.manual_seed(0)
    codebook = torch.randn(16, 4)
    b = purr.Batch(torch.randint(0, 16, (2, 4, 4)), torch.tensor([0, 1]), torch.randn(2, 4, 4, 4),
                   torch.rand(2), None)
    models = [perturbed_dit(dims=NARROW) for _ in range(3)]
    norms = [purr.train_step(m, torch.optim.SGD(m.parameters(), lr=1.0), [b], "purr", codebook, 1e-5,
                             contextlib.nullcontext(), clip)["grad_norm"]
             for m, clip in zip(models, (0.01, 0.0))]
    ref = models[2]
    purr.OBJECTIVES["purr"].loss(ref, b, codebook, 1e-5)["loss"].backward()
    grads = [p.grad for p in ref.parameters() if p.grad is not None]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm > 0.1 and torch.allclose(norms[0], norm) and torch.allclose(norms[1], norm)
    start = perturbed_dit(dims=NARROW)
    for clipped, unclipped, p, s in zip(models[0].parameters(), models[1].parameters(), ref.parameters(),
                                        start.parameters()):
        g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(clipped, s - g * 0.01 / (norm + 1e-6), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(unclipped, s - g, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # trains
def test_official_training_settings_train_log_and_resume(tmp_path, monkeypatch):
    """One demo step with every setting of their code: the EMA's first update is torch_ema's (decay 2/11),
    t >= t_min, AdamW's eps and the time input as given, grad_norm logged; a resumed run restores them all."""
    seen, built = record_training(monkeypatch)
    flags = ["--ema-warmup", "--ema-decay", "0.9", "--max-grad-norm", "0.05", "--t-min", "0.5", "--adam-eps",
             "1e-7", "--time-scale", "1"]
    run = train_cli(tmp_path, "--steps", "1", "--log-every", "1", *flags, quick=True)
    ckpt = final_state(tmp_path)
    model, init = built[0]  # the model trained and its weights before training (the EMA's start)
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(ckpt["ema"][k], 2 / 11 * init[k] + 9 / 11 * v, atol=1e-6, rtol=0)
    assert torch.cat([b.t for b in seen[0]]).min() >= 0.5 and ckpt["opt"]["param_groups"][0]["eps"] == 1e-7
    assert model.t_embedder.time_scale == 1.0
    line = json.loads(Path(run, "log.jsonl").read_text().splitlines()[-1])
    assert line["grad_norm"] > 0.05
    a = ckpt["args"]
    assert [a[k] for k in THEIR_SETTINGS] == [1, 0.05, True, 0.5, 1e-7]
    train_cli(tmp_path, "--resume", "--steps", "2", quick=True)
    b = final_state(tmp_path)["args"]
    assert {k: b[k] for k in THEIR_SETTINGS} == {k: a[k] for k in THEIR_SETTINGS}
    with pytest.raises(appendix.PurrError, match="max-grad-norm"):
        train_cli(tmp_path, "--resume", "--steps", "3", "--max-grad-norm", "2", quick=True)


# Their checkpoint: fixtures/make_goldens.py ran their DiT, training loss and sampler on seeded weights saved
# as their checkpointer.py saves them; tools/from_official.py converts that file and purr reproduces what
# their code computed. CFG: purr's lerp rounds unlike their u + s (c - u) (~1e-6 relative).

@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """(golden, their checkpoint, the tokenizer file, the converted purr checkpoint's path)."""
    sys.path.insert(0, os.path.join(HERE, "tools"))
    import from_official
    root = tmp_path_factory.mktemp("authors")
    g = torch.load(Path(HERE, "fixtures", "official_dit_golden.pt"), weights_only=True)
    theirs = seeded.write(g["recipe"], root / "official.pth")
    tok = seeded.write(g["vq_recipe"], root / "vq.pt")
    (root / "hparams.json").write_text(json.dumps(g["hparams"]))
    from_official.main([str(theirs), "--hparams", str(root / "hparams.json"), "--vq", "llamagen-vq-ds8",
                        "--vq-ckpt", str(tok), "--out", str(root / "purr.pt")])
    return g, theirs, tok, root / "purr.pt"


def ch32_llamagen(monkeypatch, K=64):
    """load_tokenizer builds the seeded file's tokenizer (width 32, K codes)."""
    real = vqlib.load_tokenizer
    monkeypatch.setattr(vqlib, "load_tokenizer", lambda name, path: real(name, path, ch=32, codebook_size=K))


def test_official_checkpoint_converts_to_purr_layout(authors):
    g, theirs, _, ours = authors
    ckpt, official = appendix.load_checkpoint(str(ours)), torch.load(theirs, weights_only=True)
    assert seeded.digest(official["backbone_state_dict"]) == g["recipe"]["sha256"]
    renamed = {k.replace("x_embedder.proj.", "x_embedder.")
               .replace("y_embedder.embedding_table.", "y_embedder.")
               .replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2."): v
               for k, v in official["backbone_state_dict"].items()}
    assert ckpt["model"].keys() == renamed.keys()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in renamed.items())
    shadow = official["ema_state_dict"]["shadow_params"]
    assert len(shadow) == len(ckpt["ema"])
    assert all(torch.equal(e, s) for e, s in zip(ckpt["ema"].values(), shadow))
    a = ckpt["args"]
    assert (ckpt["step"], a["model"], a["objective"], a["time_scale"], a["codebook_size"]) == \
        (1234, "N/2", "purr", 1.0, 64) and a["num_classes"] == 3
    assert (a["adam_eps"], a["max_grad_norm"], a["ema_warmup"], a["t_min"], a["class_dropout"]) == \
        (1e-8, 1.0, True, 1e-3, 0.0)
    assert ckpt["opt"]["state"] == {} and ckpt["opt"]["param_groups"][0]["eps"] == 1e-8
    assert set(a) >= set(purr.SETTINGS)


def test_official_dit_loss_and_sampler_goldens(authors):
    """Their positional table, logits (cfg 1, 1.5 and the null class at three t), Purrception loss with the
    z-loss, velocities (their eps = 0) and a 6-point Euler trajectory (Algorithm 2's T = 5), on the EMA."""
    g, _, _, ours = authors
    a = appendix.load_checkpoint(str(ours))
    model = purr.build_model(a["args"])
    model.load_state_dict(a["ema"])
    model.eval()
    assert torch.equal(purr.sincos_2d(128, 2)[None], g["pos_embed"])
    z, y, codebook = g["z"], g["y"], g["codebook"]
    with torch.no_grad():
        for i, t in enumerate(g["t"].tolist()):
            for j, s in enumerate(g["cfg"].tolist()):
                labels, scale = (torch.full_like(y, 3), 1.0) if s == 0 else (y, s)  # their cfg 0: null class
                out = purr.unpatchify(purr.network(model, z, t, labels, scale))
                torch.testing.assert_close(out, g["logits"][i, j], atol=3e-5 if s == 1.5 else 1e-6, rtol=0)
                if s:
                    v = purr.purr_velocity(model, codebook, y, 0.8, s)(t, z)
                    torch.testing.assert_close(v, g["velocity"][i, j], atol=3e-5 / (1 - t), rtol=0)
        batch = purr.Batch(g["c"], y, g["z0"], g["t_train"], None)
        torch.testing.assert_close(purr.purr_loss(model, batch, codebook, 1e-5)["loss"], g["loss"],
                                   atol=1e-6, rtol=0)
        z1 = purr.sample_latents(model, codebook, y, g["trajectory_z0"], 0.8, 1.5, g["ode_steps"] - 1)
    torch.testing.assert_close(z1, g["trajectory"], atol=2e-5, rtol=0)  # their 1/(1 - t + 1e-6): ~4e-6


def test_official_checkpoint_samples_through_the_cli(authors, tmp_path, monkeypatch, capsys):
    ch32_llamagen(monkeypatch)
    out = tmp_path / "grid.png"
    purr.main(["sample", "--ckpt", str(authors[3]), "--num-steps", "5", "--class-labels", "0", "2",
               "--num-samples", "2", "--cfg-scale", "1.5", "--out", str(out), "--precision", "fp32"])
    assert "2 samples from" in capsys.readouterr().out and Image.open(out).size[0] >= 32


def test_official_llamagen_mu_uses_the_normalised_rows(authors, monkeypatch):
    """Their training targets are LlamaGen's quantizer outputs (unit rows); their sampler's mu reads the raw
    rows. purr's sampler reads the unit rows, as its training does: its trajectory is theirs on unit rows and
    far from theirs on the raw ones."""
    g, _, _, ours = authors
    ch32_llamagen(monkeypatch)
    model, tok, _, _ = purr.load_sampler(str(ours))
    assert torch.equal(tok.codebook, g["codebook"])
    assert torch.equal(tok.embed(g["c"]), g["codebook"][g["c"]].permute(0, 3, 1, 2))
    seen = []
    real = vqlib.Quantizer.forward
    monkeypatch.setattr(vqlib.Quantizer, "forward", lambda self, z: seen.append(z) or real(self, z))  # z_1
    purr.sample_codes(model, tok, "purr", g["y"], g["trajectory_z0"], 0.8, 1.5, g["ode_steps"] - 1)
    torch.testing.assert_close(seen[0], g["trajectory"], atol=2e-5, rtol=0)
    assert (seen[0] - g["trajectory_raw_codebook"]).abs().max() > 0.05


@pytest.mark.parametrize("edit, words", [({"model_type": "dfm"}, ["dfm", "DFM"]),
                                         ({"backbone_hparams": {"depth": 5}}, ["depth 5", "sizes"]),
                                         ({"autoencoder_type": "stablediffusion"}, ["--vq llamagen-vq-ds8"])])
def test_official_conversion_refuses_in_one_line(authors, tmp_path, edit, words):
    g, theirs, tok, _ = authors
    hp = {**g["hparams"], **edit, "backbone_hparams": {**g["hparams"]["backbone_hparams"],
                                                       **edit.get("backbone_hparams", {})}}
    (tmp_path / "hparams.json").write_text(json.dumps(hp))
    proc = run_cli(str(theirs), "--hparams", str(tmp_path / "hparams.json"), "--vq", "llamagen-vq-ds8",
                   "--vq-ckpt", str(tok), "--out", str(tmp_path / "x.pt"), script="tools/from_official.py")
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "x.pt").exists()


# --- vq.py: the official tokenizers against the original code's outputs (random weights, ch = 32) -----------

TOKENIZERS = ["sd-vq-f8", "llamagen-vq-ds8"]


def golden_case(official, name, source="seeded"):
    ckpt, golden = official(source, name)
    return ckpt, golden, vqlib.load_tokenizer(name, ckpt, **golden["config"])


class Payload:
    """Unpickling this runs `call` on `arg`: what a malicious checkpoint would do."""
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_quantize_inverts_embed(name):
    torch.manual_seed(0)
    tok = vqlib.build_tokenizer(name, ch=32)
    c = torch.randint(len(tok.codebook), (3, 16, 16))
    assert torch.equal(tok.quantize(tok.embed(c)), c)
    if name == "llamagen-vq-ds8":  # latents are compared on the sphere: scale does not matter
        assert torch.equal(tok.quantize(3 * tok.embed(c)), c)


def test_tiny_round_trip_and_reload(tmp_path):
    tok = vqlib.fit_tiny(smooth_images(8, 32), codebook_size=64, dim=8, patch=4, iters=5)
    c = torch.arange(64).view(1, 8, 8)
    assert torch.equal(tok.encode(tok.decode(c)), c)
    assert torch.equal(tok.quantize(tok.embed(c)), c)
    spec = {"name": "tiny", "config": tok.config(), "state": tok.state_dict()}
    torch.save(spec, tmp_path / "tiny.pt")
    torch.save({"model": {}, "args": {}, "vq": spec}, tmp_path / "run.pt")  # inside a purr checkpoint
    x = smooth_images(2, 32, seed=1)
    for path in ("tiny.pt", "run.pt"):
        loaded = vqlib.load_tokenizer("tiny", str(tmp_path / path))
        assert loaded.config() == tok.config() and torch.equal(loaded.encode(x), tok.encode(x))
    with pytest.raises(vqlib.TokenizerError, match="purr checkpoint"):
        vqlib.load_tokenizer("tiny")


def test_nearest_codes_are_found_in_full_fp32_whatever_tf32(monkeypatch):
    """Every quantizer path (encode and quantize of the tiny and the official tokenizers: training's encode
    and sampling's last quantize) finds its nearest code with TF32 off, even with TF32 on globally (purr's GPU
    setting), and the global setting comes back after."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x = smooth_images(2, 16)
    for tok in (vqlib.fit_tiny(x, codebook_size=16, iters=2), vqlib.build_tokenizer("sd-vq-f8", ch=32)):
        with TF32Seen() as seen:
            tok.quantize(tok.embed(tok.encode(x)))
        assert len(seen.products) >= 2 and not any(seen.products), tok.name
        assert torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("name", [*TOKENIZERS, "inception"])
def test_seeded_checkpoints_are_the_goldens_weights_in_the_official_layouts(official, name):
    """The recipe gives, here, the very tensors the goldens were computed with (their digest), in the
    published files' containers, extra keys included."""
    ckpt, g = official("seeded", name)
    obj = torch.load(ckpt, weights_only=True)
    sd = {"sd-vq-f8": obj.get("state_dict"), "llamagen-vq-ds8": obj.get("model"), "inception": obj}[name]
    assert seeded.digest(sd) == g["recipe"]["sha256"]
    if name == "sd-vq-f8":  # a pytorch-lightning checkpoint: the training loss's weights beside the model's
        assert "global_step" in obj and any(k.startswith("loss.discriminator.") for k in sd)
    if name == "llamagen-vq-ds8":
        assert sd["quantize.codebook_used"].shape == (65536,)
    if name == "inception":
        assert len(sd) == 566 and sd["fc.weight"].shape == (1008, 2048)  # the official file's keys


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", TOKENIZERS)
def test_matches_original_outputs(official, name, source):
    _, g, tok = golden_case(official, name, source)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert tok.name == name and tok.downsample == 8
    with torch.no_grad():
        torch.testing.assert_close(tok.quant_conv(tok.encoder(g["images"])), g["pre_quant"], atol=3e-5,
                                   rtol=0)
    c = tok.encode(g["images"])
    assert c.dtype == torch.long and torch.equal(c, g["indices"])
    torch.testing.assert_close(tok.embed(g["indices"]), g["quant"], atol=1e-6, rtol=0)
    decoded = tok.decode(g["indices"])
    torch.testing.assert_close(decoded, g["decoded"], atol=1e-4, rtol=0)
    assert decoded.is_contiguous() and not decoded.is_inference() and not c.is_inference()
    decoded.clamp_(-1, 1)  # callers may edit outputs in place
    # a float latent as is
    torch.testing.assert_close(tok.decode(g["quant"]), g["decoded"], atol=1e-4, rtol=0)
    if name == "llamagen-vq-ds8":  # the latent space is the unit sphere
        torch.testing.assert_close(tok.codebook.norm(dim=1), torch.ones(len(tok.codebook)))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_fp32_accuracy_with_large_mean_activations(official, name):
    """Activations with a large mean (100 here: both conv_in biases raised) are where PyTorch's channels-last
    GroupNorm loses fp32 accuracy (E[x^2] - E[x]^2 cancels: errors of 3e-2 and more here). Encoding and
    decoding, of embed's channels-last-strided latents too, stay as close to a float64 run as the original
    layout does (contiguous, stock GroupNorm), within a factor 2 for the order of rounding."""
    ckpt, g = official("seeded", name)

    def model(dtype=torch.float32, original_layout=False):
        tok = vqlib.load_tokenizer(name, ckpt, **g["config"])
        tok.encoder.conv_in.bias.add_(100)
        tok.decoder.conv_in.bias.add_(100)
        if original_layout:
            tok.to(memory_format=torch.contiguous_format)
            for m in tok.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.__class__ = torch.nn.GroupNorm
        return tok.to(dtype)

    tok, x = model(), g["images"][:1]
    z = tok.embed(g["indices"][:1])

    def run(tok, dtype):  # encode's float path (its indices would hide the error), and decode's
        with torch.no_grad():
            return (tok.quant_conv(tok.encoder(x.to(dtype))).double(),
                    tok.decoder(tok.post_quant_conv(z.contiguous().to(dtype))).double())
    ours = run(tok, torch.float32)[0], tok.decode(g["indices"][:1]).double()
    exact = run(model(torch.float64), torch.float64)
    original = run(model(original_layout=True), torch.float32)
    for what, ref, theirs, mine in zip(("encode", "decode"), exact, original, ours):
        err, err_original = (mine - ref).abs().max().item(), (theirs - ref).abs().max().item()
        assert err <= 2 * err_original, f"{what}: {err:.2e} vs the original layout's {err_original:.2e}"


def test_full_ldm_checkpoint_with_pickled_objects(official, tmp_path):
    """A full LDM checkpoint: the tokenizer under `first_stage_model.`, other models' keys, and
    pickled non-tensor objects (argparse.Namespace here) that the weights-only unpickler refuses."""
    ckpt, g, _ = golden_case(official, "sd-vq-f8")
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    full = {f"first_stage_model.{k}": v for k, v in sd.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": full, "hyper_parameters": argparse.Namespace(lr=1.0)}, path)
    tok = vqlib.load_tokenizer("sd-vq-f8", str(path), **g["config"])
    assert torch.equal(tok.encode(g["images"]), g["indices"])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("call", ["os.system", "builtins.exec"])
def test_checkpoint_pickles_never_run(official, tmp_path, legacy, call):
    """A checkpoint whose pickle would run code loads with the code replaced by an inert stand-in, or is
    refused in one line; either way nothing runs. Plain legacy (pre-1.6 format) files load weights-only."""
    ckpt, g, _ = golden_case(official, "sd-vq-f8")
    obj, marker = torch.load(ckpt, weights_only=True), tmp_path / "ran"
    code = {"os.system": (os.system, f"touch {marker}"),
            "builtins.exec": (exec, f"open({str(marker)!r}, 'w')")}[call]
    torch.save(obj, tmp_path / "plain.ckpt", _use_new_zipfile_serialization=not legacy)
    torch.save({**obj, "callbacks": Payload(*code)}, tmp_path / "evil.ckpt",
               _use_new_zipfile_serialization=not legacy)
    tok = vqlib.load_tokenizer("sd-vq-f8", str(tmp_path / "plain.ckpt"), **g["config"])
    assert torch.equal(tok.encode(g["images"]), g["indices"])
    try:
        tok = vqlib.load_tokenizer("sd-vq-f8", str(tmp_path / "evil.ckpt"), **g["config"])
        assert torch.equal(tok.encode(g["images"]), g["indices"])
        outcome = "loaded"
    except vqlib.TokenizerError as e:
        assert "\n" not in str(e) and "evil.ckpt" in str(e)
        outcome = "refused"
    assert not marker.exists()
    # the zip format names its globals, so exec becomes inert; os is blocked outright; legacy files are
    # refused
    assert outcome == ("loaded" if call == "builtins.exec" and not legacy else "refused")


def test_mismatched_checkpoint_names_every_bad_key(official, tmp_path):
    ckpt, g, _ = golden_case(official, "sd-vq-f8")
    obj = torch.load(ckpt, weights_only=True)
    sd = obj["state_dict"]
    del sd["encoder.conv_in.bias"]
    sd["decoder.mid.attn_1.qq.weight"] = sd.pop("decoder.mid.attn_1.q.weight")
    sd["quant_conv.weight"] = sd["quant_conv.weight"][:2]
    torch.save(obj, tmp_path / "bad.ckpt")
    with pytest.raises(vqlib.TokenizerError) as e:
        vqlib.load_tokenizer("sd-vq-f8", str(tmp_path / "bad.ckpt"), **g["config"])
    msg = str(e.value)
    for key in ("encoder.conv_in.bias", "decoder.mid.attn_1.q.weight", "decoder.mid.attn_1.qq.weight",
                "quant_conv.weight", "ommer-lab.com/files/latent-diffusion/vq-f8.zip"):
        assert key in msg
    assert "\n" not in msg


def test_wrong_or_missing_file_says_which_one(official, tmp_path):
    sd_ckpt, llamagen_ckpt = official("seeded", "sd-vq-f8")[0], official("seeded", "llamagen-vq-ds8")[0]
    with pytest.raises(vqlib.TokenizerError, match="use --vq llamagen-vq-ds8"):
        vqlib.load_tokenizer("sd-vq-f8", llamagen_ckpt, ch=32)
    with pytest.raises(vqlib.TokenizerError, match="use --vq sd-vq-f8.*huggingface.co/FoundationVision"):
        vqlib.load_tokenizer("llamagen-vq-ds8", sd_ckpt, ch=32)
    with pytest.raises(vqlib.TokenizerError, match="ch=32"):  # the fixture at the official width
        vqlib.load_tokenizer("sd-vq-f8", sd_ckpt)
    with pytest.raises(vqlib.TokenizerError, match="no/such/vq_ds8_c2i.pt: no such file.*huggingface.co"):
        vqlib.load_tokenizer("llamagen-vq-ds8", "no/such/vq_ds8_c2i.pt")
    with pytest.raises(vqlib.TokenizerError, match="needs its checkpoint"):
        vqlib.load_tokenizer("sd-vq-f8")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    with pytest.raises(vqlib.TokenizerError, match="photo.png: not a torch checkpoint; expected"):
        vqlib.load_tokenizer("sd-vq-f8", str(tmp_path / "photo.png"))


def test_recon_cli(official, tmp_path):
    ckpt = official("seeded", "sd-vq-f8")[0]
    img = ((smooth_images(1, 64)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    Image.fromarray(np.pad(img, ((0, 0), (8, 8), (0, 0)), mode="edge")).save(tmp_path / "cat.png")  # 64x80
    recon = ["recon", "--vq", "sd-vq-f8", "--vq-config", "ch=32", "--image-size", "64",
             str(tmp_path / "cat.png")]
    out = run_cli(*recon, "--vq-ckpt", ckpt, script="vq.py")
    assert out.returncode == 0, out.stderr
    assert "PSNR" in out.stdout and "mean PSNR" in out.stdout
    assert Image.open(tmp_path / "cat_recon.png").size == (64, 64)
    missing = run_cli(*recon, "--vq-ckpt", str(tmp_path / "missing.ckpt"), script="vq.py")
    assert_one_line_error(missing, "vq-f8.zip")


# --- fid.py -------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def fid_model(weights, preprocess):  # random weights in the official layout: loaded once per preprocessing
    return fid.load_inception(weights, preprocess)


def fid_image_folder(root, n, size, seed):
    """n smooth random RGB PNGs (upsampled noise, so the Inception sees structure) in root."""
    root.mkdir()
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=size, mode="bilinear")
        Image.fromarray((x[0].permute(1, 2, 0) * 255).byte().numpy()).save(root / f"{i:03d}.png")
    return root


def fid_cli(capsys, *args):
    """fid.main in-process (same code path as `python fid.py`, without a torch import per call)."""
    fid.main([str(a) for a in args])
    return capsys.readouterr().out.strip()


def fid_metrics(out):
    """{metric: its value (a mean ± std: the mean)} of fid.py's report."""
    return {l.split()[0]: float(l.split()[1]) for l in out.splitlines() if "not computed" not in l}


METRICS_GOLDEN = torch.load(Path(HERE, "fixtures", "metrics_golden.pt"), weights_only=True)


def test_fid_covariance_is_the_unbiased_estimator():
    feats = np.random.default_rng(0).normal(size=(5, 3))
    centred = feats - feats.mean(0)
    assert np.allclose(fid.moments(feats)["sigma"], centred.T @ centred / 4)  # torch-fidelity's: 1 / (N - 1)


def test_fid_sfid_is_adms_frechet_distance():
    a, b = (METRICS_GOLDEN[k].double().numpy() for k in ("sfid_a", "sfid_b"))
    ours = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert ours == pytest.approx(METRICS_GOLDEN["sfid_adm"].item(), rel=1e-9)


def test_fid_inception_score_is_torch_fidelitys_and_one_image_repeated_scores_1():
    logits = METRICS_GOLDEN["is_logits"].numpy()
    ref = METRICS_GOLDEN["is_torch_fidelity"].tolist()
    assert fid.inception_score(logits) == pytest.approx(ref, rel=1e-9)
    assert fid.inception_score(np.repeat(logits[:1], 50, 0)) == pytest.approx((1.0, 0.0), abs=1e-9)


def test_fid_kid_is_torch_fidelitys_near_0_for_one_distribution():
    a, b = METRICS_GOLDEN["kid_a"].numpy(), METRICS_GOLDEN["kid_b"].numpy()
    ours, ref = fid.kid(a, b), METRICS_GOLDEN["kid_torch_fidelity"].tolist()  # 100 subsets of 1000 by default
    assert ours == pytest.approx(ref, abs=1e-7)  # torch-fidelity sums in float32: 3e-8 off float64's here
    assert abs(fid.kid(a[:550], a[550:], subsets=20, subset_size=500)[0]) < 1e-3  # two halves of one set
    assert fid.kid(a, b + 0.2, subsets=20, subset_size=500)[0] > 0.1


def test_fid_precision_recall_is_adms_in_blocks_self_is_1_disjoint_is_0():
    ref, samples = METRICS_GOLDEN["pr_ref"].numpy(), METRICS_GOLDEN["pr_samples"].numpy()
    adm = METRICS_GOLDEN["pr_adm_fp32"].tolist()  # ADM's ManifoldEstimator, fp32 distances
    assert 0.2 < adm[0] < adm[1] < 0.95
    for batch in (64, 5000):  # blocks of distances, or all at once
        assert fid.precision_recall(ref, samples, batch=batch) == pytest.approx(adm, abs=1e-7)
    assert fid.precision_recall(ref, ref, batch=64) == (1.0, 1.0)
    # small integers: exact sums
    copies = np.repeat(np.random.RandomState(0).randint(0, 8, (20, 16)).astype(np.float32), 4, 0)
    assert fid.precision_recall(copies, copies, batch=64) == (1.0, 1.0)  # k=3 copies: radius 0, and d <= 0
    assert fid.precision_recall(ref, samples + 1e5, batch=64) == (0.0, 0.0)


def test_fid_metrics_a_reference_without_a_field_names_what_it_cannot_compute():
    x = np.random.RandomState(0).rand(8, 4).astype(np.float32)
    samples = {**fid.summarize({"pool": x, "spatial": x[:, :3], "logits": x}, "samples"), "name": "samples"}
    ref = {**fid.moments(x + 0.1), "name": "ref.npz"}  # pytorch-fid's statistics: mu and sigma only
    lines = fid.report(fid.metrics(samples, ref))
    assert [l.split()[0] for l in lines] == ["FID", "sFID", "IS", "precision", "recall", "KID"]
    assert "not computed" not in lines[0] + lines[2] and float(lines[0].split()[1]) > 0
    assert "ref.npz has no mu_s" in lines[1] and all("ref.npz has no images (arr_0)" in l for l in lines[3:])
    stats_only = fid.report(fid.metrics({**fid.moments(x), "name": "s.npz"}, ref))[2]
    assert "IS" in stats_only and "s.npz has no images" in stats_only


def test_fid_center_crop_is_appendixs_without_importing_it():
    x = (smooth_images(1, 64)[0].permute(1, 2, 0) + 1) * 127.5
    im = Image.fromarray(x.round().byte().numpy()).resize((150, 97))
    for img in (im, im.quantize(64)):
        for size in (40, 64):
            assert np.array_equal(fid.center_crop(img, size), appendix.center_crop(img, size))


def test_fid_one_pass_gives_torch_fidelitys_logits_and_adms_spatial_features(official):
    weights, g = official("seeded", "inception")
    for size in (256, 64):
        out = fid_model(weights, "fidelity")(g[f"images_uint8_{size}"])
        assert out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, 17 * 17 * 7)
        for ours, ref in ((out["logits"], METRICS_GOLDEN[f"logits_unbiased_{size}"]),
                          (out["spatial"], METRICS_GOLDEN[f"spatial_{size}"])):
            assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("size", [256, 64])
def test_fid_features_match_torch_fidelity_and_pytorch_fid(official, size, source):
    weights, g = official(source, "inception")
    images = g[f"images_uint8_{size}"]
    ours = {p: fid_model(weights, p)(images)["pool"] for p in fid.PREPROCESS}
    ref = {"fidelity": g[f"features_torch_fidelity_{size}"], "pytorch-fid": g[f"features_pytorch_fid_{size}"]}
    for p in fid.PREPROCESS:
        assert ours[p].shape == (len(images), 2048) and ours[p].dtype == torch.float32
        assert (ours[p] - ref[p]).abs().max() < 1e-4, p
    # the two preprocessings differ by far more than the tolerance: the check above tells them apart
    assert (ours["fidelity"] - ref["pytorch-fid"]).abs().max() > 1e-3


@pytest.mark.parametrize("source", SOURCES)
def test_fid_frechet_distance_golden_and_self(official, capsys, source):
    g = official(source, "inception")[1]
    a, b = g["frechet_a"].double().numpy(), g["frechet_b"].double().numpy()
    sa, sb = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ref = g["frechet_distance"].item()
    assert abs(fid.frechet_distance(*sa, *sb) - ref) <= 1e-6 * abs(ref)
    assert abs(fid.frechet_distance(*sa, *sa)) < 1e-6 * ref
    with pytest.raises(ValueError, match="mismatched"):
        fid.frechet_distance(sa[0], sa[1], sb[0][:10], sb[1][:10, :10])
    # sqrtm of [[0, 1], [0, 0]] is infinite: retried with 1e-6 on the diagonals, as pytorch-fid does
    zero, nilpotent = np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]])
    assert fid.frechet_distance(zero, nilpotent, zero, np.eye(2)) == pytest.approx(2.0, abs=1e-2)
    assert "adding 1e-06 to the diagonals" in capsys.readouterr().err
    with pytest.raises(ValueError, match="imaginary"):  # a negative eigenvalue: no real square root
        fid.frechet_distance(zero, np.eye(2), zero, np.diag([-1.0, 1.0]))


def test_fid_statistics_files_ours_pytorch_fid_and_adm(official, tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    model = fid_model(official("seeded", "inception")[0], "fidelity")
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    s = fid.statistics(tmp_path / "pytorch_fid.npz")  # no weights needed: the default model is never loaded
    assert np.array_equal(s["mu"], mu) and np.array_equal(s["sigma"], sigma) and s["num_images"] is None
    assert "mu_s" not in s and "pool" not in s
    # ADM's reference batch: its mu, sigma, mu_s, sigma_s win; its arr_0 images give the pool features
    images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    np.savez(tmp_path / "adm_ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    s = fid.statistics(tmp_path / "adm_ref.npz", model)
    assert np.array_equal(s["mu_s"], mu[:2]) and np.array_equal(s["sigma_s"], sigma[:2, :2])
    assert np.array_equal(s["pool"], model(torch.from_numpy(images).permute(0, 3, 1, 2))["pool"].numpy())


def test_fid_features_of_a_tensor_in_batches_with_progress(official, capsys):
    weights, g = official("seeded", "inception")
    model = fid_model(weights, "fidelity")
    feats = fid.features(g["images_uint8_64"], model, batch_size=1, progress_s=0)["pool"]
    assert feats.shape == (2, 2048) and np.abs(feats - g["features_torch_fidelity_64"].numpy()).max() < 1e-4
    assert "fid: tensor: 1/2 images" in capsys.readouterr().err
    with pytest.raises(fid.FIDError, match="3 images asked for, 2 found"):
        fid.features(g["images_uint8_64"], model, num_images=3)
    with pytest.raises(fid.FIDError, match="uint8"):
        model(g["images_uint8_64"].float())


def test_fid_weights_in_fp16_without_num_batches_tracked_load(official, tmp_path):
    weights = official("seeded", "inception")[0]
    sd = torch.load(weights, weights_only=True)
    assert len(sd) == 566  # the official file's keys, num_batches_tracked included
    fp16 = {k: v.half() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(fp16, tmp_path / fid.WEIGHTS)
    loaded = fid.load_inception(tmp_path / fid.WEIGHTS).state_dict()
    ref = fid_model(weights, "fidelity").state_dict()
    assert all(torch.equal(loaded[k], ref[k].half().float())
               for k in ref if not k.endswith("num_batches_tracked"))
    assert loaded["fc.weight"].dtype == torch.float32


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing keys: Mixed_6b.branch1x1.conv.weight"),
    ("extra", "unexpected keys: AuxLogits.fc.weight"),
    ("shape", "wrong shapes: fc.weight"),
    ("truncate", "unreadable or truncated"),
])
def test_fid_bad_weights_file_one_clear_error(official, tmp_path, damage, message):
    src, bad = Path(official("seeded", "inception")[0]), tmp_path / "bad_inception.pth"
    if damage == "truncate":
        data = src.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        sd = torch.load(src, weights_only=True)
        if damage == "drop":
            del sd["Mixed_6b.branch1x1.conv.weight"]
        elif damage == "extra":
            sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
        else:
            sd["fc.weight"] = sd["fc.weight"][:1000]
        torch.save(sd, bad)
    with pytest.raises(fid.FIDError) as e:
        fid.load_inception(bad)
    msg = str(e.value)
    assert message in msg and str(bad) in msg and fid.WEIGHTS_URL in msg and "\n" not in msg
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


def test_fid_cli_empty_folder_errors_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(str(tmp_path / "empty"), str(tmp_path / "empty"), script="fid.py")
    assert_one_line_error(proc, "no images")


def test_fid_cli_bad_inputs_error_cleanly(official, tmp_path, capsys):
    weights = official("seeded", "inception")[0]
    mixed = fid_image_folder(tmp_path / "mixed", 2, (32, 32), 0)
    Image.new("RGB", (48, 40)).save(mixed / "z.jpg")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    cases = {tmp_path / "missing": "not found", mixed: "48x40 differs from",
             tmp_path / "nchw.npz": "N x H x W x 3", tmp_path / "float.npz": "float32",
             tmp_path / "other.npz": "no arr_0"}
    for src, message in cases.items():
        with pytest.raises(SystemExit) as e:
            fid_cli(capsys, src, src, "--inception", weights)
        assert isinstance(e.value.code, str) and message in e.value.code and "\n" not in e.value.code, src
    n, batches = fid.images(mixed, crop=24)  # ADM's center crop makes the mixed folder usable
    assert n == 3 and [tuple(x.shape) for x in batches] == [(3, 3, 24, 24)]


def test_fid_cli_folders_npz_and_saved_stats_agree(official, tmp_path, capsys, monkeypatch):
    weights = official("seeded", "inception")[0]
    # one 2048x2048 sqrtm takes ~15-25 s on 2 busy cores: identical statistics reuse the first FID
    real, memo = fid.frechet_distance, {}

    def memo_frechet(*xs):
        k = hashlib.sha1(b"".join(np.ascontiguousarray(x).tobytes() for x in xs)).hexdigest()
        if k not in memo:
            memo[k] = real(*xs)
        return memo[k]
    monkeypatch.setattr(fid, "frechet_distance", memo_frechet)
    a = fid_image_folder(tmp_path / "a", 5, (48, 48), 1)
    b = fid_image_folder(tmp_path / "b", 5, (48, 48), 2)
    batch = np.stack([np.asarray(Image.open(f)) for f in sorted(b.glob("*.png"))])
    np.savez(tmp_path / "b_batch.npz", arr_0=batch, arr_1=np.arange(5))  # ADM sample batch
    direct = fid_metrics(fid_cli(capsys, a, b, "--inception", weights, "--batch-size", 2))
    fid_cli(capsys, "--save-stats", tmp_path / "b_batch.npz", tmp_path / "b_stats.npz", "--inception",
            weights)
    with np.load(tmp_path / "b_stats.npz") as s:  # ADM's reference-batch fields
        assert s["mu"].shape == (2048,) and s["sigma"].shape == (2048, 2048) and int(s["num_images"]) == 5
        assert s["mu_s"].shape == (2023,) and s["sigma_s"].shape == (2023, 2023)
        assert np.array_equal(s["arr_0"], batch)
    via_stats = fid_metrics(fid_cli(capsys, a, tmp_path / "b_stats.npz", "--inception", weights))
    assert list(direct) == ["FID", "sFID", "IS", "precision", "recall", "KID"]
    assert direct["FID"] > 1 and direct["sFID"] > 1 and direct["IS"] >= 1
    assert direct == pytest.approx(via_stats, rel=1e-6)


# --- benchmarks/: miniature.py and its metric ---------------------------------------------------------------

def test_demo_metric_scores_real_images_well_and_degraded_ones_badly(tmp_path):
    """The miniature experiments' metric (benchmarks/demo_metric.py), with a classifier trained in seconds."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import demo_metric
    clf = demo_metric.load_classifier(str(tmp_path / "clf.pt"), n_ref=1000, n=2000, epochs=4)
    images, labels = appendix.demo_dataset(500, seed=3)
    fd, acc = demo_metric.demo_fd_and_accuracy(clf, images, labels)
    assert acc > 0.95 and demo_metric.demo_fd_and_accuracy(clf, images, labels.roll(1))[1] < 0.05
    blocky = F.interpolate(F.interpolate(images.float(), size=8, mode="area"), size=32).to(torch.uint8)
    assert demo_metric.demo_fd_and_accuracy(clf, blocky, labels)[0] > 10 * fd
    reloaded = demo_metric.load_classifier(str(tmp_path / "clf.pt"))
    assert demo_metric.demo_fd_and_accuracy(reloaded, images, labels) == (fd, acc)
    # as 'purr.py sample' writes
    np.savez(tmp_path / "s.npz", images.permute(0, 2, 3, 1).numpy(), labels.numpy())
    got_images, got_labels = demo_metric.load_samples(str(tmp_path / "s.npz"))
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    np.savez(tmp_path / "unlabelled.npz", images.permute(0, 2, 3, 1).numpy())
    with pytest.raises(SystemExit, match="no labels"):
        demo_metric.load_samples(str(tmp_path / "unlabelled.npz"))


@pytest.mark.slow  # trains or starts torchrun
def test_miniature_runs_end_to_end(tmp_path):
    """The miniature's every part on a tiny configuration, so the script cannot rot: its tables and plots."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import miniature
    out = tmp_path / "out"
    miniature.main(["--smoke", "--seeds", "0", "1", "--steps", "4", "--eval-every", "2", "--work",
                    str(tmp_path / "runs"), "--out", str(out), "--classifier", str(tmp_path / "clf.pt")])
    tables = {name: list(csv.DictReader(open(out / f"miniature_{name}.csv")))
              for name in ("convergence", "steps", "guidance", "temperature", "tau_schedule")}
    conv = [r for r in tables["convergence"] if r["seed"]]
    assert {(r["seed"], r["objective"], r["step"]) for r in conv} == {
        (str(s), o, str(k)) for s in (0, 1) for o in purr.OBJECTIVES for k in (2, 4)}
    assert {r["num_steps"] for r in tables["steps"] if r["method"] == "euler"} == {"2", "4"}
    assert {r["train_steps"] for r in tables["temperature"]} == {"4", "8"}
    assert all(float(r["fd"]) > 0 for t in tables.values() for r in t)
    for name in ("convergence", "steps", "guidance", "temperature", "tau_grid"):
        assert Image.open(out / f"miniature_{name}.png").size[0] > 100
