"""Mutation testing for purr: does the suite notice plausible one-line bugs? (Not run by CI.)

    python tools/mutate.py                 # every mutation, one at a time: KILLED or SURVIVED, then the score
    python tools/mutate.py --list          # the mutations and the tests each one runs
    python tools/mutate.py --only ema_decay_swapped --only zloss_not_squared

Each mutation is (file, where, old text, new text, tests): `where` names a function, method (Class.method,
or outer.inner for a nested function), class or module-level assignment of the file, found with ast, and the
old text must occur exactly once in that definition's source, whitespace ignored (any run of spaces and line
breaks matches any other, or none), so reformatting the code, or changing it elsewhere, does not lose the
target. For each, the repository's files (`git ls-files` plus untracked files git does not ignore) are copied
into a temporary folder, the old text is replaced there, and the tests run there with a timeout; the working
tree is never touched.
The same tests first run on an unmutated copy: a mutation is KILLED when a test that passes unmutated fails
(or errors, or the run times out) with it; tests that already fail unmutated cannot kill anything.
Tests are a pytest -k expression (a string) or a list of node ids. Run with OMP_NUM_THREADS=1 on a busy
machine.
"""
import argparse
import ast
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Mutation = namedtuple("Mutation", "name file where old new tests")

# The test selections, by what they check (names of test_purr.py's tests).
DIT = "test_unpatchify or test_cfg_guides or test_dit_emits or test_dit_condition"
LOSS = ("test_loss_equals_hand or test_training_loss_equals_the_formula or test_bf16_loss_gradient "
        "or test_purr_training_loss")
SAMPLER = ("test_euler_sampler or test_last_euler_step or test_torchdiffeq_euler or test_small_tau "
           "or test_one_hot_posterior or test_baseline_samplers")
TRAIN_RUN = "test_class_dropout or test_train_ema or test_signal_in_train"
SPLITS = "test_train_step_accumulates or test_three_splits"
DDP = "test_draw_noise_slices or test_rank_batches_slice or test_two_processes"
RESUME = "test_resume_is_exact or test_resume_with_a_new_lr"
SAVE = "test_interrupted_save or test_save_into_a_full_disk or test_keep_leaves or test_truncated_checkpoint"
SIGNALS = "test_stop_requests or test_signal_in_train"
SD = "test_matches_original_outputs and sd or test_fp32_accuracy and sd or test_full_ldm"
LLAMAGEN = ("test_matches_original_outputs and llamagen or test_fp32_accuracy and llamagen "
            "or test_quantize_inverts")
FID = "test_fid_features_match or test_fid_weights_in_fp16 or test_fid_bad_weights"
CROP = "test_center_crop or test_fid_cli_bad_inputs"
SETTINGS = "test_data_settings_are_app_c or test_learning_rate or test_resume_with_a_new_lr or test_bench"
RESUME_SETTINGS = ("test_settings_absent_from_an_old_checkpoint or test_official_training_settings "
                   "or test_resume_with_other or test_data_settings_are_app_c or test_sigterm_saves")
SAMPLE = "test_sample_uses_the_ema or test_sampled_images_do_not_depend or test_sampling_across_ranks"
IMAGES = "test_16_bit or test_center_crop or test_unreadable_images_are_named or test_extract_tokens_equal"

MUTATIONS = [
    # Eq. 12: the categorical posterior over codes, from K logits per latent position.
    Mutation("posterior_softmax_over_positions", "purr.py", "posterior",
             "return torch.softmax(logits.float() / tau, -1)",
             "return torch.softmax(logits.float() / tau, 0)", SAMPLER),
    Mutation("unpatchify_transposed", "purr.py", "unpatchify",
             "x.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)",
             "x.view(B, g, g, p, p, C).permute(0, 5, 1, 2, 3, 4)", DIT),
    Mutation("ce_gathers_wrong_axis", "purr.py", "CrossEntropyZ.forward",
             "logits.gather(1, c[:, None])[:, 0]", "logits.gather(0, c[:, None])[:, 0]", LOSS),
    # Eq. 13: v = (mu - z_t) / (1 - t), mu = sum_k pi_k e_k.
    Mutation("velocity_sign", "purr.py", "purr_velocity.v", "return (unpatchify(mu) - z) / (1 - t)",
             "return (z - unpatchify(mu)) / (1 - t)", SAMPLER),
    Mutation("velocity_times_one_minus_t", "purr.py", "purr_velocity.v",
             "return (unpatchify(mu) - z) / (1 - t)", "return (unpatchify(mu) - z) * (1 - t)", SAMPLER),
    # Algorithm 2 as a loop: t = s/T for s = 0..T-1, steps of 1/T; Eq. 15 with tau(t).
    Mutation("euler_loop_time_shifted", "purr.py", "algorithm2", "z = z + v(s / T, z) / T",
             "z = z + v((s + 1) / T - 1e-3, z) / T", SAMPLER),
    Mutation("tau_schedule_reversed", "purr.py", "tau_schedule", "return lambda t: tau + (tau_end - tau) * t",
             "return lambda t: tau_end + (tau - tau_end) * t", "test_linear_tau"),
    # The learning-rate schedule (the demo's decay).
    Mutation("lr_decay_never_reaches_zero", "purr.py", "learning_rate",
             "lr *= (steps - step) / (steps * cfg[\"decay\"])",
             "lr *= (steps - step + 1) / (steps * cfg[\"decay\"])", "test_learning_rate"),
    # Eq. 14: cross-entropy plus the z-loss (log Z)^2.
    Mutation("zloss_not_squared", "purr.py", "cross_entropy_z", "z_weight * log_z.pow(2).mean()",
             "z_weight * log_z.mean()", LOSS),
    Mutation("zloss_left_out_of_the_loss", "purr.py", "purr_loss",
             'return {"loss": ce + zloss, "ce": ce', 'return {"loss": ce, "ce": ce', LOSS),
    Mutation("ce_backward_ignores_zloss", "purr.py", "CrossEntropyZ.backward", "w = g_ce + g_log_z",
             "w = g_ce", LOSS),
    Mutation("ce_backward_onehot_scaled_by_w", "purr.py", "CrossEntropyZ.backward", "c[s:e]] -= g_ce[s:e]",
             "c[s:e]] -= w[s:e]", LOSS),
    # Eq. 15: pi = softmax(logits / tau).
    Mutation("tau_multiplies", "purr.py", "posterior", "return torch.softmax(logits.float() / tau, -1)",
             "return torch.softmax(logits.float() * tau, -1)", SAMPLER),
    Mutation("entropy_ignores_tau", "purr.py", "entropy", "torch.log_softmax(l.float() / tau, -1)",
             "torch.log_softmax(l.float(), -1)", "test_entropy_is_that or test_entropy_map"),
    # The interpolant z_t = t z_1 + (1 - t) z_0.
    Mutation("interpolant_reversed", "purr.py", "interpolant", "return t * z1 + (1 - t) * z0",
             "return (1 - t) * z1 + t * z0", "test_each_objective_loss or test_purr_training_loss"),
    # Algorithm 2: integrate to (T-1)/T, then one Euler step that lands on mu.
    Mutation("last_step_too_short", "purr.py", "integrate", "return z + v(t_last, z) / T",
             "return z + v(t_last, z) / (T + 1)", SAMPLER),
    Mutation("grid_reaches_t_1", "purr.py", "integrate", "grid = (torch.arange(T, dtype=torch.float64) / T)",
             "grid = (torch.arange(T + 1, dtype=torch.float64) / T)", SAMPLER),
    # EMA.
    Mutation("ema_decay_swapped", "purr.py", "update_ema", "list(model.parameters()), 1 - decay)",
             "list(model.parameters()), decay)",
             "test_ema_update or test_train_ema or test_entropy_map_is_written"),
    Mutation("ema_gets_one_minus_decay", "purr.py", "train",
             "update_ema(ema, model, ema_decay(cfg, step + 1))",
             "update_ema(ema, model, 1 - ema_decay(cfg, step + 1))", "test_train_ema"),
    # Label dropout (--class-dropout) and the null class num_classes.
    Mutation("label_dropout_null_off_by_one", "purr.py", "micro_batches",
             "y = torch.where(drop, cfg[\"num_classes\"], y)",
             "y = torch.where(drop, cfg[\"num_classes\"] - 1, y)", TRAIN_RUN),
    Mutation("label_dropout_inverted", "purr.py", "draw_noise",
             "drop = torch.rand(batch, generator=g)[rows] < class_dropout",
             "drop = torch.rand(batch, generator=g)[rows] > class_dropout", TRAIN_RUN),
    Mutation("label_dropout_where_swapped", "purr.py", "micro_batches",
             "y = torch.where(drop, cfg[\"num_classes\"], y)",
             "y = torch.where(drop, y, cfg[\"num_classes\"])", TRAIN_RUN),
    Mutation("cfg_null_off_by_one", "purr.py", "DiT.forward_with_cfg",
             "null = torch.full_like(y, self.num_classes)", "null = torch.full_like(y, self.num_classes - 1)",
             DIT),
    # Time conditioning: TimestepEmbedder embeds 1000 t as [cos, sin] at DiT's frequencies.
    Mutation("time_not_scaled_by_1000", "purr.py", "TimestepEmbedder.forward",
             "args = self.time_scale * t.float()[:, None] * freqs[None]",
             "args = t.float()[:, None] * freqs[None]", "test_time_embedding"),
    Mutation("time_sin_cos_swapped", "purr.py", "TimestepEmbedder.forward",
             "torch.cat([args.cos(), args.sin()], 1)", "torch.cat([args.sin(), args.cos()], 1)",
             "test_time_embedding"),
    Mutation("time_max_period", "purr.py", "TimestepEmbedder.forward", "freqs = torch.exp(-math.log(10000) *",
             "freqs = torch.exp(-math.log(1000) *", "test_time_embedding"),
    Mutation("time_ignored", "purr.py", "DiT.forward", "c = self.t_embedder(t) + self.y_embedder(y)",
             "c = self.y_embedder(y)", DIT),
    # Class conditioning: y_embedder has num_classes + 1 rows (the last is the null class).
    Mutation("label_ignored", "purr.py", "DiT.forward", "c = self.t_embedder(t) + self.y_embedder(y)",
             "c = self.t_embedder(t)", DIT),
    Mutation("no_null_class_row", "purr.py", "DiT.__init__",
             "self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)",
             "self.y_embedder = nn.Embedding(num_classes, hidden_size)", DIT),
    # DDP: each rank takes its slice of the global batch (data and noise alike).
    Mutation("rank_data_strided", "appendix.py", "RankBatches.__iter__",
             "mine = slice(self.rank * b, (self.rank + 1) * b)", "mine = slice(self.rank, None, self.world)",
             DDP),
    Mutation("rank_noise_not_sliced", "purr.py", "train",
             "rows = slice(rank * per_rank, (rank + 1) * per_rank)", "rows = slice(0, per_rank)", DDP),
    Mutation("noise_same_every_step", "purr.py", "draw_noise",
             "torch.Generator().manual_seed(seed * 1_000_003 + step)",
             "torch.Generator().manual_seed(seed * 1_000_003)", DDP),
    # Resume: optimizer state, EMA, step and data position come back.
    Mutation("resume_drops_opt_state", "purr.py", "build_training", 'opt.load_state_dict(ckpt["opt"])',
             'opt.state_dict()', RESUME),
    Mutation("resume_ema_from_model", "purr.py", "build_training", 'ema.load_state_dict(ckpt["ema"])',
             'ema.load_state_dict(ckpt["model"])', RESUME),
    Mutation("resume_data_from_start", "purr.py", "train",
             "plan = RankBatches(len(data), step, steps,",
             "plan = RankBatches(len(data), 0, steps - step,", RESUME),
    # Atomic saves: write beside, os.replace; a failed save removes its temporary file.
    Mutation("save_in_place", "appendix.py", "save_checkpoint",
             'torch.save(obj, path + ".tmp")\n        os.replace(path + ".tmp", path)',
             "torch.save(obj, path)", SAVE),
    Mutation("save_catches_only_oserror", "appendix.py", "save_checkpoint",
             "except (OSError, RuntimeError) as e:  # disk full", "except OSError as e:  # disk full", SAVE),
    Mutation("save_leaves_tmp", "appendix.py", "save_checkpoint",
             'os.remove(path + ".tmp")\n        previous', 'pass\n        previous', SAVE),
    # Signals: recorded by stop_requests, then the loop saves and stops.
    Mutation("signal_flag_ignored", "purr.py", "train",
             "sum_over_ranks(world, device, bool(stop), not torch.isfinite",
             "sum_over_ranks(world, device, False, not torch.isfinite", SIGNALS),
    Mutation("signal_handlers_not_restored", "appendix.py", "stop_requests",
             "            signal.signal(s, handler)\n", "            pass\n", SIGNALS),
    Mutation("sigusr1_not_handled", "appendix.py", "STOP_SIGNALS",
             "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)",
             "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)", SIGNALS),
    Mutation("stop_without_saving", "purr.py", "train",
             "if step % cfg[\"ckpt_every\"] == 0 or step == steps or stopping:",
             "if step % cfg[\"ckpt_every\"] == 0 or step == steps:", SIGNALS),
    # Gradient accumulation: loss / n per micro-batch, DDP's all-reduce only on the last.
    Mutation("accum_loss_not_divided", "purr.py", "train_step", '(losses["loss"] / n).backward()',
             'losses["loss"].backward()', SPLITS),
    Mutation("accum_no_sync_on_last", "purr.py", "train_step", "if i < n - 1 and hasattr(model, \"no_sync\")",
             "if i < n and hasattr(model, \"no_sync\")", SPLITS),
    Mutation("accum_logged_sum", "purr.py", "train_step",
             "totals[k] = totals.get(k, 0) + v.detach().float() / n",
             "totals[k] = totals.get(k, 0) + v.detach().float()", SPLITS),
    # vq.py: SD's and LlamaGen's tokenizers from their official files.
    Mutation("vq_groupnorm_eps", "vq.py", "norm", "GroupNorm(32, c, eps=1e-6)", "GroupNorm(32, c, eps=1e-5)",
             SD),
    Mutation("vq_channels_last_groupnorm", "vq.py", "VQModel._in",
             "return x.to(self.codebook.dtype, memory_format=torch.contiguous_format)",
             "return x.to(self.codebook.dtype, memory_format=torch.channels_last)", "test_fp32_accuracy"),
    Mutation("vq_upsample_bilinear", "vq.py", "Resample.forward",
             'F.interpolate(x, scale_factor=2.0, mode="nearest")',
             'F.interpolate(x, scale_factor=2.0, mode="bilinear")', SD),
    Mutation("vq_downsample_pad_left", "vq.py", "Resample.forward", "F.pad(x, (0, 1, 0, 1))",
             "F.pad(x, (1, 0, 1, 0))", SD),
    Mutation("vq_sd_decoder_order", "vq.py", "SD_LAYOUT",
             'SD_LAYOUT = Layout("block", "down", "up", ("block_1", "attn_1", "block_2"), True)',
             'SD_LAYOUT = Layout("block", "down", "up", ("block_1", "attn_1", "block_2"), False)', SD),
    Mutation("vq_ldm_prefix", "vq.py", "_official_state",
             "sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}",
             "sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}", SD),
    # (Not a mutation: dropping the l2-normalisation of z in nearest_code. The codes are unit-norm, so the
    # nearest code of z and of z / |z| is the same: argmin |z|^2 + 1 - 2 z.e_k = argmax z.e_k. Equivalent up
    # to float ties.)
    Mutation("vq_llamagen_codes_not_normalised", "vq.py", "Quantizer._codes",
             "return F.normalize(e, dim=1) if self.l2_norm else e.clone()", "return e.clone()", LLAMAGEN),
    Mutation("vq_llamagen_attention_level", "vq.py", "build_tokenizer",
             "cfg[\"ch_mult\"], cfg[\"num_res_blocks\"], {n - 1},",
             "cfg[\"ch_mult\"], cfg[\"num_res_blocks\"], {n - 2},", LLAMAGEN),
    # fid.py: the Inception's weights, layout and preprocessing.
    Mutation("fid_bn_eps", "fid.py", "Conv.__init__", "nn.BatchNorm2d(cout, eps=1e-3)",
             "nn.BatchNorm2d(cout, eps=1e-5)", FID),
    Mutation("fid_normalise_127_5", "fid.py", "InceptionV3.normalize", "(resize_tf1(x.float()) - 128) / 128",
             "(resize_tf1(x.float()) - 127.5) / 127.5", FID),
    Mutation("fid_torch_resize_align_corners", "fid.py", "InceptionV3.normalize",
             'mode="bilinear", align_corners=False) - 1', 'mode="bilinear", align_corners=True) - 1', FID),
    Mutation("fid_avgpool_counts_pad", "fid.py", "avg3", "F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)",
             "F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)", FID),
    Mutation("fid_last_block_avg_pool", "fid.py", "InceptionV3.__init__", "BlockE(2048, max_pool=True)",
             "BlockE(2048, max_pool=False)", FID),
    # (Not a mutation: loading fp16 weights without .float(). load_state_dict copies into the fp32 parameters,
    # converting: equivalent.)
    Mutation("fid_requires_num_batches_tracked", "fid.py", "load_inception",
             "want = {k: v.shape for k, v in model.state_dict().items()"
             ' if not k.endswith("num_batches_tracked")}',
             "want = {k: v.shape for k, v in model.state_dict().items()}", FID),
    Mutation("crop_bilinear", "appendix.py", "center_crop",
             "img.resize(tuple(round(x * scale) for x in img.size), Image.BICUBIC)",
             "img.resize(tuple(round(x * scale) for x in img.size), Image.BILINEAR)", CROP),
    Mutation("crop_no_box_halving", "appendix.py", "center_crop", "Image.BOX)", "Image.BICUBIC)", CROP),
    # Image modes that PIL's convert("RGB") clips (16-bit and float greys), and folders named like images.
    Mutation("crop_clips_16_bit_to_white", "appendix.py", "to_rgb", 'if img.mode in ("I", "F") or',
             "if False and", IMAGES),
    Mutation("folders_listed_as_images", "appendix.py", "ImageFolder.__init__", "and os.path.isfile(f)]", "]",
             IMAGES),
    # AdamW as built, and the --data defaults against App. C.
    Mutation("adamw_no_weight_decay", "purr.py", "SETTINGS", "weight_decay=0.01", "weight_decay=0.0",
             SETTINGS),
    Mutation("adamw_betas", "purr.py", "SETTINGS", "beta2=0.999", "beta2=0.99", SETTINGS),
    Mutation("adamw_ignores_the_betas", "purr.py", "adamw", 'betas=(cfg["beta1"], cfg["beta2"])',
             "betas=(0.9, 0.99)", SETTINGS),
    Mutation("adamw_eps_default", "purr.py", "SETTINGS", "adam_eps=1e-6", "adam_eps=1e-8", SETTINGS),
    Mutation("data_lr_default", "purr.py", "SETTINGS", "lr=1e-4", "lr=3e-4", SETTINGS),
    Mutation("data_ema_default", "purr.py", "SETTINGS", "ema_decay=0.9999", "ema_decay=0.999", SETTINGS),
    Mutation("data_zloss_default", "purr.py", "SETTINGS", "z_loss=1e-5", "z_loss=1e-4", SETTINGS),
    # The settings of a run: flags given over the checkpoint's over the defaults; old checkpoints.
    Mutation("resume_ignores_the_checkpoints_settings", "purr.py", "resolve_config",
             'cfg.update({k: v for k, v in saved_settings(ckpt).items() if k in SETTINGS})', "pass",
             RESUME_SETTINGS),
    Mutation("legacy_settings_ignored", "purr.py", "saved_settings", "return {**LEGACY, **ckpt[\"args\"]}",
             "return dict(ckpt[\"args\"])", RESUME_SETTINGS),
    Mutation("demo_defaults_for_data_runs", "purr.py", "resolve_config", '.get("data") is None',
             '.get("data") is None or True', RESUME_SETTINGS),
    # Sampling as `sample` runs it: guidance in place, the EMA weights, each image's noise from its index,
    # what --compile compiles, the entropy map on every rank and at an evaluated time.
    Mutation("cfg_in_place_swapped", "purr.py", "DiT.forward_with_cfg", "uncond.lerp_(cond, cfg_scale)",
             "cond.lerp_(uncond, cfg_scale)", f"test_guided_sampling_is_the_formula or {SAMPLER}"),
    Mutation("sample_from_live_weights", "purr.py", "load_sampler", 'model.load_state_dict(ckpt["ema"])',
             'model.load_state_dict(ckpt["model"])', SAMPLE),
    Mutation("sample_noise_per_batch", "purr.py", "image_noise",
             "seeds = [seed * 10_000_019 + j for j in indices]",
             "seeds = [seed * 10_000_019 + j - indices[0] for j in indices]", SAMPLE),
    Mutation("compile_a_wrapper_sampling_never_calls", "purr.py", "compile_in_place",
             "model.compile() return model", "return torch.compile(model)",
             "test_sample_and_bench_compile or test_bench_prints"),
    Mutation("entropy_map_of_rank_0_only", "purr.py", "write_entropy_map",
             'shards = [f"{args.out}.rank{r}.entropy.npy" for r in range(world)]',
             'shards = [f"{args.out}.rank{r}.entropy.npy" for r in range(1)]',
             f"{SAMPLE} or test_entropy_map"),
    Mutation("entropy_t_unchecked", "purr.py", "check_sample_args",
             "if args.entropy_map and not 0 <= args.entropy_t <= last:", "if False:",
             "test_entropy_map or test_bad_sample_arguments"),
    # Resuming a demo run: its tokenizer comes from the checkpoint.
    Mutation("demo_resume_refits_the_tokenizer", "purr.py", "open_data",
             'vqlib.load_tokenizer("tiny", resumed) if resumed else', "",
             f"test_a_resumed_demo_run_keeps or test_sigterm_saves or test_resume_with_other or {RESUME}"),
    # Data: a new order each epoch, the replacement's label, the unreadable-file limit; the logged mean.
    Mutation("epoch_order_repeats", "appendix.py", "epoch_plan", "seed * 100_003 + epoch", "seed * 100_003",
             "test_global_batch_plan or test_rank_batches_slice or " + RESUME),
    Mutation("replacement_gets_the_unreadable_files_label", "appendix.py", "ImageFolder.__getitem__",
             "return x, self.labels[j], bad", "return x, self.labels[i], bad",
             "test_an_unreadable_files_replacement or test_unreadable_images_are_named or test_extract"),
    Mutation("unreadable_limit_one_percent", "appendix.py", "Unreadable.__init__", "len(data) // 1000",
             "len(data) // 100", "test_unreadable_images_stop_the_run_past or test_too_many_unreadable"),
    Mutation("log_sums_over_ranks", "appendix.py", "Log.add", "/ (self.world * n)", "/ n",
             f"test_logged_losses_are_means or test_short_demo_training or {DDP}"),
    # Precision: mu and the nearest codes in full fp32 (no bf16 autocast, no TF32).
    Mutation("mu_under_autocast", "purr.py", "posterior_mean",
             "torch.autocast(logits.device.type, enabled=False),", "contextlib.nullcontext(),",
             f"test_mu_is_full_fp32 or test_guided_bf16_sampling or {SAMPLER}"),
    Mutation("mu_in_tf32", "purr.py", "posterior_mean", ", vqlib.full_fp32():", ":",
             f"test_mu_is_full_fp32 or test_guided_bf16_sampling or {SAMPLER}"),
    Mutation("nearest_code_in_tf32", "vq.py", "nearest_code", "@full_fp32()", "",
             "test_nearest_codes_are_found or test_quantize_inverts or test_matches_original_outputs"),
    # FID: torch-fidelity's covariance, the unbiased estimator.
    Mutation("fid_covariance_biased", "fid.py", "moments", "np.cov(feats, rowvar=False)",
             "np.cov(feats, rowvar=False, bias=True)",
             f"test_fid_covariance or {FID} or test_fid_frechet_distance"),
]


def repo_files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def copy_repo(dest, tests_file=None):
    for f in repo_files():
        os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    if tests_file:  # another version of the suite (e.g. an older one, for a before/after score)
        shutil.copy2(tests_file, os.path.join(dest, "test_purr.py"))


def pytest_args(tests):
    return ["-k", tests] if isinstance(tests, str) else list(tests)


def run_tests(folder, tests, timeout, tag, deselect=()):
    """{test name: passed?} of the selected tests in folder, or None on timeout; the seconds taken; the
    output's tail. With `deselect` (tests failing unmutated, left out) it stops at the first failure."""
    xml = os.path.join(folder, f".mutate-{tag}.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "test_purr.py",
           *pytest_args(tests), *(["-x"] if tag != "base" else []),
           *(f"--deselect=test_purr.py::{t}" for t in deselect)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.time() - t0, "timeout"
    results = {}
    if os.path.isfile(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = any(child.tag in ("failure", "error") for child in case)
            skipped = any(child.tag == "skipped" for child in case)
            if not skipped:
                results[case.get("name")] = not bad
    return results, time.time() - t0, proc.stdout[-2000:] + proc.stderr[-2000:]


def definitions(tree):
    """{qualified name: (first line, last line)} of the functions, classes (with their decorators) and
    module-level assignments of a parsed file."""
    spans = {}

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                spans[prefix + node.name] = (first, node.end_lineno)
                walk(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not prefix:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        spans[target.id] = (node.lineno, node.end_lineno)
    walk(tree.body, "")
    return spans


def locate(text, m):
    """(start, end) offsets in text of m.old within the definition m.where, or ValueError why not."""
    spans = definitions(ast.parse(text))
    if m.where not in spans:
        raise ValueError(f"{m.name}: no definition {m.where} in {m.file}")
    lines = text.splitlines(keepends=True)
    first, last = spans[m.where]
    base = sum(map(len, lines[:first - 1]))
    source = "".join(lines[first - 1:last])
    found = list(re.finditer(r"\s*".join(map(re.escape, m.old.split())), source))
    if len(found) != 1:
        raise ValueError(f"{m.name}: the old text occurs {len(found)} times in {m.file}'s {m.where}, "
                         "not once")
    return base + found[0].start(), base + found[0].end()


def apply(folder, m):
    path = os.path.join(folder, m.file)
    text = open(path).read()
    start, end = locate(text, m)
    with open(path, "w") as f:
        f.write(text[:start] + m.new.strip() + text[end:])


def mutant(m, base, timeout, tests_file=None):
    """(status, detail, seconds) of one mutation, run in a fresh copy of the repository."""
    with tempfile.TemporaryDirectory(prefix=f"purr-mutant-{m.name}-") as folder:
        copy_repo(folder, tests_file)
        try:
            apply(folder, m)
        except ValueError as e:
            return "ERROR", str(e), 0.0
        failing = [t for t, ok in base.items() if not ok]
        results, secs, log = run_tests(folder, m.tests, timeout, m.name, failing)
    if results is None:
        return "KILLED", f"timeout after {timeout}s", secs
    killed = sorted(t for t, ok in results.items() if not ok and base.get(t, True))
    if killed:
        return "KILLED", "by " + ", ".join(killed), secs
    if not results:  # e.g. a suite without the tests meant for it
        return "SURVIVED", "no test selected: " + " ".join(log.split())[-120:], secs
    return "SURVIVED", f"{len(results)} tests passed", secs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    p.add_argument("-j", type=int, default=1, metavar="N", help="mutations run at once (default 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutation's test run (default 900)")
    p.add_argument("--tests", metavar="FILE",
                   help="run this file as test_purr.py (default: the repository's)")
    a = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not a.only or m.name in a.only]
    unknown = set(a.only or []) - {m.name for m in MUTATIONS}
    if unknown:
        p.error(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
    if a.list:
        for m in chosen:
            print(f"{m.name}: {m.file}, {m.where}: {m.old!r} -> {m.new!r}\n    tests: {m.tests}")
        return
    # The unmutated baseline of every test the chosen mutations run: a test failing there kills nothing.
    with tempfile.TemporaryDirectory(prefix="purr-mutant-baseline-") as folder:
        copy_repo(folder, a.tests)
        for m in chosen:
            try:
                locate(open(os.path.join(folder, m.file)).read(), m)
            except ValueError as e:
                print(f"warning: {e}", flush=True)
        exprs = sorted({m.tests for m in chosen if isinstance(m.tests, str)})
        ids = sorted({t for m in chosen if not isinstance(m.tests, str) for t in m.tests})
        base = {}
        for sel in ([" or ".join(f"({e})" for e in exprs)] if exprs else []) + ([ids] if ids else []):
            r, secs, log = run_tests(folder, sel, a.timeout * 4, "base")
            if r is None:
                sys.exit(f"the unmutated tests took more than {a.timeout * 4:.0f}s")
            base.update(r)
    failing = sorted(t for t, ok in base.items() if not ok)
    print(f"baseline: {len(base)} tests, {len(failing)} failing unmutated"
          + (f" ({', '.join(failing)})" if failing else ""), flush=True)
    killed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, a.j)) as pool:
        futures = [pool.submit(mutant, m, base, a.timeout, a.tests) for m in chosen]
        for m, fut in zip(chosen, futures):
            status, detail, secs = fut.result()
            killed += status == "KILLED"
            print(f"{status:8s} {m.name} ({m.file}, {secs:.0f}s): {detail}", flush=True)
    print(f"killed {killed} of {len(chosen)}")


if __name__ == "__main__":
    main()
