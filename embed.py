"""128-d embeddings (the head's second-to-last layer) of the train and test images of the seen
classes and of every image of the unseen classes.

    python embed.py

Reads:  checkpoints/best.pth, outputs/split.csv, the images (through the trunk cache).
Writes: outputs/embeddings_train.pkl, outputs/embeddings_test.pkl, outputs/embeddings_unseen.pkl:
        pickled pandas DataFrames with columns label, class_name, path, e0 … e127; frame.attrs
        records the checkpoint's SHA-256, the split's SHA-256, the subset and the class list.
"""
import time

import numpy as np
import pandas as pd

import common
import dataloader


def embeddings_frame(embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                     relpaths: list[str], attrs: dict) -> pd.DataFrame:
    frame = pd.DataFrame(embeddings.astype(np.float32), columns=[f"e{i}" for i in range(embeddings.shape[1])])
    frame.insert(0, "path", relpaths)
    frame.insert(0, "class_name", [class_names[i] for i in labels])
    frame.insert(0, "label", labels.astype(np.int64))
    frame.attrs.update(attrs)
    return frame


def run(cfg) -> None:
    paths = common.make_output_dirs(cfg)
    device = common.pick_device(cfg.DEVICE)
    checkpoint, split, model = dataloader.open_trained_model(cfg, paths, device)
    checkpoint_sha256 = common.sha256_file(paths.best)

    for subset in ("train", "test", "unseen"):
        started = time.time()
        relpaths, labels = split.subset(subset)
        source = dataloader.feature_source(split, subset, model.trunk, checkpoint["trunk_sha256"], cfg,
                                           paths.cache, device, use_cache=bool(cfg.CACHE_TRUNK))
        _, embeddings = dataloader.head_outputs(model, source, device, cfg)
        names = split.unseen_classes if subset == "unseen" else split.seen_classes
        frame = embeddings_frame(embeddings, labels, names, relpaths, dict(
            checkpoint_sha256=checkpoint_sha256, split_sha256=split.sha256, subset=subset, class_names=names,
            data_dir=str(split.root), weights_source=checkpoint["weights_source"]))
        common.save_pickle(frame, paths.embeddings[subset])
        print(f"{subset}: {len(frame)} embeddings of size {embeddings.shape[1]} in {time.time() - started:.1f}s "
              f"-> {paths.embeddings[subset]}")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
