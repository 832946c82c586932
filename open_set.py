"""Open-set detection: can the trained classifier tell images of the unseen classes from the seen
classes' test images? Four scores, each higher for "more likely unknown":

    max_softmax   1 - the largest softmax probability (Hendrycks & Gimpel 2017)
    openset.energy        -logsumexp of the logits (Liu et al. 2020)
    knn           distance to the OPEN_SET_K-th nearest training embedding; OPEN_SET_KNN_METRIC
                  "cosine" (1 - cos, the default, as Sun et al. 2022) or "euclidean"
    mahalanobis   Mahalanobis distance to the nearest class mean of the training embeddings, with one
                  covariance shared by the classes: scikit-learn's LedoitWolf (shrunk; 128 dimensions
                  from a few hundred images) on the embeddings minus their class's mean

    python open_set.py

Reads:  checkpoints/best.pth, outputs/split.csv, the train, val, test and unseen images (through the
        trunk cache; logits and embeddings come from the head, training.head_outputs).
Writes: outputs/open_set_scores.csv (per score: AUROC and FPR at 95% TPR with the seen test images
        as the positive "known" class, the threshold that keeps PREDICT_KEEP of the validation images,
        and at it the share of seen test images kept and of unseen images flagged),
        outputs/open_set_image_scores.csv (every val, test and unseen image's four scores),
        outputs/open_set_roc.png (the four ROC curves), and last outputs/provenance_open_set.json.

Multi-label runs (TASK="multilabel"): "unknown" is an image carrying an unseen label (the held-out
subset; it may carry seen labels too), "known" a test image whose labels are all seen. The two logit
scores become max_sigmoid (1 - the largest sigmoid score) and joint_energy (-sum over labels of
log(1 + e^logit), Wang et al. 2021); kNN is unchanged, and Mahalanobis uses the class means of each
training image's rarest label. The same files, open_set_image_scores.csv with a `labels` column.
"""

import numpy as np
import pandas as pd

import dataloader
from plankton import checkpoints, fileio, locations, openset, plots, provenance, registry, runner

# ---- how well a score separates seen from unseen -------------------------------------------------


# ---- head outputs of the split's subsets ---------------------------------------------------------


# ---- the stage -----------------------------------------------------------------------------------

def results_table(scores: dict[str, dict[str, np.ndarray]], keep: float) -> tuple[pd.DataFrame, dict]:
    """One row per score (see the module docstring); and each score's ROC curve."""
    rows, curves = [], {}
    for name in scores["test"]:
        found = openset.detection_metrics(scores["test"][name], scores["unseen"][name])
        curves[name] = found.pop("roc")
        threshold = openset.keep_threshold(scores["val"][name], keep)
        rows.append(dict(score=name, **found, val_keep=keep, threshold=threshold,
                         test_seen_kept=float((scores["test"][name] <= threshold).mean()),
                         unseen_flagged=float((scores["unseen"][name] > threshold).mean())))
    return pd.DataFrame(rows), curves


def plot_roc(table: pd.DataFrame, curves: dict, n_seen: int, n_unseen: int, k: int, metric: str, path) -> None:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    labels = {"max_softmax": "max softmax", "energy": "energy", "knn": f"kNN ({metric}, k={k})",
              "mahalanobis": "Mahalanobis (Ledoit-Wolf)", "max_sigmoid": "max sigmoid",
              "joint_energy": "joint energy"}
    for row in table.itertuples():
        fpr, tpr = curves[row.score]
        ax.plot(fpr, tpr, lw=1.8, label=f"{labels[row.score]}: AUROC {row.auroc:.3f}, FPR95 {row.fpr_at_95_tpr:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.axhline(openset.TPR_LEVEL, color="black", lw=0.8, ls="--")
    ax.text(0.99, openset.TPR_LEVEL - 0.01, "95% of seen images kept", ha="right", va="top", fontsize=8)
    unseen_words = "images with an unseen label" if "max_sigmoid" in curves else "unseen-class images"
    ax.set_xlabel(f"{unseen_words} accepted as known (FPR)")
    ax.set_ylabel("seen-class test images kept as known (TPR)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"Open-set detection: {n_seen} seen test images vs {n_unseen} {unseen_words}")
    ax.legend(loc="lower right", fontsize=8)
    plots.save_figure(fig, path)


def image_table(trained, scores: dict) -> pd.DataFrame:
    frames = []
    table = trained.split.table.set_index("relpath")
    for subset in ("val", "test", "unseen"):
        relpaths, labels = trained.split.subset(subset)
        names = trained.split.classes(subset)
        if labels.ndim == 2:  # multi-label: the image's whole label set, as split.csv has it
            frame = pd.DataFrame(dict(subset=subset, path=relpaths, labels=table.labels.loc[relpaths].to_numpy()))
        else:
            frame = pd.DataFrame(dict(subset=subset, path=relpaths, class_name=[names[i] for i in labels]))
        for name in scores[subset]:
            frame[name] = scores[subset][name]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def run(cfg) -> None:
    registry.require_task("open_set", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = provenance.start_stage(paths, "open_set", [paths.best, paths.split])
    cache = trained.trunk_cache(cfg, paths, runtime)
    reference = openset.reference_from_model(trained, cache, runtime, cfg)
    scores = {}
    for subset in ("val", "test", "unseen"):
        logits, embeddings, _ = openset.subset_outputs(trained, cache, runtime, subset)
        scores[subset] = openset.all_scores(logits, embeddings, reference, trained.split.task)
    table, curves = results_table(scores, cfg.PREDICT_KEEP)
    print(f"open-set detection, {len(scores['test']['knn'])} seen test vs {len(scores['unseen']['knn'])} unseen images "
          f"(threshold keeps {cfg.PREDICT_KEEP:.0%} of {len(scores['val']['knn'])} validation images):")
    for row in table.itertuples():
        print(f"  {row.score:>12}: AUROC {row.auroc:.4f}  FPR95 {row.fpr_at_95_tpr:.4f}  at the val threshold: "
              f"{row.test_seen_kept:.1%} of seen test kept, {row.unseen_flagged:.1%} of unseen flagged")
    outputs = [paths.out / name for name in registry.stage("open_set").outputs]
    fileio.save_csv(table, outputs[0], index=False)
    fileio.save_csv(image_table(trained, scores), outputs[1], index=False)
    plot_roc(table, curves, len(scores["test"]["knn"]), len(scores["unseen"]["knn"]), reference.k,
             cfg.OPEN_SET_KNN_METRIC, outputs[2])
    provenance.save_provenance(paths, "open_set", inputs, outputs, cfg)
    print(f"-> {outputs[0]}, {outputs[2]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
