# Tests of fid.py (issue 4); plain pytest functions, to be merged into test_purr.py.
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fid

REPO = Path(__file__).resolve().parent
FIXTURES = Path(os.environ.get("PURR_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fid_fixture(name):
    p = FIXTURES / name
    if not p.exists():
        pytest.skip(f"fixture {p} absent (set PURR_FIXTURES to the shared fixtures folder)")
    return p


@functools.lru_cache(maxsize=None)
def fid_golden():
    return torch.load(fid_fixture("inception_random_golden.pt"), weights_only=True)


@functools.lru_cache(maxsize=None)
def fid_model(preprocess):  # random weights in the official layout: loaded once per preprocessing
    return fid.load_inception(fid_fixture("inception_random_fp16.pth"), preprocess)


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


@pytest.mark.parametrize("size", [256, 64])
def test_fid_features_match_torch_fidelity_and_pytorch_fid(size):
    g = fid_golden()
    images = g[f"images_uint8_{size}"]
    ours = {p: fid_model(p)(images) for p in fid.PREPROCESS}
    ref = {"fidelity": g[f"features_torch_fidelity_{size}"], "pytorch-fid": g[f"features_pytorch_fid_{size}"]}
    for p in fid.PREPROCESS:
        assert ours[p].shape == (len(images), 2048) and ours[p].dtype == torch.float32
        assert (ours[p] - ref[p]).abs().max() < 1e-4, p
    # the two preprocessings differ by far more than the tolerance: the check above tells them apart
    assert (ours["fidelity"] - ref["pytorch-fid"]).abs().max() > 1e-3


def test_fid_frechet_distance_golden_and_self(capsys):
    g = fid_golden()
    a, b = g["frechet_a"].numpy(), g["frechet_b"].numpy()
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


def test_fid_statistics_files_ours_pytorch_fid_and_adm(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    # ADM reference batch: images too (here in a layout fid.py would reject), but mu/sigma win
    np.savez(tmp_path / "adm_ref.npz", arr_0=np.zeros((2, 3, 8, 8), np.float32), mu=mu, sigma=sigma, mu_s=mu[:2])
    for name in ("pytorch_fid.npz", "adm_ref.npz"):
        s = fid.statistics(tmp_path / name)  # no weights needed: the default model is never loaded
        assert np.array_equal(s["mu"], mu) and np.array_equal(s["sigma"], sigma) and s["num_images"] is None


def test_fid_features_of_a_tensor_in_batches_with_progress(capsys):
    g = fid_golden()
    feats = fid.features(g["images_uint8_64"], fid_model("fidelity"), batch_size=1, progress_s=0)
    assert feats.shape == (2, 2048) and np.abs(feats - g["features_torch_fidelity_64"].numpy()).max() < 1e-4
    assert "fid: tensor: 1/2 images" in capsys.readouterr().err
    with pytest.raises(fid.FIDError, match="3 images asked for, 2 found"):
        fid.features(g["images_uint8_64"], fid_model("fidelity"), num_images=3)
    with pytest.raises(fid.FIDError, match="uint8"):
        fid_model("fidelity")(g["images_uint8_64"].float())


def test_fid_weights_with_num_batches_tracked_load(tmp_path):
    sd = torch.load(fid_fixture("inception_random_fp16.pth"), weights_only=True)
    bns = {k[: -len("running_var")] for k in sd if k.endswith("running_var")}
    sd.update({b + "num_batches_tracked": torch.tensor(0) for b in bns})
    assert len(sd) == 566  # the official file's key count
    torch.save(sd, tmp_path / fid.WEIGHTS)
    loaded, ref = fid.load_inception(tmp_path / fid.WEIGHTS).state_dict(), fid_model("fidelity").state_dict()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref) and loaded["fc.weight"].dtype == torch.float32


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing keys: Mixed_6b.branch1x1.conv.weight"),
    ("extra", "unexpected keys: AuxLogits.fc.weight"),
    ("shape", "wrong shapes: fc.weight"),
    ("truncate", "unreadable or truncated"),
])
def test_fid_bad_weights_file_one_clear_error(tmp_path, damage, message):
    src, bad = fid_fixture("inception_random_fp16.pth"), tmp_path / "bad_inception.pth"
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
    r = subprocess.run([sys.executable, str(REPO / "fid.py"), str(tmp_path / "empty"), str(tmp_path / "empty")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no images" in r.stderr


def test_fid_cli_bad_inputs_error_cleanly(tmp_path, capsys):
    weights = fid_fixture("inception_random_fp16.pth")
    mixed = fid_image_folder(tmp_path / "mixed", 2, (32, 32), 0)
    Image.new("RGB", (48, 40)).save(mixed / "z.jpg")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    cases = {tmp_path / "missing": "not found", mixed: "48x40 differs from", tmp_path / "nchw.npz": "N x H x W x 3",
             tmp_path / "float.npz": "float32", tmp_path / "other.npz": "no arr_0"}
    for src, message in cases.items():
        with pytest.raises(SystemExit) as e:
            fid_cli(capsys, src, src, "--inception", weights)
        assert isinstance(e.value.code, str) and message in e.value.code and "\n" not in e.value.code, src


def test_fid_cli_folders_npz_and_saved_stats_agree(tmp_path, capsys, monkeypatch):
    weights = fid_fixture("inception_random_fp16.pth")
    # one 2048x2048 sqrtm takes ~15-25 s on 2 busy cores: identical statistics reuse the first FID
    real, memo = fid.frechet_distance, {}

    def memo_frechet(*xs):
        k = hashlib.sha1(b"".join(np.ascontiguousarray(x).tobytes() for x in xs)).hexdigest()
        if k not in memo:
            memo[k] = real(*xs)
        return memo[k]
    monkeypatch.setattr(fid, "frechet_distance", memo_frechet)
    a = fid_image_folder(tmp_path / "a", 3, (48, 48), 1)
    b = fid_image_folder(tmp_path / "b", 3, (48, 48), 2)
    batch = np.stack([np.asarray(Image.open(f)) for f in sorted(b.glob("*.png"))])
    np.savez(tmp_path / "b_batch.npz", arr_0=batch, arr_1=np.arange(3))  # ADM sample batch
    direct = float(fid_cli(capsys, a, b, "--inception", weights, "--batch-size", 2))
    fid_cli(capsys, "--save-stats", tmp_path / "b_batch.npz", tmp_path / "b_stats.npz", "--inception", weights)
    with np.load(tmp_path / "b_stats.npz") as s:
        assert s["mu"].shape == (2048,) and s["sigma"].shape == (2048, 2048) and int(s["num_images"]) == 3
    via_stats = float(fid_cli(capsys, a, tmp_path / "b_stats.npz", "--inception", weights))
    assert direct > 1 and direct == pytest.approx(via_stats, rel=1e-6)
