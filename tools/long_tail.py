"""How far the rare-class settings help on a long-tailed variant of the built-in digits (a measurement,
not a test: it prints figures).

    python tools/long_tail.py                     # efficientnet_lite0 (ImageNet weights from pip), seeds 0 and 1
    python tools/long_tail.py --trunk=efficientnet_v2_s --seeds 0 --folder=/tmp/other

Exports the built-in digits, then holds out --eval-per-class images of each seen class (0-5, as
configfile.py has them) as a balanced evaluation folder. Of the other images it keeps a long tail:
every image of class 0, --ratio times fewer of class 5, geometric in between (148, 68, 31, 14, 6, 3
with the defaults: 49:1); the unseen classes 6-9 stay whole. train.py trains on that folder once per
variant of VARIANTS and seed (with QUICK's settings), each in its own folder, on one split
(SPLIT_SEED=0) and one trunk cache.
Each best.pth then classifies the balanced evaluation images: balanced accuracy (the mean recall of
the six classes) and the recall of the three rarest classes. Writes <folder>/long_tail_results.csv
(one row per run) and prints the table docs/rare_classes.md quotes, as mean (min to max) over seeds.
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dataloader  # noqa: E402
from plankton import checkpoints, images, training  # noqa: E402

SEEN, UNSEEN = [str(i) for i in range(6)], [str(i) for i in range(6, 10)]
# variant -> train.py settings; the fixes one by one, best.pth picked by validation balanced accuracy
VARIANTS = {
    "baseline (plain cross-entropy, lowest validation loss)": [],
    "SELECT_BY=balanced_accuracy": ["--SELECT_BY=balanced_accuracy"],
    "CLASS_WEIGHTS=balanced": ["--CLASS_WEIGHTS=balanced", "--SELECT_BY=balanced_accuracy"],
    "CLASS_WEIGHTS=sqrt": ["--CLASS_WEIGHTS=sqrt", "--SELECT_BY=balanced_accuracy"],
    "BALANCED_SAMPLING=True": ["--BALANCED_SAMPLING=True", "--SELECT_BY=balanced_accuracy"],
    "MAX_PER_CLASS=30 + CLASS_WEIGHTS=balanced": ["--MAX_PER_CLASS=30", "--CLASS_WEIGHTS=balanced",
                                                   "--SELECT_BY=balanced_accuracy"],
}


# every run: one validation pass per epoch and at most 20 epochs (the defaults' 4 passes and 50 epochs take
# about 4 x longer on a shared CPU; the head has converged on these few hundred images long before)
QUICK = ["--VAL_PER_EPOCH=1", "--MAX_EPOCHS=20", "--PATIENCE=5"]


def long_tail_counts(largest: int, classes: int, ratio: float) -> list[int]:
    """Images kept per class: `largest` down to largest / ratio, geometric (at least 3: train, val, test)."""
    return [max(3, int(round(largest * ratio ** (-i / (classes - 1))))) for i in range(classes)]


def build(digits: Path, folder: Path, eval_per_class: int, ratio: float, seed: int) -> list[int]:
    """folder/long_tail (the training data) and folder/eval (balanced), from the exported digits."""
    for name in ("long_tail", "eval"):
        shutil.rmtree(folder / name, ignore_errors=True)
    rng = np.random.default_rng(seed)
    files = {c: sorted((digits / c).glob("*.png")) for c in SEEN + UNSEEN}
    held = {c: list(rng.permutation(files[c])) for c in SEEN}
    counts = long_tail_counts(len(files[SEEN[0]]) - eval_per_class, len(SEEN), ratio)
    for c, n in zip(SEEN, counts):
        for target, chosen in (("eval", held[c][:eval_per_class]), ("long_tail", held[c][eval_per_class:][:n])):
            (folder / target / c).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                shutil.copyfile(path, folder / target / c / path.name)
    for c in UNSEEN:
        shutil.copytree(digits / c, folder / "long_tail" / c)
    return counts


def score(best: Path, eval_root: Path) -> dict:
    """Balanced accuracy and per-class recall of best.pth on the balanced evaluation images."""
    checkpoint = checkpoints.open_checkpoint(best)
    model = checkpoint.build_model(torch.device("cpu"))
    relpaths = [f"{c}/{p.name}" for c in SEEN for p in sorted((eval_root / c).glob("*.png"))]
    labels = np.array([SEEN.index(p.split("/")[0]) for p in relpaths])
    source = dataloader.feature_source(eval_root, relpaths, labels, checkpoint.preprocess)
    runtime = dataloader.Runtime(torch.device("cpu"), 64, 0, False, False)
    predicted = training.head_outputs(model, source, runtime)[0].argmax(1)
    recall = {f"recall_{c}": float((predicted[labels == i] == i).mean()) for i, c in enumerate(SEEN)}
    return dict(balanced_accuracy=float(np.mean(list(recall.values()))), best_epoch=checkpoint.epoch, **recall)


def summary(results: pd.DataFrame, rare: list[str]) -> pd.DataFrame:
    results = results.assign(rare_recall=results[[f"recall_{c}" for c in rare]].mean(axis=1))
    columns = ["balanced_accuracy", "rare_recall", f"recall_{rare[-1]}"]
    cell = lambda v: f"{v.mean():.3f} ({v.min():.3f} to {v.max():.3f})"  # noqa: E731
    return results.groupby("variant", sort=False)[columns].agg(cell)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/tmp/long_tail"))
    parser.add_argument("--trunk", default="efficientnet_lite0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ratio", type=float, default=50.0)
    parser.add_argument("--eval-per-class", type=int, default=30)
    parser.add_argument("--reuse", action="store_true", help="keep runs whose training finished in an earlier call")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    args = parser.parse_args()
    images.export_digits(args.folder / "digits")
    counts = build(args.folder / "digits", args.folder, args.eval_per_class, args.ratio, seed=0)
    print(f"long-tailed training data: {dict(zip(SEEN, counts))} images per seen class "
          f"({counts[0] / counts[-1]:.0f}:1); {args.eval_per_class} per class to evaluate on")
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            run = args.folder / "runs" / f"{list(VARIANTS).index(variant)}_seed{seed}"
            settings = [f"--DATA_DIR={args.folder / 'long_tail'}", f"--OUTPUT_DIR={run / 'outputs'}",
                        f"--CHECKPOINT_DIR={run / 'checkpoints'}", f"--CACHE_DIR={args.folder / 'cache'}",
                        f"--TRUNK={args.trunk}", f"--SEED={seed}", "--SPLIT_SEED=0", "--RESUME=False",
                        *QUICK, *VARIANTS[variant]]
            run.mkdir(parents=True, exist_ok=True)
            if args.reuse and (run / "outputs" / "training_history.csv").is_file():
                print(f"reusing {run} (--reuse)")
            else:
                with open(run / "train_log.txt", "w") as log:
                    subprocess.run([sys.executable, str(REPO / "train.py"), *settings], check=True, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
            rows.append(dict(variant=variant, seed=seed, **score(run / "checkpoints" / "best.pth",
                                                                 args.folder / "eval")))
            print(f"{variant}, seed {seed}: balanced accuracy {rows[-1]['balanced_accuracy']:.3f}, recall of "
                  f"class {SEEN[-1]} {rows[-1][f'recall_{SEEN[-1]}']:.3f}", flush=True)
    results = pd.DataFrame(rows)
    results.to_csv(args.folder / "long_tail_results.csv", index=False)
    table = summary(results, SEEN[-3:])
    table.columns = ["balanced accuracy", f"recall of the 3 rarest ({', '.join(SEEN[-3:])})",
                     f"recall of the rarest ({SEEN[-1]})"]
    print(f"\ntrunk {args.trunk}, seeds {args.seeds}: mean (min to max) over seeds\n")
    print("| variant | " + " | ".join(table.columns) + " |\n|---|" + "---|" * len(table.columns))
    for variant, row in table.iterrows():
        print(f"| {variant} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
