"""Seed robustness: train the classifier once per seed in SEEDS on ONE fixed split and see how much
test accuracy and transfer accuracy move with the seed alone.

    python seeds.py                          # SEEDS from configfile.py, e.g. [0, 1, 2, 3, 4]
    python seeds.py --SEEDS=[0,1,2,3,4,5,6,7,8,9]

Reads:  outputs/split.csv (drawn as train.py draws it if there is none yet), the images (through the
        trunk cache).
Writes: outputs/seeds/initial_trunk.pth (the trunk every seed starts from), outputs/seeds/seed_<n>/
        (a copy of split.csv, best.pth, last.pth, training_history.csv and its plots, train_log.txt),
        outputs/seed_robustness.csv (one row per seed), outputs/seed_robustness_summary.csv (mean, sd,
        min, max over the seeds), outputs/seed_training_curves.png, and last
        outputs/provenance_seeds.json. The main checkpoints/best.pth is never touched.

The seed changes the head's initial weights, the order of the batches and dropout (and augmentation
with AUGMENT=True). It does not change the split, the trunk (the one train.py starts from with SEED,
saved once, so every seed reads the same cached trunk features), or the transfer analysis' test part
and training subsets (drawn with SEED). A seed whose training finished is not trained again; after
changing a training setting run with --RESUME=False.
"""
import contextlib
import io
import time
import types

import pandas as pd
import torch

import dataloader
from plankton import (
    checkpoints,
    fileio,
    locations,
    metrics,
    plots,
    probes,
    provenance,
    registry,
    runner,
    splits,
    trunk_cache,
    variant_runs,
)


def initial_trunk(cfg, paths, split) -> tuple[str, str]:
    """(path, weights source): the trunk train.py starts from with these settings, saved once for all seeds."""
    path, weights_source, trunk_sha256 = variant_runs.save_initial_trunk(cfg, paths.seeds, split)
    if paths.best.is_file():
        shared = checkpoints.open_checkpoint(paths.best).trunk_sha256 == trunk_sha256
        print(f"the seeds start from {'the same trunk as' if shared else 'ANOTHER trunk than'} {paths.best}")
    return path, weights_source


def seed_settings(cfg, seed: int, folder, trunk_path: str) -> types.SimpleNamespace:
    """The settings of one seed's run: its own folder for outputs and checkpoints, the shared trunk."""
    return types.SimpleNamespace(**{**vars(cfg), "SEED": seed, "OUTPUT_DIR": str(folder), "CHECKPOINT_DIR": str(folder),
                                    "WEIGHTS": trunk_path})


def evaluate_seed(seed_cfg, main_seed: int, runtime) -> dict:
    """Test accuracy (overall and per class) and, per probe, the transfer balanced accuracy with the
    largest training size (mean over draws) of one seed's best.pth."""
    seed_paths = locations.Paths.from_settings(seed_cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # the split's checks print what train.py printed
        trained = checkpoints.open_trained_model(seed_cfg, seed_paths, runtime.device, runtime.channels_last)
    checkpoint = trained.checkpoint
    cache = trunk_cache.from_settings(seed_cfg, seed_paths.cache, trained.model.trunk, checkpoint.trunk_sha256,
                                      trained.preprocess, runtime)
    logits, _, test_labels = trained.outputs("test", cache, runtime)
    scores = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    table = metrics.metrics_table(test_labels, logits.argmax(1), scores, trained.class_names)
    row = dict(seed=seed_cfg.SEED, best_epoch=checkpoint.epoch, best_val_loss=checkpoint.val_loss,
               test_accuracy=float(table.accuracy.iloc[-1]))
    row.update({f"test_acc_{r.class_name}": r.accuracy for r in table.iloc[:-1].itertuples()})
    _, embeddings, unseen_labels = trained.outputs("unseen", cache, runtime)
    curves = probes.transfer_curves(embeddings, unseen_labels, seed_cfg.TRANSFER_TEST_FRACTION,
                                    seed_cfg.TRANSFER_REPEATS, probes.ProbeSettings.from_settings(seed_cfg), main_seed)
    largest = curves[curves.n_train == curves.n_train.max()]
    row["transfer_n_train"] = int(largest.n_train.iloc[0])
    row.update({f"transfer_{m}": float(largest[largest.method == m].balanced_accuracy.mean())
                for m in probes.PROBES})
    return row


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation, min and max over the seeds of every figure but the seed."""
    figures = per_seed.drop(columns=["seed"]).select_dtypes("number")
    return pd.DataFrame(dict(metric=figures.columns, mean=figures.mean().values, sd=figures.std(ddof=1).values,
                             min=figures.min().values, max=figures.max().values, n_seeds=len(per_seed)))


def plot_seed_curves(histories: dict[int, pd.DataFrame], path) -> None:
    """Validation loss and accuracy of every seed's run, the best pass of each marked."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    colours = plt.get_cmap("tab10" if len(histories) <= 10 else "tab20")
    for i, (seed, history) in enumerate(histories.items()):
        best = history.val_loss.idxmin()
        for ax, column in ((axes[0], "val_loss"), (axes[1], "val_acc")):
            ax.plot(history.epoch, history[column], "-", lw=1.2, color=colours(i % colours.N), label=f"seed {seed}")
            ax.plot(history.epoch[best], history[column][best], "o", ms=6, color=colours(i % colours.N))
    axes[0].set_yscale("log")  # the late passes, where the best one is chosen, sit near 0
    for ax, title in ((axes[0], "Validation cross-entropy loss (log scale)"), (axes[1], "Validation accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(min(0.9, min(float(h.val_acc.min()) for h in histories.values())) - 0.02, 1.01)
    axes[1].legend(title="dot = best pass (lowest validation loss)", loc="center left", bbox_to_anchor=(1.02, 0.5),
                   fontsize=8, title_fontsize=8)
    fig.suptitle(f"Validation curves of {len(histories)} training seeds on one split")
    plots.save_figure(fig, path)


def print_summary(summary: pd.DataFrame) -> None:
    print(f"Over {int(summary.n_seeds.iloc[0])} seeds (mean ± sd, min–max):")
    for row in summary.itertuples():
        print(f"  {row.metric:>24}: {row.mean:.4f} ± {row.sd:.4f}  ({row.min:.4f}–{row.max:.4f})")


def run(cfg) -> None:
    registry.require_task("seeds", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    inputs = provenance.start_stage(paths, "seeds", [paths.split])
    trunk_path, weights_source = initial_trunk(cfg, paths, split)
    rows, histories, started = [], {}, time.time()
    for seed in cfg.SEEDS:
        seed_cfg = seed_settings(cfg, seed, paths.seeds / f"seed_{seed}", trunk_path)
        seconds = variant_runs.train_variant(seed_cfg, paths.split, f"seed {seed}")
        rows.append(dict(evaluate_seed(seed_cfg, cfg.SEED, runtime), train_seconds=seconds))
        histories[seed] = fileio.read_csv(locations.Paths.from_settings(seed_cfg).history)
        print(f"seed {seed}: test accuracy {rows[-1]['test_accuracy']:.4f}, best validation loss "
              f"{rows[-1]['best_val_loss']:.4f} at epoch {rows[-1]['best_epoch']:.2f} ({seconds:.1f} s)")
    per_seed = pd.DataFrame(rows).assign(trunk_weights=weights_source)
    summary = summarise(per_seed)
    outputs = [paths.out / name for name in ("seed_robustness.csv", "seed_robustness_summary.csv",
                                             "seed_training_curves.png")]
    fileio.save_csv(per_seed, outputs[0], index=False)
    fileio.save_csv(summary, outputs[1], index=False)
    plots.note_trunk_weights(weights_source)  # the trunk every seed started from, not its saved copy's path
    plot_seed_curves(histories, outputs[2])
    print_summary(summary)
    provenance.save_provenance(paths, "seeds", inputs, outputs, cfg)
    print(f"{len(cfg.SEEDS)} seeds in {time.time() - started:.1f} s -> {outputs[0]}, {outputs[1]}, {outputs[2]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
