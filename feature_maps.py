"""Feature-map statistics through forward hooks: for each module in FEATURE_MODULES, the share of
non-positive values of its output and the eigenvalue spectrum of the covariance of its spatially
averaged channel vectors (mean over height and width: one C-vector per image).

    python feature_maps.py
    python feature_maps.py --FEATURE_MODULES='["trunk.1", "head.3"]' --FEATURE_IMAGES=100
    python feature_maps.py --FEATURE_MAP_DIR=/data/other_campaign     # images from another folder

Conditions (each on up to FEATURE_IMAGES images, drawn with SEED):
    seen_test         the trained model on the seen classes' test images
    unseen            the trained model on the unseen classes' images
    head_init         head modules only: the head as initialised before training (built with the
                      checkpoint's SEED, as train.py built it), on the checkpoint's trunk; seen test images
    random_trunk      trunk modules only: a freshly initialised random trunk (seed SEED + 1) in place
                      of the checkpoint's; seen test images
    pretrained_trunk  FINETUNE_BLOCKS > 0 only, trunk modules only: the trunk before fine-tuning (the
                      same architecture with its weights loaded again as WEIGHTS says, built with the
                      checkpoint's SEED; its frozen blocks must hash to the checkpoint's trunk_sha256,
                      else it is skipped with a note); seen test images
With FEATURE_MAP_DIR set, the images of that folder (any depth, up to FEATURE_IMAGES of them) take the
place of the seen test images in every condition, and `unseen` is not measured.
"auto" modules are each block of the frozen trunk and of the fine-tuned blocks (tuned_trunk.<name>)
and the head's convolutions. A frozen trunk's blocks are the checkpoint's; a head module on a random
trunk, or a trunk module at head initialisation, would repeat or mean nothing and is not measured.

Reads:  checkpoints/best.pth, outputs/split.csv, the seen test and unseen images themselves (not the
        trunk cache: the hooks need the trunk's inside), or FEATURE_MAP_DIR's images (those measured
        are fingerprinted in the provenance record, as split.csv fingerprints the run's own); each
        decoded once and kept as 8-bit pixels (FEATURE_IMAGES x 3 x IMAGE_SIZE² bytes per subset) for
        every condition that uses it.
Writes: outputs/feature_map_stats.csv (module, condition, description: which model on which images,
        n_images, n_channels, nonpositive_share, effective_rank, eig_1..eig_5),
        outputs/feature_map_spectra.csv (every eigenvalue), outputs/feature_map_spectra.png,
        outputs/feature_map_nonpositive.png; with
        FINETUNE_BLOCKS > 0, outputs/feature_map_finetune_vs_pretrained.csv (one row per trunk module:
        the fine-tuned and the pretrained trunk's statistics side by side, on the same images) and
        .png; and last outputs/provenance_feature_maps.json (see plankton/provenance.py).
"""
import collections
import contextlib
import difflib
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import backbone
import dataloader
from plankton import checkpoints, fileio, images, locations, plots, provenance, runner
from plankton.errors import PipelineError

TOP_EIGENVALUES = 5  # eig_1..eig_5 in feature_map_stats.csv
MAX_CHANNELS = 4096  # a pooled output wider than this would need a covariance matrix too large to decompose
CONDITIONS = {  # name: (what the legend says, image subset, which modules it measures)
    "seen_test": ("trained model, {test}", "test", "all"),
    "unseen": ("trained model, unseen images", "unseen", "all"),
    "head_init": ("head at initialisation, {test}", "test", "head"),
    "random_trunk": ("fresh random trunk, {test}", "test", "trunk"),
    "pretrained_trunk": ("trunk before fine-tuning, {test}", "test", "trunk"),
}
CONDITION_COLOURS = {"seen_test": "#1f77b4", "unseen": "#e6550d", "head_init": "#7f7f7f", "random_trunk": "#2ca02c",
                     "pretrained_trunk": "#9467bd"}




# ---- the modules ---------------------------------------------------------------------------------

def is_trunk_module(name: str) -> bool:
    """A module (or state-dict key) of the frozen trunk or of its fine-tuned blocks."""
    return name.split(".")[0] in ("trunk", "tuned_trunk")


def is_tuned_module(name: str) -> bool:
    return name.split(".")[0] == "tuned_trunk"


def auto_modules(model: torch.nn.Module) -> list[str]:
    """Each block of the trunk that holds weights (a ResNet's ReLU and pooling are no blocks), the
    fine-tuned blocks included (tuned_trunk.<name>), and each of the head's convolutions."""
    trunk = [f"{part}.{name}" for part in ("trunk", "tuned_trunk")
             for name, child in getattr(model, part).named_children() if any(True for _ in child.parameters())]
    head = [f"head.{name}" for name, child in model.head.named_children() if isinstance(child, torch.nn.Conv2d)]
    return trunk + head


def module_kind(module: torch.nn.Module) -> str:
    """A module's layer type for a title; a container (a Sequential block) by what it holds, one
    level further down when it holds containers: "2 x FusedMBConv", "Conv2d, BatchNorm2d, ReLU",
    "3 stages: 1 DepthwiseSeparableConv, 4 InvertedResidual"."""
    children = list(module.children())
    if not children or not isinstance(module, torch.nn.Sequential):
        return type(module).__name__
    if all(isinstance(c, torch.nn.Sequential) for c in children):
        inner = collections.Counter(type(g).__name__ for c in children for g in c.children())
        return f"{len(children)} stages: " + ", ".join(f"{n} {kind}" for kind, n in inner.items())
    kinds = [type(c).__name__ for c in children]
    if len(set(kinds)) == 1:
        return f"{len(kinds)} x {kinds[0]}"
    return ", ".join(kinds) if len(kinds) <= 3 else f"{', '.join(kinds[:2])} … ({len(kinds)} layers)"


def resolve_modules(model: torch.nn.Module, setting) -> list[str]:
    """FEATURE_MODULES as module names; an unknown name is one error line listing the valid ones."""
    if setting == "auto":
        return auto_modules(model)
    known = [name for name, _ in model.named_modules() if name]
    for name in setting:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            shallow = [n for n in known if n.count(".") <= 1]
            deeper = next((n for n in known if n.count(".") > 1), known[-1])
            raise PipelineError(f"FEATURE_MODULES: {name!r} is not a module of the model"
                                f"{f' (did you mean {close[0]!r}?)' if close else ''}; valid names: "
                                f"{', '.join(shallow)}, or any deeper name of model.named_modules() "
                                f"({len(known)} in all, e.g. {deeper!r})")
    return list(setting)


# ---- what a hook records -------------------------------------------------------------------------

@dataclass
class ModuleStats:
    """Running totals of one module's outputs over the batches."""
    nonpositive: int = 0
    values: int = 0
    pooled: list = field(default_factory=list)  # (batch, channels) arrays: the output averaged over H, W

    def add(self, name: str, output) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 4):
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise PipelineError(f"FEATURE_MODULES: {name!r} gives {shape}, not a (batch, channels, height, width) "
                                f"or (batch, features) tensor; choose another module")
        if output.shape[1] > MAX_CHANNELS:
            raise PipelineError(f"FEATURE_MODULES: {name!r} gives {output.shape[1]} channels (at most "
                                f"{MAX_CHANNELS}); choose another module")
        output = output.detach().float()
        self.nonpositive += int((output <= 0).sum())
        self.values += output.numel()
        pooled = output.mean(dim=(2, 3)) if output.dim() == 4 else output
        self.pooled.append(pooled.cpu().double().numpy())

    @property
    def nonpositive_share(self) -> float:
        return self.nonpositive / self.values

    def pooled_matrix(self) -> np.ndarray:
        return np.concatenate(self.pooled)


@contextlib.contextmanager
def hooked(model: torch.nn.Module, names: list[str]):
    """Forward hooks on the named modules, each recording into its ModuleStats; removed on exit."""
    modules = dict(model.named_modules())
    stats = {name: ModuleStats() for name in names}
    handles = [modules[name].register_forward_hook(lambda module, args, output, name=name: stats[name].add(name, output))
               for name in names]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def spectrum(pooled: np.ndarray) -> np.ndarray:
    """Eigenvalues of the channels' covariance (n - 1 in the denominator), largest first."""
    return np.linalg.eigvalsh(np.atleast_2d(np.cov(pooled, rowvar=False)))[::-1]


def effective_rank(eigenvalues: np.ndarray) -> float:
    """exp(entropy) of the eigenvalues as shares of their sum (Roy & Vetterli): 1 when one
    direction holds all the variance, C when C directions hold equal parts."""
    positive = np.clip(eigenvalues, 0, None)
    if positive.sum() <= 0:
        return 0.0
    shares = positive[positive > 0] / positive.sum()
    return float(np.exp(-(shares * np.log(shares)).sum()))


# ---- running the models --------------------------------------------------------------------------

def collect(model: torch.nn.Module, names: list[str], pictures: torch.Tensor, preprocess: dataloader.Preprocess,
            runtime: dataloader.Runtime, keep_trunk: list | None = None,
            trunk_outputs: list | None = None) -> dict[str, ModuleStats]:
    """Run the images (uint8, decoded once: dataloader.decode_images) through the model in batches
    (float32, no autocast) with the named modules hooked. Only the trunk (its tuned blocks included)
    runs when every module is in it. keep_trunk (a list) is filled with the frozen trunk's output of
    each batch; trunk_outputs (such a list, of a model with the same trunk) is the input of the rest
    (tuned blocks and head) instead of the images: the frozen trunk does not run."""
    forward = model.whole_trunk() if all(is_trunk_module(n) for n in names) else model
    with hooked(model, names) as stats, torch.inference_mode():
        if trunk_outputs is not None:
            for features in trunk_outputs:
                model.forward_head(features)
            return stats
        kept = model.trunk.register_forward_hook(lambda module, args, output: keep_trunk.append(output)) \
            if keep_trunk is not None else None
        try:
            for start in range(0, len(pictures), runtime.batch_size):
                images = dataloader.normalise(pictures[start:start + runtime.batch_size], preprocess).to(runtime.device)
                forward(images.contiguous(memory_format=torch.channels_last) if runtime.channels_last else images)
        finally:
            if kept is not None:
                kept.remove()
    return stats


def variant_model(arch: dict, trained: torch.nn.Module, seed: int, keep: str,
                  runtime: dataloader.Runtime) -> torch.nn.Module:
    """A fresh build_model(arch) drawn with `seed` (the global random state is left as it was),
    keeping the trained model's trunk, tuned blocks included (keep="trunk": the head as initialised)
    or its head (keep="head": a random trunk)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = backbone.build_model(arch)
    trained_state = {k: v.cpu() for k, v in trained.state_dict().items()}
    model.load_state_dict({k: (trained_state[k] if is_trunk_module(k) == (keep == "trunk") else v)
                           for k, v in model.state_dict().items()})
    return placed(model, runtime)


def placed(model: torch.nn.Module, runtime: dataloader.Runtime) -> torch.nn.Module:
    model.to(runtime.device).eval()
    if runtime.channels_last:
        backbone.to_channels_last(model)
    return model


def pretrained_model(checkpoint: checkpoints.Checkpoint, weights_setting,
                     runtime: dataloader.Runtime) -> torch.nn.Module | None:
    """The model before fine-tuning: build_model(arch) with the checkpoint's seed and the trunk's
    weights loaded as WEIGHTS says, as train.py began. Its frozen blocks must hash to the checkpoint's
    trunk_sha256 (the same weights source); otherwise None, with a note saying why."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(checkpoint.seed)
        model = backbone.build_model(checkpoint.arch)
        source = backbone.load_trunk_weights(model, weights_setting)
    if backbone.frozen_trunk_sha256(model) != checkpoint.trunk_sha256:
        print(f"note: pretrained_trunk skipped: WEIGHTS={weights_setting!r} loads {source}, whose frozen blocks are "
              f"not the checkpoint's (trained with {checkpoint.weights_source}); set WEIGHTS as in training")
        return None
    return placed(model, runtime)


def sample(relpaths: list[str], limit: int, seed: int) -> list[str]:
    """Up to `limit` of the paths, drawn with the seed, in their original order."""
    if len(relpaths) <= limit:
        return list(relpaths)
    chosen = np.sort(np.random.default_rng(seed).choice(len(relpaths), size=limit, replace=False))
    return [relpaths[i] for i in chosen]


@dataclass(frozen=True)
class ImageSets:
    """The images measured: `test` (the seen test images, or FEATURE_MAP_DIR's) and `unseen` (empty
    with a folder), each under its root; `words` is what legends call the test set."""
    test_root: Path
    test: list[str]
    unseen_root: Path
    unseen: list[str]
    words: str = "seen test images"

    def subset(self, name: str) -> tuple[Path, list[str]]:
        return (self.test_root, self.test) if name == "test" else (self.unseen_root, self.unseen)


def run_images(trained: checkpoints.TrainedModel, limit: int, seed: int) -> ImageSets:
    root = trained.split.root
    return ImageSets(root, sample(trained.split.subset("test")[0], limit, seed),
                     root, sample(trained.split.subset("unseen")[0], limit, seed))


def folder_images(folder, limit: int, seed: int, scan_cache: Path) -> ImageSets:
    """Up to `limit` readable images of FEATURE_MAP_DIR (any depth), drawn with the seed; a missing
    folder, or one without a readable image, is one error line."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PipelineError(f"FEATURE_MAP_DIR={str(folder)!r} is not a folder; give a folder of images "
                            f"(searched at any depth), or None for the run's own images")
    found = images.list_folder_images(root).images
    picked = sample(found, limit, seed)
    bad, _ = images.scan_images(root, picked, scan_cache)
    usable = [p for p in picked if p not in bad]
    if not usable:
        raise PipelineError(f"FEATURE_MAP_DIR={str(folder)!r} holds no readable image "
                            f"({len(found)} image file(s) found, {len(bad)} of those tried unreadable)")
    if bad:
        print(f"note: FEATURE_MAP_DIR: {len(bad)} unreadable image(s) left out, e.g. {images.printable(next(iter(bad)))}")
    return ImageSets(root, usable, root, [], f"images of {root.name}/")


def measure(trained: checkpoints.TrainedModel, names: list[str], image_sets: ImageSets, runtime: dataloader.Runtime,
            weights_setting=None) -> dict[str, tuple[int, dict[str, ModuleStats]]]:
    """{condition: (images used, {module: stats})} for every condition that has modules and images
    to measure; pretrained_trunk only with fine-tuned blocks (and its weights found again)."""
    checkpoint, run_seed = trained.checkpoint, trained.checkpoint.seed
    pictures = {subset: dataloader.decode_images(*image_sets.subset(subset), trained.preprocess, runtime)
                for subset in ("test", "unseen") if image_sets.subset(subset)[1]}  # each decoded once, for every condition
    models = {"seen_test": lambda: trained.model, "unseen": lambda: trained.model,
              "head_init": lambda: variant_model(checkpoint.arch, trained.model, run_seed, "trunk", runtime),
              "random_trunk": lambda: variant_model(checkpoint.arch, trained.model, run_seed + 1, "head", runtime),
              "pretrained_trunk": lambda: pretrained_model(checkpoint, weights_setting, runtime)}
    results = {}
    # the trained trunk's output on the seen test images, kept from seen_test: head_init's input (its trunk is
    # the checkpoint's), so the trunk runs over those images once for both
    trunk_outputs = [] if any(not is_trunk_module(n) for n in names) else None
    for condition, (_, subset, scope) in CONDITIONS.items():
        wanted = [n for n in names if scope == "all" or is_trunk_module(n) == (scope == "trunk")]
        if condition == "pretrained_trunk" and not trained.model.finetune_blocks:
            continue
        if wanted and subset in pictures:
            model = models[condition]()
            if model is None:
                continue
            print(f"{condition}: {len(wanted)} module(s), {len(pictures[subset])} images")
            reuse = dict(keep_trunk=trunk_outputs) if condition == "seen_test" else \
                dict(trunk_outputs=trunk_outputs) if condition == "head_init" else {}
            results[condition] = (len(pictures[subset]), collect(model, wanted, pictures[subset], trained.preprocess,
                                                                 runtime, **reuse))
    return results


# ---- tables and figures --------------------------------------------------------------------------

def describe(condition: str, words: str = "seen test images") -> str:
    """What a legend says of a condition, its test images named as `words`."""
    return CONDITIONS[condition][0].format(test=words)


def tables(results: dict, names: list[str], words: str = "seen test images") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per module and condition, one row per eigenvalue), modules in FEATURE_MODULES order."""
    rows, spectra = [], []
    for name in names:
        for condition, (n_images, stats) in results.items():
            if name not in stats:
                continue
            eigenvalues = spectrum(stats[name].pooled_matrix())
            top = {f"eig_{i + 1}": float(eigenvalues[i]) if i < len(eigenvalues) else np.nan
                   for i in range(TOP_EIGENVALUES)}
            rows.append(dict(module=name, condition=condition, description=describe(condition, words),
                             n_images=n_images, n_channels=len(eigenvalues),
                             nonpositive_share=stats[name].nonpositive_share,
                             effective_rank=effective_rank(eigenvalues), **top))
            spectra += [dict(module=name, condition=condition, rank=i + 1, eigenvalue=float(v))
                        for i, v in enumerate(eigenvalues)]
    return pd.DataFrame(rows), pd.DataFrame(spectra)


def trunk_words(weights_source: str, fresh_seed: int) -> str:
    """Which weights the two trunks compared have, for the figures' titles."""
    if weights_source.startswith("random"):
        return f"trunks: random (checkpoint) vs random (fresh seed {fresh_seed})"
    return f"trunks: pretrained (checkpoint: {weights_source}) vs random (fresh seed {fresh_seed})"


def plot_spectra(spectra: pd.DataFrame, stats: pd.DataFrame, names: list[str], kinds: dict[str, str], title: str,
                 path, words: str = "seen test images") -> None:
    """One panel per module (its name, as FEATURE_MODULES takes it, and what it is), one line per
    condition, log scale; the conditions in one legend under the panels, each panel's legend only
    the effective ranks in the conditions' colours."""
    plt = plots.pyplot()
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows + 0.8), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for condition in CONDITIONS:
            values = spectra[(spectra.module == name) & (spectra.condition == condition)].eigenvalue.to_numpy()
            if len(values) == 0:
                continue
            shown = values[values > max(values[0], 1e-300) * 1e-12]  # zeros (and rounding below them) have no log
            rank = stats[(stats.module == name) & (stats.condition == condition)].effective_rank.iloc[0]
            ax.plot(np.arange(1, len(shown) + 1), shown, color=CONDITION_COLOURS[condition], linewidth=1.5,
                    label=f"eff. rank {rank:.1f}")
        channels = int(stats[stats.module == name].n_channels.iloc[0])
        ax.set_yscale("log")
        ax.set_title(f"{name}\n{textwrap.shorten(kinds[name], 62, placeholder='…')}, {channels} channels", fontsize=9)
        ax.set_xlabel("eigenvalue rank (largest first)", fontsize=8)
        ax.set_ylabel("eigenvalue (variance)", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", handlelength=1.2)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    present = [c for c in CONDITIONS if c in set(stats.condition)]
    fig.legend([plt.Line2D([], [], color=CONDITION_COLOURS[c], lw=2) for c in present],
               [describe(c, words) for c in present], loc="lower center", ncol=min(3, len(present)), fontsize=9)
    used = stats.groupby("condition").n_images.first()
    counts = f"{used.get('seen_test', 0)} {words}" + (f" and {used['unseen']} unseen" if "unseen" in used else "")
    if (stats.n_images - 1 < stats.n_channels).any():
        counts += "; n images give at most n - 1 non-zero eigenvalues, the zeros are not drawn"
    fig.suptitle(f"Eigenvalues (log scale, largest first) of the covariance of each module's output averaged over "
                 f"height and width\n({counts})\n{title}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 / rows if len(present) > 3 else 0.06 / rows, 1, 1))
    plots.save_figure(fig, path)


def plot_nonpositive(stats: pd.DataFrame, names: list[str], title: str, path, words: str = "seen test images") -> None:
    """Grouped bars: for each module, one bar per condition measured there, its share written on it."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(names) + 2), 4.6))
    width = 0.8 / len(CONDITIONS)
    for x, name in enumerate(names):
        here = stats[stats.module == name].set_index("condition")
        present = [c for c in CONDITIONS if c in here.index]
        for j, condition in enumerate(present):
            share = float(here.loc[condition, "nonpositive_share"])
            position = x + (j - (len(present) - 1) / 2) * width
            ax.bar(position, share, width, color=CONDITION_COLOURS[condition])
            ax.text(position, share + 0.01, f"{share:.2f}", ha="center", va="bottom", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=CONDITION_COLOURS[c]) for c in CONDITIONS if c in set(stats.condition)]
    ax.legend(handles, [describe(c, words) for c in CONDITIONS if c in set(stats.condition)], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(len(names)), names, rotation=30 if max(map(len, names)) > 8 else 0,
                  ha="right" if max(map(len, names)) > 8 else "center")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of output values <= 0")
    ax.set_title(f"Share of non-positive values in each module's output\n{title}", fontsize=10)
    plots.save_figure(fig, path)


COMPARED = ("nonpositive_share", "effective_rank", "eig_1")  # the side-by-side table's statistics


def finetune_comparison(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per trunk module measured both ways: the fine-tuned trunk's statistics (seen_test)
    beside the pretrained trunk's (pretrained_trunk), on the same images, and their differences.
    Frozen blocks have the same weights both ways, so their rows must agree: a check on the rest."""
    tuned = stats[stats.condition == "seen_test"].set_index("module")
    before = stats[stats.condition == "pretrained_trunk"].set_index("module")
    rows = []
    for module in before.index:
        row = dict(module=module, part="fine-tuned block" if is_tuned_module(module) else "frozen block",
                   n_images=int(before.loc[module, "n_images"]), n_channels=int(before.loc[module, "n_channels"]))
        for stat in COMPARED:
            row[f"{stat}_pretrained"] = float(before.loc[module, stat])
            row[f"{stat}_finetuned"] = float(tuned.loc[module, stat])
            row[f"{stat}_change"] = row[f"{stat}_finetuned"] - row[f"{stat}_pretrained"]
        rows.append(row)
    return pd.DataFrame(rows)


def plot_finetune_comparison(table: pd.DataFrame, words: str, title: str, path) -> None:
    """Side by side for each trunk module: the pretrained and the fine-tuned trunk's share of
    non-positive values (left) and effective rank (right), the fine-tuned blocks shaded."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.1 * len(table) + 5), 4.8))
    x = np.arange(len(table))
    tuned = np.flatnonzero(table.part == "fine-tuned block")
    for ax, stat, label in zip(axes, ("nonpositive_share", "effective_rank"),
                               ("share of output values <= 0", "effective rank of the pooled channels")):
        for offset, (which, colour) in zip((-0.2, 0.2), (("pretrained", CONDITION_COLOURS["pretrained_trunk"]),
                                                          ("finetuned", CONDITION_COLOURS["seen_test"]))):
            bars = ax.bar(x + offset, table[f"{stat}_{which}"], 0.4, color=colour,
                          label="trunk before fine-tuning" if which == "pretrained" else "fine-tuned trunk (trained model)")
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
        if len(tuned):
            ax.axvspan(tuned[0] - 0.5, tuned[-1] + 0.5, color="#fdd49e", alpha=0.5, zorder=0, label="fine-tuned blocks")
        ax.set_xticks(x, table.module, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlim(-0.6, len(table) - 0.4)
        top = table[[f"{stat}_pretrained", f"{stat}_finetuned"]].to_numpy().max()
        ax.set_ylim(0, 1 if stat == "nonpositive_share" else top * 1.12)  # room for the values on the bars
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"Fine-tuned vs pretrained trunk on the same {int(table.n_images.iloc[0])} {words} (frozen blocks: "
                 f"equal by construction)\n{title}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    plots.save_figure(fig, path)


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    image_sets = None if cfg.FEATURE_MAP_DIR is None else folder_images(
        cfg.FEATURE_MAP_DIR, cfg.FEATURE_IMAGES, cfg.SEED, paths.scan_cache(Path(cfg.FEATURE_MAP_DIR)))
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    names = resolve_modules(trained.model, cfg.FEATURE_MODULES)
    image_sets = image_sets or run_images(trained, cfg.FEATURE_IMAGES, cfg.SEED)
    # FEATURE_MAP_DIR's images are no part of split.csv: the record fingerprints the ones measured
    folder_files = [image_sets.test_root / p for p in image_sets.test] if cfg.FEATURE_MAP_DIR is not None else []
    inputs = provenance.start_stage(paths, "feature_maps", [paths.best, paths.split] + folder_files)
    checkpoint = trained.checkpoint
    print(f"feature_maps.py  {paths.best} (trunk: {checkpoint.weights_source}), modules: {', '.join(names)}")
    results = measure(trained, names, image_sets, runtime, cfg.WEIGHTS)
    stats, spectra = tables(results, names, image_sets.words)
    outputs = [paths.out / name for name in ("feature_map_stats.csv", "feature_map_spectra.csv",
                                             "feature_map_spectra.png", "feature_map_nonpositive.png")]
    fileio.save_csv(stats, outputs[0], index=False)
    fileio.save_csv(spectra, outputs[1], index=False)
    fresh_seed = checkpoint.seed + 1
    title = trunk_words(checkpoint.weights_source, fresh_seed)
    modules = dict(trained.model.named_modules())
    plot_spectra(spectra, stats, names, {n: module_kind(modules[n]) for n in names}, title, outputs[2],
                 image_sets.words)
    plot_nonpositive(stats, names, title, outputs[3], image_sets.words)
    if "pretrained_trunk" in results:
        comparison = finetune_comparison(stats)
        outputs += [paths.out / "feature_map_finetune_vs_pretrained.csv",
                    paths.out / "feature_map_finetune_vs_pretrained.png"]
        fileio.save_csv(comparison, outputs[-2], index=False)
        plot_finetune_comparison(comparison, image_sets.words, f"trunk: {checkpoint.weights_source}, "
                                 f"FINETUNE_BLOCKS={trained.model.finetune_blocks}", outputs[-1])
        print(comparison[["module", "part", "nonpositive_share_pretrained", "nonpositive_share_finetuned",
                          "effective_rank_pretrained", "effective_rank_finetuned"]].round(4).to_string(index=False))
    provenance.save_provenance(paths, "feature_maps", inputs, outputs, cfg)
    print(stats[["module", "condition", "n_images", "nonpositive_share", "effective_rank"]].to_string(index=False))
    print(f"-> {', '.join(str(o) for o in outputs if o.suffix == '.png')}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
