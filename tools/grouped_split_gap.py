"""How optimistic a per-image split is when images come in groups of near-duplicates (a measurement,
not a test: it prints figures).

    python tools/grouped_split_gap.py                 # efficientnet_lite0, seeds 0 and 1, in /tmp/grouped_split_gap
    python tools/grouped_split_gap.py --sources 20 --copies 8 --seeds 0

Builds a folder from the built-in digits in which each of --sources digits per class becomes one
"tow": a sub-folder <class>/tow_<class>_<i>/ of --copies near-duplicates (shifted by up to one pixel,
with a little noise), as the images of one net tow or one station often are. Other digits, from no
tow, are kept apart as fresh images. train.py and evaluate.py then run twice per seed: with the split
drawn image by image (GROUP_BY=None) and with whole tows in one subset (GROUP_BY="path:2"). Printed per
split: the test accuracy evaluate.py reports, and the balanced accuracy of the same best.pth on the
fresh images (what the model really does on new tows; 50 per seen class, so balanced accuracy is
plain accuracy there). Training uses long_tail.py's QUICK settings. Writes <folder>/grouped_split_gap.csv.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from long_tail import QUICK, SEEN, UNSEEN, score  # noqa: E402  (tools/ is this script's folder)

from plankton import images  # noqa: E402

SPLITS = {"per image (GROUP_BY=None)": [], "grouped (GROUP_BY='path:2')": ["--GROUP_BY=path:2"]}


def near_copy(pixels: np.ndarray, rng) -> np.ndarray:
    """The image shifted by up to one pixel each way, with Gaussian noise (sd 8 grey levels)."""
    moved = np.roll(pixels, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1)).astype(float)
    return np.clip(moved + rng.normal(0, 8, moved.shape), 0, 255).astype(np.uint8)


def build(digits: Path, folder: Path, sources: int, copies: int, fresh: int, seed: int) -> None:
    """folder/tows (class/tow_<class>_<i>/copy_<j>.png) and folder/fresh (class/<digit>.png, no tow)."""
    for name in ("tows", "fresh"):
        shutil.rmtree(folder / name, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for c in SEEN + UNSEEN:
        files = list(rng.permutation(sorted((digits / c).glob("*.png"))))
        for i, path in enumerate(files[:sources]):
            pixels = np.asarray(Image.open(path).convert("L"))
            tow = folder / "tows" / c / f"tow_{c}_{i}"
            tow.mkdir(parents=True)
            for j in range(copies):
                Image.fromarray(near_copy(pixels, rng)).save(tow / f"copy_{j}.png")
        if c in SEEN:
            (folder / "fresh" / c).mkdir(parents=True)
            for path in files[sources:sources + fresh]:
                shutil.copyfile(path, folder / "fresh" / c / path.name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/tmp/grouped_split_gap"))
    parser.add_argument("--trunk", default="efficientnet_lite0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sources", type=int, default=15, help="tows per class")
    parser.add_argument("--copies", type=int, default=8, help="near-duplicates per tow")
    parser.add_argument("--reuse", action="store_true", help="keep runs evaluated in an earlier call")
    parser.add_argument("--fresh", type=int, default=50, help="fresh images per seen class")
    args = parser.parse_args()
    images.export_digits(args.folder / "digits")
    build(args.folder / "digits", args.folder, args.sources, args.copies, args.fresh, seed=0)
    print(f"{args.sources} tows of {args.copies} near-duplicates per class; {args.fresh} fresh images per seen class")
    rows = []
    for split, extra in SPLITS.items():
        for seed in args.seeds:
            run = args.folder / "runs" / f"{'grouped' if extra else 'per_image'}_seed{seed}"
            run.mkdir(parents=True, exist_ok=True)
            settings = [f"--DATA_DIR={args.folder / 'tows'}", f"--OUTPUT_DIR={run / 'outputs'}",
                        f"--CHECKPOINT_DIR={run / 'checkpoints'}", f"--CACHE_DIR={args.folder / 'cache'}",
                        f"--TRUNK={args.trunk}", f"--SEED={seed}", f"--SPLIT_SEED={seed}", "--RESUME=False",
                        *QUICK, *extra]
            if args.reuse and (run / "outputs" / "test_metrics.json").is_file():
                print(f"reusing {run} (--reuse)")
            else:
                (run / "outputs" / "split.csv").unlink(missing_ok=True)  # each seed draws its own split
                with open(run / "log.txt", "w") as log:
                    for script in ("train.py", "evaluate.py"):
                        subprocess.run([sys.executable, str(REPO / script), *settings], check=True, cwd=REPO,
                                       stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
            reported = json.loads((run / "outputs" / "test_metrics.json").read_text())
            fresh = score(run / "checkpoints" / "best.pth", args.folder / "fresh")
            rows.append(dict(split=split, seed=seed, test_accuracy=reported_accuracy(reported),
                             fresh_balanced_accuracy=fresh["balanced_accuracy"]))
            print(f"{split}, seed {seed}: test accuracy reported {rows[-1]['test_accuracy']:.3f}, on fresh images "
                  f"{rows[-1]['fresh_balanced_accuracy']:.3f}", flush=True)
    results = pd.DataFrame(rows)
    results.to_csv(args.folder / "grouped_split_gap.csv", index=False)
    print(f"\ntrunk {args.trunk}, seeds {args.seeds}: mean (min to max) over seeds\n")
    print("| split | test accuracy evaluate.py reports | accuracy on fresh images |\n|---|---|---|")
    for split, part in results.groupby("split", sort=False):
        cells = [f"{v.mean():.3f} ({v.min():.3f} to {v.max():.3f})" for v in
                 (part.test_accuracy, part.fresh_balanced_accuracy)]
        print(f"| {split} | " + " | ".join(cells) + " |")


def reported_accuracy(metrics: dict) -> float:
    """The overall test accuracy in evaluate.py's test_metrics.json."""
    return float(metrics["overall"]["accuracy"])


if __name__ == "__main__":
    main()
