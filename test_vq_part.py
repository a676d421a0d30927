"""Tests of vq.py: the two official tokenizers against the original code's outputs (random-weight
fixtures at ch=32), strict loading and its errors, round trips, the tiny tokenizer, `vq.py recon`."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vq

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("PURR_FIXTURES", os.path.join(HERE, "..", "shared", "fixtures"))
CASES = {"sd-vq-f8": ("sd_vqf8_ch32_random.ckpt", "sd_vqf8_ch32_golden.pt", "state_dict"),
         "llamagen-vq-ds8": ("llamagen_vq8_ch32_random.pt", "llamagen_vq8_ch32_golden.pt", "model")}


def fixture(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.isfile(path):
        pytest.skip(f"fixture {path} absent (set PURR_FIXTURES to the shared fixtures folder)")
    return path


def golden_case(name):
    ckpt, golden, _ = CASES[name]
    ckpt, golden = fixture(ckpt), torch.load(fixture(golden), weights_only=True)
    return ckpt, golden, vq.load_tokenizer(name, ckpt, **golden["config"])


@pytest.mark.parametrize("name", CASES)
def test_matches_original_outputs(name):
    _, g, tok = golden_case(name)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert tok.name == name and tok.downsample == 8
    with torch.no_grad():
        torch.testing.assert_close(tok.quant_conv(tok.encoder(g["images"])), g["pre_quant"], atol=1e-5, rtol=0)
    c = tok.encode(g["images"])
    assert c.dtype == torch.long and torch.equal(c, g["indices"])
    torch.testing.assert_close(tok.embed(g["indices"]), g["quant"], atol=1e-6, rtol=0)
    decoded = tok.decode(g["indices"])
    torch.testing.assert_close(decoded, g["decoded"], atol=1e-4, rtol=0)
    assert decoded.is_contiguous() and not decoded.is_inference() and not c.is_inference()
    decoded.clamp_(-1, 1)  # callers may edit outputs in place
    torch.testing.assert_close(tok.decode(g["quant"]), g["decoded"], atol=1e-4, rtol=0)  # a float latent as is
    if name == "llamagen-vq-ds8":  # the latent space is the unit sphere
        torch.testing.assert_close(tok.codebook.norm(dim=1), torch.ones(len(tok.codebook)))


def test_full_ldm_checkpoint_with_pickled_objects(tmp_path):
    """A full LDM checkpoint: the tokenizer under `first_stage_model.`, other models' keys, and
    pickled non-tensor objects (argparse.Namespace here) that the weights-only unpickler refuses."""
    ckpt, g, _ = golden_case("sd-vq-f8")
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    full = {f"first_stage_model.{k}": v for k, v in sd.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": full, "hyper_parameters": argparse.Namespace(lr=1.0)}, path)
    tok = vq.load_tokenizer("sd-vq-f8", str(path), **g["config"])
    assert torch.equal(tok.encode(g["images"]), g["indices"])


def test_mismatched_checkpoint_names_every_bad_key(tmp_path):
    ckpt, g, _ = golden_case("sd-vq-f8")
    obj = torch.load(ckpt, weights_only=True)
    sd = obj["state_dict"]
    del sd["encoder.conv_in.bias"]
    sd["decoder.mid.attn_1.qq.weight"] = sd.pop("decoder.mid.attn_1.q.weight")
    sd["quant_conv.weight"] = sd["quant_conv.weight"][:2]
    torch.save(obj, tmp_path / "bad.ckpt")
    with pytest.raises(vq.TokenizerError) as e:
        vq.load_tokenizer("sd-vq-f8", str(tmp_path / "bad.ckpt"), **g["config"])
    msg = str(e.value)
    for key in ("encoder.conv_in.bias", "decoder.mid.attn_1.q.weight", "decoder.mid.attn_1.qq.weight",
                "quant_conv.weight", "ommer-lab.com/files/latent-diffusion/vq-f8.zip"):
        assert key in msg
    assert "\n" not in msg


def test_wrong_or_missing_file_says_which_one():
    with pytest.raises(vq.TokenizerError, match="use --vq llamagen-vq-ds8"):
        vq.load_tokenizer("sd-vq-f8", fixture(CASES["llamagen-vq-ds8"][0]), ch=32)
    with pytest.raises(vq.TokenizerError, match="use --vq sd-vq-f8.*huggingface.co/FoundationVision"):
        vq.load_tokenizer("llamagen-vq-ds8", fixture(CASES["sd-vq-f8"][0]), ch=32)
    with pytest.raises(vq.TokenizerError, match="ch=32"):  # the fixture at the official width
        vq.load_tokenizer("sd-vq-f8", fixture(CASES["sd-vq-f8"][0]))
    with pytest.raises(vq.TokenizerError, match="no/such/vq_ds8_c2i.pt: no such file.*huggingface.co"):
        vq.load_tokenizer("llamagen-vq-ds8", "no/such/vq_ds8_c2i.pt")
    with pytest.raises(vq.TokenizerError, match="needs its checkpoint"):
        vq.load_tokenizer("sd-vq-f8")


@pytest.mark.parametrize("name", CASES)
def test_quantize_inverts_embed(name):
    torch.manual_seed(0)
    tok = vq.build_tokenizer(name, ch=32)
    c = torch.randint(len(tok.codebook), (3, 16, 16))
    assert torch.equal(tok.quantize(tok.embed(c)), c)
    if name == "llamagen-vq-ds8":  # latents are compared on the sphere: scale does not matter
        assert torch.equal(tok.quantize(3 * tok.embed(c)), c)


def smooth_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def test_tiny_round_trip_and_reload(tmp_path):
    tok = vq.fit_tiny(smooth_images(8, 32), codebook_size=64, dim=8, patch=4, iters=5)
    c = torch.arange(64).view(1, 8, 8)
    assert torch.equal(tok.encode(tok.decode(c)), c)
    assert torch.equal(tok.quantize(tok.embed(c)), c)
    spec = {"name": "tiny", "config": tok.config(), "state": tok.state_dict()}
    torch.save(spec, tmp_path / "tiny.pt")
    torch.save({"model": {}, "args": {}, "vq": spec}, tmp_path / "run.pt")  # inside a purr checkpoint
    x = smooth_images(2, 32, seed=1)
    for path in ("tiny.pt", "run.pt"):
        loaded = vq.load_tokenizer("tiny", str(tmp_path / path))
        assert loaded.config() == tok.config() and torch.equal(loaded.encode(x), tok.encode(x))
    with pytest.raises(vq.TokenizerError, match="purr checkpoint"):
        vq.load_tokenizer("tiny")


def test_recon_cli(tmp_path):
    ckpt = fixture(CASES["sd-vq-f8"][0])
    img = ((smooth_images(1, 64)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    Image.fromarray(np.pad(img, ((0, 0), (8, 8), (0, 0)), mode="edge")).save(tmp_path / "cat.png")  # 64x80
    cmd = [sys.executable, os.path.join(HERE, "vq.py"), "recon", "--vq", "sd-vq-f8", "--vq-ckpt", ckpt,
           "--vq-config", "ch=32", "--image-size", "64", str(tmp_path / "cat.png")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PSNR" in out.stdout and "mean PSNR" in out.stdout
    assert Image.open(tmp_path / "cat_recon.png").size == (64, 64)
    bad = subprocess.run(cmd[:6] + [str(tmp_path / "missing.ckpt")] + cmd[7:], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "vq-f8.zip" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
