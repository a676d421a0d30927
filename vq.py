"""Frozen VQ tokenizers for purr.

Every tokenizer is an nn.Module in eval mode with one interface, the one the training loop and the
sampler use:
    encode(x)    images in [-1, 1], [B,3,H,W]  -> indices c, long [B,h,w]
    codebook     the K codebook vectors e_k the latent space uses, [K,d]
    quantize(z)  latents [B,d,h,w]               -> indices of the nearest e_k, [B,h,w]
    embed(c)     indices [B,h,w]                 -> z_1 = e_c, [B,d,h,w]
    decode(c|z)  indices or latents              -> images in [-1, 1] (unclamped), [B,3,H,W]
and the attributes `downsample` (f) and `name`.

`load_tokenizer(name, path)` gives Stable Diffusion's `sd-vq-f8` (16384 x 4) or LlamaGen's
`llamagen-vq-ds8` (16384 x 8, unit-norm codes) from the official files as published, or the `tiny`
demo tokenizer from a purr checkpoint. Check a download with
    python vq.py recon --vq sd-vq-f8 --vq-ckpt vq-f8/model.ckpt photo.jpg
"""
import argparse
import ast
import functools
import os
import pickle
import sys
import zipfile
from collections import OrderedDict, namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from appendix import full_fp32


class TokenizerError(ValueError):
    """A tokenizer file that is missing or is not the one asked for; the message is one line."""


@full_fp32()
def nearest_code(z, codebook, normalize=False, chunk=16384):
    """Index of the nearest codebook entry for every position of z [B,d,h,w] (l2-normalised first if
    `normalize`). The distance is written as the originals write it, ||z||^2 + ||e_k||^2 - 2 z.e_k, on
    [N,d] rows in full fp32, so float near-ties break as theirs do; rows go in chunks to keep the [N,K] matrix
    small."""
    B, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d).to(codebook.dtype)
    flat = F.normalize(flat, dim=1) if normalize else flat
    e2 = codebook.pow(2).sum(1)
    return torch.cat([(f.pow(2).sum(1, keepdim=True) + e2 - 2 * (f @ codebook.t())).argmin(1)
                      for f in flat.split(chunk)]).view(B, h, w)


# ----------------------------------------------------------------------------------------------
# The convolutional VQ autoencoders. SD (latent-diffusion) and LlamaGen share every block and differ
# only in how the blocks are named and ordered in their checkpoints, so one Encoder and one Decoder
# take a Layout and register their submodules under that layout's names: the official files load
# with strict=True, key for key.

def norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


def conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=1 if stride == 1 else 0)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), conv3(cin, cout)
        self.norm2, self.conv2 = norm(cout), conv3(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1-conv projections, residual."""
    def __init__(self, c):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.proj_out = norm(c), *(nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # [b, 1 head, hw, c]: with the head axis SDPA takes its fused (flash) CPU kernel, 4x the 3-D path
        q, k, v = (proj(y).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # default scale c^-1/2, as the originals
        return x + self.proj_out(a[:, 0].transpose(1, 2).reshape(b, c, h, w))


class Resample(nn.Module):
    """x2 down: pad right and bottom by one, 3x3 stride-2 conv (the originals' asymmetric padding).
    x2 up: nearest-neighbour, then 3x3 conv."""
    def __init__(self, c, down):
        super().__init__()
        self.down, self.conv = down, conv3(c, c, 2 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down
                         else F.interpolate(x, scale_factor=2.0, mode="nearest"))


# Checkpoint names: res = a level's list of resnet blocks, enc/dec = the lists of levels, mid = the
# middle (resnet, attention, resnet) blocks; dec_by_level: the decoder's list is indexed by resolution
# level and run from its last entry (SD), rather than stored in the order it runs (LlamaGen).
Layout = namedtuple("Layout", "res enc dec mid dec_by_level")


SD_LAYOUT = Layout("block", "down", "up", ("block_1", "attn_1", "block_2"), True)
LLAMAGEN_LAYOUT = Layout("res", "conv_blocks", "conv_blocks", ("0", "1", "2"), False)


class Level(nn.Module):
    """One resolution: n resnet blocks, each followed by attention if the level has it, then resampling."""
    def __init__(self, res_name, cin, cout, n, attn, resample=None):
        super().__init__()
        self.res_name, self.resample = res_name, resample
        self.add_module(res_name, nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(n)))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n if attn else 0))
        if resample:
            self.add_module(resample, Resample(cout, down=resample == "downsample"))

    def forward(self, h):
        for i, block in enumerate(getattr(self, self.res_name)):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return getattr(self, self.resample)(h) if self.resample else h


def middle(layout, c):
    return nn.Sequential(OrderedDict(zip(layout.mid, (ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)))))


class Encoder(nn.Module):
    def __init__(self, layout, ch, ch_mult, num_res_blocks, attn_levels, z_channels):
        super().__init__()
        chans = [ch * m for m in ch_mult]
        self.layout = layout
        self.conv_in = conv3(3, ch)
        self.add_module(layout.enc, nn.ModuleList(
            Level(layout.res, cin, c, num_res_blocks, i in attn_levels,
                  "downsample" if i < len(chans) - 1 else None)
            for i, (cin, c) in enumerate(zip([ch] + chans, chans))))
        self.mid = middle(layout, chans[-1])
        self.norm_out, self.conv_out = norm(chans[-1]), conv3(chans[-1], z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level in getattr(self, self.layout.enc):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, layout, ch, ch_mult, num_res_blocks, attn_levels, z_channels):
        super().__init__()
        chans = [ch * m for m in ch_mult]
        self.layout = layout
        self.conv_in = conv3(z_channels, chans[-1])
        self.mid = middle(layout, chans[-1])
        deepest_first = [Level(layout.res, chans[min(i + 1, len(chans) - 1)], chans[i],
                               num_res_blocks + 1, i in attn_levels, "upsample" if i else None)
                         for i in reversed(range(len(chans)))]
        levels = deepest_first[::-1] if layout.dec_by_level else deepest_first
        self.add_module(layout.dec, nn.ModuleList(levels))
        self.norm_out, self.conv_out = norm(ch * ch_mult[0]), conv3(ch * ch_mult[0], 3)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        levels = getattr(self, self.layout.dec)
        for level in (reversed(levels) if self.layout.dec_by_level else levels):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _frozen(fn):
    """Run under inference_mode (no autograd bookkeeping at all) and hand back an ordinary tensor,
    copied out of it in the default memory format, which callers may reshape, modify in place or
    feed to autograd."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone(memory_format=torch.contiguous_format)
    return run


class Quantizer(nn.Module):
    """The codebook, `embedding.weight` as the files name it, and the codes in latent space derived from it
    whenever weights are loaded (`codebook`, not saved). l2_norm (LlamaGen): the codes are the l2-normalised
    rows and latents are normalised before the comparison. Calling it is the tokenizer's quantize(z)."""
    def __init__(self, codebook_size, embed_dim, l2_norm):
        super().__init__()
        self.embedding, self.l2_norm = nn.Embedding(codebook_size, embed_dim), l2_norm
        self.register_buffer("codebook", self._codes(), persistent=False)
        self.register_load_state_dict_post_hook(Quantizer._refresh)  # called as (module, keys)

    def _codes(self):
        e = self.embedding.weight.detach()
        return F.normalize(e, dim=1) if self.l2_norm else e.clone()

    def _refresh(self, _incompatible_keys=None):
        with torch.no_grad():
            self.codebook.copy_(self._codes())

    def forward(self, z):
        """The index of the nearest code at every position: latents [B,d,h,w] -> [B,h,w]."""
        return nearest_code(z, self.codebook, normalize=self.l2_norm)


class VQModel(nn.Module):
    """encoder -> quant_conv -> nearest codebook entry; codebook entry -> post_quant_conv -> decoder.
    Parameters carry the official checkpoint names (`encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*`, `quantize.embedding.weight`). l2_norm (LlamaGen): codes and latents are
    compared after l2-normalisation and the latent of a code is its normalised entry."""
    def __init__(self, name, layout, ch, ch_mult, num_res_blocks, attn_levels, z_channels, embed_dim,
                 codebook_size, l2_norm):
        super().__init__()
        self.name, self.l2_norm, self.downsample = name, l2_norm, 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(layout, ch, ch_mult, num_res_blocks, attn_levels, z_channels)
        self.decoder = Decoder(layout, ch, ch_mult, num_res_blocks, attn_levels, z_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        # quantize.embedding.weight, as in the files
        self.quantize = Quantizer(codebook_size, embed_dim, l2_norm)
        self.eval().requires_grad_(False)

    @property
    def codebook(self):
        return self.quantize.codebook

    def _in(self, x):
        """x in the weights' dtype, contiguous. Channels-last tensors (embed's output among them) would
        switch the network to the channels-last kernels, and PyTorch's channels-last GroupNorm loses fp32
        accuracy when activations have a large mean (E[x^2] - E[x]^2 cancels: 5e-2 at mean 100 against
        1e-5). Channels-last also bought no speed here (benchmarks/bench_vq.py)."""
        return x.to(self.codebook.dtype, memory_format=torch.contiguous_format)

    def embed(self, c):
        return self.codebook[c].permute(0, 3, 1, 2)

    @_frozen
    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(self._in(x))))

    @_frozen
    def decode(self, c):
        """Indices, or a float latent [B,d,h,w] decoded as it is (not re-quantized): callers pass
        quantized latents such as embed(c), and decoding others is occasionally wanted."""
        return self.decoder(self.post_quant_conv(self._in(c if c.is_floating_point() else self.embed(c))))


# ----------------------------------------------------------------------------------------------
# The CPU demo tokenizer.

class TinyVQ(nn.Module):
    """The CPU demo tokenizer: k-means over p x p pixel patches, so encoding is a nearest-centroid
    search and decoding a table look-up; each code's latent vector e_k is the centroid projected on
    the top-d principal components (scaled to unit variance), so z lives in a small R^d like SD's and
    LlamaGen's latents do. Fitted in seconds by `fit_tiny`, saved whole inside purr's checkpoints."""
    name = "tiny"

    def __init__(self, codebook_size=256, dim=8, patch=4):
        super().__init__()
        self.downsample = patch
        self.register_buffer("patches", torch.zeros(codebook_size, 3 * patch * patch))
        self.register_buffer("codebook", torch.zeros(codebook_size, dim))
        self.eval().requires_grad_(False)

    def config(self):
        return dict(codebook_size=self.codebook.shape[0], dim=self.codebook.shape[1], patch=self.downsample)

    def _unfold(self, x):  # [B,3,H,W] -> [B*h*w, 3*p*p], each patch flattened as (channel, row, col)
        B, _, H, W = x.shape
        p = self.downsample
        return x.reshape(B, 3, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3 * p * p)

    def encode(self, x):
        B, _, H, W = x.shape
        p = self.downsample
        flat = self._unfold(x.float())[:, :, None, None]  # nearest_code wants [N,D,1,1]
        return nearest_code(flat, self.patches).view(B, H // p, W // p)

    def quantize(self, z):
        return nearest_code(z, self.codebook)

    def embed(self, c):
        return self.codebook[c].permute(0, 3, 1, 2)

    def decode(self, c):
        if c.is_floating_point():
            c = self.quantize(c)
        B, h, w = c.shape
        p = self.downsample
        x = self.patches[c].view(B, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, 3, h * p, w * p)


def fit_tiny(images, codebook_size=256, dim=8, patch=4, iters=25, seed=0):
    """k-means (k-means++ seeding, Lloyd iterations) over all patches of `images` ([N,3,H,W] in [-1,1])."""
    vq = TinyVQ(codebook_size, dim, patch)
    g = torch.Generator().manual_seed(seed)
    x = vq._unfold(images.float())
    x = x[torch.randperm(len(x), generator=g)[:100_000]]
    seeds = x[:10_000]  # k-means++ seeding on a subset: it is sequential over the K codes
    cent = seeds[:1]
    d2 = (seeds - cent).pow(2).sum(1)
    for _ in range(codebook_size - 1):
        target = torch.rand(1, generator=g) * d2.sum()
        pick = torch.searchsorted(d2.cumsum(0), target).clamp(max=len(seeds) - 1)
        cent = torch.cat([cent, seeds[pick]])
        d2 = torch.minimum(d2, (seeds - cent[-1]).pow(2).sum(1))
    for _ in range(iters):
        assign = nearest_code(x[:, :, None, None], cent).view(-1)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=codebook_size)[:, None]
        cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)
    centered = cent - cent.mean(0)
    e = centered @ torch.linalg.svd(centered, full_matrices=False).Vh[:dim].t()
    vq.patches.copy_(cent)
    vq.codebook.copy_(e / e.std())
    return vq


# ----------------------------------------------------------------------------------------------
# Building and loading. Each configuration keeps the field names of its original code; the keyword
# overrides of load_tokenizer change them (the test fixtures use ch=32).

CONFIGS = {  # latent-diffusion models/first_stage_models/vq-f8/config.yaml; LlamaGen VQ_8
    "sd-vq-f8": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), resolution=256,
                     z_channels=4, embed_dim=4, n_embed=16384),
    "llamagen-vq-ds8": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                            codebook_embed_dim=8, codebook_size=16384, codebook_l2_norm=True),
}
ALIASES = {"sd-vq-f8": {"codebook_size": "n_embed"}, "llamagen-vq-ds8": {}}
OFFICIAL = {
    "sd-vq-f8": "model.ckpt inside https://ommer-lab.com/files/latent-diffusion/vq-f8.zip",
    "llamagen-vq-ds8":
        "vq_ds8_c2i.pt from https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds8_c2i.pt",
}
SIGNATURE = {"sd-vq-f8": "encoder.down.", "llamagen-vq-ds8": "encoder.conv_blocks."}  # tells the files apart


def build_tokenizer(name, **overrides):
    """`name` with random weights (for tests and benchmarks); load_tokenizer fills in a file's."""
    if name not in CONFIGS:
        raise TokenizerError(f"unknown tokenizer {name!r}; choose one of {', '.join([*CONFIGS, 'tiny'])}")
    arch = dict(CONFIGS[name])
    for key, value in overrides.items():
        key = ALIASES[name].get(key, key)
        if key not in arch:
            raise TokenizerError(f"{name} has no setting {key!r}; it has {', '.join(arch)}")
        arch[key] = value
    n = len(arch["ch_mult"])
    if name == "sd-vq-f8":  # attention wherever the level's nominal resolution is listed
        return VQModel(name, SD_LAYOUT, arch["ch"], arch["ch_mult"], arch["num_res_blocks"],
                       {i for i in range(n) if arch["resolution"] // 2 ** i in arch["attn_resolutions"]},
                       arch["z_channels"], arch["embed_dim"], arch["n_embed"], l2_norm=False)
    return VQModel(name, LLAMAGEN_LAYOUT, arch["ch"], arch["ch_mult"], arch["num_res_blocks"],
                   {n - 1},  # deepest level
                   arch["z_channels"], arch["codebook_embed_dim"], arch["codebook_size"],
                   arch["codebook_l2_norm"])


class _Inert:
    """Stands in for every class or function a checkpoint pickles beside its tensors (pytorch-lightning
    callbacks, numpy scalars, or whatever a malicious file would call): built from anything, holds and
    does nothing."""
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# how pre-1.6 torch.save files begin
_LEGACY_HEAD = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def _torch_load(path, expected):
    """The checkpoint's contents, unpickled weights-only: no code from the file ever runs."""
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: no such file; expected {expected}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if not zipfile.is_zipfile(path):
                with open(path, "rb") as f:
                    legacy = f.read(len(_LEGACY_HEAD)) == _LEGACY_HEAD
                why = ("a pre-1.6 torch.save file that pickles objects besides tensors: not loaded, as only "
                       "a full unpickle, running code from the file, could read it; re-save its state dict "
                       "with a current torch" if legacy else "not a torch checkpoint")
                raise TokenizerError(f"{path}: {why}; expected {expected}") from None
            # SD's model.ckpt is a pytorch-lightning checkpoint: it also pickles callback objects and
            # numpy scalars, which the weights-only unpickler refuses and a full unpickle could only
            # rebuild with pytorch-lightning installed (running code from the file). None of them is
            # needed: load weights-only again with inert stand-ins for exactly those names.
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            with torch.serialization.safe_globals([(_Inert, name) for name in names]):
                try:
                    return torch.load(path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError:  # e.g. a module the unpickler blocks outright (os, sys)
                    raise TokenizerError(f"{path}: refused: it pickles {', '.join(sorted(names))} in a way "
                                         "only a full unpickle, running code from the file, could read; "
                                         f"expected {expected}") from None
    except TokenizerError:
        raise
    except Exception as e:  # a .zip still to unpack, an image, a truncated download...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        unzip = " (unzip it: the checkpoint is the model.ckpt inside)" if path.endswith(".zip") else ""
        raise TokenizerError(f"{path}: cannot read it as a torch checkpoint{unzip}: {why}; "
                             f"expected {expected}") from e


def _official_state(name, path):
    """The state dict of an official file, as published: SD's model.ckpt (`state_dict`, minus the
    training loss `loss.*`) or a full LDM checkpoint (its `first_stage_model.*`), LlamaGen's
    vq_ds8_c2i.pt (`model`, minus the usage statistics `quantize.codebook_used`)."""
    obj = _torch_load(path, f"{name}'s {OFFICIAL[name]}")
    sd = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise TokenizerError(f"{path} holds no state dict; {name} expects {OFFICIAL[name]}")
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if not k.startswith("loss.") and k != "quantize.codebook_used"}


def _check_keys(model, sd, name, path):
    """Everything the strict load would reject, gathered into one error that names the keys."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}"
              for k in want if k in sd and sd[k].shape != want[k].shape]
    if not (missing or unexpected or shapes):
        return

    def listed(what, keys):
        more = ", ..." if len(keys) > 3 else ""
        return f"{len(keys)} {what} ({', '.join(keys[:3])}{more})" if keys else None
    problems = "; ".join(filter(None, [listed("missing", missing), listed("unexpected", unexpected),
                                       listed("with the wrong shape (file vs model)", shapes)]))
    hint = next((f"this looks like {other}'s file: use --vq {other}" for other, sig in SIGNATURE.items()
                 if other != name and any(k.startswith(sig) for k in sd)), "")
    width = sd.get("encoder.conv_in.weight")
    if not hint and width is not None and width.shape[0] != want["encoder.conv_in.weight"].shape[0]:
        file_ch = width.shape[0]
        hint = f"the file's width is ch={file_ch} (load_tokenizer(..., ch={file_ch}) builds that)"
    raise TokenizerError(f"{path} does not fit {name}: {problems}. {hint + '. ' if hint else ''}"
                         f"{name} loads {OFFICIAL[name]}")


def load_tokenizer(name, ckpt_path=None, **overrides):
    """The frozen tokenizer `name` (sd-vq-f8, llamagen-vq-ds8, tiny) with the weights of `ckpt_path`.
    Official files load as published, strictly: any missing, unexpected or misshapen key is a
    TokenizerError naming them. `overrides` change the architecture (e.g. ch=32, codebook_size=...).
    For tiny, ckpt_path is a purr checkpoint (its `vq` entry) or a file holding that same
    {"name": "tiny", "config": ..., "state": ...} dict."""
    if name == "tiny":
        return _load_tiny(ckpt_path, overrides)
    model = build_tokenizer(name, **overrides)
    if ckpt_path is None:
        raise TokenizerError(f"{name} needs its checkpoint file (--vq-ckpt): {OFFICIAL[name]}")
    sd = _official_state(name, ckpt_path)
    _check_keys(model, sd, name, ckpt_path)
    model.load_state_dict(sd, strict=True)
    return model


def _load_tiny(path, overrides):
    what = "a purr checkpoint trained with the tiny tokenizer (its 'vq' entry)"
    if path is None:
        raise TokenizerError(f"the tiny tokenizer is fitted per run: pass {what}")
    obj = _torch_load(path, what)
    spec = obj.get("vq", obj) if isinstance(obj, dict) else None
    if not isinstance(spec, dict) or spec.get("name") != "tiny" or not {"config", "state"} <= set(spec):
        raise TokenizerError(f"{path} holds no tiny tokenizer; expected {what}")
    tok = TinyVQ(**{**spec["config"], **overrides})
    try:
        tok.load_state_dict(spec["state"])
    except RuntimeError as e:
        raise TokenizerError(f"{path}: the tiny tokenizer's state does not fit its config: "
                             + " ".join(str(e).split())) from None
    return tok


# ----------------------------------------------------------------------------------------------
# python vq.py recon: reconstruct a few images to check a downloaded tokenizer.

def load_image(path, size):
    """ADM's center crop to size x size (the same as training's), as a [1,3,size,size] tensor in [-1, 1]."""
    from PIL import Image

    from appendix import center_crop
    with Image.open(path) as im:
        x = torch.from_numpy(center_crop(im, size).astype(np.float32)).permute(2, 0, 1)[None]
    return x / 127.5 - 1


def to_uint8(x):
    """Images in [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(a, b):
    """PSNR in dB between two uint8 images."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def recon(args):
    from PIL import Image
    overrides = {}
    for item in args.vq_config:
        key, sep, value = item.partition("=")
        if not sep:
            raise TokenizerError(f"--vq-config {item}: expected KEY=VALUE, e.g. ch=32")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    tok = load_tokenizer(args.vq, args.vq_ckpt, **overrides)
    if args.image_size % tok.downsample:
        raise TokenizerError(f"--image-size {args.image_size} must be a multiple of {tok.downsample}")
    scores = []
    for path in args.images:
        try:
            x = load_image(path, args.image_size)
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read the image ({e})") from None
        c = tok.encode(x)
        ref, out = to_uint8(x), to_uint8(tok.decode(c))
        stem = os.path.splitext(path)[0]
        Image.fromarray(out[0].permute(1, 2, 0).numpy()).save(f"{stem}_recon.png")
        scores.append(psnr(ref, out))
        print(f"{path}: {c.shape[1]}x{c.shape[2]} codes, PSNR {scores[-1]:.2f} dB -> {stem}_recon.png",
              flush=True)
    print(f"mean PSNR {np.mean(scores):.2f} dB over {len(scores)} image(s) "
          f"({tok.name}, {args.image_size}x{args.image_size})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="vq.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recon",
                       help="encode and decode images, write <stem>_recon.png beside each, print PSNR")
    r.add_argument("--vq", required=True, choices=[*CONFIGS, "tiny"], help="tokenizer")
    r.add_argument("--vq-ckpt", required=True, help="its checkpoint file")
    r.add_argument("--image-size", type=int, default=256, help="center crop resized to this (default 256)")
    r.add_argument("--vq-config", action="append", default=[], metavar="KEY=VALUE",
                   help="change the architecture, e.g. ch=32 (the test fixtures); repeatable")
    r.add_argument("images", nargs="+", metavar="IMAGE")
    args = p.parse_args(argv)
    try:
        recon(args)
    except TokenizerError as e:
        sys.exit(f"vq.py {args.cmd}: error: {e}")


if __name__ == "__main__":
    main()
