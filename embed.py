"""128-d embeddings (the head's second-to-last layer) of the train and test images of the seen
classes and of every image of the unseen classes.

    python embed.py
    torchrun --standalone --nproc_per_node=4 embed.py   # each process embeds a block of the images

Reads:  checkpoints/best.pth, outputs/split.csv, the images (through the trunk cache).
Writes: outputs/embeddings_train.pkl, outputs/embeddings_test.pkl, outputs/embeddings_unseen.pkl
        (and the same tables as .parquet, and .csv with EXPORT_CSV=True):
        pickled pandas DataFrames with columns label, class_name, path, e0 … e127; frame.attrs
        records the checkpoint's SHA-256, the split's SHA-256, the subset, the class list and the task.
        TASK="multilabel": a `labels` column after path holds each image's label set ("1;3;5"), and
        label/class_name are its rarest label among the subset's labels (seen, or unseen for "unseen").
        Last, outputs/provenance_embed.json (see plankton/provenance.py).
Under torchrun the processes share out the images (and the missing trunk features) in contiguous
blocks; rank 0 gathers the embeddings in the split's order and alone writes the same files.
"""
import time

import numpy as np

import dataloader
from plankton import checkpoints, distributed, embedding_files, locations, orientations, provenance, runner, training


def embeddings_of(model, source: dataloader.FeatureSource, runtime: dataloader.Runtime) -> np.ndarray | None:
    """The embedding of every item of `source`, in order: in a single process, all of it; under
    torchrun each rank runs its contiguous block and rank 0 gets them all (the others None)."""
    start, stop = distributed.shard_bounds(len(source))
    mine = None
    if stop > start:
        _, mine = training.head_outputs(model, dataloader.select_rows(source, np.arange(start, stop)), runtime)
    return distributed.gather_rows(mine)


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    with distributed.main_first():  # rank 0 checks the images first (and refreshes their scan cache)
        trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    checkpoint, split = trained.checkpoint, trained.split
    main = distributed.is_main()
    inputs = provenance.start_stage(paths, "embed", [paths.best, paths.split]) if main else {}
    cache = trained.trunk_cache(cfg, paths, runtime)
    outputs = []
    for subset in embedding_files.EMBEDDED_SUBSETS:
        started = time.time()
        embeddings = orientations.averaged(  # one pass, or the mean over TTA's orientations
            lambda o: embeddings_of(trained.model, trained.source(subset, cache, o), runtime), trained.orientations)
        if not main:
            continue
        relpaths, labels = split.subset(subset)
        names = split.classes(subset)
        frame = embedding_files.embeddings_frame(embeddings, labels, names, relpaths, embedding_files.EmbeddingsInfo(
            checkpoint_sha256=trained.sha256, split_sha256=split.sha256, subset=subset, class_names=tuple(names),
            data_dir=str(split.root), weights_source=checkpoint.weights_source, task=split.task),
            label_texts=split.label_texts(subset),
            label_counts=split.label_counts(names) if split.task == "multilabel" else None)
        embedding_files.save_embeddings(frame, paths.embeddings(subset))
        outputs += [paths.embeddings(subset)] + embedding_files.export_table(frame, paths.embeddings(subset), cfg.EXPORT_CSV)
        print(f"{subset}: {len(frame)} embeddings of size {embeddings.shape[1]} in {time.time() - started:.1f}s "
              f"-> {paths.embeddings(subset)}")
    if main:
        provenance.save_provenance(paths, "embed", inputs, outputs, cfg)


def main(argv=None):
    runner.run_script(run, argv, distributed_ok=True)


if __name__ == "__main__":
    main()
