"""A checkpoint of the authors' code (github razvanmatisan/purrception, checkpointer.py) as a purr checkpoint.

    python tools/from_official.py OFFICIAL.pth --hparams hparams.json --vq NAME --vq-ckpt FILE --out purr.pt
    python purr.py sample --ckpt purr.pt --num-steps 99 ...     # their ode_steps: 100 is 99 Euler steps

Their file holds `backbone_state_dict` (the live weights, bf16 under DeepSpeed), `ema_state_dict` (torch_ema
0.3's: `shadow_params`, the EMA of every parameter, in parameters() order) and `step`; the run's
hparams.json beside it holds model_type, autoencoder_type, backbone_hparams. purr's DiT is theirs with four
key groups renamed (RENAMES) and time_scale 1 (they embed t, not 1000 t). The purr checkpoint gets `ema` from
the shadow parameters, `model` from the live weights, a fresh AdamW state, and `args`: a purr --data run's
with OFFICIAL_TRAINING, the settings of their training code, so a resumed run trains as theirs did.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import purr  # noqa: E402
import vq as vqlib  # noqa: E402
from appendix import PurrError  # noqa: E402

RENAMES = [("x_embedder.proj.", "x_embedder."), ("y_embedder.embedding_table.", "y_embedder."),
           (".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.2.")]
OBJECTIVES = {"purrception": "purr", "cfm": "cfm", "cfm-endpoint": "cfm-endpoint"}
TOKENIZERS = {"llamagen": "llamagen-vq-ds8", "stablediffusion": "sd-vq-f8"}
# Their trainer's settings (main.py's defaults, trainer.py, torch_ema), as purr train flags. Their example
# configs train with cfg_scale 1.0, which never drops a label. Not in their files: the global batch size.
OFFICIAL_TRAINING = ["--lr", "1e-4", "--warmup", "0", "--decay", "0", "--ema-decay", "0.9999", "--ema-warmup",
                     "--max-grad-norm", "1.0", "--adam-eps", "1e-8", "--t-min", "1e-3", "--time-scale", "1",
                     "--z-loss", "1e-5", "--class-dropout", "0"]
DATA = "(the authors' latents)"  # their WebDataset shards are no purr data folder: resuming needs --data


def purr_key(key):
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def model_name(bb):
    """purr's DiT_models name for their backbone_hparams, or a PurrError."""
    shape = (bb["depth"], bb["hidden_size"], bb["num_heads"])
    size = next((n for n, s in purr.DIT_SIZES.items() if s == shape), None)
    name = f"{size}/{bb['patch_size']}"
    if size is None or name not in purr.DiT_models or bb.get("mlp_ratio", 4) != 4:
        raise PurrError(f"their DiT (depth {bb['depth']}, width {bb['hidden_size']}, "
                        f"{bb['num_heads']} heads, patch {bb['patch_size']}, "
                        f"mlp_ratio {bb.get('mlp_ratio')}) is none of purr's sizes "
                        f"({', '.join(purr.DiT_models)}, mlp_ratio 4)")
    return name


def convert(official_path, hparams_path, vq, vq_ckpt):
    """The purr checkpoint (a dict for torch.save) of their checkpoint and hparams.json."""
    try:
        hp = json.load(open(hparams_path))
        bb, model_type, autoencoder = hp["backbone_hparams"], hp["model_type"], hp["autoencoder_type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PurrError(f"--hparams {hparams_path}: not their run's hparams.json ({type(e).__name__}: {e})") \
            from None
    if model_type not in OBJECTIVES:
        raise PurrError(f"model_type {model_type!r}: purr converts {', '.join(OBJECTIVES)}; their DFM "
                        "checkpoints are not converted")
    if TOKENIZERS.get(autoencoder) != vq:
        raise PurrError(f"--vq {vq}, but their run used autoencoder_type {autoencoder!r} "
                        f"({TOKENIZERS.get(autoencoder, 'which purr does not have')})")
    if bb.get("num_classes", -1) <= 0:
        raise PurrError(f"num_classes {bb.get('num_classes')}: an unconditional DiT has no label embedding; "
                        "purr's is class-conditional")
    obj = vqlib._torch_load(official_path, "a checkpoint of the authors' checkpointer.py")
    if not isinstance(obj, dict) or not {"backbone_state_dict", "ema_state_dict", "step"} <= set(obj):
        raise PurrError(f"{official_path} is not a checkpoint of their checkpointer.py (no "
                        "backbone_state_dict, ema_state_dict and step)")
    live = {purr_key(k): v.float() for k, v in obj["backbone_state_dict"].items()}
    name, p, d = model_name(bb), bb["patch_size"], bb["in_channels"]
    out = live["final_layer.linear.weight"].shape[0] // p ** 2
    codebook = vqlib._official_state(vq, vq_ckpt)["quantize.embedding.weight"]
    K = out if model_type == "purrception" else len(codebook)
    if tuple(codebook.shape) != (K, d):
        raise PurrError(f"{vq_ckpt}: its codebook is {tuple(codebook.shape)}, their DiT's is ({K}, {d})")
    args = purr.parser().parse_args(["train", "--data", DATA, "--vq", vq, "--vq-ckpt",
                                     os.path.abspath(vq_ckpt), "--model", name, "--objective",
                                     OBJECTIVES[model_type], *OFFICIAL_TRAINING])
    cfg, _ = purr.resolve_config(args, None)
    cfg.update(latent_size=bb["input_size"], latent_channels=d, codebook_size=K,
               num_classes=bb["num_classes"])
    model = purr.build_model(cfg)
    try:
        model.load_state_dict(live)
    except RuntimeError as e:
        raise PurrError(f"{official_path}: its weights do not fit purr's {name}: "
                        + " ".join(str(e).split())) from None
    shadow, params = (obj["ema_state_dict"] or {}).get("shadow_params"), list(model.named_parameters())
    if not shadow or [tuple(s.shape) for s in shadow] != [tuple(v.shape) for _, v in params]:
        raise PurrError(f"{official_path}: its ema_state_dict holds no shadow_params matching the DiT's "
                        f"{len(params)} parameters")
    ema = {k: s.float() for (k, _), s in zip(params, shadow)}
    opt = purr.adamw(model, cfg).state_dict()
    return {"model": model.state_dict(), "ema": ema, "opt": opt, "args": cfg, "step": int(obj["step"]),
            "vq": {"name": vq, "ckpt": os.path.abspath(vq_ckpt)}}


def main(argv=None):
    p = argparse.ArgumentParser(prog="from_official.py", description=__doc__.split("\n\n")[0])
    p.add_argument("official", help="their checkpoint (.pth, written by checkpointer.py)")
    p.add_argument("--hparams", required=True, help="the run's hparams.json (beside it in their log folder)")
    p.add_argument("--vq", required=True, choices=list(TOKENIZERS.values()))
    p.add_argument("--vq-ckpt", required=True, help="the tokenizer's official file")
    p.add_argument("--out", required=True, help="the purr checkpoint to write")
    a = p.parse_args(argv)
    try:
        ckpt = convert(a.official, a.hparams, a.vq, a.vq_ckpt)
    except (PurrError, vqlib.TokenizerError) as e:
        sys.exit(f"from_official: error: {e}")
    torch.save(ckpt, a.out)
    print(f"{a.official} (their {ckpt['args']['model']}, purr objective {ckpt['args']['objective']}, step "
          f"{ckpt['step']}) -> {a.out}")


if __name__ == "__main__":
    main()
