"""Speed and memory benchmark of the pipeline: one table of figures, ratios and targets.

    .venv/bin/python tools/bench.py                 # everything, at 5,000 and 50,000 images too (long on a CPU)
    .venv/bin/python tools/bench.py --sizes=5000    # the generated folders to measure at (comma-separated)
    .venv/bin/python tools/bench.py --quick         # about a minute: no memory run, no run_all, no generated folders
    .venv/bin/python tools/bench.py --DEVICE=cpu    # any --KEY=VALUE setting override, as for the other scripts

Reads:  the image folder (DATA_DIR, or the built-in digits) and the settings (configfile.py or --config=FILE).
Writes: only under bench_outputs/: micro/ and e2e/ (its own split, checkpoints, trunk cache and
        outputs, deleted and rebuilt on every run, so a user's run is never touched), numba/
        (numba's compiled code, kept between benchmark runs), and the figures as bench.json.

Figures:
  limit       trunk forward throughput on tensors already on the device (images/s)
  epoch       one head-training epoch over the train split, trunk features cached vs from images
  head pass   one eval-mode head pass over the cached training features (a validation pass's work):
              at BATCH_SIZE vs in batches sized for the device (training.inference_batch_size)
  embed       dataloader.compute_trunk_features over every image (decode + trunk) vs the limit
  distances   fast class-pair distances vs scipy cdist per pair, 20,000 x 128 synthetic points
  memory      peak RSS of the fast distances on 200,000 x 128 points, in a child process
  end to end  run_all.run on fresh folders, stage times, and the UMAP fit time on its embeddings
  at scale    run_all.py in a fresh process on generated folders of 5,000 and 50,000 distinct images
              (the built-in digits shifted, turned, scaled and noised; made once, deterministically),
              first cold (empty cache folder, no compiled code kept) then warm (caches kept):
              every stage's time cold and warm, peak memory, and against the limit (one trunk pass
              over every image at the measured trunk rate) the six study stages cold (<= 1.5x at
              5,000) and the whole cold run (<= 2.5x at 5,000, <= 1.3x at 50,000)
A missed target is reported as MISS; the exit status is 0 either way.
"""
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts and the plankton package
import backbone  # noqa: E402
import compute_average_distances as cad
import dataloader
from dataloader import Runtime
from plankton import (
    embedding_files,
    fileio,
    locations,
    projection,
    provenance,
    runner,
    settings,
    splits,
    system,
    training,
)
from plankton.errors import PipelineError
from plankton.trunk_cache import TrunkCache

BENCH_DIR = system.REPO_DIR / "bench_outputs"
CHILD_FLAG = "--_peak-memory-child"  # hidden: the process whose peak memory is measured
RUN_CHILD_FLAG = "--_run-all-child"  # hidden: a run_all.py run whose stage times and peak memory are measured
SIZES_FLAG = "--sizes="
DEFAULT_SIZES = (5_000, 50_000)
DIST_POINTS, MEMORY_POINTS, DIMS, CLASSES = 20_000, 200_000, 128, 10
LIMIT_SECONDS = 5.0  # time the trunk for at least this long, so one slow batch cannot skew the rate


# ---- settings and folders ------------------------------------------------------------------------

def split_flags(argv: list[str]) -> tuple[set[str], list[str]]:
    """bench.py's own flags, and the --KEY=VALUE / --config= arguments that go to settings.load_settings."""
    own = {a for a in argv if a in ("--quick", CHILD_FLAG, RUN_CHILD_FLAG) or a.startswith(SIZES_FLAG)}
    return own, [a for a in argv if a not in own]


def sizes_asked(flags: set[str], quick: bool) -> list[int]:
    given = [f[len(SIZES_FLAG):] for f in flags if f.startswith(SIZES_FLAG)]
    if not given:
        return [] if quick else list(DEFAULT_SIZES)
    try:
        sizes = [int(n) for n in given[0].split(",") if n]
    except ValueError:
        raise PipelineError(f"{given[0]!r}: --sizes takes image counts separated by commas, e.g. --sizes=5000")
    if any(n < 100 for n in sizes):
        raise PipelineError("--sizes: each folder needs at least 100 images")
    return sizes


def bench_config(cfg: types.SimpleNamespace, name: str) -> types.SimpleNamespace:
    """A copy of the settings whose outputs, checkpoints and caches live in bench_outputs/<name>,
    emptied first: a benchmark must start from nothing and must never write into a user's folders."""
    folder = BENCH_DIR / name
    shutil.rmtree(folder, ignore_errors=True)
    copy = types.SimpleNamespace(**vars(cfg))
    copy.OUTPUT_DIR, copy.CHECKPOINT_DIR, copy.CACHE_DIR = (str(folder / sub) for sub in ("outputs", "checkpoints", "cache"))
    return copy


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for it before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds)."""
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


# ---- the limit: the trunk alone ------------------------------------------------------------------

def with_layout(runtime: Runtime, channels_last: bool) -> Runtime:
    return dataclasses.replace(runtime, channels_last=channels_last)


@torch.inference_mode()
def measure_limit(trunk: torch.nn.Module, image_size: int, runtime: Runtime) -> float:
    """Images/s of dataloader.run_trunk on one batch already on the device (no decoding, no copying)."""
    images = torch.randn(runtime.batch_size, 3, image_size, image_size, device=runtime.device)
    for _ in range(3):  # warm-up: allocator, cuDNN/oneDNN algorithm choice
        dataloader.run_trunk(trunk, images, runtime)
    batches, elapsed = 0, 0.0
    while elapsed < LIMIT_SECONDS or batches < 5:
        _, seconds = timed(lambda: dataloader.run_trunk(trunk, images, runtime), runtime.device)
        batches, elapsed = batches + 1, elapsed + seconds
    return batches * runtime.batch_size / elapsed


def measure_layouts(trunk: torch.nn.Module, image_size: int, runtime: Runtime) -> dict:
    """The limit with the trunk in each memory layout (CHANNELS_LAST is on where this says it pays)."""
    rates = {}
    for layout, memory_format in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        trunk.to(memory_format=memory_format)
        rates[layout] = measure_limit(trunk, image_size, with_layout(runtime, layout == "channels_last"))
    trunk.to(memory_format=torch.channels_last if runtime.channels_last else torch.contiguous_format)
    return rates


# ---- one training epoch, cached vs uncached ------------------------------------------------------

def train_epoch(model, state: dict, source, batches: list, runtime: Runtime, lr: float, seed: int) -> float:
    """Seconds for one epoch of train.py's loop (training.train_one_epoch), from the same starting
    weights and a fresh Adam, with no validation passes."""
    model.load_state_dict(state)
    optimizer = torch.optim.Adam(training.trainable_parameters(model), lr=lr)
    return timed(lambda: training.train_one_epoch(model, optimizer, source, batches, runtime, set(), None, seed=seed),
                 runtime.device)[1]


def measure_epoch(model, split, preprocess, cache, runtime: Runtime, cfg) -> dict:
    """One epoch over the train split, trunk features from the disk cache vs from the images."""
    cached = split.source("train", preprocess, cache)  # fills the cache, untimed
    uncached = split.source("train", preprocess)
    batches = training.epoch_batches(len(cached), cfg.BATCH_SIZE, cfg.SEED, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_epoch(model, state, cached, batches[:3], runtime, cfg.LR, cfg.SEED)  # warm-up of the head's kernels
    seconds_cached = train_epoch(model, state, cached, batches, runtime, cfg.LR, cfg.SEED)
    seconds_uncached = train_epoch(model, state, uncached, batches, runtime, cfg.LR, cfg.SEED)
    model.load_state_dict(state)
    return dict(images=len(cached), cached_s=seconds_cached, uncached_s=seconds_uncached,
                ratio=seconds_uncached / seconds_cached)


def measure_head_pass(model, split, preprocess, cache, runtime: Runtime, repeats: int = 3) -> dict:
    """One eval-mode head pass over the cached training features (what a validation pass runs): at
    BATCH_SIZE, as before issue 24, and in the batches training.inference_batch_size sizes for the
    device; alternated, medians of `repeats`."""
    source = split.source("train", preprocess, cache)
    sized = training.inference_batch_size(source, runtime)
    seconds = {runtime.batch_size: [], sized: []}
    training.head_outputs(model, source, runtime)  # warm-up: the rows in the page cache, the kernels chosen
    for _ in range(repeats):
        for batch in seconds:
            pass_once = lambda: training.head_outputs(model, source, runtime, batch)  # noqa: E731
            seconds[batch].append(timed(pass_once, runtime.device)[1])
    at_batch, at_sized = (float(np.median(seconds[b])) for b in (runtime.batch_size, sized))
    return dict(images=len(source), batch_size=runtime.batch_size, sized_batch=sized, batch_size_s=at_batch,
                sized_s=at_sized, ratio=at_batch / at_sized)


# ---- embed.py's throughput from image files ------------------------------------------------------

def measure_embed(trunk, split, preprocess, limit: float, runtime: Runtime) -> dict:
    """dataloader.compute_trunk_features over every image (decode, resize, trunk), as the cache fill
    of embed.py does it, with NUM_WORKERS loader workers."""
    relpaths = list(split.table.relpath)
    _, seconds = timed(lambda: dataloader.compute_trunk_features(trunk, split.root, relpaths, preprocess, runtime),
                       runtime.device)
    rate = len(relpaths) / seconds
    return dict(images=len(relpaths), seconds=seconds, images_per_s=rate, ratio_to_limit=rate / limit,
                workers=runtime.workers)


# ---- image decoding: can the loader's workers feed the trunk? --------------------------------------

DECODE_IMAGES, DECODE_SIDE = 300, 256  # plankton images from imaging flow cytometers are about this size


def decode_folder(n: int | None = None, side: int = DECODE_SIDE) -> Path:
    """bench_outputs/decode_<side>/: n grey side x side PNGs and as many JPEGs (built-in digits
    enlarged, with noise), written once: the 28-px scale folders decode too fast to say anything."""
    from PIL import Image
    from sklearn.datasets import load_digits
    n = DECODE_IMAGES if n is None else n
    folder = BENCH_DIR / f"decode_{side}"
    if (folder / "COMPLETE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    digits, rng = load_digits(), np.random.default_rng(0)
    for i in range(n):
        base = Image.fromarray((digits.images[i % len(digits.images)] * 15).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        pixels = np.clip(np.asarray(base, np.int16) + rng.integers(0, 24, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.png")
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.jpg", quality=90)
    (folder / "COMPLETE").write_text(f"{n} images of {side} px\n")
    return folder


def tensor_item(path: Path, preprocess: dataloader.Preprocess, mean: torch.Tensor, std: torch.Tensor,
                library: str = "torchvision"):
    """What ImageDataset does for one image (stretch mode), decoded by torchvision.io (deprecated
    since torchvision 0.29) or TorchCodec (its successor, when installed) and resized as a tensor."""
    from torchvision.transforms.v2 import functional as F
    if library == "torchcodec":
        from torchcodec.decoders import decode_image
        image = decode_image(path, mode="RGB")
    else:
        import warnings

        from torchvision.io import ImageReadMode, decode_image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(str(path), mode=ImageReadMode.RGB)
    image = F.resize(image, [preprocess.image_size] * 2, antialias=True)
    return (image.float().div_(255.0) - mean) / std


def tensor_decoders() -> list[str]:
    """torchvision's decoder, and TorchCodec's where it is installed (it is not a requirement)."""
    import importlib.util
    return ["torchvision"] + (["torchcodec"] if importlib.util.find_spec("torchcodec") else [])


def measure_decoding(preprocess: dataloader.Preprocess) -> dict:
    """Images per second one loader worker (one thread) decodes, resizes and normalises: Pillow as
    dataloader.ImageDataset does it, and the tensor decoders (tensor_decoders), for PNG and JPEG. Divide
    the trunk's rate on a GPU by this to get the workers it needs (NUM_WORKERS)."""
    folder = decode_folder()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    mean, std = torch.tensor(preprocess.mean).view(3, 1, 1), torch.tensor(preprocess.std).view(3, 1, 1)
    rates = {}
    try:
        for suffix in ("png", "jpg"):
            files = sorted(folder.glob(f"*.{suffix}"))
            dataset = dataloader.ImageDataset(folder, [f.name for f in files], np.zeros(len(files)), preprocess)
            readers = [("pillow", lambda i: dataset[i][0])] + [
                (library, lambda i, library=library: tensor_item(files[i], preprocess, mean, std, library))
                for library in tensor_decoders()]
            for name, item in readers:
                item(0)  # first-call costs out of the timing
                started = time.perf_counter()
                for i in range(len(files)):
                    item(i)
                rates[f"{name}_{suffix}"] = len(files) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return dict(images=len(files), side=DECODE_SIDE, images_per_s=rates)


# ---- class-pair distances ------------------------------------------------------------------------

def synthetic_embeddings(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n x DIMS points in CLASSES Gaussian clusters (equal sizes, shuffled), away from the origin so
    that the Euclidean formula's cancellation is exercised."""
    rng = np.random.default_rng(seed)
    centres = 5.0 + 2.0 * rng.standard_normal((CLASSES, DIMS))
    labels = rng.permutation(np.arange(n) % CLASSES)
    return centres[labels] + rng.standard_normal((n, DIMS)), labels


def fast_distances(x: np.ndarray, labels: np.ndarray, device: torch.device, repeats: int = 3) -> dict:
    """The pipeline's own functions: {metric: (matrix, median seconds of `repeats` runs)}. Sub-second
    timings on two shared cores jump by a third from run to run; the median steadies them."""
    runs = {"euclidean": lambda: cad.average_euclidean_distances(x, labels, CLASSES, device),
            "cosine": lambda: cad.average_cosine_distances(x, labels, CLASSES)}
    result = {}
    for metric, fn in runs.items():
        timings = [timed(fn, device) for _ in range(repeats)]
        result[metric] = (timings[0][0], float(np.median([seconds for _, seconds in timings])))
    return result


def max_relative_difference(fast: np.ndarray, reference: np.ndarray) -> float:
    return float(np.nanmax(np.abs(fast - reference) / np.abs(reference)))


def measure_distances(device: torch.device) -> dict:
    """Fast vs scipy cdist per class pair on DIST_POINTS points, per metric and combined."""
    x, labels = synthetic_embeddings(DIST_POINTS)
    fast_distances(x[:2000], labels[:2000], device, repeats=1)  # warm-up: first matmul, compiled kernel
    fast = fast_distances(x, labels, device)
    result = {}
    for metric in ("euclidean", "cosine"):
        reference, seconds = timed(lambda: cad.brute_force_average_distances(x, labels, CLASSES, metric), device)
        matrix, fast_seconds = fast[metric]
        result[metric] = dict(fast_s=fast_seconds, brute_s=seconds, ratio=seconds / fast_seconds,
                              max_rel_diff=max_relative_difference(matrix, reference))
    fast_total = sum(result[m]["fast_s"] for m in ("euclidean", "cosine"))
    brute_total = sum(result[m]["brute_s"] for m in ("euclidean", "cosine"))
    result["combined"] = dict(fast_s=fast_total, brute_s=brute_total, ratio=brute_total / fast_total,
                              max_rel_diff=max(result[m]["max_rel_diff"] for m in ("euclidean", "cosine")))
    return dict(points=DIST_POINTS, dims=DIMS, classes=CLASSES, **result)


# ---- peak memory on 200,000 points, in a child process -------------------------------------------

def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(cfg) -> None:
    """Runs in the child: build the data, note the RSS, run both fast metrics, print the peak as JSON.
    The peak (VmHWM) covers the whole process: torch, the data and the computation."""
    device = system.pick_device(cfg.DEVICE)
    x, labels = synthetic_embeddings(MEMORY_POINTS)
    baseline = rss_mib("VmRSS")
    times = {m: seconds for m, (_, seconds) in fast_distances(x, labels, device).items()}
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps(dict(baseline_mib=baseline, peak_mib=rss_mib("VmHWM"), seconds=times, gpu_peak_mib=gpu)))


def measure_peak_memory(cfg_args: list[str]) -> dict:
    """Peak RSS of a fresh process doing only the fast distances on MEMORY_POINTS points."""
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, *cfg_args],
                           capture_output=True, text=True, cwd=system.REPO_DIR)
    if child.returncode != 0:
        raise RuntimeError(f"peak-memory child failed:\n{child.stderr[-2000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return dict(points=MEMORY_POINTS, dims=DIMS, classes=CLASSES, **result)


# ---- end to end ----------------------------------------------------------------------------------

def measure_umap(cfg) -> dict:
    """fit_umap on the points dimensionality_reduction.py fits (the run's embeddings, sampled the
    same way), after a small warm-up fit so numba's compilation is not counted."""
    import dimensionality_reduction as dr
    paths = locations.Paths.from_settings(cfg)
    frames = {s: embedding_files.open_embeddings(paths, s) for s in dr.SUBSETS}
    points, _ = dr.plotted_points(frames, cfg.UMAP_SAMPLES, cfg.SEED)
    projection.fit_umap(points[:300], cfg.UMAP_NEIGHBORS, cfg.SEED)
    _, seconds = timed(lambda: projection.fit_umap(points, cfg.UMAP_NEIGHBORS, cfg.SEED), torch.device("cpu"))
    return dict(points=len(points), seconds=seconds)


def measure_end_to_end(cfg) -> dict:
    """run_all.run on fresh folders (training from scratch), then the UMAP fit time on its output."""
    import run_all
    e2e = bench_config(cfg, "e2e")
    stage_times = run_all.run(e2e)
    return dict(stage_s=stage_times, total_s=stage_times["total"], umap=measure_umap(e2e))


# ---- at the sizes users have: generated folders, cold and warm runs -----------------------------

def generated_folder(n: int, seed: int = 0) -> Path:
    """bench_outputs/data_<n>/<digit>/img_<i>.png: n distinct 28-px images made from the built-in
    digits by a random turn, scale, shift and noise; written once, reused while complete."""
    from PIL import Image
    from sklearn.datasets import load_digits
    folder = BENCH_DIR / f"data_{n}"
    if (folder / "COMPLETE").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    digits, rng = load_digits(), np.random.default_rng(seed)
    for i in range(n):
        j = int(rng.integers(len(digits.images)))
        side = int(rng.integers(22, 35))  # scale
        image = Image.fromarray(np.uint8(digits.images[j] * 255 / 16)).resize((side, side), Image.BILINEAR)
        canvas = Image.new("L", (28, 28))
        canvas.paste(image, ((28 - side) // 2 + int(rng.integers(-3, 4)), (28 - side) // 2 + int(rng.integers(-3, 4))))
        canvas = canvas.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        pixels = np.clip(np.asarray(canvas, dtype=np.int16) + rng.integers(0, 24, (28, 28)), 0, 255).astype(np.uint8)
        (folder / str(digits.target[j])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / str(digits.target[j]) / f"img_{i:06d}.png")
    (folder / "COMPLETE").write_text(f"{n} images, seed {seed}\n")
    return folder


class AnonymousPeak(threading.Thread):
    """Samples RssAnon every 0.1 s: the peak of memory the process owns, without the file pages
    VmHWM also counts (the shared libraries' code, about 0.35 GB here; anything memory-mapped),
    which the kernel can drop at any time."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib, self.stopped = 0.0, threading.Event()

    def run(self):
        while not self.stopped.wait(0.1):
            self.peak_mib = max(self.peak_mib, rss_mib("RssAnon"))

    def stop(self) -> float:
        self.stopped.set()
        self.join()
        return max(self.peak_mib, rss_mib("RssAnon"))


def reset_peak() -> bool:
    """Start VmHWM again from the current resident size (Linux: "5" to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_all_child(cfg) -> None:
    """Runs in the child: run_all.run, then its stage times, its peak memory (VmHWM, and the sampled
    peak of RssAnon) and each stage's own peaks (VmHWM started again before each stage) as JSON."""
    import run_all
    sampler, stage_peaks, whole = AnonymousPeak(), {}, dict(hwm=0.0, anon=0.0)
    sampler.start()
    can_reset = reset_peak()

    def after_stage(name: str) -> None:
        stage_peaks[name] = dict(peak_mib=rss_mib("VmHWM"), peak_anon_mib=sampler.peak_mib)
        whole.update(hwm=max(whole["hwm"], stage_peaks[name]["peak_mib"]), anon=max(whole["anon"], sampler.peak_mib))
        if can_reset:
            reset_peak()
            sampler.peak_mib = rss_mib("RssAnon")

    times = run_all.run(cfg, after_stage)
    anon = max(sampler.stop(), whole["anon"])
    print(json.dumps(dict(stage_s=times, peak_mib=max(rss_mib("VmHWM"), whole["hwm"]), peak_anon_mib=anon,
                          stage_peaks=stage_peaks if can_reset else {})))


def timed_run_all(data: Path, work: Path, numba_dir: Path, cfg_args: list[str]) -> dict:
    """run_all.py in a fresh process on `data`, writing under `work`, numba's code kept in numba_dir."""
    folders = [f"--DATA_DIR={data}", f"--OUTPUT_DIR={work / 'outputs'}", f"--CHECKPOINT_DIR={work / 'checkpoints'}",
               f"--CACHE_DIR={work / 'cache'}"]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(numba_dir)}
    started = time.perf_counter()
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), RUN_CHILD_FLAG, *cfg_args, *folders],
                           capture_output=True, text=True, cwd=system.REPO_DIR, env=env)
    if child.returncode != 0:
        raise RuntimeError(f"run_all child on {data} failed:\n{child.stderr[-3000:]}")
    return dict(json.loads(child.stdout.strip().splitlines()[-1]), wall_s=time.perf_counter() - started)


# the targets for a cold run_all at scale, as multiples of its limit: one trunk pass over every image
STUDY_STAGES = ("train", "evaluate", "embed", "compute_average_distances", "dimensionality_reduction",
                "transfer_learning")  # the study's six stages (the README's first paragraph)
STUDY_TARGET = {5_000: 1.5}  # the six study stages together, cold
WHOLE_TARGET = {5_000: 2.5, 50_000: 1.3}  # the whole cold run_all (its process's wall time)


def measure_at_size(n: int, cfg, cfg_args: list[str], limit: float) -> dict:
    """A cold then a warm run_all on n generated images, held to its limit: one trunk pass over the
    n images at the measured trunk rate. The UMAP fit of the plotted points is measured beside it."""
    data = generated_folder(n)
    work = BENCH_DIR / f"run_{n}"
    shutil.rmtree(work, ignore_errors=True)
    numba_dir = work / "numba"
    cold = timed_run_all(data, work, numba_dir, cfg_args)
    for sub in ("outputs", "checkpoints"):  # the warm run keeps the trunk cache and numba's code
        shutil.rmtree(work / sub)
    warm = timed_run_all(data, work, numba_dir, cfg_args)
    run_cfg = types.SimpleNamespace(**{**vars(cfg), "OUTPUT_DIR": str(work / "outputs"),
                                       "CHECKPOINT_DIR": str(work / "checkpoints"), "CACHE_DIR": str(work / "cache")})
    umap = measure_umap(run_cfg)
    trunk_pass = n / limit
    study = sum(cold["stage_s"].get(stage, 0.0) for stage in STUDY_STAGES)
    embeddings = sum(f.stat().st_size for f in (work / "outputs").glob("embeddings_*.pkl")) / 2 ** 20
    return dict(images=n, cold=cold, warm=warm, umap=umap, trunk_pass_s=trunk_pass, study_cold_s=study,
                study_ratio=study / trunk_pass, whole_ratio=cold["wall_s"] / trunk_pass, embeddings_mib=embeddings)


def target_row(figure: str, ratio: float, target: float | None) -> tuple:
    return (figure, f"{ratio:.2f}x", f"<= {target}x" if target else "", verdict(ratio <= target) if target else "")


def scale_rows(runs: list[dict]) -> list[tuple]:
    """Per size: the limit, the six study stages and the whole run against it (cold), cold and warm
    wall time and peak memory, then every stage's time cold and warm; then the ratios between sizes."""
    rows = []
    for r in runs:
        n, cold, warm = r["images"], r["cold"], r["warm"]
        rows += [(f"{n:,} images: limit = one trunk pass", f"{r['trunk_pass_s']:.1f} s", "", ""),
                 ("  six study stages, cold (" + ", ".join(STUDY_STAGES) + ")", f"{r['study_cold_s']:.1f} s", "", ""),
                 target_row("  six study stages cold / limit", r["study_ratio"], STUDY_TARGET.get(n)),
                 ("  whole run_all cold / warm", f"{cold['wall_s']:.1f} s / {warm['wall_s']:.1f} s", "", ""),
                 target_row("  whole run_all cold / limit", r["whole_ratio"], WHOLE_TARGET.get(n)),
                 ("  UMAP fit alone (warm), of the plotted points", f"{r['umap']['seconds']:.1f} s "
                  f"({r['umap']['points']} points)", "", ""),
                 ("  peak memory cold / warm", f"{cold['peak_mib']:.0f} / {warm['peak_mib']:.0f} MiB",
                  "< 3 GB" if n >= 50_000 else "", verdict(cold["peak_mib"] < 3072) if n >= 50_000 else ""),
                 ("  of it owned (RssAnon, sampled) cold / warm",
                  f"{cold['peak_anon_mib']:.0f} / {warm['peak_anon_mib']:.0f} MiB", "", "")]
        peaks = cold.get("stage_peaks", {})
        for stage, seconds in cold["stage_s"].items():
            if stage == "total":
                continue
            study = " [study]" if stage in STUDY_STAGES else ""
            rows.append((f"  {stage}{study}: cold / warm", f"{seconds:.1f} s / {warm['stage_s'].get(stage, 0.0):.1f} s"
                         f" ({1000 * seconds / n:.2f} ms/img cold"
                         + (f", peak {peaks[stage]['peak_mib']:.0f} MiB" if stage in peaks else "") + ")", "", ""))
    by_size = {r["images"]: r for r in runs}
    if 5_000 in by_size and 50_000 in by_size:
        small, large = by_size[5_000]["cold"]["stage_s"], by_size[50_000]["cold"]["stage_s"]
        for stage in small:
            ratio = (large[stage] / 50_000) / (small[stage] / 5_000)
            rows.append((f"per-image time 50,000 / 5,000: {stage}", f"{ratio:.2f}x", "<= 1.3x", verdict(ratio <= 1.3)))
        # the second memory target: the larger run may hold its embeddings, little else more
        peak_small = max(by_size[5_000][w]["peak_mib"] for w in ("cold", "warm"))
        peak_large = max(by_size[50_000][w]["peak_mib"] for w in ("cold", "warm"))
        allowed = 1.2 * peak_small + by_size[50_000].get("embeddings_mib", 0.0)
        rows.append(("peak memory 50,000 / (1.2 x 5,000's + its embeddings)",
                     f"{peak_large:.0f} / {allowed:.0f} MiB", "<= 1", verdict(peak_large <= allowed)))
    return rows


# ---- report --------------------------------------------------------------------------------------

def cpu_clock() -> tuple[float, float, float]:
    """(wall s, CPU s busy on the whole machine, CPU s used by this process and its finished children)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return time.perf_counter(), machine, own


def other_load(start: tuple[float, float, float]) -> float:
    """Cores kept busy by other processes since `start`, on average: another process on these cores
    slows torch's thread pool far more than its own share, so the figures are only as good as this is low."""
    wall, machine, own = (b - a for a, b in zip(start, cpu_clock()))
    return max(0.0, (machine - own) / wall)


def environment(device: torch.device, cfg, quick: bool, other_cores: float) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model_lines = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")] \
            if Path("/proc/cpuinfo").is_file() else []
        name = model_lines[0].split(":", 1)[1].strip() if model_lines else platform.processor() or "cpu"
    return dict(device=str(device), device_name=name, torch=torch.__version__, cpu_cores=os.cpu_count(),
                torch_threads=torch.get_num_threads(), date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                python=platform.python_version(), code_version=provenance.code_version(), quick=quick,
                other_processes_busy_cores=other_cores, settings=settings.settings_dict(cfg))


def table_rows(f: dict) -> list[tuple]:
    """(figure, value, target, PASS/MISS or '') for every measured figure."""
    rows = [("images (seen + unseen)", f"{f['images']}", "", ""),
            ("trunk forward, contiguous layout", f"{f['trunk_layouts_images_per_s']['contiguous']:.1f} img/s", "", ""),
            ("trunk forward, channels-last layout", f"{f['trunk_layouts_images_per_s']['channels_last']:.1f} img/s", "", ""),
            ("trunk forward limit (as configured)", f"{f['limit_images_per_s']:.1f} img/s", "", ""),
            ("epoch, cached trunk features", f"{f['epoch']['cached_s']:.3f} s", "", ""),
            ("epoch, trunk on images", f"{f['epoch']['uncached_s']:.3f} s", "", ""),
            ("epoch ratio uncached/cached", f"{f['epoch']['ratio']:.1f}x", ">= 10x", verdict(f['epoch']['ratio'] >= 10)),
            (f"head pass over cached features, {f['head_pass']['images']} images: batches of "
             f"{f['head_pass']['batch_size']} / {f['head_pass']['sized_batch']}",
             f"{f['head_pass']['batch_size_s']:.2f} s / {f['head_pass']['sized_s']:.2f} s = "
             f"{f['head_pass']['ratio']:.2f}x", "", ""),
            ("embed from image files", f"{f['embed']['images_per_s']:.1f} img/s", "", ""),
            ("embed / limit", f"{f['embed']['ratio_to_limit']:.2f}", ">= 0.8", verdict(f['embed']['ratio_to_limit'] >= 0.8))]
    if "decoding" in f:
        dec = f["decoding"]
        for key, rate in dec["images_per_s"].items():
            library, suffix = key.split("_")
            rows.append((f"decode+resize, one worker, {dec['side']}-px {suffix.upper()}, {library}",
                         f"{rate:.0f} img/s = {rate / f['limit_images_per_s']:.1f}x the trunk", "", ""))
    d = f["distances"]
    for metric in ("euclidean", "cosine", "combined"):
        rows += [(f"distances {metric}: fast / cdist", f"{d[metric]['fast_s']:.3f} s / {d[metric]['brute_s']:.1f} s", "", ""),
                 (f"distances {metric}: speed ratio", f"{d[metric]['ratio']:.0f}x",
                  ">= 50x" if metric == "combined" else "", verdict(d[metric]['ratio'] >= 50) if metric == "combined" else "")]
    rows.append(("distances max relative difference", f"{d['combined']['max_rel_diff']:.1e}", "<= 1e-6",
                 verdict(d['combined']['max_rel_diff'] <= 1e-6)))
    return rows + memory_rows(f.get("memory")) + end_to_end_rows(f) + scale_rows(f.get("scale", []))


def memory_rows(m: dict | None) -> list[tuple]:
    if m is None:
        return [("peak memory, 200,000 x 128", "skipped (--quick)", "< 2 GB", "")]
    rows = [("baseline RSS (torch + data)", f"{m['baseline_mib']:.0f} MiB", "", ""),
            ("peak memory, 200,000 x 128", f"{m['peak_mib']:.0f} MiB", "< 2 GB", verdict(m['peak_mib'] < 2048)),
            ("  peak above baseline", f"{m['peak_mib'] - m['baseline_mib']:.0f} MiB", "", ""),
            ("  its time euclidean + cosine", f"{m['seconds']['euclidean']:.1f} s + {m['seconds']['cosine']:.2f} s", "", "")]
    if m.get("gpu_peak_mib") is not None:
        rows.append(("  GPU memory peak", f"{m['gpu_peak_mib']:.0f} MiB", "", ""))
    return rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def end_to_end_rows(f: dict) -> list[tuple]:
    e = f.get("end_to_end")
    if e is None:
        return [("run_all end to end", "skipped (--quick)", "", "")]
    rows = [(f"  stage {name}", f"{seconds:.1f} s", "", "") for name, seconds in e["stage_s"].items() if name != "total"]
    bound = e["bound_s"]
    return rows + [("UMAP fit", f"{e['umap']['seconds']:.1f} s ({e['umap']['points']} points)", "", ""),
                   ("images/limit + UMAP fit", f"{bound / 2:.1f} s", "", ""),
                   ("run_all end to end", f"{e['total_s']:.1f} s", f"<= {bound:.1f} s",
                    verdict(e["total_s"] <= bound)),
                   ("end to end / (images/limit + UMAP fit)", f"{e['total_s'] / (bound / 2):.1f}x", "<= 2x", "")]


def print_table(rows: list[tuple], env: dict) -> None:
    print(f"\n==== bench.py  {env['date']}  {env['device']} ({env['device_name']})  torch {env['torch']}  "
          f"{env['cpu_cores']} cores ====")
    if env["other_processes_busy_cores"] > 0.1:
        print(f"note: other processes kept {env['other_processes_busy_cores']:.2f} cores busy on average during the "
              f"benchmark; its figures are distorted — re-run on an idle machine")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("figure", "measured", "target", "result")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())


# ---- main ----------------------------------------------------------------------------------------

def run(cfg, quick: bool, cfg_args: list[str], sizes: list[int]) -> dict:
    """Measure everything; the figures as one dict."""
    micro = bench_config(cfg, "micro")
    runtime = dataloader.runtime_from_settings(micro)
    paths = locations.prepare_output_dirs(micro)
    split = splits.split_from_settings(micro, paths, create=True)
    system.set_seed(micro.SEED)
    model, arch, _ = training.new_model(micro, len(split.seen_classes))
    training.place_model(model, runtime)
    preprocess = dataloader.Preprocess.for_trunk(arch["trunk"], micro.IMAGE_SIZE, micro.RESIZE_MODE)
    cache = TrunkCache(paths.cache, model.trunk, backbone.frozen_trunk_sha256(model), preprocess, runtime,
                       micro.CACHE_DTYPE)
    layouts = measure_layouts(model.trunk, micro.IMAGE_SIZE, runtime)
    figures = dict(images=len(split.table), trunk_layouts_images_per_s=layouts,
                   limit_images_per_s=layouts["channels_last" if runtime.channels_last else "contiguous"])
    figures["epoch"] = measure_epoch(model, split, preprocess, cache, runtime, micro)
    figures["head_pass"] = measure_head_pass(model, split, preprocess, cache, runtime)
    figures["embed"] = measure_embed(model.trunk, split, preprocess, figures["limit_images_per_s"], runtime)
    figures["decoding"] = measure_decoding(preprocess)
    figures["distances"] = measure_distances(runtime.device)
    if not quick:
        figures["memory"] = measure_peak_memory(cfg_args)
        e2e = measure_end_to_end(cfg)
        e2e["bound_s"] = 2.0 * (figures["images"] / figures["limit_images_per_s"] + e2e["umap"]["seconds"])
        figures["end_to_end"] = e2e
    figures["scale"] = [measure_at_size(n, cfg, cfg_args, figures["limit_images_per_s"]) for n in sizes]
    return figures


def report(cfg, figures: dict, quick: bool, clock_start) -> None:
    env = environment(system.pick_device(cfg.DEVICE), cfg, quick, other_load(clock_start))
    rows = table_rows(figures)
    print_table(rows, env)
    BENCH_DIR.mkdir(exist_ok=True)
    fileio.save_json(dict(environment=env, figures=figures,
                          table=[dict(zip(("figure", "measured", "target", "result"), r)) for r in rows]),
                     BENCH_DIR / "bench.json")
    print(f"-> {BENCH_DIR / 'bench.json'}  (benchmark wall time {figures['bench_wall_s']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    flags, cfg_args = split_flags(sys.argv[1:] if argv is None else argv)
    quick, clock_start = "--quick" in flags, cpu_clock()

    def bench(cfg) -> None:
        if CHILD_FLAG in flags:
            return peak_memory_child(cfg)
        if RUN_CHILD_FLAG in flags:
            return run_all_child(cfg)
        started = time.perf_counter()
        figures = run(cfg, quick, cfg_args, sizes_asked(flags, quick))
        figures["bench_wall_s"] = time.perf_counter() - started
        report(cfg, figures, quick, clock_start)
    # numba's compiled code is kept between benchmark runs, apart from the user's
    runner.run_script(bench, cfg_args, numba_cache=BENCH_DIR / "numba", lock_folders=False)  # writes only its own


if __name__ == "__main__":
    main()
