"""How many deliberately flipped labels suspicious_labels.py finds (a measurement, not a test: it
prints figures).

    python tools/flipped_labels.py                   # 5 % of the seen digits, in /tmp/flipped_labels
    python tools/flipped_labels.py --share=0.1 --folder=/tmp/other

Exports the built-in digits, moves `share` of the seen classes' images (0-5, as configfile.py has
them) into another seen class's folder (a random other class), trains with WEIGHTS=None for 2 epochs
(the stage does not use the trained head, only the frozen trunk) and runs suspicious_labels.py, all in
`folder`. Prints how many flipped images landed in the training split and how many of them rank in
the top n and the top 2n of outputs/suspicious_labels.csv (n = flipped training images).
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from plankton import images  # noqa: E402

SEEN = [str(i) for i in range(6)]


def flip(clean: Path, noisy: Path, share: float, seed: int) -> dict[str, str]:
    """Copy `clean` to `noisy` and move `share` of the seen images to another seen class: {new relpath: true class}."""
    if noisy.exists():
        shutil.rmtree(noisy)
    shutil.copytree(clean, noisy)
    rng = np.random.default_rng(seed)
    files = sorted(f"{c}/{p.name}" for c in SEEN for p in (noisy / c).glob("*.png"))
    moved = {}
    for i in rng.choice(len(files), int(round(share * len(files))), replace=False):
        true, name = files[i].split("/")
        given = str(rng.choice([c for c in SEEN if c != true]))
        shutil.move(noisy / true / name, noisy / given / name)
        moved[f"{given}/{name}"] = true
    print(f"flipped {len(moved)} of {len(files)} seen-class images")
    return moved


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/flipped_labels"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images.export_digits(args.folder / "clean")
    moved = flip(args.folder / "clean", args.folder / "noisy", args.share, args.seed)
    run = args.folder / "run"
    settings = [f"--DATA_DIR={args.folder / 'noisy'}", f"--OUTPUT_DIR={run / 'outputs'}",
                f"--CHECKPOINT_DIR={run / 'checkpoints'}", f"--CACHE_DIR={run / 'cache'}", "--WEIGHTS=None",
                "--MAX_EPOCHS=2", f"--SEED={args.seed}"]
    for script in ("train.py", "suspicious_labels.py"):
        subprocess.run([sys.executable, str(REPO / script), *settings], check=True, cwd=REPO)
    table = pd.read_csv(run / "outputs" / "suspicious_labels.csv", dtype={"path": str, "suggested_class": str})
    flipped = table.path.isin(moved).to_numpy()
    n = int(flipped.sum())
    print(f"\n{len(table)} training images, {n} of them flipped")
    for top in (n, 2 * n):
        print(f"top {top}: {int(flipped[:top].sum())} flipped ({flipped[:top].sum() / max(n, 1):.1%} of them)")
    back = sum(moved[p] == s for p, s in zip(table.path[flipped], table.suggested_class[flipped]))
    print(f"suggested class = the true class for {back} of {n} flipped")


if __name__ == "__main__":
    main()
