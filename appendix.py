"""purr's appendix: the plumbing under purr.py's training and sampling, out of the method's way.

Data (the built-in demo images, image and token folders, `extract`'s loop, the seeded batch plan), processes
(precision, torchrun, signals), checkpoints and logs, and image outputs (grids, entropy maps, ADM sample
batches). Nothing here knows the method or the tokenizers; vq.py takes its image crop from here.
"""
import contextlib
import ctypes
import datetime
import functools
import glob
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


class PurrError(Exception):
    """A problem with the user's input: printed as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------
# Data: the built-in demo images, image folders, token folders (and `purr.py extract`), the batch plan.

IMAGE_EXTS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # compared lower-case (ImageNet's .JPEG)

DEMO_CLASSES = ["circle", "square", "triangle", "diamond", "plus", "cross", "ring", "frame", "star", "bars"]


def draw_shape(draw, cls, cx, cy, r, color):
    w = max(2, r // 2)  # stroke width of the line-drawn classes
    box = (cx - r, cy - r, cx + r, cy + r)
    if cls == "circle":
        draw.ellipse(box, fill=color)
    elif cls == "square":
        draw.rectangle(box, fill=color)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    elif cls == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif cls == "plus":
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
    elif cls == "cross":
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=color, width=2 * w)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=color, width=2 * w)
    elif cls == "ring":
        draw.ellipse(box, outline=color, width=w)
    elif cls == "frame":
        draw.rectangle(box, outline=color, width=w)
    elif cls == "star":
        pts = [(cx + (r if i % 2 == 0 else r * 0.4) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.4) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(pts, fill=color)
    else:  # bars: three horizontal stripes
        for k in (-1, 0, 1):
            draw.rectangle((cx - r, cy + k * 2 * w - w // 2, cx + r, cy + k * 2 * w + w // 2), fill=color)


def demo_dataset(n=10000, size=32, seed=0):
    """Deterministic class-conditional images: one shape of a random colour, size and position on
    black, drawn 4x larger and downsampled (anti-aliased). Returns uint8 [n,3,size,size], labels [n]."""
    rng = np.random.default_rng(seed)
    s = 4 * size
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.arange(n) % len(DEMO_CLASSES)
    for i, cls in enumerate(labels):
        r = int(rng.uniform(0.22, 0.4) * s)
        cx, cy = rng.integers(r + 2, s - r - 2, size=2)
        hue = rng.uniform(0, 6)
        rgb = np.clip(np.abs((hue + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)  # HSV with s = v = 1
        color = tuple(int(v) for v in 255 * (0.3 + 0.7 * rgb))
        im = Image.new("RGB", (s, s))
        draw_shape(ImageDraw.Draw(im), DEMO_CLASSES[cls], int(cx), int(cy), r, color)
        images[i] = np.asarray(im.resize((size, size), Image.LANCZOS))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def to_unit(images):  # uint8 [0,255] -> float [-1,1]
    return images.float() / 127.5 - 1


def to_rgb(img):
    """img as 8-bit RGB. PIL's convert("RGB") clips 16-bit greys (PNG's I;16, or I) and float ones (F) to
    white: scale those from 0..65535 and 0..1. Palette transparency goes through RGBA, as PIL asks."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        grey = np.asarray(img, np.float64) * (255 if img.mode == "F" else 255 / 65535)
        img = Image.fromarray(grey.clip(0, 255).round().astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def center_crop(img, size):
    """ADM's center crop, purr's training crop (also vq.py's recon; fid.py has its own, equal): to
    RGB first (to_rgb; PIL resizes palette images nearest-neighbour), halve with a box filter while the image
    is at least 2x too large, resize bicubic so the short side is `size`, cut the center square."""
    img = to_rgb(img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


class ImageFolder(torch.utils.data.Dataset):
    """ImageNet layout: root/<class>/<image>; classes sorted by name. Items are (index, flip). Under
    torch.distributed, rank 0 alone lists the folder (list_images) and sends the list to the other ranks:
    32 ranks each listing 1.28M files at once load a shared filesystem for minutes."""

    def __init__(self, root, size):
        self.classes, names = on_rank_0(list_images, root)
        self.files = [(os.path.join(root, d, f), y) for y, d in enumerate(self.classes) for f in names[y]]
        self.size, self.num_classes = size, len(self.classes)
        self.labels = torch.tensor([y for _, y in self.files])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        """(image, label, unreadable files met): an unreadable file is replaced by the next readable one in
        the folder's order, a function of the index alone, so the run stays reproducible on any number of
        processes. The label is the replacement's."""
        i, flip = item
        bad = []
        for j in itertools.chain(range(i, len(self)), range(i)):
            try:
                with Image.open(self.files[j][0]) as im:
                    arr = center_crop(im, self.size)
                break
            except Exception as e:  # whatever a damaged file makes Pillow raise
                said = str(e).splitlines()[0] if str(e) and self.files[j][0] not in str(e) else ""
                bad.append((j, f"{type(e).__name__}{': ' + said if said else ''}"))
        else:
            raise PurrError(f"no image in {len(self)} files of --data can be read")
        x = torch.from_numpy(np.array(arr[:, ::-1] if flip else arr)).permute(2, 0, 1)  # a writable copy
        return x, self.labels[j], bad


def list_images(root):
    """(classes, the image names of each class) of an ImageNet layout, sorted: one scan of each folder, whose
    entries' types need no stat of the files on most filesystems. Hidden files are skipped, as glob does."""
    if not os.path.isdir(root):
        raise PurrError(f"--data {root}: no such folder; give an image folder with one sub-folder per class")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    names = []
    for d in classes:
        with os.scandir(os.path.join(root, d)) as entries:
            names.append(sorted(e.name for e in entries if not e.name.startswith(".")  # not a folder x.jpg
                                and e.name.lower().endswith(IMAGE_EXTS) and e.is_file()))
    if not any(names):
        raise PurrError(f"--data {root}: no images found; expected {root}/<class>/<image>.png|jpg "
                        "(one sub-folder per class)")
    return classes, names


def on_rank_0(fn, *args):
    """fn(*args) computed by rank 0 and sent to every rank when torch.distributed is initialised (fn's
    PurrError is raised on every rank), else computed here."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn(*args)
    box = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = fn(*args)
        except PurrError as e:
            box[0] = e
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], PurrError):
        raise box[0]
    return box[0]


class TokenFolder(torch.utils.data.Dataset):
    """Pre-encoded data: tokens [N,2,h,w] (the image and its horizontal flip), labels [N]; each an array in
    memory (the demo's) or the path of a .npy file (a token folder's), memory-mapped in each process on first
    use. A pickled TokenFolder (what a DataLoader worker gets under spawn or forkserver) holds the paths,
    not the maps: NumPy pickles a memory map with all its data, 5 GB for ImageNet's tokens."""

    def __init__(self, tokens, labels, num_classes):
        self.sources, self.num_classes = {"tokens": tokens, "labels": labels}, num_classes
        self.maps = {}
        self.n = len(self.array("labels"))

    def array(self, name):
        """The tokens or the labels: the array itself, or its file's map, opened once per process."""
        if name not in self.maps:
            src = self.sources[name]
            self.maps[name] = np.load(src, mmap_mode="r") if isinstance(src, (str, os.PathLike)) else src
        return self.maps[name]

    def __getstate__(self):
        return {**self.__dict__, "maps": {}}

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        i, flip = item
        tokens = torch.from_numpy(np.asarray(self.array("tokens")[i, flip], dtype=np.int64))
        return tokens, torch.as_tensor(self.array("labels")[i], dtype=torch.int64), []


@functools.lru_cache(maxsize=2)
def epoch_plan(n, epoch, seed):
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g), torch.randint(0, 2, (n,), generator=g)


def global_batch_plan(n, step, global_batch, seed):
    """(index, flip) of every sample of the global batch at `step`. Each epoch is a seeded permutation
    with seeded flips, so the data position is a function of the step alone: resuming needs no loader
    state and the result does not depend on the number of processes."""
    pos = step * global_batch + torch.arange(global_batch)
    idx, flip = torch.empty_like(pos), torch.empty_like(pos)
    for e in (pos // n).unique().tolist():
        perm, flips = epoch_plan(n, e, seed)
        at = pos // n == e
        idx[at] = perm[pos[at] % n]
        flip[at] = flips[idx[at]]
    return idx, flip


class RankBatches(torch.utils.data.Sampler):
    """This rank's slice of every global batch from step `start` on, as lists of (index, flip)."""

    def __init__(self, n, start, steps, global_batch, rank, world, seed):
        self.n, self.start, self.steps, self.global_batch, self.seed = n, start, steps, global_batch, seed
        self.rank, self.world = rank, world

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        per_rank = self.global_batch // self.world
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        for step in range(self.start, self.steps):
            idx, flip = global_batch_plan(self.n, step, self.global_batch, self.seed)
            yield list(zip(idx[rows].tolist(), flip[rows].tolist()))


def collate(items):
    """A rank's batch: stacked images (or tokens), labels, and the unreadable files met (index, why)."""
    x, y, bad = zip(*items)
    return torch.stack(x), torch.stack(y), [b for part in bad for b in part]


def split_batch(global_batch, world, grad_accum, micro_batch_size):
    """(this process's share, micro-batches per step) of the global batch."""
    if global_batch % world:
        raise PurrError(f"--global-batch-size {global_batch} is not divisible by the {world} processes")
    per_rank = global_batch // world
    n = per_rank // micro_batch_size if micro_batch_size else grad_accum
    if n < 1 or per_rank % n or (micro_batch_size and per_rank % micro_batch_size):
        parts = f"micro-batches of {micro_batch_size}" if micro_batch_size else f"{n} equal micro-batches"
        raise PurrError(f"--global-batch-size {global_batch} on {world} process(es) is {per_rank} per "
                        f"process, which does not split into {parts}; choose a divisor")
    return per_rank, n


class Unreadable:
    """The unreadable images met so far, over all ranks: each reported once (rank 0, stderr), counted in
    the log; past max(5, 0.1 % of the data) the run stops with one line naming the first few."""

    def __init__(self, data, world):
        self.data, self.world, self.seen = data, world, {}
        self.limit = max(5, len(data) // 1000)

    def fresh(self, bad):
        """This rank's (index, why) not reported yet; the caller agrees across ranks whether any exist."""
        return [b for b in bad if b[0] not in self.seen]

    def add(self, mine, rank):
        gathered = [mine]
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, mine)
        for i, why in sorted(set(b for part in gathered for b in part)):
            if i not in self.seen and rank == 0:
                print(f"unreadable image {self.data.files[i][0]} ({why}): replaced by the next readable file",
                      file=sys.stderr, flush=True)
            self.seen[i] = why
        if len(self.seen) > self.limit:
            first = ", ".join(self.data.files[i][0] for i in sorted(self.seen)[:5])
            raise PurrError(f"{len(self.seen)} unreadable images in --data (more than {self.limit}), "
                            f"e.g. {first}: fix or remove them")


def extract_tokens(data, tok, out, meta, batch_size, num_workers, rank, world, device):
    """`purr.py extract`: every image of an ImageFolder and its horizontal flip, encoded once into the token
    folder `out`: tokens.npy (uint16 [N,2,h,w], memory-mapped by training), labels.npy, meta.json, and
    done.npy, which makes an interrupted run resumable: a run encodes only the rows not done. Rank r encodes
    the r-th contiguous block of rows and writes exactly their bytes (NpyRows); a row is marked done only
    once its tokens and label are on disk."""
    h = meta["image_size"] // tok.downsample
    token_folder(out, meta, data, h, rank, world)
    block = range(rank * len(data) // world, (rank + 1) * len(data) // world)  # this rank's rows
    done = np.load(os.path.join(out, "done.npy"))
    todo = [(i, 0) for i in block if not done[i]]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=collate, worker_init_fn=ignore_stop_signals)
    # Each file is this rank's alone, so unreadable ones are reported and counted per rank, and a signal
    # stops each rank at its next batch boundary without waiting for the others.
    unreadable, progress = Unreadable(data, 1), Progress("extract", len(todo) * world, len(todo), "images")
    files = {k: NpyRows(os.path.join(out, k + ".npy")) for k in ("tokens", "labels", "done")}
    with stop_requests() as stop, contextlib.ExitStack() as closing:
        for f in files.values():
            closing.callback(f.close)
        for (x, y, bad), items in zip(loader, batches):
            unreadable.add(unreadable.fresh(bad), 0)
            idx = [i for i, _ in items]
            x = to_unit(x.to(device))
            c = torch.stack([tok.encode(x), tok.encode(x.flip(3))], 1)
            files["tokens"].write(idx, c.cpu().numpy())
            files["labels"].write(idx, y.numpy())  # a replacement's label
            files["tokens"].sync()
            files["labels"].sync()
            files["done"].write(idx, np.ones(len(idx), bool))  # only after the tokens are on disk
            if rank == 0:
                progress.update(len(idx))
            if stop:
                files["done"].sync()
                n = int(np.load(os.path.join(out, "done.npy")).sum())
                print(f"extract: stopped by signal on rank {rank} with {n}/{len(data)} images done; rerun "
                      "the same command to finish", flush=True)
                return
        files["done"].sync()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"extract: {len(data)} images x 2 flips -> {out} ({h}x{h} tokens of {meta['vq']}), "
              f"{len(unreadable.seen)} unreadable replaced on rank 0")


class NpyRows:
    """Rows of an .npy file written in place with os.pwrite: exactly their bytes. Ranks on several nodes
    share the file's pages (a token row is 4 KB, behind a 128-byte header; done.npy holds 4096 rows a page);
    a shared memory map writes back whole pages, so one node's write-back could overwrite rows that
    another node wrote into the same page."""

    def __init__(self, path):
        m = np.load(path, mmap_mode="r")
        self.offset, self.dtype, self.shape = m.offset, m.dtype, m.shape
        self.row = m.dtype.itemsize * math.prod(m.shape[1:])
        del m
        self.fd = os.open(path, os.O_RDWR)

    def write(self, rows, values):
        """values[j] into row rows[j] (increasing), one write per run of consecutive rows."""
        values = np.ascontiguousarray(values, self.dtype).reshape(len(rows), *self.shape[1:])
        start = 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or rows[end] != rows[end - 1] + 1:
                data = memoryview(values[start:end].tobytes())
                at = self.offset + rows[start] * self.row
                while data:  # pwrite may write less than asked
                    n = os.pwrite(self.fd, data, at)
                    data, at = data[n:], at + n
                start = end

    def sync(self):
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def token_folder(out, meta, data, h, rank, world):
    """Creates the token folder `out` on rank 0 in the first run: zero tokens, the folder's labels, meta.json
    and done.npy (all False), the last one last."""
    paths = {k: os.path.join(out, k + ".npy") for k in ("tokens", "labels", "done")}
    if rank == 0 and not os.path.isfile(paths["done"]):
        os.makedirs(out, exist_ok=True)
        np.lib.format.open_memmap(paths["tokens"], "w+", np.uint16, (len(data), 2, h, h)).flush()
        np.save(paths["labels"], data.labels.numpy())
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        np.save(paths["done"], np.zeros(len(data), bool))
    if world > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Processes, precision and signals.

def default_precision():
    """bf16 where the hardware runs it fast: a CUDA GPU with bf16, or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16, AMX); elsewhere (an AVX2-only CPU runs bf16 matmuls ~30x slower) fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if cpu_bf16 else "fp32"


def keep_freed_memory():
    """glibc hands freed blocks of a few MB back to the OS, so every step's K-wide CPU tensors fault their
    pages in afresh (~4,000 page faults a demo step, ~15 % of its time). Keep them in the process instead."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(M_TOP_PAD, 64 << 20)


def tf32(enabled=None):
    """Whether CUDA's fp32 matrix products and convolutions run in TF32, as a pair (matmul, conv); with
    `enabled` (a bool, or such a pair) set first, and the pair from before returned, so that tf32(before)
    restores it. Through the fp32_precision settings where torch has them (2.9 on): it deprecates the
    allow_tf32 flags, and raises when a process mixes the two."""
    new = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv if new else torch.backends.cudnn)
    before = tuple(f.fp32_precision == "tf32" if new else f.allow_tf32 for f in flags)
    if enabled is not None:
        for f, on in zip(flags, (enabled, enabled) if isinstance(enabled, bool) else enabled):
            if new:
                f.fp32_precision = "tf32" if on else "ieee"
            else:
                f.allow_tf32 = on
    return before


@contextlib.contextmanager
def full_fp32():
    """fp32 matrix products and convolutions in full fp32 inside, whatever TF32 is outside (purr turns it
    on for the DiT): TF32's 10-bit mantissa would break the tokenizers' near-ties, move mu and Inception's
    features."""
    before = tf32(False)
    try:
        yield
    finally:
        tf32(before)


DIST_TIMEOUT = 60  # minutes a rank waits in a collective: the others wait so while rank 0 saves 12 GB


def setup_distributed(timeout=DIST_TIMEOUT):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (also across nodes): whenever it started the process, one
    process included, the process group is set up (NCCL on GPUs, gloo on CPUs), with a collective timeout of
    `timeout` minutes. TF32 matmuls for fp32 work on GPUs (train and sample alike)."""
    tf32(True)
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                         timeout=datetime.timedelta(minutes=timeout))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def sum_over_ranks(world, device, *flags, late=False):
    """All ranks see the sum of each flag (a number, or a one-element tensor on the device) over ranks: one
    small all-reduce. late: a function that reads the sums later (to_host_later): the host need not wait."""
    t = torch.stack([f.reshape(()).float() if torch.is_tensor(f) else torch.full((), float(f), device=device)
                     for f in flags])
    if world > 1:
        torch.distributed.all_reduce(t)
    return to_host_later(t) if late else t.tolist()


def to_host_later(t):
    """A function that returns t's values as a list. On CUDA the copy into pinned memory is queued now, behind
    the work that makes t, and the function waits for that work only: read after the next step is queued, the
    device never waits for the host."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read():
        copied.synchronize()
        return host.tolist()
    return read


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # preemption, scancel, time limits, Ctrl-C


@contextlib.contextmanager
def stop_requests():
    """Record SIGTERM/SIGINT/SIGUSR1 instead of dying: the loop finishes its step and saves. SLURM signals
    every process of the job, DataLoader workers too: they ignore them (ignore_stop_signals)."""
    got = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in STOP_SIGNALS}
    try:
        yield got
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id=None):
    """A DataLoader worker's start (worker_init_fn): a stop signal is the trainer's to handle, after the
    step; a worker killed by one would fail the step before the save."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs.

def checkpoint_paths(folder):
    return sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True), key=os.path.getmtime)


def load_checkpoint(path):
    if path is None or not os.path.isfile(path):
        raise PurrError(f"checkpoint {path} not found; pass --ckpt PATH to a .pt file saved by "
                        "'purr.py train' (they live in results/<run>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        older = [p for p in checkpoint_paths(os.path.dirname(path)) if p != path]
        hint = f"; the previous one is {older[-1]}" if older else ""
        raise PurrError(f"checkpoint {path} cannot be read ({type(e).__name__}: it is truncated or not a "
                        f"purr checkpoint){hint}") from None
    missing = {"model", "ema", "args", "step", "vq"} - set(ckpt) if isinstance(ckpt, dict) else {"everything"}
    if missing:
        raise PurrError(f"{path} is not a purr checkpoint (no {', '.join(sorted(missing))})")
    return ckpt


def save_checkpoint(obj, path, keep=None):
    """Atomic and durable: written beside, flushed to disk, renamed, and the rename flushed, so an
    interrupted or failed save (or a node lost right after it) never replaces a good checkpoint. Only then
    keep the newest `keep` checkpoints of the folder (all if None)."""
    folder = os.path.dirname(path)
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fsync_folder(folder)
    except (OSError, RuntimeError) as e:  # disk full, read-only, quota: torch reports some as RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        previous = sorted(glob.glob(os.path.join(folder, "*.pt")))
        free_gib = shutil.disk_usage(folder).free / 2 ** 30
        raise PurrError(f"cannot write checkpoint {path} ({str(e).splitlines()[0]}); "
                        f"{free_gib:.1f} GiB free there; the previous checkpoint "
                        f"{previous[-1] if previous else '(none)'} is intact") from None
    for old in sorted(glob.glob(os.path.join(folder, "*.pt")))[:-keep] if keep else []:
        os.remove(old)


def fsync_folder(folder):
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_run_dir(results, model):
    os.makedirs(results, exist_ok=True)
    run = os.path.join(results, f"{len(glob.glob(os.path.join(results, '*'))):03d}-{model.replace('/', '-')}")
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    return run


def save_run(run, step, model, ema, opt, cfg, tok, rank, world, device, last_saved):
    """Rank 0 saves a checkpoint (never one of non-finite weights); every rank learns whether it worked."""
    path, error = os.path.join(run, "checkpoints", f"{step:07d}.pt") if run else None, ""
    if rank == 0:
        try:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise PurrError(f"the weights are not finite at step {step}; not saving them; the last good "
                                f"checkpoint is {last_saved or '(none)'}: resume from it with a lower --lr")
            save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                             "args": cfg, "step": step, "vq": tokenizer_spec(tok, cfg)}, path, cfg["keep"])
            print(f"saved {path}", flush=True)
        except PurrError as e:
            error = str(e)
    if sum_over_ranks(world, device, bool(error))[0]:
        raise PurrError(error or "rank 0 could not save a checkpoint (see its message)")
    return path


def tokenizer_spec(tok, cfg):
    """How sampling finds the tokenizer again: the tiny one travels whole, real ones by name and path."""
    if tok.name == "tiny":
        return {"name": "tiny", "config": tok.config(), "state": tok.state_dict()}
    return {"name": cfg["vq"], "ckpt": os.path.abspath(cfg["vq_ckpt"])}


class Log:
    """Mean losses over ranks and steps since the last line; a line on stdout and in log.jsonl (rank 0). The
    sums stay on the device; a line's means reach the host behind its step (to_host_later) and are written at
    the next add or at flush, so that logging never makes the host wait for the device."""

    def __init__(self, run, world, global_batch, step):
        self.run, self.world, self.global_batch = run, world, global_batch
        self.last, self.sums, self.t0, self.line = step, 0, time.time(), None

    def add(self, step, losses, unreadable, final):
        self.flush()
        self.sums = self.sums + torch.stack(list(losses.values()))
        if not final:
            return
        if self.world > 1:
            torch.distributed.all_reduce(self.sums)
        dt, n = time.time() - self.t0, step - self.last
        rest = {"images": step * self.global_batch, "steps_per_s": n / dt,
                "images_per_s": self.global_batch * n / dt, "unreadable": unreadable}
        self.line = step, list(losses), rest, to_host_later(self.sums / (self.world * n))
        self.sums, self.t0, self.last = 0, time.time(), step

    def flush(self):
        """Writes the last line, if it is not written yet."""
        if self.line is None:
            return
        (step, names, rest, means), self.line = self.line, None
        rec = {"step": step, **dict(zip(names, means())), **rest}
        if self.run:
            print("  ".join(f"{k} {v:.4g}" for k, v in rec.items()), flush=True)
            with open(os.path.join(self.run, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")


class Progress:
    """`name: N/M unit, X unit/s, ETA ...` on stderr at most every `every` seconds and at the end. Rank 0
    counts its own share and scales it to all ranks' (the shards are equal to within one batch)."""

    def __init__(self, name, total, mine, unit, every=30.0):
        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.scale = total / max(mine, 1)
        self.done, self.t0 = 0, time.time()
        self.last = self.t0

    def update(self, n):
        self.done += n
        now = time.time()
        finished = round(self.done * self.scale) >= self.total
        if now - self.last >= self.every or finished:
            self.last = now
            done = min(round(self.done * self.scale), self.total)
            rate = self.done * self.scale / (now - self.t0)
            eta = ("done" if finished
                   else f"ETA {datetime.timedelta(seconds=round((self.total - done) / rate))}")
            print(f"{self.name}: {done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, {eta}",
                  file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Image outputs: grids, entropy maps, ADM sample batches.

def save_grid(images, rows, path):
    """uint8 [N,3,H,W] -> one PNG, `rows` rows (one per class), 2-pixel gaps."""
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), np.uint8)
    for i, im in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = im
    Image.fromarray(grid).save(path)


def heat_map(x, size):
    """Values in [0, 1], [N,h,w] -> uint8 'hot' colour map [N,3,size,size] (black, red, yellow, white)."""
    x = F.interpolate(x[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    return (255 * torch.stack([3 * x, 3 * x - 1, 3 * x - 2], 1).clamp(0, 1)).to(torch.uint8)


def write_adm_npz(path, shards, labels):
    """ADM's sample batch (arr_0: N x H x W x 3 uint8, arr_1: labels), streamed from the ranks' .npy
    shards so that 50k images at 256^2 (9.8 GB) never sit in memory at once."""
    arrays = [np.load(s, mmap_mode="r") for s in shards]
    header = {"descr": "|u1", "fortran_order": False, "shape": (sum(map(len, arrays)), *arrays[0].shape[1:])}
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for a in arrays:
                for i in range(0, len(a), 256):
                    f.write(np.ascontiguousarray(a[i:i + 256]).tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, np.int64))
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Timing and memory, for `purr.py bench`.

def timed(device, warmup, n, run, per_call=False):
    """Milliseconds per unit of run(n) after run(warmup): the median of n single calls with per_call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    run(warmup)
    times = []
    for k in [1] * n if per_call else [n]:
        sync()
        t0 = time.perf_counter()
        run(k)
        sync()
        times.append((time.perf_counter() - t0) / k)
    return 1000 * float(np.median(times))


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB peak allocated"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB peak RSS"
