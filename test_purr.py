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
import gc
import glob
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import weakref
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


def torchrun(nproc, *args, script="purr.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, script), *args]
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
    """Records whether TF32 is on (appendix.tf32) at every matrix product and convolution run inside: the
    CPU never uses TF32, so the setting is observed, not its effect."""
    CONV = (torch.ops.aten.convolution, torch.ops.aten.cudnn_convolution)
    PRODUCTS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
                torch.ops.aten.matmul)  # matmul: under inference_mode

    def __init__(self):
        super().__init__()
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (*self.PRODUCTS, *self.CONV):
            self.products.append(appendix.tf32()[func.overloadpacket in self.CONV])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_on():
    """TF32 on globally inside the test (purr's GPU setting), restored after."""
    before = appendix.tf32(True)
    yield
    appendix.tf32(before)


class DeviceStandIn(TorchDispatchMode):
    """On the CPU, stands in for an accelerator's queue: every tensor computed from the tagged ones (the
    model's weights) is tagged with the training step that was under way (`step`, counted by the caller), and
    every read by the host (item, bool, float, tolist, numpy) of a value tagged with the current step is
    recorded: on a GPU the host would wait there for the work it has just queued."""

    def __init__(self):
        super().__init__()
        self.step, self.tags, self.stalls = 0, torch.utils.weak.WeakIdKeyDictionary(), []

    def tag(self, tensors):
        for t in tensors:
            self.tags[t] = self.step

    def read(self, t, how):
        if self.tags.get(t) == self.step:
            self.stalls.append((self.step, how))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero):
            self.read(leaves[0], func.__name__)
        out = func(*args, **kwargs)
        if any(t in self.tags for t in leaves):
            written = [a for arg, a in zip(func._schema.arguments, args) if arg.alias_info and
                       arg.alias_info.is_write] + [v for k, v in kwargs.items() if k == "out"]
            made = torch.utils._pytree.tree_leaves((out, written))
            self.tag(t for t in made if isinstance(t, torch.Tensor))
        return out


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


@pytest.mark.parametrize("objective", ["purr", "dfm"])
def test_cfg_interval_guides_inside_only_and_skips_the_unconditional_pass_outside(objective):
    """Guidance in a limited interval: [0, 1] is the guided sampler; an interval that no t of the grid falls
    in is the unguided one; the network sees a doubled batch (the unconditional pass) only at the t inside."""
    K, dfm = 16, objective == "dfm"
    model = perturbed_dit(K)
    if dfm:  # the authors' DFM: codes and MASK in, K + 1 logits out
        model = purr.DiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                         num_classes=3, codebook_size=K, vocab_size=K + 1, out_channels=K + 1).eval()
        with torch.no_grad():
            [p.add_(0.05 * torch.randn_like(p)) for p in model.parameters()]
    tok = types.SimpleNamespace(codebook=torch.randn(K, 4), quantize=lambda z: z.sum(1).long())
    y, z0 = torch.tensor([0, 1]), torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(cfg_scale):  # Euler at t = 0, 1/4, 1/2, 3/4: codes (DFM), or the latents z_1 (purr)
        if dfm:
            return purr.sample_codes(model, tok, "dfm", y, z0, 1.0, cfg_scale, num_steps=4)
        return purr.sample_latents(model, tok.codebook, y, z0, 0.8, cfg_scale, num_steps=4)
    assert torch.equal(run(purr.cfg_interval(3.0, (0, 1))), run(3.0))
    assert torch.equal(run(purr.cfg_interval(3.0, (0.8, 0.9))), run(1.0))
    assert not torch.equal(run(3.0), run(1.0))
    batches = []
    hook = model.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    late = run(purr.cfg_interval(3.0, (0.5, 1)))
    hook.remove()
    assert batches == [2, 2, 4, 4]
    assert dfm or not torch.equal(late, run(3.0))  # (DFM's last draw, at t = 3/4, is guided in both)


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


def test_mu_is_full_fp32_under_bf16_autocast_and_global_tf32(tf32_on):
    """mu = pi E is a full fp32 product: not bf16 under autocast, nor TF32 with TF32 on globally (purr's GPU
    setting); the global setting comes back after."""
    logits, codebook = (3 * torch.randn(2, 3, 3, 64)).bfloat16(), torch.randn(64, 4)
    want = torch.softmax(logits.double() / 0.8, -1) @ codebook.double()
    with torch.autocast("cpu", torch.bfloat16), TF32Seen() as seen:
        mu = purr.posterior_mean(logits, codebook, 0.8)
    assert mu.dtype == torch.float32 and torch.allclose(mu.double(), want, atol=1e-5)
    assert seen.products and not any(seen.products) and appendix.tf32() == (True, True)


def test_tf32_is_set_and_read_through_the_api_the_installed_torch_has():
    """appendix.tf32 sets both flags, returns the state before, and restores it; on a torch with the
    fp32_precision settings it never touches the deprecated allow_tf32 flags, which raise when a process
    mixes the two APIs (a user's or a library's settings beside purr's)."""
    before = appendix.tf32((True, False))
    try:
        assert appendix.tf32() == (True, False) and appendix.tf32(False) == (True, False)
        assert appendix.tf32() == (False, False)
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"  # another library, on the current API
            assert appendix.tf32() == (True, False)
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        appendix.tf32(before)
    assert appendix.tf32() == before


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


def test_a_training_step_never_waits_for_the_work_it_queued(tmp_path, monkeypatch):
    """The host reads a step's flags and losses one step late (once the next step is queued), so a GPU never
    idles between steps; only a step that saves (here the last, which also logs) reads its own values."""
    device, real_step, real_build = DeviceStandIn(), purr.train_step, purr.build_model

    def step(*args):
        device.step += 1
        return real_step(*args)

    def build(cfg):
        model = real_build(cfg)
        device.tag(model.parameters())
        return model
    monkeypatch.setattr(purr, "train_step", step)
    monkeypatch.setattr(purr, "build_model", build)
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, real=real, name=name, **kw: device.read(t, name)
                            or real(t, *a, **kw))
    with device:
        train_cli(tmp_path, "--steps", "4", "--log-every", "1000", "--ckpt-every", "1000", quick=True)
    assert device.step == 4 and device.stalls and {s for s, _ in device.stalls} == {4}, device.stalls


def test_the_loader_makes_each_steps_draws_ahead_of_it(monkeypatch):
    """z_0, t, the dropped labels and DFM's uniforms come with the batch, from the loader's worker: each
    rank's rows of draw_noise's draw for (seed, step), and the main process draws nothing."""
    main, drawn, real = os.getpid(), [], purr.draw_noise
    monkeypatch.setattr(purr, "draw_noise", lambda *a, **kw: drawn.append(os.getpid()) or real(*a, **kw))
    tokens = torch.randint(0, 16, (40, 2, 4, 4)).numpy()
    data = appendix.TokenFolder(tokens, torch.arange(40) % 10, 10)
    cfg = {**purr.SETTINGS, "steps": 5, "global_batch_size": 8, "num_workers": 1, "class_dropout": 0.5,
           "latent_size": 4, "latent_channels": 3, "num_classes": 10, "seed": 7}
    loader, dropped = purr.training_loader(cfg, data, 3, 1, 2, slice(4, 8), torch.device("cpu")), 0
    for step, (x, y, bad, (z0, t, u)) in zip((3, 4), loader):
        idx, flip = appendix.global_batch_plan(40, step, 8, 7)
        want = real(8, slice(4, 8), step, 7, 4, 3, 0.5, "cpu", cfg["t_min"])
        assert torch.equal(x, torch.from_numpy(tokens[idx[4:], flip[4:]]).long()) and bad == []
        assert torch.equal(y, torch.where(want[2], 10, idx[4:] % 10))
        assert all(torch.equal(a, b) for a, b in zip((z0, t, u), want[:2] + want[3:]))
        dropped += int((y == 10).sum())
    assert 0 < dropped < 8 and main not in drawn


@pytest.mark.slow  # trains or starts torchrun
@pytest.mark.parametrize("bad", [3, 4])
def test_a_non_finite_loss_read_a_step_late_still_stops_before_the_next_save(bad, tmp_path, monkeypatch):
    """Every second step saves. Step 3's flags reach the host during step 4, before its save; step 4's are
    read at once, as it saves. Either way the run stops with step 2's checkpoint its last."""
    real, calls = purr.train_step, []

    def step(*args):
        losses = real(*args)
        calls.append(1)
        return {**losses, "loss": losses["loss"] * (math.nan if len(calls) == bad else 1)}
    monkeypatch.setattr(purr, "train_step", step)
    with pytest.raises(appendix.PurrError, match=f"not finite at step {bad}; nothing after step {bad - 1} "
                                                 ".*/0000002.pt"):
        train_cli(tmp_path, "--steps", "6", "--ckpt-every", "2", quick=True)
    assert [os.path.basename(p) for p in appendix.checkpoint_paths(str(tmp_path))] == ["0000002.pt"]


def test_micro_batches_encode_images_a_micro_batch_at_a_time():
    sizes = []
    tok = types.SimpleNamespace(encode=lambda x: sizes.append(len(x)) or torch.zeros(len(x), 2, 2).long())
    draws = (torch.randn(6, 3, 2, 2), torch.rand(6), torch.rand(6, 2, 2))
    micro = purr.micro_batches(tok, torch.zeros(6, 3, 16, 16, dtype=torch.uint8), torch.arange(6), draws, 3,
                               "cpu")
    assert sizes == [2, 2, 2] and [len(b.c) for b in micro] == [2, 2, 2]
    assert torch.equal(torch.cat([b.z0 for b in micro]), draws[0])


def test_ddp_keeps_gradients_in_its_buckets_and_compresses_them_when_asked(monkeypatch):
    built = []

    class DDP:
        def __init__(self, module, **kw):
            self.module, self.kw, self.hooks = module, kw, []
            built.append(self)

        def register_comm_hook(self, state, hook):
            self.hooks.append(hook.__name__)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DDP)
    for setting in ("none", "bf16"):
        purr.distributed(torch.nn.Linear(2, 2), {**purr.SETTINGS, "grad_compression": setting})
    assert [b.kw for b in built] == [{"gradient_as_bucket_view": True}] * 2
    assert [b.hooks for b in built] == [[], ["bf16_compress_hook"]]


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


def test_every_runs_tokenizer_lives_on_the_runs_device(image_folder, tiny_ckpt, monkeypatch):
    """open_data puts the tokenizer on the run's device for the demo (fitted, or a resumed run's), and for an
    image folder; train, micro_batches and sample_grid use it there (on a GPU, --sample-every mixed devices).
    Here the device is `meta`; the demo's tokens are encoded on the CPU before."""
    monkeypatch.setattr(purr, "DEMO_TOKENIZER", {**purr.DEMO_TOKENIZER, "codebook_size": 16, "iters": 2})
    demo = {**purr.SETTINGS, **purr.DEMO, "demo_size": 100}
    folder = {**purr.SETTINGS, "data": str(image_folder / "data"), "vq": "tiny",
              "vq_ckpt": str(image_folder / "tiny.pt"), "image_size": 32}
    for cfg, resumed in ((demo, None), (demo, tiny_ckpt), (folder, None)):
        data, tok = purr.open_data(cfg, torch.device("meta"), resumed)
        tensors = [*tok.parameters(), *tok.buffers()]
        assert tensors and all(t.is_meta for t in tensors) and tok.codebook.is_meta, (cfg["data"], resumed)
        assert data[(3, 1)][0].device.type == "cpu" and len(data) == (40 if cfg["data"] else 100)


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
    assert_one_line_error(run_cli("sample", "--ckpt", tiny_ckpt, "--cfg-interval", "0.9", "0.1"),
                          "--cfg-interval")


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
    log.flush()  # a line is written at the next step, or now
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
def test_two_processes_train_with_bf16_gradient_compression(tmp_path):
    """--grad-compression bf16 all-reduces bf16 gradients: the run trains, close to the fp32 all-reduce's."""
    common = ["--steps", "3", "--global-batch-size", "8", "--demo-size", "200", "--precision", "fp32"]
    torchrun(2, "train", *common, "--grad-compression", "bf16", "--results-dir", str(tmp_path / "bf16"))
    train_cli(tmp_path / "one", *common)
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "bf16")
    assert b["step"] == 3 and b["args"]["grad_compression"] == "bf16"
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-2) for k in a["model"])
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


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
    train_cli(tmp_path, "--steps", "2", "--resume", *common, "--grad-compression", "bf16")
    ckpt = final_state(tmp_path)
    assert ckpt["opt"]["param_groups"][0]["lr"] == 1e-5 and ckpt["args"]["lr"] == 1e-5
    assert ckpt["args"]["grad_compression"] == "bf16"  # how the same update is computed may change too
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


def preempt(cmd, signal_at, send, timeout=300):
    """Launches cmd (in a session of its own, as a scheduler's job), sends send(proc) once its output shows
    `signal_at`, and returns (returncode, stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith(signal_at):
            send(proc)
            break
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow  # trains or starts torchrun
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_whole_job_saves_though_the_data_loader_workers_get_it_too(tmp_path, sig):
    """SLURM signals every process of the job (scancel, --signal, preemption), DataLoader workers included:
    they ignore it, the trainer finishes its step, saves, exits 0 and prints the resume command."""
    cmd = [sys.executable, "purr.py", "train", "--steps", "300", "--global-batch-size", "8", "--demo-size",
           "200", "--log-every", "1", "--num-workers", "2", "--results-dir", str(tmp_path)]
    rc, out, err = preempt(cmd, "step 3 ", lambda proc: os.killpg(proc.pid, sig))
    assert rc == 0, err[-2000:]
    step = int(re.search(r"stopped by signal at step (\d+)/300, saved (\S+); resume with", out).group(1))
    assert appendix.load_checkpoint(appendix.checkpoint_paths(str(tmp_path))[-1])["step"] == step >= 3


@pytest.mark.slow  # trains or starts torchrun
def test_torchrun_whose_agent_gets_sigterm_saves_and_resumes_as_if_never_stopped(tmp_path):
    """torchrun's agent forwards SIGTERM to its processes and kills them after its shutdown timeout (30 s by
    default): they agree on a step, save in time, and the printed resume command (under torchrun too)
    ends with the weights of a run never stopped. With DataLoader workers, as real runs have them."""
    common = ["--steps", "40", "--global-batch-size", "8", "--demo-size", "200", "--log-every", "1",
              "--num-workers", "2", "--ckpt-every", "1000"]
    torchrun(2, "train", *common, "--results-dir", str(tmp_path / "straight"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    t0 = []
    rc, out, err = preempt([*launch, "purr.py", "train", *common, "--results-dir", str(tmp_path / "cut")],
                           "step 3 ", lambda proc: (t0.append(time.time()), proc.send_signal(signal.SIGTERM)))
    assert time.time() - t0[0] < 30, "the processes outlived torchrun's shutdown timeout"
    resume = re.search(r"stopped by signal at step (\d+)/40, saved \S+; resume with: torchrun "
                       r"--nproc_per_node=2 purr.py (.*)$", out, re.M)
    assert resume and 3 <= int(resume.group(1)) < 40, (rc, out[-1000:], err[-2000:])
    torchrun(2, *resume.group(2).split())
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "cut")
    assert a["step"] == b["step"] == 40
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def two_nodes(tmp_path, node_args, timeout=180):
    """Two torchrun agents on this machine as two nodes of one process each (static rendezvous: node i is
    rank i), node i with its own purr.py train arguments; returns their (returncode, stdout, stderr)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                               f"--node_rank={i}", "--nproc_per_node=1", "--rdzv_backend=static",
                               "--master_addr=localhost", f"--master_port={port}", "purr.py", "train", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for i, args in enumerate(node_args)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope="module")
def two_results_folders(tmp_path_factory):
    """Two nodes' own results folders: node 0's newest checkpoint is at step 6, node 1's at step 3."""
    root = tmp_path_factory.mktemp("nodes")
    run = train_cli(root / "node0", "--steps", "6", "--ckpt-every", "3", quick=True)
    shutil.copytree(root / "node0", root / "node1")
    os.remove(os.path.join(str(root / "node1"), os.path.relpath(run, root / "node0"), "checkpoints",
                           "0000006.pt"))
    return root


@pytest.mark.slow  # trains or starts torchrun
def test_resume_on_two_nodes_takes_rank_0s_newest_checkpoint(two_results_folders, tmp_path):
    """--resume with no path: rank 0 picks the newest checkpoint and every rank loads that one, not its own
    node's newest; both resume at step 6 and train together to step 9."""
    root = two_results_folders
    common = ["--resume", "--steps", "9", "--num-workers", "0"]
    shutil.copytree(root, tmp_path / "nodes")
    results = two_nodes(tmp_path, [[*common, "--results-dir", str(tmp_path / "nodes" / f"node{i}")]
                                   for i in (0, 1)])
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-1500:] + results[1][2][-1500:]
    assert "resumed at step 6" in results[0][1]
    assert final_state(tmp_path / "nodes" / "node0")["step"] == 9


@pytest.mark.slow  # trains or starts torchrun
def test_resume_on_two_nodes_that_read_different_steps_stops_both_with_one_line(two_results_folders):
    """A --resume path whose file differs between the nodes (each its own disk): every rank stops at once,
    with one line that says where checkpoints must be."""
    paths = [appendix.checkpoint_paths(str(two_results_folders / f"node{i}"))[-1] for i in (0, 1)]
    results = two_nodes(two_results_folders, [["--resume", p, "--num-workers", "0"] for p in paths])
    for rc, out, err in results:
        assert rc != 0 and re.search(r"^purr train: error: --resume .*the ranks read different steps from it "
                                     r".*filesystem that every node sees$", err, re.M), err[-2000:]


# Checkpoints: a failed or bad save never replaces a good checkpoint.

def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save failing half-way (as a full disk or a quota makes it fail) leaves the previous checkpoint,
    and nothing at all, under the new file's final name or beside it."""
    first, second = str(tmp_path / "0000001.pt"), str(tmp_path / "0000002.pt")
    appendix.save_checkpoint({"step": 1}, first)
    real = torch.save

    def half_save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file "
                           "data/0")
    monkeypatch.setattr(torch, "save", half_save)
    for path in (second, first):  # a new name, and over an existing checkpoint
        with pytest.raises(appendix.PurrError, match="cannot write checkpoint.*0000001.pt is intact"):
            appendix.save_checkpoint({"step": 2, "big": torch.zeros(1000)}, path)
        assert sorted(os.listdir(tmp_path)) == ["0000001.pt"]
        assert torch.load(first, weights_only=True) == {"step": 1}


def test_a_save_reaches_the_disk_before_the_rename_and_old_checkpoints_go_only_after(tmp_path, monkeypatch):
    """A node lost right after a save must not leave a renamed but empty file: the file is flushed to disk
    (fsync) before the rename, the folder after it, and only then is --keep's pruning done."""
    for step in (1, 2):
        appendix.save_checkpoint({"step": step}, str(tmp_path / f"{step:07d}.pt"))
    events, real = [], {name: getattr(os, name) for name in ("fsync", "replace", "remove")}

    def record(name):
        def call(*args):
            what = os.readlink(f"/proc/self/fd/{args[0]}") if name == "fsync" else os.path.basename(args[0])
            events.append((name, os.path.basename(what)))
            return real[name](*args)
        return call
    for name in real:
        monkeypatch.setattr(os, name, record(name))
    appendix.save_checkpoint({"step": 3}, str(tmp_path / "0000003.pt"), keep=2)
    assert events == [("fsync", "0000003.pt.tmp"), ("replace", "0000003.pt.tmp"), ("fsync", tmp_path.name),
                      ("remove", "0000001.pt")]
    assert torch.load(tmp_path / "0000003.pt", weights_only=True) == {"step": 3}


@pytest.mark.slow  # trains or starts torchrun
def test_dist_timeout_is_how_long_the_other_ranks_wait_for_a_save(tmp_path):
    """While rank 0 writes a checkpoint the other ranks wait in the next collective: the process group's
    timeout is --dist-timeout (minutes, long by default). A save of 8 s kills a run whose timeout is 3 s,
    and not one whose timeout is 1 minute."""
    slow = tmp_path / "slow_save.py"
    slow.write_text(f"""import sys, time
sys.path.insert(0, {HERE!r})
import appendix, purr
real = appendix.save_checkpoint
appendix.save_checkpoint = lambda *a, **kw: (time.sleep(8), real(*a, **kw))[1]
purr.main()
""")
    common = ["train", "--steps", "1", "--global-batch-size", "4", "--demo-size", "100", "--num-workers", "0"]
    torchrun(2, *common, "--dist-timeout", "1", "--results-dir", str(tmp_path / "a"), script=str(slow))
    with pytest.raises(AssertionError, match="(?i)timed? ?out"):
        torchrun(2, *common, "--dist-timeout", "0.05", "--results-dir", str(tmp_path / "b"), script=str(slow))


@pytest.mark.slow  # trains or starts torchrun
def test_train_lets_go_of_the_checkpoint_it_resumed_from(tmp_path, monkeypatch):
    """XL/2's checkpoint (weights, EMA, AdamW state) is ~12 GB of host memory per process: once restored,
    nothing refers to its weights any more."""
    train_cli(tmp_path, "--steps", "1", quick=True)
    refs, held, real_load, real_step = [], [], purr.load_checkpoint, purr.train_step

    def load(path):
        ckpt = real_load(path)
        refs.extend(weakref.ref(v) for part in ("model", "ema") for v in ckpt[part].values())
        return ckpt

    def step(*args, **kw):
        gc.collect()
        held.append(sum(r() is not None for r in refs))
        return real_step(*args, **kw)
    monkeypatch.setattr(purr, "load_checkpoint", load)
    monkeypatch.setattr(purr, "train_step", step)
    train_cli(tmp_path, "--steps", "2", "--resume", quick=True)
    assert len(refs) > 10 and held == [0]


def test_torchrun_with_one_process_sets_up_the_process_group_and_ddp(tmp_path, monkeypatch, capsys):
    """Under torchrun (RANK in the environment) the process group is set up, one process included, and the
    model trains in DDP: `torchrun --nproc_per_node=1` on a GPU runs NCCL and DDP as 8 processes do."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "localhost", "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    models, real_step = [], purr.train_step
    monkeypatch.setattr(purr, "train_step", lambda model, *a, **kw: (models.append(type(model).__name__),
                                                                     real_step(model, *a, **kw))[1])
    train_cli(tmp_path, "--steps", "1", quick=True)
    assert models == ["DistributedDataParallel"] and not torch.distributed.is_initialized()
    assert "1 process(es) (gloo, DDP) x 1 micro-batch(es)" in capsys.readouterr().out


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


@pytest.mark.parametrize("module, never", [("vq", ("fid", "purr")), ("fid", ("vq", "purr")),
                                           ("appendix", ("vq", "fid", "purr"))])
def test_dependencies_run_one_way(module, never):
    """The tokenizers, FID and the plumbing stand alone: vq.py takes its crop and fid.py and vq.py their
    TF32 switch from appendix.py, which knows nothing of the method; fid.py has its own crop."""
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


def token_folder_by_hand(root, tokens, labels, tiny):
    """A complete token folder of the tiny tokenizer file `tiny`, as extract writes it."""
    root.mkdir()
    np.save(root / "tokens.npy", tokens)
    np.save(root / "labels.npy", labels)
    np.save(root / "done.npy", np.ones(len(labels), bool))
    meta = {"vq": "tiny", "vq_ckpt": str(tiny), "image_size": 32, "classes": appendix.DEMO_CLASSES}
    (root / "meta.json").write_text(json.dumps(meta))
    return {**purr.SETTINGS, "data": str(root)}


def test_a_token_folder_pickles_to_a_few_kilobytes_and_maps_its_files_where_it_is_read(image_folder,
                                                                                        tmp_path):
    """A DataLoader worker under spawn or forkserver (Python 3.14's default) gets the dataset pickled: a
    token folder's holds the paths of its files, not their data (a NumPy memory map pickles all of it, 5 GB
    for ImageNet), and maps them on first use; the demo's tokens in memory still pickle whole."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 64, (4096, 2, 32, 32)).astype(np.uint16)  # 16 MiB
    labels = rng.randint(0, 10, 4096)
    cfg = token_folder_by_hand(tmp_path / "tok", tokens, labels, image_folder / "tiny.pt")
    data, _ = purr.open_tokens(cfg, torch.device("cpu"))
    assert data[(7, 1)][0].tolist() == tokens[7, 1].tolist()  # maps opened here
    sent = pickle.dumps(data)
    assert len(sent) < 4096, len(sent)
    worker = pickle.loads(sent)
    assert not worker.maps and len(worker) == 4096
    for i, flip in ((0, 0), (4095, 1), (1234, 1)):
        x, y, bad = worker[(i, flip)]
        assert x.dtype == torch.int64 and x.tolist() == tokens[i, flip].tolist()
        assert y.dtype == torch.int64 and y.item() == labels[i] and bad == []
    assert isinstance(worker.maps["tokens"], np.memmap)
    demo = appendix.TokenFolder(tokens[:8].astype(np.int64), torch.as_tensor(labels[:8]), 10)
    x, y, _ = pickle.loads(pickle.dumps(demo))[(5, 0)]
    assert x.tolist() == tokens[5, 0].tolist() and y.item() == labels[5]


FORKSERVER_TRAIN = """
import json, multiprocessing, pickle, sys
import torch.multiprocessing
torch.multiprocessing.set_start_method("forkserver")
import appendix, purr
pickled, getstate = [], appendix.TokenFolder.__getstate__

def recording(self):  # pickling happens here, in the trainer, once per worker it starts
    state = getstate(self)
    pickled.append(len(pickle.dumps(state)))
    return state
appendix.TokenFolder.__getstate__ = recording
purr.main(sys.argv[1:])
print(json.dumps({"start_method": multiprocessing.get_start_method(), "pickled": pickled}))
"""


@pytest.mark.slow  # trains or starts torchrun
def test_training_from_a_token_folder_with_workers_under_forkserver(image_folder, tmp_path):
    """Two DataLoader workers started by forkserver (each gets the dataset pickled: a few KB) train from a
    token folder to the weights of a run without workers."""
    g = torch.Generator().manual_seed(0)
    cfg = token_folder_by_hand(tmp_path / "tok", torch.randint(0, 64, (40, 2, 8, 8), generator=g).numpy()
                               .astype(np.uint16), np.arange(40) % 10, image_folder / "tiny.pt")
    common = ["--data", cfg["data"], "--model", "N/2", "--steps", "2", "--global-batch-size", "8",
              "--log-every", "1", "--precision", "fp32"]
    proc = subprocess.run([sys.executable, "-c", FORKSERVER_TRAIN, "train", *common, "--num-workers", "2",
                           "--results-dir", str(tmp_path / "workers")], cwd=HERE, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["start_method"] == "forkserver" and len(seen["pickled"]) == 2, seen
    assert all(n < 4096 for n in seen["pickled"]), seen
    train_cli(tmp_path / "none", *common)
    assert_trained_alike(tmp_path / "none", tmp_path / "workers")


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


def test_extract_ranks_write_contiguous_blocks_and_a_rerun_only_what_is_missing(image_folder, tmp_path,
                                                                                 monkeypatch):
    """On several nodes, each rank writes one contiguous block of rows, and only its rows' bytes (a node's
    write-back of shared pages could overwrite another node's rows); done is set for a row only after its
    tokens and label. Simulated: ranks 0 and 1 of 2 run in turn in this process (barriers stubbed), every
    write to the folder recorded; their folder equals one rank's."""
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    data = appendix.ImageFolder(str(image_folder / "data"), 32)
    tok = vqlib.load_tokenizer("tiny", str(image_folder / "tiny.pt"))
    meta = {"vq": "tiny", "vq_ckpt": str(image_folder / "tiny.pt"), "image_size": 32, "classes": data.classes}
    writes, real_pwrite, real_fsync, now = [], os.pwrite, os.fsync, {}

    def pwrite(fd, b, at):
        writes.append((now["rank"], os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), at, len(b)))
        return real_pwrite(fd, b, at)

    def fsync(fd):
        writes.append((now["rank"], os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), "fsync", 0))
        return real_fsync(fd)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", fsync)

    def extract(out, ranks, world):
        writes.clear()
        for rank in ranks:
            now["rank"] = rank
            appendix.extract_tokens(data, tok, str(out), meta, 16, 0, rank, world, torch.device("cpu"))
        return [np.load(out / f"{k}.npy") for k in ("tokens", "labels", "done")]

    def rows_written(rank, name):
        m = np.load(tmp_path / "two" / name, mmap_mode="r")
        row = m.itemsize * math.prod(m.shape[1:])
        spans = [(at - m.offset, n) for r, f, at, n in writes if (r, f) == (rank, name) and at != "fsync"]
        assert all(at % row == 0 and n % row == 0 for at, n in spans)  # whole rows, nothing else
        return sorted(i for at, n in spans for i in range(at // row, (at + n) // row))

    one = extract(tmp_path / "one", [0], 1)
    two = extract(tmp_path / "two", [0, 1], 2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two)) and two[2].all()
    for rank, block in ((0, range(0, 20)), (1, range(20, 40))):
        for name in ("tokens.npy", "labels.npy", "done.npy"):
            assert rows_written(rank, name) == list(block), (rank, name)
        unsynced = set()  # files written since their last fsync: none when a row is marked done
        for f, at in [(f, at) for r, f, at, _ in writes if r == rank]:
            if f == "done.npy" and at != "fsync":
                assert not unsynced, (rank, unsynced)
            elif at == "fsync":
                unsynced.discard(f)
            else:
                unsynced.add(f)
    done = np.load(tmp_path / "two" / "done.npy", mmap_mode="r+")
    done[[3, 4, 25]] = False
    done.flush()
    del done
    again = extract(tmp_path / "two", [0, 1], 2)
    assert rows_written(0, "tokens.npy") == [3, 4] and rows_written(1, "tokens.npy") == [25]
    assert all(np.array_equal(a, b) for a, b in zip(one, again))


LISTING_RANK = """
import glob, json, os, sys
sys.path.insert(0, sys.argv[1])
import appendix, purr
root, out = sys.argv[2], sys.argv[3]
calls, listed, init = [], [], appendix.ImageFolder.__init__

def counted(fn):
    def call(path=".", *a, **kw):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root):
            calls.append(fn.__name__)
        return fn(path, *a, **kw)
    return call
for module, name in ((os, "listdir"), (os, "scandir"), (os, "stat"), (os, "lstat"), (glob, "glob"),
                     (glob, "iglob")):
    setattr(module, name, counted(getattr(module, name)))

def recording(self, *a):
    init(self, *a)
    listed.append([os.path.relpath(f, root) for f, _ in self.files] + [str(self.labels.tolist())])
appendix.ImageFolder.__init__ = recording
purr.main(sys.argv[4:])
with open(f"{out}.rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"calls": calls, "listed": listed}, f)
"""


@pytest.mark.slow  # trains or starts torchrun
def test_extract_on_two_ranks_lists_the_folder_once_and_writes_what_one_rank_writes(image_folder, tmp_path):
    """torchrun, 2 processes: rank 0 alone lists and stats the image folder and sends the list (32 ranks
    each listing ImageNet's 1.28M files load a shared filesystem); both ranks see the same list, which
    skips hidden files and folders named like images; the token folder equals one process's."""
    data = tmp_path / "data"
    shutil.copytree(image_folder / "data", data)
    (data / "circle" / ".hidden.png").write_bytes(b"not an image")
    (data / "square" / "folder.png").mkdir()
    (tmp_path / "listing.py").write_text(LISTING_RANK)
    extract = ["extract", "--data", str(data), "--vq", "tiny", "--vq-ckpt", str(image_folder / "tiny.pt"),
               "--image-size", "32", "--batch-size", "8", "--num-workers", "0"]
    torchrun(2, HERE, str(data), str(tmp_path / "two"), *extract, "--out", str(tmp_path / "two"),
             script=str(tmp_path / "listing.py"))
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["calls"] and not ranks[1]["calls"], ranks[1]["calls"]
    assert len(ranks[0]["listed"]) == 1 and ranks[0]["listed"] == ranks[1]["listed"]
    by_glob = sorted(os.path.relpath(f, data) for f in glob.glob(str(data / "*" / "*.png"))
                     if os.path.isfile(f))
    assert ranks[0]["listed"][0][:-1] == by_glob and len(by_glob) == 40
    purr.main([*extract, "--out", str(tmp_path / "one")])
    for k in ("tokens", "labels", "done"):
        assert np.array_equal(np.load(tmp_path / "one" / f"{k}.npy"), np.load(tmp_path / "two" / f"{k}.npy"))


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


@pytest.mark.slow  # trains or starts torchrun
def test_sample_compile_pads_the_last_batch_into_the_same_graph(tiny_ckpt, tmp_path, monkeypatch):
    """5 images in batches of 2: the last batch of 1 runs padded to 2 in the graph the others use (the
    backend counts the graphs it is given), and the images are those sampled without --compile."""
    ckpt, graphs, real = with_perturbed_ema(tiny_ckpt, tmp_path / "ckpt.pt"), [], torch.compile
    backend = lambda gm, inputs: graphs.append(gm) or gm  # noqa: E731
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: real(*a, **{**kw, "backend": backend}))
    torch._dynamo.reset()
    common = ["sample", "--ckpt", ckpt, "--num-steps", "3", "--num-samples", "5", "--batch-size", "2",
              "--class-labels", "1", "--entropy-map", "--out"]
    purr.main([*common, str(tmp_path / "eager.png")])
    purr.main([*common, str(tmp_path / "compiled.png"), "--compile"])
    torch._dynamo.reset()
    assert len(graphs) == 1
    for name in ("", "_entropy"):
        eager, compiled = (np.asarray(Image.open(tmp_path / f"{k}{name}.png")) for k in ("eager", "compiled"))
        assert np.array_equal(eager, compiled) and eager.shape[1] == 2 + 5 * 34


@pytest.mark.parametrize("name, bf16, tf32", [
    ("NVIDIA H100 80GB HBM3", 989, 494), ("NVIDIA H100 PCIe", 756, 378), ("NVIDIA H100 NVL", 835, 418),
    ("NVIDIA H200", 989, 494), ("NVIDIA H200 NVL", 835, 418), ("NVIDIA GH200 480GB", 989, 494),
    ("NVIDIA A100-SXM4-80GB", 312, 156), ("NVIDIA A100 80GB PCIe", 312, 156), ("NVIDIA B200", 2250, 1100),
    ("NVIDIA GeForce RTX 4090", None, None)])
def test_bench_mfu_is_against_the_peak_of_the_gpu_found(name, bf16, tf32):
    assert purr.peak_tflops(name, "bf16") == bf16 and purr.peak_tflops(name, "fp32") == tf32


def test_freed_memory_is_kept_in_cpu_runs_only(monkeypatch, tmp_path):
    """mallopt's tuning is for the CPU's K-wide tensors; a GPU run leaves glibc's defaults."""
    kept = []
    monkeypatch.setattr(purr, "keep_freed_memory", lambda: kept.append(1))
    monkeypatch.setattr(purr, "default_precision", lambda: "fp32")  # the parser's default asks the GPU
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        with pytest.raises(SystemExit):  # the command itself fails at once: no checkpoint
            purr.main(["sample", "--precision", "fp32", "--results-dir", str(tmp_path)])
        assert len(kept) == 1


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


CFM_GOLDEN = torch.load(Path(HERE, "fixtures", "official_cfm_golden.pt"), weights_only=True)


@pytest.mark.parametrize("objective", ["cfm", "cfm-endpoint"])
def test_official_cfm_checkpoints_convert_and_give_their_networks_outputs(authors, tmp_path, monkeypatch,
                                                                          capsys, objective):
    """Their CFM and CFM-endpoint baselines (model_type cfm, cfm-endpoint: d output channels, not K):
    tools/from_official.py converts their checkpoint, and purr's DiT on its EMA gives what their code computed
    (fixtures/make_goldens.py, official_cfm): the network's outputs (cfg 1, 1.5 and the null class at three
    t), their samplers' velocities (CFM: the output; CFM-endpoint: (out - z) / (1 - t), their eps = 0) and
    their training loss; and it samples through the CLI."""
    import from_official  # tools/ is on the path (the authors fixture)
    g, case = CFM_GOLDEN, CFM_GOLDEN[objective]
    theirs = seeded.write(case["recipe"], tmp_path / "official.pth")
    assert seeded.digest(torch.load(theirs, weights_only=True)["backbone_state_dict"]) == case["recipe"]["sha256"]
    (tmp_path / "hparams.json").write_text(json.dumps(case["hparams"]))
    ours = tmp_path / "purr.pt"
    from_official.main([str(theirs), "--hparams", str(tmp_path / "hparams.json"), "--vq", "llamagen-vq-ds8",
                        "--vq-ckpt", str(authors[2]), "--out", str(ours)])  # official_dit's tokenizer file
    ckpt = appendix.load_checkpoint(str(ours))
    a = ckpt["args"]
    assert (a["objective"], a["model"], a["latent_channels"], a["codebook_size"], a["time_scale"], ckpt["step"]) \
        == (objective, "N/2", 8, 64, 1.0, 77)
    model = purr.build_model(a)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    z, y = g["z"], g["y"]
    with torch.no_grad():
        for i, t in enumerate(g["t"].tolist()):
            for j, s in enumerate(g["cfg"].tolist()):
                labels, scale = (torch.full_like(y, 3), 1.0) if s == 0 else (y, s)  # their cfg 0: null class
                out = purr.unpatchify(purr.network(model, z, t, labels, scale))
                assert out.shape == (2, 8, 4, 4)  # d channels
                torch.testing.assert_close(out, case["outputs"][i, j], atol=3e-5 if s == 1.5 else 1e-6, rtol=0)
                if s:
                    v = purr.OBJECTIVES[objective].velocity(model, g["codebook"], y, 0.8, s)(t, z)
                    torch.testing.assert_close(v, case["velocity"][i, j], atol=3e-5 / (1 - t), rtol=0)
        batch = purr.Batch(g["c"], y, case["z0"], case["t_train"], None)
        loss = purr.OBJECTIVES[objective].loss(model, batch, g["codebook"], 1e-5)["loss"]
        torch.testing.assert_close(loss, case["loss"], atol=1e-6, rtol=1e-6)
    ch32_llamagen(monkeypatch)
    purr.main(["sample", "--ckpt", str(ours), "--num-steps", "3", "--class-labels", "0", "2", "--num-samples",
               "2", "--cfg-scale", "1.5", "--out", str(tmp_path / "grid.png"), "--precision", "fp32"])
    assert f"2 samples from {ours} (EMA, step 77, {objective})" in capsys.readouterr().out


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


def test_nearest_codes_are_found_in_full_fp32_whatever_tf32(tf32_on):
    """Every quantizer path (encode and quantize of the tiny and the official tokenizers: training's encode
    and sampling's last quantize) finds its nearest code with TF32 off, even with TF32 on globally (purr's GPU
    setting), and the global setting comes back after."""
    x = smooth_images(2, 16)
    for tok in (vqlib.fit_tiny(x, codebook_size=16, iters=2), vqlib.build_tokenizer("sd-vq-f8", ch=32)):
        with TF32Seen() as seen:
            tok.quantize(tok.embed(tok.encode(x)))
        assert len(seen.products) >= 2 and not any(seen.products), tok.name
        assert appendix.tf32() == (True, True)


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


def test_fid_inception_and_metric_products_are_full_fp32_whatever_tf32(tf32_on):
    """The Inception's convolutions and fc, KID's kernels and precision and recall's distances run with TF32
    off, though purr turns it on for the DiT (setup_distributed) and cuDNN has it on by default; the global
    setting comes back after."""
    feats = np.random.RandomState(0).rand(12, 8).astype(np.float32)
    with TF32Seen() as seen:
        fid.InceptionV3().eval()(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8))
        n_inception = len(seen.products)
        fid.kid(feats, feats + 0.1, subsets=2, subset_size=6)
        fid.precision_recall(feats, feats + 0.1, batch=5)
    assert n_inception > 90 and len(seen.products) > n_inception + 2
    assert not any(seen.products) and appendix.tf32() == (True, True)


def test_sample_fid_ref_scores_on_the_sampling_device(tmp_path, monkeypatch, capsys):
    """`sample --fid-ref` moves the Inception to the device it sampled on and computes the metrics there (on
    a GPU machine, the GPU; only a GPU run shows the speed). Here that device is `meta`, which holds no
    numbers: where the Inception's weights are and the device the metrics are asked to use are recorded,
    and the numbers come from a CPU copy."""
    seen, real_features, real_metrics = [], fid.features, fid.metrics
    inception = fid.InceptionV3().eval()  # random weights: the numbers do not matter here
    monkeypatch.setattr(fid, "load_inception", lambda *a, **kw: copy.deepcopy(inception))

    def features(src, model, *a, **kw):
        seen.append(("inception", next(model.parameters()).device.type))
        return real_features(src, inception, *a, **kw)

    def metrics(samples, ref, device=None):
        seen.append(("metrics", torch.device(device or "cpu").type))
        return real_metrics(samples, ref, "cpu")
    monkeypatch.setattr(fid, "features", features)
    monkeypatch.setattr(fid, "metrics", metrics)
    monkeypatch.setattr(fid, "frechet_distance", lambda *a, **kw: 1.0)  # a 2048-d sqrtm costs ~20 s here
    images = np.random.RandomState(0).randint(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images[::-1], arr_1=np.zeros(6))
    out = str(tmp_path / "samples.npz")
    np.save(out + ".rank0.npy", images)
    args = argparse.Namespace(out=out, fid_ref=str(tmp_path / "ref.npz"))
    purr.write_samples(args, 1, [0], torch.zeros(6, dtype=torch.long), "six images", torch.device("meta"))
    assert seen == [("inception", "meta"), ("inception", "meta"), ("metrics", "meta")]
    printed = capsys.readouterr().out
    assert "vs " in printed and "KID" in printed and "not computed" not in printed, printed
    assert np.array_equal(np.load(out)["arr_0"], images)


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


# --- Plumbing: every setting reaches its code, flips happen, names sit on their numbers ---------------------

# A run observed through train_cli: what each train_step received and left behind, what was built, saved,
# logged and drawn. The settings' cases below compare two such runs that differ in one setting.

def observe(root, *flags, quick=True):
    """train_cli(root, *flags) observed: .steps, one dict per training step (its codes c, labels y, noise z0,
    times t, micro-batch sizes, lr and AdamW's hyper-parameters as it ran, whether the DiT ran under bf16
    autocast, the losses it returned, the norm of the gradients it applied); .start, the step it began at;
    .model (the DiT trained), .ckpt (the last checkpoint), .checkpoints, .grids, .log (lines of log.jsonl),
    .out (stdout); .workers (num_workers of each DataLoader made), .remat (activation checkpoints run),
    .compiled (torch.compile calls)."""
    obs = argparse.Namespace(steps=[], workers=[], remat=0, compiled=0, built=[])
    real_step, real_build, real_loader = purr.train_step, purr.build_model, torch.utils.data.DataLoader.__init__
    real_remat = torch.utils.checkpoint.checkpoint

    def step(model, opt, micro, *rest, **kw):
        group, autocast = opt.param_groups[0], next((a for a in rest if isinstance(a, torch.autocast)), None)
        seen = dict(lr=group["lr"], hyper=(group["weight_decay"], tuple(group["betas"]), group["eps"]),
                    bf16=bool(autocast is not None and autocast._enabled and autocast.fast_dtype == torch.bfloat16),
                    sizes=[len(b.c) for b in micro],
                    **{k: torch.cat([getattr(b, k) for b in micro]).clone() for k in ("c", "y", "z0", "t")})
        losses = real_step(model, opt, micro, *rest, **kw)
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        obs.steps.append({**seen, "losses": {k: float(v) for k, v in losses.items()},
                          "applied_norm": float(torch.cat(grads).norm())})
        return losses

    def build(cfg):
        model = real_build(cfg)
        obs.built.append(model)
        return model

    def loader(self, *args, **kw):
        real_loader(self, *args, **kw)
        obs.workers.append(self.num_workers)

    def remat(*args, **kw):
        obs.remat += 1
        return real_remat(*args, **kw)

    def compile_(model, *args, **kw):  # the call is what is checked: the eager module runs
        obs.compiled += 1
        return model
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setattr(purr, "train_step", step)
        mp.setattr(purr, "build_model", build)
        mp.setattr(torch.utils.data.DataLoader, "__init__", loader)
        mp.setattr(torch.utils.checkpoint, "checkpoint", remat)
        mp.setattr(torch, "compile", compile_)
        run = train_cli(root, *flags, quick=quick)
    obs.out, obs.model = out.getvalue(), obs.built[-1]
    obs.checkpoints = sorted(os.listdir(os.path.join(run, "checkpoints")))
    obs.grids = sorted(os.listdir(os.path.join(run, "samples"))) if os.path.isdir(os.path.join(run, "samples")) \
        else []
    log = os.path.join(run, "log.jsonl")
    obs.log = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    obs.ckpt = appendix.load_checkpoint(os.path.join(run, "checkpoints", obs.checkpoints[-1]))
    obs.start = obs.ckpt["step"] - len(obs.steps)
    return obs


def same(a, b, *keys):
    """The runs' steps hold equal tensors under keys (c, y, z0, t), step by step."""
    return len(a.steps) == len(b.steps) and all(torch.equal(x[k], y[k]) for x, y in zip(a.steps, b.steps)
                                                for k in keys)


def same_weights(a, b, part="model", atol=0.0):
    return all(torch.allclose(a.ckpt[part][k], b.ckpt[part][k], atol=atol, rtol=0) for k in a.ckpt[part])


def lrs(obs):
    return [s["lr"] for s in obs.steps]


def lr_schedule(lr, steps, warmup=0, decay=0.0):
    """learning_rate's schedule, written out: linear warm-up over `warmup` steps, then linear decay to 0 over
    the last `decay` fraction of `steps`."""
    def at(s):
        f = (s + 1) / warmup if s < warmup else 1.0
        return lr * f * ((steps - s) / (steps * decay) if decay and s >= steps * (1 - decay) else 1.0)
    return at


def check_model(base, alt):
    assert [o.ckpt["model"]["x_embedder.weight"].shape[-1] for o in (base, alt)] == [4, 2]  # N/4's patch, N/2's
    assert same(base, alt, "c", "y", "z0", "t")


def check_objective(base, alt):
    assert "mse" in alt.steps[0]["losses"] and "mse" not in base.steps[0]["losses"]  # CFM's loss ran
    assert alt.ckpt["args"]["objective"] == "cfm"
    assert same(base, alt, "c", "y", "z0", "t")


def check_z_loss(base, alt):
    a, b = alt.steps[0]["losses"], base.steps[0]["losses"]  # the first step: the same weights and batch
    assert a["ce"] == b["ce"] and a["zloss"] == pytest.approx(100 * b["zloss"], rel=1e-4) and b["zloss"] > 0


def check_class_dropout(base, alt):
    assert all((s["y"] == 10).all() for s in alt.steps)  # 10 demo classes: 10 is the null class
    assert any((s["y"] < 10).any() for s in base.steps)
    assert same(base, alt, "c", "z0", "t")


def check_steps(base, alt):
    assert len(alt.steps) == len(base.steps) + 1 and alt.ckpt["step"] == base.ckpt["step"] + 1
    assert all(torch.equal(a[k], b[k]) for a, b in zip(alt.steps, base.steps) for k in ("c", "y", "z0", "t"))


def check_global_batch_size(base, alt):
    assert [sum(s["sizes"]) for s in alt.steps] == [4] * len(alt.steps)
    assert [sum(s["sizes"]) for s in base.steps] == [8] * len(base.steps)


def check_lr(base, alt):
    assert lrs(alt) == pytest.approx([10 / 3 * x for x in lrs(base)]) and lrs(base)[0] == 3e-3
    assert same(base, alt, "c", "y", "z0", "t") and not same_weights(base, alt)


def check_warmup(base, alt):
    at = lr_schedule(3e-3, alt.ckpt["step"], warmup=4, decay=0.3)  # the demo's decay
    assert lrs(alt) == pytest.approx([at(alt.start + i) for i in range(len(alt.steps))])
    assert lrs(base) == pytest.approx([3e-3] * len(base.steps))


def check_decay(base, alt):
    at = lr_schedule(3e-3, alt.ckpt["step"], decay=0.9)
    assert lrs(alt) == pytest.approx([at(alt.start + i) for i in range(len(alt.steps))])
    assert lrs(alt)[-1] < lrs(base)[-1] == 3e-3


def adamw_check(index, value):
    def check(base, alt):
        hyper = lambda obs: [s["hyper"] for s in obs.steps]  # noqa: E731
        assert all(h[index] == value for h in hyper(alt)) and all(h[index] != value for h in hyper(base))
        assert same(base, alt, "c", "y", "z0", "t") and not same_weights(base, alt)
    return check


def check_ema_decay(base, alt):
    assert same_weights(base, alt) and not same_weights(base, alt, "ema")
    assert alt.ckpt["args"]["ema_decay"] == 0.5


def check_time_scale(base, alt):
    assert alt.model.t_embedder.time_scale == 1.0 and base.model.t_embedder.time_scale == 1000.0
    assert same(base, alt, "c", "y", "z0", "t") and not same_weights(base, alt)  # t reaches the gradients


def check_ema_warmup(base, alt):
    assert same_weights(base, alt) and not same_weights(base, alt, "ema")


def check_max_grad_norm(base, alt):
    a, b = alt.steps[0], base.steps[0]
    assert a["losses"]["grad_norm"] == b["losses"]["grad_norm"] > 0.02  # the norm before clipping, logged
    assert a["applied_norm"] == pytest.approx(0.01, rel=1e-3) and b["applied_norm"] == pytest.approx(
        b["losses"]["grad_norm"], rel=1e-5)


def check_t_min(base, alt):
    assert all(s["t"].min() >= 0.5 for s in alt.steps) and any(s["t"].min() < 0.5 for s in base.steps)
    assert same(base, alt, "c", "y", "z0")


def check_data(base, alt):
    assert not same(base, alt, "c") and same(base, alt, "z0", "t")


def check_vq(base, alt):
    assert isinstance(alt, Exception) and "llamagen-vq-ds8" in str(alt) and "tiny.pt" in str(alt), alt


def check_vq_ckpt(base, alt):
    assert (alt.ckpt["args"]["codebook_size"], base.ckpt["args"]["codebook_size"]) == (32, 64)
    assert not same(base, alt, "c") and same(base, alt, "z0", "t")


def check_image_size(base, alt):
    assert (alt.ckpt["args"]["latent_size"], base.ckpt["args"]["latent_size"]) == (4, 8)
    assert alt.steps[0]["c"].shape[-1] == 4 and alt.steps[0]["z0"].shape[-1] == 4


def check_demo_size(base, alt):
    assert " 60 images," in alt.out and " 100 images," in base.out and not same(base, alt, "c")


def check_grad_accum(base, alt):
    assert [s["sizes"] for s in alt.steps] == [[4, 4]] * len(alt.steps)
    assert [s["sizes"] for s in base.steps] == [[8]] * len(base.steps)
    assert same(base, alt, "c", "y", "z0", "t") and same_weights(base, alt, atol=1e-5)


def check_micro_batch_size(base, alt):
    assert [s["sizes"] for s in alt.steps] == [[2, 2, 2, 2]] * len(alt.steps)
    assert same(base, alt, "c", "y", "z0", "t") and same_weights(base, alt, atol=1e-5)


def check_grad_checkpoint(base, alt):
    assert alt.remat >= 4 * len(alt.steps) and base.remat == 0  # N's 4 blocks, every step
    assert same_weights(base, alt, atol=1e-6)


def check_compile(base, alt):
    assert alt.compiled >= 1 and base.compiled == 0 and same_weights(base, alt)


def check_precision(base, alt):
    assert all(s["bf16"] for s in alt.steps) and not any(s["bf16"] for s in base.steps)


def check_num_workers(base, alt):
    assert alt.workers == [1] and base.workers == [0]
    assert same(base, alt, "c", "y", "z0", "t") and same_weights(base, alt)


def check_grad_compression(base, alt):  # one process all-reduces nothing (two: the torchrun test above)
    assert alt.ckpt["args"]["grad_compression"] == "bf16" and same_weights(base, alt)


def check_log_every(base, alt):
    assert [r["step"] for r in alt.log] == list(range(alt.start + 1, alt.ckpt["step"] + 1))
    assert [r["step"] for r in base.log] == [base.ckpt["step"]] and same_weights(base, alt)


def check_ckpt_every(base, alt):
    end = alt.ckpt["step"]
    assert set(alt.checkpoints) >= {f"{s:07d}.pt" for s in range(alt.start + 1, end + 1)}
    assert f"{end - 1:07d}.pt" not in base.checkpoints and same_weights(base, alt)


def check_keep(base, alt):
    assert alt.checkpoints == [f"{alt.ckpt['step']:07d}.pt"] and len(base.checkpoints) >= 2
    assert same_weights(base, alt)


def check_sample_every(base, alt):
    assert alt.grids == ["0000002.png"] and base.grids == []
    assert same_weights(base, alt) and same_weights(base, alt, "ema")  # a grid leaves the training alone


def check_seed(base, alt):
    assert not same(base, alt, "z0") and not same(base, alt, "c")
    codebooks = [o.ckpt["vq"]["state"]["codebook"] for o in (base, alt)]
    assert not torch.equal(*codebooks)  # the demo tokenizer is fitted from the seed too


# setting: (the runs' common flags, the other run's flags, the check(base, other)). The common flags pick
# the base: a demo run (quick, 2 steps, fp32), or an image folder's run ("folder" in them).
DEMO_RUN = ("--steps", "2", "--precision", "fp32")
FOLDER_RUN = ("folder", "--steps", "2", "--precision", "fp32", "--model", "N/4")
SETTING_CASES = {
    "model": (DEMO_RUN, ["--model", "N/2"], check_model),
    "objective": (DEMO_RUN, ["--objective", "cfm"], check_objective),
    "z_loss": (DEMO_RUN, ["--z-loss", "1e-3"], check_z_loss),
    "class_dropout": (DEMO_RUN, ["--class-dropout", "1"], check_class_dropout),
    "steps": (DEMO_RUN, ["--steps", "3"], check_steps),
    "global_batch_size": (DEMO_RUN, ["--global-batch-size", "4"], check_global_batch_size),
    "lr": (DEMO_RUN, ["--lr", "1e-2"], check_lr),
    "warmup": (DEMO_RUN, ["--warmup", "4"], check_warmup),
    "decay": (DEMO_RUN, ["--decay", "0.9"], check_decay),
    "weight_decay": (DEMO_RUN, ["--weight-decay", "0.5"], adamw_check(0, 0.5)),
    "beta1": (DEMO_RUN, ["--beta1", "0.5"], adamw_check(1, (0.5, 0.999))),
    "beta2": (DEMO_RUN, ["--beta2", "0.9"], adamw_check(1, (0.9, 0.9))),
    "adam_eps": (DEMO_RUN, ["--adam-eps", "1e-3"], adamw_check(2, 1e-3)),
    "ema_decay": (DEMO_RUN, ["--ema-decay", "0.5"], check_ema_decay),
    "time_scale": (DEMO_RUN, ["--time-scale", "1"], check_time_scale),
    "ema_warmup": (DEMO_RUN, ["--ema-warmup"], check_ema_warmup),
    "max_grad_norm": (DEMO_RUN, ["--max-grad-norm", "0.01"], check_max_grad_norm),
    "t_min": (DEMO_RUN, ["--t-min", "0.5"], check_t_min),
    "data": (FOLDER_RUN, ["--data", "other"], check_data),
    "vq": (FOLDER_RUN, ["--vq", "llamagen-vq-ds8"], check_vq),
    "vq_ckpt": (FOLDER_RUN, ["--vq-ckpt", "tiny32.pt"], check_vq_ckpt),
    "image_size": (FOLDER_RUN, ["--image-size", "16"], check_image_size),
    "demo_size": (DEMO_RUN, ["--demo-size", "60"], check_demo_size),
    "grad_accum": (DEMO_RUN, ["--grad-accum", "2"], check_grad_accum),
    "micro_batch_size": (DEMO_RUN, ["--micro-batch-size", "2"], check_micro_batch_size),
    "grad_checkpoint": (DEMO_RUN, ["--grad-checkpoint"], check_grad_checkpoint),
    "compile": (DEMO_RUN, ["--compile"], check_compile),
    "precision": (DEMO_RUN, ["--precision", "bf16"], check_precision),
    "num_workers": (DEMO_RUN, ["--num-workers", "1"], check_num_workers),
    "grad_compression": (DEMO_RUN, ["--grad-compression", "bf16"], check_grad_compression),
    "log_every": (DEMO_RUN, ["--log-every", "1"], check_log_every),
    "ckpt_every": (DEMO_RUN, ["--ckpt-every", "1"], check_ckpt_every),
    "keep": ((*DEMO_RUN, "--ckpt-every", "1"), ["--keep", "1"], check_keep),
    "sample_every": (DEMO_RUN, ["--sample-every", "2"], check_sample_every),
    "seed": (DEMO_RUN, ["--seed", "1"], check_seed),
}


# What a resumed run may change (RESUME_MAY_CHANGE, written out): the schedule, logging, disk, and how the
# same global batch is computed. Every other setting of SETTINGS is refused on resume.
RESUMABLE = ["steps", "lr", "warmup", "decay", "log_every", "ckpt_every", "sample_every", "keep", "num_workers",
             "precision", "grad_accum", "micro_batch_size", "grad_checkpoint", "compile", "grad_compression"]


@pytest.fixture(scope="module")
def setting_runs(tmp_path_factory):
    """runs(common, flags) -> observe() of a quick run with those flags (an exception it raised instead),
    each run once per module. "folder" in common: the run reads an image folder (demo images as PNGs) with a
    tiny tokenizer of 64 codes; the names other and tiny32.pt in flags: a second folder, a second tokenizer
    (32 codes)."""
    root = tmp_path_factory.mktemp("settings")
    images = demo_folder(root / "folder", 16, seed=5)
    demo_folder(root / "other", 16, seed=6)
    for name, k in (("tiny.pt", 64), ("tiny32.pt", 32)):
        tok = vqlib.fit_tiny(appendix.to_unit(images), codebook_size=k, iters=3)
        torch.save({"name": "tiny", "config": tok.config(), "state": tok.state_dict()}, root / name)
    cache = {}

    def runs(common, flags=()):
        key = (tuple(common), tuple(flags))
        if key not in cache:
            args = [a for a in common if a != "folder"]
            if "folder" in common:
                args += ["--data", str(root / "folder"), "--vq", "tiny", "--vq-ckpt", str(root / "tiny.pt"),
                         "--image-size", "32", "--global-batch-size", "8"]
            args += [str(root / f) if f in ("other", "tiny32.pt") else f for f in flags]
            try:
                cache[key] = observe(root / f"run{len(cache)}", *args, quick="folder" not in common)
            except (appendix.PurrError, vqlib.TokenizerError) as e:
                cache[key] = e
        return cache[key]
    return runs


@pytest.mark.slow  # trains
@pytest.mark.parametrize("setting", list(purr.SETTINGS))
def test_each_setting_changes_what_the_run_does_and_nothing_else(setting, setting_runs):
    """Two short runs that differ in one setting: they differ where the setting acts (the batch, the draws,
    the lr, AdamW, the weights, the EMA, the files written) and are equal where it does not."""
    if setting not in SETTING_CASES:
        pytest.fail(f"SETTINGS has {setting!r} and SETTING_CASES no case for it: add one (the runs' common "
                    "flags, the other run's flags, a check that the setting changes what it should)")
    common, flags, check = SETTING_CASES[setting]
    base = setting_runs(common)
    assert not isinstance(base, Exception), base
    check(base, setting_runs(common, flags))


def flag_args(k, v):
    """The train flags that set setting k to v."""
    if isinstance(v, bool):
        return [purr.flag(k) if v else "--no-" + purr.flag(k)[2:]]
    return [purr.flag(k), str(v)]


def another_value(k, v):
    """A value of setting k other than v, that the train parser accepts."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1 if isinstance(v, int) else v * 2 + 1
    if k in purr.CHOICES:
        return next(c for c in purr.CHOICES[k] if c != v)
    return "/elsewhere" if v is None else f"{v}x"


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """resume(flags) -> observe() of a run resumed from the checkpoint of a quick 1-step demo run (fp32) to
    --steps 3 (or as flags say), each from its own copy of the checkpoint."""
    root = tmp_path_factory.mktemp("resumable")
    run = train_cli(root / "first", "--steps", "1", "--precision", "fp32", quick=True)
    first = os.path.join(run, "checkpoints", "0000001.pt")
    cache = {}

    def resume(flags=()):
        key = tuple(flags)
        if key not in cache:
            folder = root / f"resumed{len(cache)}" / "run" / "checkpoints"
            folder.mkdir(parents=True)
            shutil.copy(first, folder / "0000001.pt")
            cache[key] = observe(root / "unused", "--resume", str(folder / "0000001.pt"), "--steps", "3",
                                 *flags, quick=True)
        return cache[key]
    return resume


@pytest.mark.slow  # trains
@pytest.mark.parametrize("setting", RESUMABLE)
def test_each_setting_a_resumed_run_may_change_takes_effect(setting, resumable):
    """Every setting a resumed run may change is accepted on resume, said in the run's first lines, and acts
    on the resumed steps as it acts on a fresh run (the checks of SETTING_CASES)."""
    common, flags, check = SETTING_CASES[setting]
    extra = [f for f in common if f not in DEMO_RUN]  # e.g. keep's --ckpt-every 1: a change the resume allows
    if setting == "steps":
        flags = ["--steps", "4"]
    base, alt = resumable(extra), resumable([*extra, *flags])
    said = [line for line in alt.out.splitlines() if line.startswith("resume: ")]
    assert base.start == alt.start == 1 and len(said) == 1 and f"{purr.flag(setting)} " in said[0], alt.out
    check(base, alt)


def test_every_other_setting_is_refused_on_resume_in_one_line(tiny_ckpt, tmp_path, capsys):
    """A resumed run changing a setting outside RESUME_MAY_CHANGE (the model, the data, the objective, the
    optimiser's, ...) stops at once, in one line that names the flag and what may change; nothing is written."""
    saved = purr.saved_settings(appendix.load_checkpoint(tiny_ckpt))
    unknown = [k for k in purr.SETTINGS if k not in SETTING_CASES]
    assert not unknown, f"SETTINGS has {unknown} and SETTING_CASES no case: add one, and to RESUMABLE if a " \
        "resumed run may change it"
    for k in purr.SETTINGS:
        if k in RESUMABLE:
            continue
        flags = flag_args(k, another_value(k, saved[k]))
        try:
            purr.main(["train", "--resume", tiny_ckpt, "--results-dir", str(tmp_path), *flags])
        except SystemExit as e:
            message = str(e.code)
        else:
            pytest.fail(f"a resumed run took {' '.join(flags)}: only {', '.join(RESUMABLE)} may change")
        assert len(message.splitlines()) == 1 and message.startswith("purr train: error: "), message
        assert f"trained with {purr.flag(k)} " in message and "may change only --steps" in message, message
    assert os.listdir(tmp_path) == [] and capsys.readouterr().out == ""
    assert sorted(purr.RESUME_MAY_CHANGE) == sorted(RESUMABLE)  # and those resume (the test above)


# Augmentation: the seeded plan's flips reach the batches from every source.

def assert_served_as_planned(obs, n, expected):
    """Each step's codes are the plan's (index, flip) of the global batch (appendix.global_batch_plan),
    expected(index, flip) -> codes; over the run both orientations of every image were served, and they
    differ for most images (so a source serving one orientation for both would be seen)."""
    served = set()
    for step, s in enumerate(obs.steps):
        idx, flip = appendix.global_batch_plan(n, step, len(s["c"]), obs.ckpt["args"]["seed"])
        for row, (i, f) in enumerate(zip(idx.tolist(), flip.tolist())):
            assert torch.equal(s["c"][row], expected(i, f)), (step, row, i, f)
            served.add((i, f))
    assert served == {(i, f) for i in range(n) for f in (0, 1)}
    assert sum(not torch.equal(expected(i, 0), expected(i, 1)) for i in range(n)) >= n // 2


@pytest.mark.slow  # trains
def test_both_orientations_of_every_image_reach_the_batches_from_each_source(tmp_path):
    """Over 12 epochs of 8 images (a global batch each), every image is served in both orientations, each
    exactly where the seeded plan puts it: from an image folder, from the token folder `extract` made of it, and
    from the demo."""
    n, common = 8, ["--steps", "12", "--global-batch-size", "8", "--model", "N/4", "--precision", "fp32"]
    images = demo_folder(tmp_path / "data", n, seed=3)
    tok = vqlib.fit_tiny(appendix.to_unit(images), codebook_size=32, iters=3)
    torch.save({"name": "tiny", "config": tok.config(), "state": tok.state_dict()}, tmp_path / "tiny.pt")
    folder = appendix.ImageFolder(str(tmp_path / "data"), 32)  # its order: by class, then file name
    pixels = torch.stack([folder[(i, 0)][0] for i in range(n)])

    def encoded(i, f):
        x = pixels[i:i + 1]
        return tok.encode(appendix.to_unit(x.flip(3) if f else x))[0]
    source = ["--data", str(tmp_path / "data"), "--vq", "tiny", "--vq-ckpt", str(tmp_path / "tiny.pt"),
              "--image-size", "32"]
    assert_served_as_planned(observe(tmp_path / "images", *common, *source, quick=False), n, encoded)
    purr.main(["extract", *source[:-2], "--out", str(tmp_path / "tok"), "--image-size", "32", "--num-workers",
               "0"])
    obs = observe(tmp_path / "tokens", *common, "--data", str(tmp_path / "tok"), quick=False)
    assert_served_as_planned(obs, n, encoded)
    demo = observe(tmp_path / "demo", *common, "--demo-size", str(n), quick=True)
    demo_tok = vqlib.load_tokenizer("tiny", appendix.checkpoint_paths(str(tmp_path / "demo"))[-1])
    shapes = appendix.demo_dataset(n)[0]

    def demo_encoded(i, f):
        x = shapes[i:i + 1]
        return demo_tok.encode(appendix.to_unit(x.flip(3) if f else x))[0]
    assert_served_as_planned(demo, n, demo_encoded)


# Extract: a re-run does only what is missing.

def test_a_rerun_of_an_interrupted_extract_encodes_only_the_missing_images(image_folder, tmp_path, monkeypatch):
    """SIGTERM during the first batch stops extract after it; the same command again reads and encodes each
    image not yet done exactly once (and its flip), and a third run, with all done, encodes nothing."""
    real_load, real_get = vqlib.load_tokenizer, appendix.ImageFolder.__getitem__
    encoded, read, stop_after = [], [], [1]

    def load(name, path, **kw):
        tok = real_load(name, path, **kw)
        real_encode = tok.encode

        def encode(x):
            encoded.append(len(x))
            if len(encoded) == stop_after[0]:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_encode(x)
        tok.encode = encode
        return tok

    def get(self, item):
        read.append(item[0])
        return real_get(self, item)
    monkeypatch.setattr(vqlib, "load_tokenizer", load)
    monkeypatch.setattr(appendix.ImageFolder, "__getitem__", get)
    args = ["extract", "--data", str(image_folder / "data"), "--vq", "tiny", "--vq-ckpt",
            str(image_folder / "tiny.pt"), "--out", str(tmp_path / "tok"), "--image-size", "32", "--batch-size",
            "16", "--num-workers", "0"]
    purr.main(args)
    done = np.load(tmp_path / "tok" / "done.npy")
    assert done.sum() == 16 and sum(encoded) == 2 * 16 and sorted(read) == sorted(np.flatnonzero(done))
    first = set(read)
    encoded.clear()
    read.clear()
    stop_after[0] = 0  # no signal
    purr.main(args)
    assert np.load(tmp_path / "tok" / "done.npy").all()
    assert sum(encoded) == 2 * 24 and sorted(read) == sorted(set(range(40)) - first)  # each missing one once
    encoded.clear()
    read.clear()
    purr.main(args)
    assert encoded == [] and read == []
    folder, tok = appendix.ImageFolder(str(image_folder / "data"), 32), real_load("tiny", image_folder / "tiny.pt")
    x = torch.stack([real_get(folder, (i, 0))[0] for i in range(40)])
    assert np.array_equal(np.load(tmp_path / "tok" / "tokens.npy")[:, 1],
                          tok.encode(appendix.to_unit(x.flip(3))).numpy())


# Pictures: which weights, which time.

@pytest.mark.slow  # trains
def test_sample_every_grids_come_from_the_ema_not_the_live_weights(tmp_path):
    """With an EMA that differs from the live weights (--ema-decay 0.5), the grid of step 2 is what `purr.py
    sample` draws from checkpoint 2 (its EMA) with the grid's noise and labels, and not what the live
    weights draw."""
    run = train_cli(tmp_path / "r", "--steps", "2", "--sample-every", "2", "--ema-decay", "0.5", "--lr", "3e-2",
                    "--precision", "fp32", quick=True)
    ckpt_path = os.path.join(run, "checkpoints", "0000002.pt")
    ckpt = appendix.load_checkpoint(ckpt_path)
    key = "final_layer.linear.weight"
    assert not torch.equal(ckpt["ema"][key], ckpt["model"][key])
    live = dict(ckpt, ema=ckpt["model"])
    torch.save(live, tmp_path / "live.pt")
    common = ["sample", "--num-steps", "100", "--num-samples", "40", "--seed", "0", "--precision", "fp32"]
    purr.main([*common, "--ckpt", ckpt_path, "--out", str(tmp_path / "ema.png")])
    purr.main([*common, "--ckpt", str(tmp_path / "live.pt"), "--out", str(tmp_path / "live.png")])
    grid, ema, live = (np.asarray(Image.open(p)) for p in (os.path.join(run, "samples", "0000002.png"),
                                                           tmp_path / "ema.png", tmp_path / "live.png"))
    assert np.array_equal(grid, ema) and not np.array_equal(grid, live)


def test_entropy_map_shows_pi_at_exactly_entropy_t(tiny_ckpt, tmp_path, monkeypatch):
    """With 4 Euler steps pi is evaluated at t = 0, 1/4, 1/2, 3/4: --entropy-t 0.5 maps the entropy of the pi of
    t = 1/2 (at tau(1/2) of a linear schedule), 0 black .. log K white, and not that of a neighbouring time."""
    ckpt = with_perturbed_ema(tiny_ckpt, tmp_path / "ckpt.pt")
    calls, real_load = [], purr.load_sampler

    def load(*args, **kw):
        loaded = real_load(*args, **kw)
        model = loaded[0]  # sampling asks for the final hidden state h; the logits are the head's map of it
        model.register_forward_hook(lambda m, inputs, h: calls.append((
            float(inputs[1][0]), m.final_layer.linear(h).unflatten(2, (m.patch ** 2, -1)))))
        return loaded
    monkeypatch.setattr(purr, "load_sampler", load)
    purr.main(["sample", "--ckpt", ckpt, "--num-steps", "4", "--num-samples", "20", "--entropy-map", "--entropy-t",
               "0.5", "--tau-schedule", "linear", "--tau", "0.5", "--tau-end", "1.5", "--precision", "fp32",
               "--out", str(tmp_path / "s.png")])
    got = np.asarray(Image.open(tmp_path / "s_entropy.png")).astype(int)
    assert [t for t, _ in calls] == [0.0, 0.25, 0.5, 0.75]
    K = appendix.load_checkpoint(ckpt)["args"]["codebook_size"]
    maps = {}
    for t, logits in calls:
        logp = torch.log_softmax(logits.double() / (0.5 + t), -1)  # tau(t) = 0.5 + (1.5 - 0.5) t
        h = purr.unpatchify(-(logp.exp() * logp).sum(-1, keepdim=True))[:, 0] / math.log(K)
        appendix.save_grid(appendix.heat_map(h.float(), 32), 10, tmp_path / f"{t}.png")
        maps[t] = np.asarray(Image.open(tmp_path / f"{t}.png")).astype(int)
    assert np.abs(got - maps[0.5]).max() <= 1
    assert np.abs(got - maps[0.25]).max() > 10 and np.abs(got - maps[0.75]).max() > 10


# Names on the right numbers: precision is the samples' share on the reference's manifold, recall the
# reference's share on the samples'.

def test_fid_metrics_partial_coverage_is_high_precision_and_low_recall():
    """Samples covering one of the reference's five clusters: every sample lies on the reference's manifold
    (precision 1), four fifths of the reference lie off the samples' (recall 0.2), by name."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 10
    ref = np.concatenate([c + rng.normal(size=(40, 16)) for c in centres]).astype(np.float32)
    samples = ref[:40]  # the reference's first cluster
    stats = [fid.summarize({"pool": x, "spatial": x[:, :4], "logits": x}, name)
             for x, name in ((samples, "samples"), (ref, "ref"))]
    results = fid.metrics(*stats)
    assert (results["precision"][0], results["recall"][0]) == pytest.approx((1.0, 0.2)), results
    swapped = fid.metrics(stats[1], stats[0])  # the reference seen as samples: the names trade values
    assert (swapped["precision"][0], swapped["recall"][0]) == pytest.approx((0.2, 1.0)), swapped


def test_fid_cli_partial_coverage_is_high_precision_and_low_recall(official, tmp_path, capsys, monkeypatch):
    """fid.py SAMPLES REF, the samples being the reference's images of one colour of four: precision 1, recall
    near 1/4, on the report's lines of those names."""
    monkeypatch.setattr(fid, "frechet_distance", lambda *a, **k: 0.0)  # FID's 2048-d sqrtm: not what is tested
    rng = np.random.default_rng(1)
    (tmp_path / "ref").mkdir()
    (tmp_path / "samples").mkdir()
    colours = [(230, 30, 30), (30, 200, 40), (40, 40, 220), (240, 240, 240)]
    for i in range(16):  # few images: the Inception's 299^2 pass dominates the test's time
        im = np.clip(np.array(colours[i % 4]) + rng.normal(0, 6, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(tmp_path / "ref" / f"{i:03d}.png")
        if i % 4 == 0:
            Image.fromarray(im).save(tmp_path / "samples" / f"{i:03d}.png")
    weights = official("seeded", "inception")[0]
    got = fid_metrics(fid_cli(capsys, tmp_path / "samples", tmp_path / "ref", "--inception", weights))
    assert got["precision"] == 1.0 and got["recall"] < 0.5, got


# The demo tokenizer: its latents at the noise's scale.

def test_demo_tokenizer_codebook_is_fitted_to_unit_variance(tiny_ckpt):
    """The demo's codebook (DEMO_TOKENIZER, fitted in the run, saved in its checkpoints) is centred with
    variance 1, the scale of z_0 ~ N(0, I): z_t mixes noise and codes at the scale the method assumes."""
    spec = appendix.load_checkpoint(tiny_ckpt)["vq"]
    codebook = spec["state"]["codebook"]
    assert spec["config"] == {k: purr.DEMO_TOKENIZER[k] for k in ("codebook_size", "dim", "patch")}
    assert codebook.std().item() == pytest.approx(1.0, abs=1e-5)
    assert codebook.mean(0).abs().max().item() < 1e-5
    assert codebook.std(0).min() > 0.05  # every one of the d directions is used


# Counts that show at scale only: every loop in fixed chunks, with more than one chunk.

def test_adm_batch_of_more_images_than_one_chunk_is_written_whole(tmp_path):
    """write_adm_npz streams 256 images at a time: 300 + 7 images from two shards come back whole, in order."""
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (300, 7)]
    for i, a in enumerate(shards):
        np.save(tmp_path / f"s{i}.npy", a)
    labels = np.arange(307) % 10
    appendix.write_adm_npz(str(tmp_path / "b.npz"), [str(tmp_path / f"s{i}.npy") for i in range(2)], labels)
    with np.load(tmp_path / "b.npz") as f:
        assert np.array_equal(f["arr_0"], np.concatenate(shards)) and np.array_equal(f["arr_1"], labels)


def test_nearest_code_over_more_rows_than_one_chunk():
    """Rows go in chunks of 16384: 20000 positions, each next to its own code, all find it."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.eye(8).repeat(2, 1) * torch.tensor([1.0] * 8 + [3.0] * 8)[:, None]  # 16 distinct codes
    c = torch.randint(0, 16, (5, 40, 100), generator=g)
    z = codebook[c].permute(0, 3, 1, 2) + 0.01 * torch.randn(5, 8, 40, 100, generator=g)
    assert torch.equal(vqlib.nearest_code(z, codebook), c)


def test_entropy_and_code_draws_over_more_positions_than_one_chunk():
    """entropy and draw_codes go through logits POSITIONS_PER_CHUNK rows at a time: over more rows (and a
    remainder) each row's value is the one-row formula's."""
    g = torch.Generator().manual_seed(0)
    n = getattr(purr, "POSITIONS_PER_CHUNK", 4096) * 2 + 5
    logits, u = 3 * torch.randn(1, n, 1, 16, generator=g), torch.rand(1, n, 1, generator=g)
    logp = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(purr.entropy(logits, 0.7), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)
    cdf = torch.softmax(logits / 0.7, -1).cumsum(-1)
    want = (cdf <= u[..., None]).sum(-1).clamp(max=15)
    assert (purr.draw_codes(logits, 0.7, u) == want).float().mean() > 0.999


def test_fid_metrics_kid_takes_subsets_of_1000_of_more_images(monkeypatch):
    """torch-fidelity's KID draws subsets of 1000: with 1200 images a side, fid.metrics asks fid.kid for
    subsets of 1000 (not of all the images), and its convention line says so."""
    asked = []
    monkeypatch.setattr(fid, "kid", lambda f1, f2, subset_size, **kw: asked.append((len(f1), subset_size)) or
                        (0.0, 0.0))  # 100 subsets of 1000: seconds; what is checked is what metrics asks
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(1200, 8)).astype(np.float32) + shift for shift in (0.0, 0.3))
    stats = [{**fid.moments(x), "name": n, "pool": x} for x, n in ((a, "samples"), (b, "ref"))]
    assert "100 subsets of 1000" in fid.metrics(*stats)["KID"][1] and asked == [(1200, 1000)]


def test_fid_features_over_several_batches_keep_the_evenly_spaced_images():
    """features() runs the network batch by batch (23 images in batches of 5) and keeps `keep` images evenly
    spaced over all of them, whichever batch they fall in."""
    class Stub(torch.nn.Module):  # a "network" whose features name each image
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            f = x.float().mean((1, 2, 3))[:, None]
            return {"pool": f, "spatial": f, "logits": f}
    x = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 3, 2, 2).contiguous()
    out = fid.features(x, Stub(), batch_size=5, keep=7)
    assert out["pool"][:, 0].tolist() == list(range(23))
    assert out["images"][:, 0, 0, 0].tolist() == [i * 23 // 7 for i in range(7)]


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
    names = ("convergence", "steps", "guidance", "cfg_interval", "temperature", "tau_schedule",
             "learning_rate")
    tables = {name: list(csv.DictReader(open(out / f"miniature_{name}.csv"))) for name in names}
    conv = [r for r in tables["convergence"] if r["seed"]]
    assert {(r["seed"], r["objective"], r["step"]) for r in conv} == {
        (str(s), o, str(k)) for s in (0, 1) for o in purr.OBJECTIVES for k in (2, 4)}
    lrs = {(r["objective"], float(r["lr"])): float(r["fd"]) for r in tables["learning_rate"]}
    assert set(lrs) == {(o, lr) for o in purr.OBJECTIVES for lr in (3e-3, 1e-2)}
    for r in conv:  # every objective trains at the learning rate of its lowest FD, on N/2
        assert min((fd, lr) for (o, lr), fd in lrs.items() if o == r["objective"])[1] == float(r["lr"])
        assert r["model"] == "N/2"
    assert {r["commit"] for t in tables.values() for r in t} == {miniature.COMMIT}
    assert {r["num_steps"] for r in tables["steps"] if r["method"] == "euler"} == {"2", "4"}
    assert {r["train_steps"] for r in tables["temperature"]} == {"4", "8"}
    scales = {(float(r["cfg_scale"]), float(r["fd"])) for r in tables["guidance"]}
    best = {float(r["cfg_scale"]) for r in tables["cfg_interval"]}
    assert len(best) == 1 and {(float(r["lo"]), float(r["hi"])) for r in tables["cfg_interval"]} == set(
        miniature.CFG_INTERVALS) and best <= {s for s, _ in scales}
    # at [0, 1] the interval is guidance everywhere: the guidance table's numbers at that scale
    full = [r for r in tables["cfg_interval"] if (float(r["lo"]), float(r["hi"])) == (0.0, 1.0)]
    assert {(r["seed"], r["fd"]) for r in full} == {(r["seed"], r["fd"]) for r in tables["guidance"]
                                                    if float(r["cfg_scale"]) in best}
    assert all(float(r["fd"]) > 0 for t in tables.values() for r in t)
    for name in ("convergence", "steps", "guidance", "temperature", "tau_grid"):
        assert Image.open(out / f"miniature_{name}.png").size[0] > 100
    # a finished run is taken as it is by a later miniature; one with another setting trains
    a = types.SimpleNamespace(work=str(tmp_path / "runs"), model="N/2", demo_size=200)
    folder = tmp_path / "runs" / "dfm-N2-lr0.01-0"
    assert miniature.train_run(a, "dfm", 0, 4, 2, 1e-2) == str(folder / "000-N-2")
    assert sorted(os.listdir(folder)) == ["000-N-2"]
    assert miniature.train_run(a, "dfm", 0, 4, 4, 1e-2) == str(folder / "001-N-2")


@pytest.mark.slow  # trains or starts torchrun
def test_gpu_check_runs_its_reduced_cpu_version_with_every_row_ok(tmp_path):
    """benchmarks/gpu_check.sh, the acceptance run for a GPU machine (bench, NCCL and DDP under torchrun,
    extract, a token folder with workers, accumulation, checkpointing and compile, --sample-every grids,
    SIGTERM and resume, sample --fid-ref), in its reduced CPU version: so it cannot rot between GPU runs."""
    proc = subprocess.run(["bash", os.path.join(HERE, "benchmarks", "gpu_check.sh"), str(tmp_path)], cwd=HERE,
                          capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [line.split("|")[1:4] for line in proc.stdout.splitlines()[2:]]
    assert len(rows) == 10 and all(status.strip().startswith("ok") for _, status, _ in rows), proc.stdout
    result = dict((name.strip(), text.strip()) for name, _, text in rows)
    assert "1 process(es) (gloo, DDP)" in result["torchrun 1 process, 10 steps"]
    assert result["SIGTERM to torchrun, resume"].startswith("SIGTERM at step")
    assert re.match(r"FID\b", result["sample --fid-ref, random Inception"])
