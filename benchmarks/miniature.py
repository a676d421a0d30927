"""The paper's experiments in miniature, on the built-in demo data (about 40 min on 2 CPU cores):

  Fig. 3  the four objectives (purr, cfm, cfm-endpoint, dfm), same T/2 DiT, data, seed and steps;
          quality (demo FD, class accuracy; benchmarks/demo_metric.py) at several checkpoints.
  Fig. 5  the sampling temperature tau from 0.1 to 1.5 on the final Purrception model.
  Fig. 4  one grid across tau: same noise, same labels, one row per tau.

    python benchmarks/miniature.py            # -> benchmarks/results/miniature_*.{csv,png}

Everything is trained with `purr.train` exactly as `python purr.py train --objective X` trains the
demo (its defaults: T/2, batch 64, lr 2e-3, EMA 0.99, 1,500 steps). Sampling: Euler, no guidance;
tau 0.9 for purr (the paper's Fig. 3 setting) and 1.0 for DFM, whose x_1 draws are the model's own
distribution.
"""
import argparse
import csv
import glob
import math
import os
import sys
import time

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import purr  # noqa: E402
import vq as vqlib  # noqa: E402
from demo_metric import HELD_OUT_SEED, demo_fd_and_accuracy, load_classifier  # noqa: E402

TAUS = [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5]
GRID_TAUS = [0.1, 0.3, 0.5, 0.8, 0.9, 1.0, 1.5]
COLORS = {"purr": (220, 60, 40), "cfm": (40, 90, 220), "cfm-endpoint": (60, 170, 220), "dfm": (60, 160, 60),
          "real": (0, 0, 0), "tokenizer": (150, 150, 150)}


def evaluate(sampler, clf, tau, n, num_steps, seed=0, z0=None):
    """Samples of purr.load_sampler(ckpt) (EMA), labels cycling over the classes -> (FD, accuracy, uint8 images)."""
    model, tok, a, _ = sampler
    y = torch.arange(n) % a["num_classes"]
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, a["latent_channels"], a["latent_size"], a["latent_size"], generator=g) if z0 is None else z0
    torch.manual_seed(seed)
    c = purr.generate(model, tok, a["objective"], y, z0, tau, 1.0, num_steps)
    images = vqlib.to_uint8(tok.decode(c))
    return (*demo_fd_and_accuracy(clf, images, y), images)


def floors(tok, clf, n):
    """What the metric gives real held-out images, and the same images through the tokenizer (encode,
    decode): no generator in this token space can beat the second."""
    images, labels = purr.demo_dataset(n, seed=HELD_OUT_SEED + 1)
    recon = vqlib.to_uint8(tok.decode(tok.encode(purr.to_unit(images))))
    return {"real": demo_fd_and_accuracy(clf, images, labels), "tokenizer": demo_fd_and_accuracy(clf, recon, labels)}


def plot(path, panels, size=(420, 300)):
    """Line plots side by side, drawn with Pillow. panels: [(title, xlabel, {name: (xs, ys)}, hlines, log)],
    hlines {name: y} drawn dashed (reference levels); log: a log-scale y axis (FD spans decades)."""
    W, H, L, B, T = size[0], size[1], 52, 40, 26
    img = Image.new("RGB", (W * len(panels), H), "white")
    d = ImageDraw.Draw(img)
    for p, (title, xlabel, series, hlines, log) in enumerate(panels):
        ox = p * W
        f = math.log10 if log else float
        xs = [x for xs, _ in series.values() for x in xs]
        ys = [f(y) for _, v in series.items() for y in v[1]] + [f(y) for y in hlines.values()]
        x0, x1 = min(xs), max(xs)
        y0, y1 = (min(ys) - 0.1, max(ys) + 0.1) if log else (min(0.0, min(ys)), max(ys) * 1.05)
        px = lambda x: ox + L + (x - x0) / (x1 - x0) * (W - L - 110)  # noqa: E731
        py = lambda y: T + (1 - (y - y0) / (y1 - y0)) * (H - T - B)  # noqa: E731
        d.rectangle([px(x0), py(y1), px(x1), py(y0)], outline="black")
        d.text((ox + L, 6), title, fill="black")
        d.text((px(x0) + (px(x1) - px(x0)) / 2 - 3 * len(xlabel), H - 16), xlabel, fill="black")
        for i in range(5):
            xv, yv = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
            d.line([px(xv), py(y0), px(xv), py(y0) + 4], fill="black")
            d.text((px(xv) - 10, py(y0) + 6), f"{xv:g}", fill="black")
            d.line([px(x0) - 4, py(yv), px(x0), py(yv)], fill="black")
            d.text((ox + 4, py(yv) - 6), f"{10 ** yv if log else yv:.3g}", fill="black")
        for k, (name, yv) in enumerate(hlines.items()):
            for xa in range(int(px(x0)), int(px(x1)), 8):
                d.line([xa, py(f(yv)), xa + 4, py(f(yv))], fill=COLORS[name])
            d.text((px(x1) + 6, H - B - 14 * (len(hlines) - k)), name, fill=COLORS[name])
        for k, (name, (sx, sy)) in enumerate(series.items()):
            pts = [(px(x), py(f(y))) for x, y in zip(sx, sy)]
            if len(pts) > 1:
                d.line(pts, fill=COLORS[name], width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[name])
            d.text((px(x1) + 6, T + 14 * k), name, fill=COLORS[name])
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=300, help="checkpoint and evaluate every N steps")
    p.add_argument("--num-samples", type=int, default=500, help="samples per evaluation (50 per class)")
    p.add_argument("--num-steps", type=int, default=32, help="sampler steps (Euler)")
    p.add_argument("--work", default="results/miniature", help="run folders (checkpoints)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    clf = load_classifier()
    rows, runs = [], {}
    for obj in purr.OBJECTIVES:
        t0 = time.time()
        args = purr.parser().parse_args(["train", "--objective", obj, "--steps", str(a.steps),
                                         "--ckpt-every", str(a.eval_every), "--log-every", str(a.eval_every),
                                         "--results-dir", os.path.join(a.work, obj)])
        runs[obj] = purr.train(args)
        train_s = time.time() - t0
        for ckpt in sorted(glob.glob(os.path.join(runs[obj], "checkpoints", "*.pt"))):
            t1 = time.time()
            fd, acc, _ = evaluate(purr.load_sampler(ckpt), clf, 0.9 if obj == "purr" else 1.0, a.num_samples,
                                  a.num_steps)
            rows.append({"objective": obj, "step": int(os.path.basename(ckpt)[:-3]), "fd": fd, "accuracy": acc,
                         "train_s": round(train_s, 1), "eval_s": round(time.time() - t1, 1)})
            print(rows[-1], flush=True)
    final = purr.load_sampler(sorted(glob.glob(os.path.join(runs["purr"], "checkpoints", "*.pt")))[-1])
    ref = floors(final[1], clf, a.num_samples)
    with open(os.path.join(a.out, "miniature_convergence.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        w.writerows({"objective": k, "step": "", "fd": fd, "accuracy": acc} for k, (fd, acc) in ref.items())
    by = {o: ([r["step"] for r in rows if r["objective"] == o], [r["fd"] for r in rows if r["objective"] == o],
              [r["accuracy"] for r in rows if r["objective"] == o]) for o in purr.OBJECTIVES}
    plot(os.path.join(a.out, "miniature_convergence.png"),
         [("demo FD, log scale (lower is better)", "training step", {o: v[:2] for o, v in by.items()}, {k: v[0] for k, v in ref.items()},
           True),
          ("class accuracy of samples", "training step", {o: (v[0], v[2]) for o, v in by.items()},
           {k: v[1] for k, v in ref.items()}, False)])

    temp = []
    for tau in TAUS:
        fd, acc, _ = evaluate(final, clf, tau, a.num_samples, a.num_steps)
        temp.append({"tau": tau, "fd": fd, "accuracy": acc})
        print(temp[-1], flush=True)
    with open(os.path.join(a.out, "miniature_temperature.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(temp[0]))
        w.writeheader()
        w.writerows(temp)
    plot(os.path.join(a.out, "miniature_temperature.png"),
         [("demo FD vs tau, log scale (purr, final EMA)", "tau", {"purr": (TAUS, [r["fd"] for r in temp])}, {k: v[0] for k, v in ref.items()},
           True),
          ("class accuracy vs tau", "tau", {"purr": (TAUS, [r["accuracy"] for r in temp])}, {k: v[1] for k, v in ref.items()},
           False)])

    # Fig. 4: two samples per class, the same z_0 and labels in every row; rows are GRID_TAUS, top to bottom.
    z0 = torch.randn(20, final[2]["latent_channels"], final[2]["latent_size"], final[2]["latent_size"],
                     generator=torch.Generator().manual_seed(1))
    grid = torch.cat([evaluate(final, clf, tau, 20, a.num_steps, z0=z0)[2] for tau in GRID_TAUS])
    purr.save_grid(grid, len(GRID_TAUS), os.path.join(a.out, "miniature_tau_grid.png"))
    print(f"miniature: done in {(time.time() - t_start) / 60:.1f} min; floors {ref}; results in {a.out}")


if __name__ == "__main__":
    main()
