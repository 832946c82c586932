"""Feature-map statistics through forward hooks: for each module in FEATURE_MODULES, the share of
non-positive values of its output and the eigenvalue spectrum of the covariance of its spatially
averaged channel vectors (mean over height and width: one C-vector per image).

    python feature_maps.py
    python feature_maps.py --FEATURE_MODULES='["trunk.1", "head.3"]' --FEATURE_IMAGES=100

Conditions (each on up to FEATURE_IMAGES images, drawn with SEED):
    seen_test     the trained model on the seen classes' test images
    unseen        the trained model on the unseen classes' images
    head_init     head modules only: the head as initialised before training (built with the
                  checkpoint's SEED, as train.py built it), on the checkpoint's trunk; seen test images
    random_trunk  trunk modules only: a freshly initialised random trunk (seed SEED + 1) in place of
                  the checkpoint's frozen one; seen test images
The trunk is frozen, so the trained model's trunk is the checkpoint's trunk (its weights are named in
the figures' titles); a head module on a random trunk, or a trunk module at head initialisation,
would repeat or mean nothing and is not measured.

Reads:  checkpoints/best.pth, outputs/split.csv, the seen test and unseen images themselves (not the
        trunk cache: the hooks need the trunk's inside), each decoded once and kept as 8-bit pixels
        (FEATURE_IMAGES x 3 x IMAGE_SIZE² bytes per subset) for every condition that uses it.
Writes: outputs/feature_map_stats.csv (module, condition, n_images, n_channels, nonpositive_share,
        effective_rank, eig_1..eig_5), outputs/feature_map_spectra.csv (every eigenvalue),
        outputs/feature_map_spectra.png, outputs/feature_map_nonpositive.png, and last
        outputs/provenance_feature_maps.json (see plankton/provenance.py).
"""
import contextlib
import difflib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

import backbone
import dataloader
from plankton import checkpoints, fileio, locations, plots, provenance, runner
from plankton.errors import PipelineError

TOP_EIGENVALUES = 5  # eig_1..eig_5 in feature_map_stats.csv
MAX_CHANNELS = 4096  # a pooled output wider than this would need a covariance matrix too large to decompose
CONDITIONS = {  # name: (what the legend says, image subset, which modules it measures)
    "seen_test": ("trained model, seen test images", "test", "all"),
    "unseen": ("trained model, unseen images", "unseen", "all"),
    "head_init": ("head at initialisation, seen test images", "test", "head"),
    "random_trunk": ("fresh random trunk, seen test images", "test", "trunk"),
}
CONDITION_COLOURS = {"seen_test": "#1f77b4", "unseen": "#e6550d", "head_init": "#7f7f7f", "random_trunk": "#2ca02c"}




# ---- the modules ---------------------------------------------------------------------------------

def is_trunk_module(name: str) -> bool:
    return name == "trunk" or name.startswith("trunk.")


def auto_modules(model: torch.nn.Module) -> list[str]:
    """Each block of the trunk that holds weights (a ResNet's ReLU and pooling are no blocks) and
    each of the head's convolutions."""
    trunk = [f"trunk.{name}" for name, child in model.trunk.named_children() if any(True for _ in child.parameters())]
    head = [f"head.{name}" for name, child in model.head.named_children() if isinstance(child, torch.nn.Conv2d)]
    return trunk + head


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
    (float32, no autocast) with the named modules hooked. Only the trunk runs when every module is in it.
    keep_trunk (a list) is filled with the trunk's output of each batch; trunk_outputs (such a list,
    of a model with the same trunk) is the head's input instead of the images: the trunk does not run."""
    forward = model.trunk if all(is_trunk_module(n) for n in names) else model
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
    keeping the trained model's trunk (keep="trunk": the head as initialised) or its head
    (keep="head": a random trunk)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = backbone.build_model(arch)
    trained_state = {k: v.cpu() for k, v in trained.state_dict().items()}
    model.load_state_dict({k: (trained_state[k] if k.startswith("trunk.") == (keep == "trunk") else v)
                           for k, v in model.state_dict().items()})
    model.to(runtime.device).eval()
    if runtime.channels_last:
        model.trunk.to(memory_format=torch.channels_last)
    return model


def sample(relpaths: list[str], limit: int, seed: int) -> list[str]:
    """Up to `limit` of the paths, drawn with the seed, in their original order."""
    if len(relpaths) <= limit:
        return list(relpaths)
    chosen = np.sort(np.random.default_rng(seed).choice(len(relpaths), size=limit, replace=False))
    return [relpaths[i] for i in chosen]


def measure(trained: checkpoints.TrainedModel, names: list[str], limit: int, seed: int,
            runtime: dataloader.Runtime) -> dict[str, tuple[int, dict[str, ModuleStats]]]:
    """{condition: (images used, {module: stats})} for every condition that has modules to measure."""
    images = {subset: sample(trained.split.subset(subset)[0], limit, seed) for subset in ("test", "unseen")}
    pictures = {subset: dataloader.decode_images(trained.split.root, relpaths, trained.preprocess, runtime)
                for subset, relpaths in images.items()}  # each image decoded once, for every condition
    run_seed = trained.checkpoint.seed
    models = {"seen_test": lambda: trained.model, "unseen": lambda: trained.model,
              "head_init": lambda: variant_model(trained.checkpoint.arch, trained.model, run_seed, "trunk", runtime),
              "random_trunk": lambda: variant_model(trained.checkpoint.arch, trained.model, run_seed + 1, "head", runtime)}
    results = {}
    # the trained trunk's output on the seen test images, kept from seen_test: head_init's input (its trunk is
    # the checkpoint's), so the trunk runs over those images once for both
    trunk_outputs = [] if any(not is_trunk_module(n) for n in names) else None
    for condition, (_, subset, scope) in CONDITIONS.items():
        wanted = [n for n in names if scope == "all" or is_trunk_module(n) == (scope == "trunk")]
        if wanted:
            print(f"{condition}: {len(wanted)} module(s), {len(images[subset])} images")
            reuse = dict(keep_trunk=trunk_outputs) if condition == "seen_test" else \
                dict(trunk_outputs=trunk_outputs) if condition == "head_init" else {}
            results[condition] = (len(images[subset]), collect(models[condition](), wanted, pictures[subset],
                                                               trained.preprocess, runtime, **reuse))
    return results


# ---- tables and figures --------------------------------------------------------------------------

def tables(results: dict, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per module and condition, one row per eigenvalue), modules in FEATURE_MODULES order."""
    rows, spectra = [], []
    for name in names:
        for condition, (n_images, stats) in results.items():
            if name not in stats:
                continue
            eigenvalues = spectrum(stats[name].pooled_matrix())
            top = {f"eig_{i + 1}": float(eigenvalues[i]) if i < len(eigenvalues) else np.nan
                   for i in range(TOP_EIGENVALUES)}
            rows.append(dict(module=name, condition=condition, description=CONDITIONS[condition][0],
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
                 path) -> None:
    """One panel per module (its name and layer type), one line per condition, log scale."""
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
                    label=f"{CONDITIONS[condition][0]} (eff. rank {rank:.1f})")
        channels = int(stats[stats.module == name].n_channels.iloc[0])
        ax.set_yscale("log")
        ax.set_title(f"{name}: {kinds[name]} ({channels} channels)", fontsize=10)
        ax.set_xlabel("eigenvalue rank (largest first)", fontsize=8)
        ax.set_ylabel("eigenvalue (variance)", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    used = stats.groupby("condition").n_images.first()
    counts = f"{used.get('seen_test', 0)} seen test and {used.get('unseen', 0)} unseen"
    if (stats.n_images - 1 < stats.n_channels).any():
        counts += "; n images give at most n - 1 non-zero eigenvalues, the zeros are not drawn"
    fig.suptitle(f"Eigenvalues (log scale, largest first) of the covariance of each module's output averaged over "
                 f"height and width ({counts} images)\n{title}", fontsize=10)
    fig.tight_layout()
    plots.save_figure(fig, path)


def plot_nonpositive(stats: pd.DataFrame, names: list[str], title: str, path) -> None:
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
    ax.legend(handles, [CONDITIONS[c][0] for c in CONDITIONS if c in set(stats.condition)], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(len(names)), names, rotation=30 if max(map(len, names)) > 8 else 0,
                  ha="right" if max(map(len, names)) > 8 else "center")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of output values <= 0")
    ax.set_title(f"Share of non-positive values in each module's output\n{title}", fontsize=10)
    plots.save_figure(fig, path)


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    names = resolve_modules(trained.model, cfg.FEATURE_MODULES)
    inputs = provenance.start_stage(paths, "feature_maps", [paths.best, paths.split])
    checkpoint = trained.checkpoint
    print(f"feature_maps.py  {paths.best} (trunk: {checkpoint.weights_source}), modules: {', '.join(names)}")
    results = measure(trained, names, cfg.FEATURE_IMAGES, cfg.SEED, runtime)
    stats, spectra = tables(results, names)
    outputs = [paths.out / name for name in ("feature_map_stats.csv", "feature_map_spectra.csv",
                                             "feature_map_spectra.png", "feature_map_nonpositive.png")]
    fileio.save_csv(stats, outputs[0], index=False)
    fileio.save_csv(spectra, outputs[1], index=False)
    fresh_seed = checkpoint.seed + 1
    title = trunk_words(checkpoint.weights_source, fresh_seed)
    modules = dict(trained.model.named_modules())
    plot_spectra(spectra, stats, names, {n: type(modules[n]).__name__ for n in names}, title, outputs[2])
    plot_nonpositive(stats, names, title, outputs[3])
    provenance.save_provenance(paths, "feature_maps", inputs, outputs, cfg)
    print(stats[["module", "condition", "n_images", "nonpositive_share", "effective_rank"]].to_string(index=False))
    print(f"-> {outputs[0]}, {outputs[2]}, {outputs[3]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
