"""What to annotate next: ranks unlabelled images so that a person labels the ones that teach the
classifier most, a batch of ANNOTATE_BATCH picked by ANNOTATE_STRATEGY (default "diverse": the
images whose two top classes are nearest a tie, spread over the embedding space so that a batch is
not fifty copies of one kind).

    python annotate_next.py --PREDICT_DIR=/data/new_campaign
    python annotate_next.py --ANNOTATE_STRATEGY=margin --ANNOTATE_BATCH=100
    python annotate_next.py            (with ECOTAXA_EXPORT and no PREDICT_DIR: its objects not yet validated)

Reads:  the candidates: PREDICT_DIR's images (at any depth, as predict.py finds them) when it is
        set, else the objects of ECOTAXA_EXPORT whose status is not in ECOTAXA_STATUSES;
        checkpoints/best.pth, outputs/split.csv, the train and val images (through the trunk cache:
        the training embeddings are what "knn" measures novelty against, the validation logits set
        the temperature). The candidates go through the trunk cache too, keyed by content SHA-256.
Writes: outputs/annotate/annotate_next.csv (the batch in rank order: rank, path relative to the
        candidates' folder, sha256, predicted_class, score (its softmax score at the fitted
        temperature), strategy_score (the strategy's score, higher = annotate sooner; see
        plankton/annotation.py), margin, entropy, knn_distance), outputs/annotate/annotate_next.tsv
        (the batch as an EcoTaxa-shaped TSV: object_id, img_file_name, category = predicted class,
        status "predicted", sample_id, score, object_annotate_rank, object_annotate_score; an EcoTaxa
        object keeps its object_id), outputs/annotate/annotate_next.png (the batch's contact sheet),
        and last outputs/provenance_annotate_next.json. A later run replaces them; nothing else changes.

The strategies (plankton/annotation.py's STRATEGIES) and a simulation of what they gain over random
picks: docs/annotation.md (python tools/annotation_simulation.py).
"""
import sys
import textwrap

import numpy as np
import pandas as pd

import dataloader
from plankton import (
    annotation,
    calibrate,
    checkpoints,
    ecotaxa,
    fileio,
    images,
    locations,
    openset,
    plots,
    provenance,
    registry,
    runner,
    unlabelled,
)

SHEET_COLUMNS = 10  # thumbnails per row of the contact sheet
SHEET_MAX = 100  # the contact sheet shows at most this many of the batch (the CSV lists them all)
COLUMNS = ["rank", "path", "sha256", "predicted_class", "score", "strategy_score", "margin", "entropy", "knn_distance"]


# ---- the batch -----------------------------------------------------------------------------------

def batch_table(pool: unlabelled.Unlabelled, candidates: annotation.Candidates, picked: np.ndarray,
                strategy_scores: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One row per picked image, in rank order (rank 1 first), with every strategy's view of it."""
    probabilities = candidates.probabilities[picked]
    return pd.DataFrame(dict(
        rank=np.arange(1, len(picked) + 1), path=[images.printable(pool.relpaths[i]) for i in picked],
        sha256=[pool.hashes[i] for i in picked], predicted_class=[class_names[i] for i in probabilities.argmax(1)],
        score=probabilities.max(1), strategy_score=strategy_scores[picked],
        margin=annotation.margin_score(probabilities), entropy=annotation.entropy_score(probabilities),
        knn_distance=openset.kth_neighbour_distance(candidates.embeddings[picked], candidates.reference)),
        columns=COLUMNS)


def plot_contact_sheet(table: pd.DataFrame, root, strategy: str, candidates: int, path) -> None:
    """Thumbnails of the batch in rank order, captioned "#rank class score / strategy score"."""
    shown = table.head(SHEET_MAX)
    fig, axes = plots.thumbnail_sheet(root, list(shown.path), SHEET_COLUMNS, (1.45, 1.75), 1.1)
    for ax, row in zip(axes, shown.itertuples()):
        name = textwrap.shorten(row.predicted_class, 14, placeholder="…")
        ax.set_title(f"#{row.rank} {name} {row.score:.2f}\n{strategy} {row.strategy_score:.3g}", fontsize=7)
    more = f" (the first {len(shown)} shown)" if len(shown) < len(table) else ""
    fig.suptitle(f"What to annotate next: {len(table)} of {candidates} unlabelled images{more}, "
                 f"strategy {strategy!r}\n({annotation.STRATEGIES[strategy].label})\n"
                 f"caption: #rank, predicted class and its score; the strategy's score (higher = sooner)", fontsize=9)
    fig.tight_layout()
    plots.save_figure(fig, path)


# ---- the script ----------------------------------------------------------------------------------

def candidates_of(cfg, trained, cache, runtime, pool: unlabelled.Unlabelled) -> annotation.Candidates:
    """The candidates' softmax probabilities at the temperature fitted on the validation images (as
    predict.py's scores), their embeddings, and the training embeddings as the kNN reference."""
    reference = openset.reference_from_model(trained, cache, runtime, cfg)
    val_logits, _, val_labels = openset.subset_outputs(trained, cache, runtime, "val")
    temperature, _ = calibrate.validation_temperature(val_logits, val_labels)
    logits, embeddings = unlabelled.new_image_outputs(trained, cache, runtime, pool.root, pool.relpaths, pool.hashes)
    return annotation.Candidates(calibrate.probabilities(logits, temperature), embeddings, reference)


def run(cfg) -> None:
    registry.require_task("annotate_next", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    pool = unlabelled.from_settings(cfg, paths)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = provenance.start_stage(paths, "annotate_next", [paths.best, paths.split])
    print(f"annotate_next.py  {len(pool.relpaths)} readable candidates ({pool.source}), strategy "
          f"{cfg.ANNOTATE_STRATEGY!r}, batch {cfg.ANNOTATE_BATCH}")
    candidates = candidates_of(cfg, trained, trained.trunk_cache(cfg, paths, runtime), runtime, pool)
    picked, scores = annotation.select(cfg.ANNOTATE_STRATEGY, candidates, cfg.ANNOTATE_BATCH, cfg.SEED)
    table = batch_table(pool, candidates, picked, scores, trained.class_names)
    fileio.own_folder(paths.annotate_dir)  # never a link: the files would land where it points
    outputs = [paths.out / name for name in registry.stage("annotate_next").outputs]
    for_ecotaxa, left_out = ecotaxa.annotation_table(table, pool.root, pool.objects or None)
    fileio.save_csv(table, outputs[0], index=False)
    ecotaxa.write_tsv(for_ecotaxa, ecotaxa.ANNOTATION_TYPES, outputs[1])
    plot_contact_sheet(table, pool.root, cfg.ANNOTATE_STRATEGY, len(pool.relpaths), outputs[2])
    provenance.save_provenance(paths, "annotate_next", inputs, outputs, cfg)
    if left_out:
        print(f"warning: {left_out} image(s) left out of {outputs[1].name}: a value over {ecotaxa.MAX_VALUE} "
              f"characters or with a tab or line break; they are in {outputs[0].name}", file=sys.stderr)
    if pool.bad:
        first = sorted(pool.bad)[0]
        print(f"warning: {len(pool.bad)} unreadable file(s) left out (e.g. {images.printable(first)!r}: "
              f"{pool.bad[first]})", file=sys.stderr)
    print(f"{len(table)} of {len(pool.relpaths)} images picked; predicted classes: "
          f"{table.predicted_class.value_counts().to_dict()}")
    print("-> " + ", ".join(map(str, outputs)))


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
