"""The paper's experiments in miniature, on the built-in demo data, with error bars over seeds:

  learning rates        each objective at each of LRS (seed 0): the demo's 3e-3 was tuned for purr, so
                        every objective then trains at its own best.
  convergence (Fig. 3)  purr, cfm, cfm-endpoint and dfm, each trained with the demo's recipe at its best
                        learning rate from every seed (one tokenizer per seed, shared by the objectives);
                        demo FD and class accuracy (benchmarks/demo_metric.py) at every checkpoint, mean and
                        spread over seeds. On N/2 by default: 4 latent positions per token, as the paper's
                        patch 2 (the demo's N/4 has 16, which cripples CFM's velocity regression).
  steps                 the final purr, cfm and dfm checkpoints sampled with 4..100 Euler steps (purr also
                        with the midpoint rule at equal network evaluations); seconds per 100 samples.
  guidance              purr at CFG scales 1..3, tau at its best; then guidance in limited intervals of t
                        (--cfg-interval) at the best scale, with the sampling time.
  temperature (Fig. 5)  the tau sweep at 1x, 2x and 4x the demo's steps (seed 0's purr run, resumed).
  tau schedule          linear tau(t) (`purr.py sample --tau-schedule linear`) against the best constant tau.
  tau grid (Fig. 4)     the same noise and labels across tau.

    pip install -r benchmarks/requirements.txt
    python benchmarks/miniature.py --steps 1800    # benchmarks/README.md's tables (3 seeds, ~85 min on 2 cores)
    python benchmarks/miniature.py --model N/4 --out benchmarks/results/n4   # the demo's model
    python benchmarks/miniature.py --quick         # every part, 2 seeds, 1/10 of the steps: < 10 min
                                                   # -> results/miniature-quick
    python benchmarks/miniature.py --objectives dfm --seeds 0 --steps 1800
                                                   # re-run some rows into the tables

Samples: Euler, 32 steps (the steps sweep aside), 500 per point, tau 0.9 for purr's convergence (the paper's
Fig. 3 setting) and 1.0 for DFM, whose x_1 draws are the model's own distribution. Every table records the
commit of the code that made it.
"""
import argparse
import contextlib
import csv
import fcntl
import glob
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import appendix  # noqa: E402
import purr  # noqa: E402
import vq as vqlib  # noqa: E402
from demo_metric import HELD_OUT_SEED, demo_fd_and_accuracy, load_classifier  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TAUS = [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5]
GRID_TAUS = [0.1, 0.3, 0.5, 0.8, 0.9, 1.0, 1.5]
SWEEP_STEPS = [4, 8, 16, 32, 64, 100]
CFG_SCALES = [1.0, 1.3, 1.5, 2.0, 3.0]
CFG_INTERVALS = [(0.0, 1.0), (0.2, 1.0), (0.0, 0.7), (0.2, 0.7), (0.4, 1.0)]  # t in [LO, HI]; t = 0 is noise
LRS = [1e-3, 3e-3, 1e-2]
SCHEDULES = [(0.5, 1.0), (1.0, 0.5), (0.7, 1.3), (1.3, 0.7)]  # linear tau(t): (tau at t = 0, tau at t = 1)
COLORS = {"purr": "tab:red", "cfm": "tab:blue", "cfm-endpoint": "tab:cyan", "dfm": "tab:green",
          "real": "black", "tokenizer": "tab:gray"}
PRESETS = {  # what --quick and --smoke shrink
    "full": dict(num_samples=500, demo_size=10000, longer=(2, 4), sweep=SWEEP_STEPS, eval_steps=32, taus=TAUS,
                 classifier={}, lrs=LRS),
    "quick": dict(num_samples=200, demo_size=10000, longer=(2,), sweep=[4, 16, 32], eval_steps=32,
                  taus=[0.5, 0.8, 1.0], classifier={}, seeds=[0, 1], steps_div=10, lrs=[3e-3], checkpoints=3),
    "smoke": dict(num_samples=20, demo_size=200, longer=(2,), sweep=[2, 4], eval_steps=2, taus=[0.5, 1.0],
                  classifier=dict(n=400, epochs=1, n_ref=200), lrs=[3e-3, 1e-2]),
}


def evaluate(sampler, clf, tau, n, num_steps, method="euler", cfg_scale=1.0, z0=None):
    """n samples of a purr.load_sampler(...) with labels cycling over the classes -> (FD, accuracy, seconds
    per 100 samples, uint8 images). Noise from seed 0, so every setting sees the same z_0."""
    model, tok, a, _ = sampler
    y = torch.arange(n) % a["num_classes"]
    z0 = torch.randn(n, a["latent_channels"], a["latent_size"], a["latent_size"],
                     generator=torch.Generator().manual_seed(0)) if z0 is None else z0
    t0 = time.perf_counter()
    c = torch.cat([purr.sample_codes(model, tok, a["objective"], y[i:i + 100], z0[i:i + 100], tau, cfg_scale,
                                     num_steps, method, seeds=range(n)[i:i + 100])
                   for i in range(0, n, 100)])
    images = vqlib.to_uint8(tok.decode(c))
    seconds = (time.perf_counter() - t0) * 100 / n
    fd, acc = demo_fd_and_accuracy(clf, images, y)
    return float(fd), float(acc), seconds, images


def train_run(a, objective, seed, steps, eval_every, lr, resume=None):
    """`purr.py train` with the demo's defaults but --model and --lr -> the run folder. A run with these
    settings that reached `steps` under a.work (an earlier or interrupted miniature) is taken as it is:
    training is deterministic, so a re-run would give the same weights."""
    folder = os.path.join(a.work, f"{objective}-{a.model.replace('/', '')}-lr{lr:g}-{seed}")
    flags = ["train", "--objective", objective, "--seed", str(seed), "--steps", str(steps),
             "--demo-size", str(a.demo_size), "--ckpt-every", str(eval_every), "--log-every", str(eval_every),
             "--model", a.model, "--lr", str(lr), "--results-dir", folder]
    args = purr.parser().parse_args(flags + (["--resume", resume] if resume else []))
    for path in sorted(glob.glob(os.path.join(folder, "*", "checkpoints", f"{steps:07d}.pt"))):
        saved = purr.saved_settings(purr.load_checkpoint(path))
        if all(saved[k] == getattr(args, k) for k in ("objective", "seed", "steps", "demo_size", "ckpt_every",
                                                       "model", "lr")):
            print(f"{path}: trained by an earlier run with these settings", flush=True)
            return os.path.dirname(os.path.dirname(path))
    return purr.train(args)


def checkpoints(run):
    return sorted(glob.glob(os.path.join(run, "checkpoints", "*.pt")))


def floors(tok, clf, n):
    """The metric on real held-out images, and on the same images through the tokenizer (no generator in
    this token space can beat the second)."""
    images, labels = appendix.demo_dataset(n, seed=HELD_OUT_SEED + 1)
    recon = vqlib.to_uint8(tok.decode(tok.encode(appendix.to_unit(images))))
    return {"real": demo_fd_and_accuracy(clf, images, labels),
            "tokenizer": demo_fd_and_accuracy(clf, recon, labels)}


def mean_sd(values):
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def first_reach(steps, fds, target):
    """The first training step at which the FD curve reaches target (linear in log FD between checkpoints)."""
    for (s0, f0), (s1, f1) in zip(zip(steps, fds), zip(steps[1:], fds[1:])):
        if f1 <= target < f0:
            return s0 + (s1 - s0) * (math.log(f0) - math.log(target)) / (math.log(f0) - math.log(f1))
    return steps[0] if fds[0] <= target else None


def merged(path, rows, a):
    """rows and the rows of the table at path that they do not replace (--objectives: other objectives or
    seeds, and floors), numbers parsed; the whole table is replaced when every objective ran."""
    if set(a.objectives) == set(purr.OBJECTIVES) or not os.path.exists(path):
        return rows

    def number(v):
        if v in ("", "nan") or not v.lstrip("-").replace(".", "", 1).isdigit():
            return v
        return float(v) if "." in v else int(v)
    old = [{k: number(v) for k, v in r.items()} for r in csv.DictReader(open(path))]
    new = {(r["seed"], r["objective"]) for r in rows}
    return [r for r in old if (r["seed"], r["objective"]) not in new and r["seed"] != ""] + rows


@contextlib.contextmanager
def locked(folder):
    """--objectives runs of different seeds at once merge into the same tables one at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def commit():
    """The code's commit (with '+' when the work tree differs from it), recorded in every table."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True).stdout.strip()
    dirty = "+" if git("status", "--short", "-uno") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


COMMIT = commit()


def write_csv(path, rows):
    rows = [{**r, "commit": r.get("commit") or COMMIT} for r in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"-> {path}", flush=True)


def grouped(rows, x, y, by="objective", **where):
    """{group: (xs, means, sds)} of rows[y] over seeds, at each rows[x], for rows matching `where`."""
    out = {}
    for r in rows:
        if all(r[k] == v for k, v in where.items()):
            out.setdefault(r[by], {}).setdefault(r[x], []).append(r[y])
    return {g: tuple(map(list, zip(*[(k, *mean_sd(v)) for k, v in sorted(d.items())])))
            for g, d in out.items()}


def plot(path, panels):
    """Panels side by side: (title, xlabel, ylabel, {name: (xs, means, sds)}, {name: level}, xlog, ylog).
    Spread over seeds as a band; dashed levels for references; log axes with 1-2-5 ticks; legends outside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, xlabel, ylabel, series, levels, xlog, ylog) in zip(axes[0], panels):
        for i, (name, (xs, ms, sds)) in enumerate(series.items()):
            color = COLORS.get(name, f"C{i}")
            ax.plot(xs, ms, "o-", color=color, label=name, ms=3.5)
            lo, hi = [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
        for name, level in levels.items():
            ax.axhline(level, ls="--", lw=1, color=COLORS.get(name, "black"), label=name)
        for axis, log in ((ax.xaxis, xlog), (ax.yaxis, ylog)):
            if log:
                (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
                axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3, which="major")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"-> {path}", flush=True)


def eval_tau(objective):
    return 1.0 if objective == "dfm" else 0.9


def learning_rates(a, clf):
    """Each objective at each of a.lrs from the first seed, its final FD -> rows, {objective: best lr}, and
    the runs (the best one is the first seed's convergence run)."""
    rows, runs = [], {}
    for obj in a.objectives:
        for lr in a.lrs:
            runs[a.seeds[0], obj, lr] = run = train_run(a, obj, a.seeds[0], a.steps, a.eval_every, lr)
            fd, acc, _, _ = evaluate(purr.load_sampler(checkpoints(run)[-1]), clf, eval_tau(obj),
                                     a.num_samples, a.eval_steps)
            rows.append({"objective": obj, "model": a.model, "lr": lr, "seed": a.seeds[0], "steps": a.steps,
                         "fd": round(fd, 3), "accuracy": round(acc, 4)})
            print(rows[-1], flush=True)
    best = {o: min((r for r in rows if r["objective"] == o), key=lambda r: r["fd"])["lr"]
            for o in a.objectives}
    return rows, best, runs


def convergence(a, clf, swept):
    """Every objective from every seed at its learning rate; each checkpoint's FD and accuracy -> rows, the
    runs."""
    rows, runs = [], {}
    for seed in a.seeds:
        for obj in a.objectives:
            t0 = time.time()
            runs[seed, obj] = swept.get((seed, obj, a.lr[obj])) or train_run(a, obj, seed, a.steps,
                                                                                a.eval_every, a.lr[obj])
            train_s = time.time() - t0
            for ckpt in checkpoints(runs[seed, obj]):
                fd, acc, _, _ = evaluate(purr.load_sampler(ckpt), clf, eval_tau(obj), a.num_samples,
                                         a.eval_steps)
                rows.append({"seed": seed, "objective": obj, "model": a.model, "lr": a.lr[obj],
                             "step": int(os.path.basename(ckpt)[:-3]), "fd": round(fd, 3),
                             "accuracy": round(acc, 4), "train_s": round(train_s, 1)})
                print(rows[-1], flush=True)
    return rows, runs


def speedups(rows, seeds):
    """Per seed: (training steps of a baseline) / (steps purr needs to reach the baseline's final FD)."""
    out = {}
    for obj in [o for o in purr.OBJECTIVES if o != "purr"]:
        ratios = []
        for seed in seeds:
            def curve(o):
                return [(r["step"], r["fd"]) for r in rows if r["seed"] == seed and r["objective"] == o]
            ps, pf = zip(*curve("purr"))
            base_step, base_fd = curve(obj)[-1]
            reach = first_reach(list(ps), list(pf), base_fd)
            ratios.append(base_step / reach if reach else float("nan"))
        out[obj] = ratios
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0 1)")
    p.add_argument("--steps", type=int, help="training steps (default: the demo's)")
    p.add_argument("--model", default="N/2", help="the DiT of every run (default: N/2; the demo's: N/4)")
    p.add_argument("--lrs", type=float, nargs="+",
                   help=f"learning rates tried for each objective (default: {' '.join(map(str, LRS))}; "
                        "--quick: 3e-3); one value: no sweep")
    p.add_argument("--eval-every", type=int,
                   help="checkpoint and evaluate every N steps (default: steps / 5; --quick: steps / 3)")
    p.add_argument("--quick", action="store_true",
                   help="every part in < 10 min: 2 seeds, 1/10 of the steps, fewer points")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny end-to-end configuration (seconds), for the tests")
    p.add_argument("--work", default="results/miniature", help="run folders (checkpoints)")
    p.add_argument("--out",
                   help="tables and plots (default: benchmarks/results; --quick: results/miniature-quick)")
    p.add_argument("--classifier",
                   help="the metric's classifier (default: benchmarks/results/demo_classifier.pt)")
    p.add_argument("--objectives", nargs="+", choices=purr.OBJECTIVES, default=list(purr.OBJECTIVES),
                   help="a subset runs only the convergence and steps parts for these: "
                        "their rows replace theirs in the tables under --out, "
                        "and the figures are redrawn from the merged tables")
    a = p.parse_args(argv)
    preset = PRESETS["smoke" if a.smoke else "quick" if a.quick else "full"]
    for k in ("num_samples", "demo_size", "longer", "eval_steps", "taus"):
        setattr(a, k, preset[k])
    a.lrs = a.lrs or preset["lrs"]
    a.seeds = a.seeds or preset.get("seeds", [0, 1, 2])
    a.out = a.out or (RESULTS if preset is PRESETS["full"] else os.path.join("results", "miniature-quick"))
    a.steps = a.steps or purr.DEMO["steps"] // preset.get("steps_div", 1)
    a.eval_every = a.eval_every or max(1, a.steps // preset.get("checkpoints", 5))
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    clf = load_classifier(a.classifier, **preset["classifier"])
    out = lambda name: os.path.join(a.out, f"miniature_{name}")  # noqa: E731

    swept = {}
    a.lr = {o: a.lrs[0] for o in a.objectives}
    if len(a.lrs) > 1:
        lr_rows, a.lr, swept = learning_rates(a, clf)
        with locked(a.out):
            write_csv(out("learning_rate.csv"), merged(out("learning_rate.csv"), lr_rows, a))
        print(f"best learning rates on {a.model}: {a.lr}", flush=True)
    rows, runs = convergence(a, clf, swept)
    finals = {(seed, obj): purr.load_sampler(checkpoints(runs[seed, obj])[-1]) for seed in a.seeds
              for obj in ("purr", "cfm", "dfm") if obj in a.objectives}
    ref = floors(purr.load_sampler(checkpoints(runs[a.seeds[0], a.objectives[0]])[-1])[1], clf, a.num_samples)
    with locked(a.out):
        rows = merged(out("convergence.csv"), rows, a)
        write_csv(out("convergence.csv"), rows + [{"seed": "", "objective": k, "step": "", "fd": round(fd, 3),
                                                    "accuracy": round(acc, 4), "train_s": ""}
                                                   for k, (fd, acc) in ref.items()])
        plot(out("convergence.png"), [
            ("demo FD (lower is better)", "training step", "demo FD", grouped(rows, "step", "fd"),
             {k: v[0] for k, v in ref.items()}, False, True),
            ("class accuracy of samples", "training step", "accuracy", grouped(rows, "step", "accuracy"),
             {k: v[1] for k, v in ref.items()}, False, False)])
    a.seeds = sorted({r["seed"] for r in rows})  # the speed-ups over every seed of the merged table
    for obj, ratios in speedups(rows, a.seeds).items():
        m, s = mean_sd(ratios)
        print(f"purr reaches {obj}'s final FD in {m:.2f}x fewer steps (sd {s:.2f} over seeds {a.seeds}; "
              f"per seed {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    if set(a.objectives) != set(purr.OBJECTIVES):
        steps_sweep(a, clf, finals, preset["sweep"], out)
        return

    temp = temperature(a, clf, runs, finals)
    tau_fd = grouped(temp, "tau", "fd", by="train_steps", train_steps=a.steps)[a.steps]
    best_tau = tau_fd[0][tau_fd[1].index(min(tau_fd[1]))]
    print(f"best constant tau (mean FD over seeds, {a.steps} steps): {best_tau}", flush=True)
    steps_sweep(a, clf, finals, preset["sweep"], out)
    guidance_and_schedules(a, clf, finals, best_tau, out)
    tau_grid(finals[a.seeds[0], "purr"], clf, a.eval_steps, out)
    print(f"miniature: done in {(time.time() - t_start) / 60:.1f} min; floors {ref}; results in {a.out}")


def temperature(a, clf, runs, finals):
    """The tau sweep at the demo's steps (every seed), and at 2x and 4x (seed 0's purr run, resumed)."""
    rows = []
    samplers = {(a.steps, seed): finals[seed, "purr"] for seed in a.seeds}
    run = runs[a.seeds[0], "purr"]
    for k in a.longer:
        train_run(a, "purr", a.seeds[0], k * a.steps, a.steps, a.lr["purr"], resume=checkpoints(run)[-1])
        samplers[k * a.steps, a.seeds[0]] = purr.load_sampler(checkpoints(run)[-1])
    for (steps, seed), sampler in samplers.items():
        for tau in a.taus:
            fd, acc, _, _ = evaluate(sampler, clf, tau, a.num_samples, a.eval_steps)
            rows.append({"train_steps": steps, "seed": seed, "tau": tau, "fd": round(fd, 3),
                         "accuracy": round(acc, 4)})
            print(rows[-1], flush=True)
    write_csv(os.path.join(a.out, "miniature_temperature.csv"), rows)
    plot(os.path.join(a.out, "miniature_temperature.png"), [
        ("demo FD against tau (purr, EMA)", "tau", "demo FD",
         {f"{s} steps": v for s, v in grouped(rows, "tau", "fd", by="train_steps").items()}, {}, False, True),
        ("class accuracy against tau", "tau", "accuracy",
         {f"{s} steps": v for s, v in grouped(rows, "tau", "accuracy", by="train_steps").items()},
         {}, False, False)])
    return rows


def steps_sweep(a, clf, finals, sweep, out):
    """Quality against network evaluations: Euler for purr, cfm, dfm; midpoint (2 per step) for purr."""
    rows = []
    for (seed, obj), sampler in finals.items():
        for nfe in sweep:
            for method in ("euler", "midpoint") if obj == "purr" else ("euler",):
                num_steps = nfe // 2 if method == "midpoint" else nfe
                fd, acc, sec, _ = evaluate(sampler, clf, eval_tau(obj), a.num_samples, num_steps, method)
                rows.append({"seed": seed, "objective": obj, "method": method, "num_steps": num_steps,
                             "nfe": nfe, "fd": round(fd, 3), "accuracy": round(acc, 4),
                             "s_per_100": round(sec, 3)})
                print(rows[-1], flush=True)
    for r in rows:
        r["curve"] = r["objective"] + (" (midpoint)" if r["method"] == "midpoint" else "")
    with locked(a.out):
        rows = merged(out("steps.csv"), rows, a)
        write_csv(out("steps.csv"), rows)
        plot(out("steps.png"), [
            ("demo FD against network evaluations", "network evaluations per sample", "demo FD",
             grouped(rows, "nfe", "fd", by="curve"), {}, True, True),
            ("class accuracy", "network evaluations per sample", "accuracy",
             grouped(rows, "nfe", "accuracy", by="curve"), {}, True, False),
            ("sampling time", "network evaluations per sample", "seconds per 100 samples",
             grouped(rows, "nfe", "s_per_100", by="curve"), {}, True, True)])


def guidance_and_schedules(a, clf, finals, best_tau, out):
    """purr at CFG scales (tau at its best); at the best scale (mean FD over seeds), guidance in limited
    intervals of t, with the sampling time; linear tau(t) schedules against the best constant tau."""
    rows, sched, intervals = [], [], []
    for seed in a.seeds:
        for s in CFG_SCALES:
            fd, acc, _, _ = evaluate(finals[seed, "purr"], clf, best_tau, a.num_samples, a.eval_steps,
                                     cfg_scale=s)
            rows.append({"seed": seed, "tau": best_tau, "cfg_scale": s, "fd": round(fd, 3),
                         "accuracy": round(acc, 4)})
            print(rows[-1], flush=True)
    scale_fd = grouped(rows, "cfg_scale", "fd", by="tau")[best_tau]
    best_scale = scale_fd[0][scale_fd[1].index(min(scale_fd[1]))]
    for seed in a.seeds:
        sampler = finals[seed, "purr"]
        for lo, hi in CFG_INTERVALS:
            fd, acc, secs, _ = evaluate(sampler, clf, best_tau, a.num_samples, a.eval_steps,
                                        cfg_scale=purr.cfg_interval(best_scale, (lo, hi)))
            intervals.append({"seed": seed, "tau": best_tau, "cfg_scale": best_scale, "lo": lo, "hi": hi,
                              "fd": round(fd, 3), "accuracy": round(acc, 4), "s_per_100": round(secs, 3)})
            print(intervals[-1], flush=True)
        for start, end in [(best_tau, best_tau)] + SCHEDULES:
            name = (f"constant {best_tau}" if (start, end) == (best_tau, best_tau)
                    else f"linear {start} -> {end}")
            schedule = purr.tau_schedule("linear", start, end)
            fd, acc, _, _ = evaluate(sampler, clf, schedule, a.num_samples, a.eval_steps)
            sched.append({"seed": seed, "schedule": name, "tau_start": start, "tau_end": end,
                          "fd": round(fd, 3), "accuracy": round(acc, 4)})
            print(sched[-1], flush=True)
    write_csv(out("guidance.csv"), rows)
    write_csv(out("cfg_interval.csv"), intervals)
    write_csv(out("tau_schedule.csv"), sched)
    for r in rows:
        r["curve"] = f"purr, tau {best_tau}"
    plot(out("guidance.png"), [
        ("demo FD against guidance", "CFG scale", "demo FD", grouped(rows, "cfg_scale", "fd", by="curve"),
         {}, False, True),
        ("class accuracy against guidance", "CFG scale", "accuracy",
         grouped(rows, "cfg_scale", "accuracy", by="curve"), {}, False, False)])


def tau_grid(sampler, clf, num_steps, out):
    """Fig. 4: two samples per class, the same z_0 and labels in every row; rows are GRID_TAUS, top to
    bottom."""
    a = sampler[2]
    z0 = torch.randn(20, a["latent_channels"], a["latent_size"], a["latent_size"],
                     generator=torch.Generator().manual_seed(1))
    grid = torch.cat([evaluate(sampler, clf, tau, 20, num_steps, z0=z0)[3] for tau in GRID_TAUS])
    appendix.save_grid(grid, len(GRID_TAUS), out("tau_grid.png"))


if __name__ == "__main__":
    main()
