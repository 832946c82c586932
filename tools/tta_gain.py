"""What test-time augmentation (TTA) gains and costs on a finished run (a measurement, not a test: it
prints figures and writes nothing into the run).

    python tools/tta_gain.py --config=my_settings.py            # the run those settings name
    python tools/tta_gain.py --TRUNK=efficientnet_lite0 --OUTPUT_DIR=/tmp/lite/outputs ...

    python tools/tta_gain.py --write-turned=/tmp/turned       # the built-in digits, each image turned or
                                                               # mirrored at random (no "up", as plankton)

For each TTA value (plankton/orientations.py) it opens the run's best.pth and prints the seen test
images' accuracy and macro F1, and each open-set score's AUROC (seen test vs unseen images, the
reference from the training images), with the seconds taken: the first pass of an orientation
computes its trunk-cache folder, a second reads it (both are printed)."""
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dataloader  # noqa: E402
from plankton import checkpoints, locations, openset, orientations, settings  # noqa: E402


def measure(cfg, tta: str) -> dict:
    cfg.TTA = tta
    paths = locations.Paths.from_settings(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    cache = trained.trunk_cache(cfg, paths, runtime)
    row = dict(tta=tta, orientations=len(orientations.TTA[tta]))
    for attempt in ("first", "cached"):
        started = time.perf_counter()
        reference = openset.reference_from_model(trained, cache, runtime, cfg)
        logits, embeddings, labels = trained.outputs("test", cache, runtime)
        unseen_logits, unseen_embeddings, _ = trained.outputs("unseen", cache, runtime)
        row[f"seconds_{attempt}"] = time.perf_counter() - started
    predicted = logits.argmax(1)
    row.update(accuracy=accuracy_score(labels, predicted), macro_f1=f1_score(labels, predicted, average="macro"))
    seen_scores = openset.all_scores(logits, embeddings, reference)
    unseen_scores = openset.all_scores(unseen_logits, unseen_embeddings, reference)
    for name in openset.SCORES:
        row[f"auroc_{name}"] = openset.detection_metrics(seen_scores[name], unseen_scores[name])["auroc"]
    return row


def write_turned(folder: Path, seed: int = 0) -> None:
    """The built-in digits (exported first if need be) in `folder`, each image in a random one of the
    eight orientations: a data set whose images have no "up", like plankton's."""
    from PIL import Image

    from plankton import images
    source = images.data_dir(None, str(REPO / "data" / "digits"))
    rng = np.random.default_rng(seed)
    for path in sorted(source.glob("*/*.png")):
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        turned = orientations.orient(pixels, int(rng.integers(8))).contiguous()
        Image.fromarray(turned.permute(1, 2, 0).numpy()).save(target)
    print(f"-> {folder}: the built-in digits, each turned or mirrored at random")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("--write-turned="):
        return write_turned(Path(argv[0].split("=", 1)[1]))
    cfg = settings.load_settings(argv)
    rows = [measure(cfg, tta) for tta in orientations.TTA]
    columns = list(rows[0])
    print("  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print("  ".join(f"{v:>14.4f}" if isinstance(v, float) else f"{v:>14}" for v in row.values()))


if __name__ == "__main__":
    main()
