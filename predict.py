"""Classify a folder of new, unlabelled images with the trained model and flag those that look like
none of the seen classes.

    python predict.py --PREDICT_DIR=/data/new_campaign

Reads:  PREDICT_DIR (images at any depth; hidden files and folders ignored, linked folders not
        followed), checkpoints/best.pth, outputs/split.csv, the train and val images (through the
        trunk cache: the training embeddings are the kNN/Mahalanobis reference, the validation
        images set the unknown threshold and the temperature). New images go through the trunk cache
        too, each keyed by its content's SHA-256. With PREDICT_BUNDLE (export_model.py's
        model_bundle.pt) it reads that file in place of best.pth, the split and the images: see docs/bundle.md.
Writes: outputs/predictions/predictions.csv (one row per readable image: path relative to
        PREDICT_DIR, sha256, predicted_class, top1..top3 class and score, open_set_score, unknown, route
        ("confident" or "to review": the per-class thresholds of ROUTE_PRECISION, plankton/routing.py;
        unknowns are reviewed);
        e0 … e127 with PREDICT_EMBEDDINGS=True), outputs/predictions/bad_files.csv (unreadable files
        and why; empty when none), outputs/predictions/predictions.json (the threshold, the score, the
        temperature, counts, what made them), outputs/predictions/predictions.png (a sample of each
        predicted class and of the images flagged unknown), outputs/predictions/ecotaxa_import.tsv
        (the predictions as an EcoTaxa import: object_id, img_file_name relative to PREDICT_DIR,
        category, status "predicted", score, open-set score, unknown flag; with ECOTAXA_IMPORT_ZIP=True
        also ecotaxa_import.zip, the TSV with the images), outputs/predictions/drift.png (the drift
        check, plankton/drift.py: the most atypical new images and their statistics against the
        held-out test images; its verdict is in predictions.json and on the console), and last
        outputs/provenance_predict.json.
        Per sample (SAMPLE_BY), the abundance of each seen class by four estimators with bootstrap
        intervals, the images flagged unknown left out: outputs/predictions/abundance.csv,
        abundance_ecotaxa.tsv and abundance.png (plankton/abundance.py, docs/abundance.md).
        A later run replaces them. The split, the checkpoints and every other output stay as they are.

Scores are softmax(logits / T), T fitted on the validation set and applied only when it does not
make the test images' ECE worse (calibrate.choose_temperature); the prediction is the same as
without T. The open-set score is openset.SCORES[PREDICT_SCORE] (higher = more likely unknown); an
image is flagged unknown when it scores above the threshold that keeps PREDICT_KEEP of the
validation images (seen classes) as known.

A multi-label model (TASK="multilabel") predicts label sets instead: plankton/label_predictions.py
writes predictions.csv (predicted_labels: every label whose sigmoid score at the validation
temperature reaches its ROUTE_PRECISION threshold; score_<label>; the open-set flag, PREDICT_SCORE's
multi-label counterpart), predictions.json and bad_files.csv; no figure and no EcoTaxa import (one
category per object there).
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import dataloader
from plankton import (
    abundance,
    bundles,
    calibrate,
    checkpoints,
    drift,
    ecotaxa,
    embedding_files,
    fileio,
    images,
    label_predictions,
    locations,
    openset,
    plots,
    provenance,
    registry,
    routing,
    runner,
    unlabelled,
)

TOP = 3  # classes (with scores) listed per image


# ---- the table -----------------------------------------------------------------------------------

def prediction_table(relpaths: list[str], hashes: list[str], probs: np.ndarray, class_names: list[str],
                     open_scores: np.ndarray, threshold: float, embeddings: np.ndarray | None) -> pd.DataFrame:
    """One row per image: path, sha256, predicted_class, top<i>_class/top<i>_score, open_set_score,
    unknown (open_set_score > threshold), and the embedding's columns when given."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :min(TOP, probs.shape[1])]
    table = pd.DataFrame(dict(path=[images.printable(p) for p in relpaths], sha256=hashes,
                              predicted_class=[class_names[i] for i in order[:, 0]]))
    for rank in range(order.shape[1]):
        table[f"top{rank + 1}_class"] = [class_names[i] for i in order[:, rank]]
        table[f"top{rank + 1}_score"] = probs[np.arange(len(probs)), order[:, rank]]
    table["open_set_score"] = open_scores
    table["unknown"] = open_scores > threshold
    if embeddings is not None:
        columns = pd.DataFrame(embeddings.astype(np.float32),
                               columns=[f"{embedding_files.EMBEDDING_PREFIX}{i}" for i in range(embeddings.shape[1])])
        table = pd.concat([table, columns], axis=1)
    return table


def bad_files_table(bad: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(sorted((images.printable(p), why) for p, why in bad.items()), columns=["path", "reason"])


# ---- the figure ----------------------------------------------------------------------------------

def sample_rows(table: pd.DataFrame, class_names: list[str], per_row: int, seed: int) -> dict[str, pd.DataFrame]:
    """{row title: up to per_row random rows}: each predicted class among the images kept as known,
    then the images flagged unknown (most unknown first)."""
    rng = np.random.default_rng(seed)
    # (flagged?, class) keys: a seen class may itself be called "unknown" and keeps its own row
    groups = {(False, name): table[(table.predicted_class == name) & ~table.unknown] for name in class_names}
    groups[(True, None)] = table[table.unknown]
    picked = {}
    for (flagged, name), rows in groups.items():
        chosen = rows.iloc[np.sort(rng.choice(len(rows), size=min(per_row, len(rows)), replace=False))]
        if flagged:
            chosen = chosen.sort_values("open_set_score", ascending=False)
        title = "flagged\nunknown" if flagged else f"predicted\n{name}"
        picked[f"{title}\n({len(rows)} images)"] = chosen
    return picked


def plot_predictions(root: Path, picked: dict[str, pd.DataFrame], per_row: int, fitted: dict, score_name: str,
                     path) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(len(picked), per_row, figsize=(1.35 * per_row + 1.8, 1.6 * len(picked) + 1.0),
                             squeeze=False)
    for r, (title, rows) in enumerate(picked.items()):
        unknown = title.startswith("flagged")
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(rows):
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=9, color="grey")
                continue
            row = rows.iloc[c]
            pixels = images.thumbnail(root / row.path)
            ax.imshow(pixels, interpolation="nearest" if max(pixels.shape[:2]) < 64 else "antialiased")
            caption = f"{row.predicted_class} {row.top1_score:.2f}\nopen-set {row.open_set_score:.3g}"
            ax.set_xlabel(caption, fontsize=6.5, labelpad=1)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red" if unknown else "tab:blue")
                spine.set_linewidth(2.0 if unknown else 1.0)
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8.5,
                              color="tab:red" if unknown else "black")
    fig.suptitle(f"New images: up to {per_row} random images per predicted class (kept as known) and of those "
                 f"flagged unknown\n(open-set score {score_name} > {fitted['threshold']:.3g}, the threshold keeping "
                 f"{fitted['val_kept']:.0%} of {fitted['val_images']} validation images)\n"
                 f"caption: predicted class and its softmax score (temperature {fitted['temperature']:.3g}), "
                 f"open-set score", fontsize=9.5, y=1.0)
    fig.tight_layout()
    plots.save_figure(fig, path)


# ---- the script ----------------------------------------------------------------------------------

def model_and_fitted(cfg, paths, runtime):
    """(settings, model, its trunk cache, what new images are compared with, the files read): from
    PREDICT_BUNDLE alone when it is set (its own settings for the score, threshold and routing; no
    DATA_DIR, split or checkpoints), else from best.pth and the split's train and val images
    (bundles.fit_from_run: the open-set reference, the unknown threshold, temperature, per-class thresholds)."""
    if cfg.PREDICT_BUNDLE is not None:
        bundle = bundles.open_bundle(cfg.PREDICT_BUNDLE)
        trained = bundle.trained_model(runtime.device, runtime.channels_last)
        cfg = bundle.predict_settings(cfg)
        return cfg, trained, trained.trunk_cache(cfg, paths, runtime), bundle.fitted(), [bundle.path]
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    cache = trained.trunk_cache(cfg, paths, runtime)
    return cfg, trained, cache, bundles.fit_from_run(cfg, trained, cache, runtime), [paths.best, paths.split]


def summary(cfg, trained, root, table, bad, fitted, found: int) -> dict:
    return dict(predict_dir=str(root), image_files=found, images_predicted=len(table), bad_files=len(bad),
                flagged_unknown=int(table.unknown.sum()), open_set_score=cfg.PREDICT_SCORE,
                open_set_direction="higher = more likely unknown", threshold=fitted["threshold"],
                keep=cfg.PREDICT_KEEP, val_images=fitted["val_images"], val_kept=fitted["val_kept"],
                knn_k=fitted["reference"].k, knn_metric=cfg.OPEN_SET_KNN_METRIC,
                temperature=fitted["temperature"], temperature_note=fitted["temperature_note"],
                temperature_choice=fitted.get("temperature_choice"), warnings=fitted["warnings"],
                scores="softmax(logits / temperature)",
                predicted_per_class=table[~table.unknown].predicted_class.value_counts().to_dict(),
                checkpoint_sha256=trained.sha256, split_sha256=trained.checkpoint.split_sha256,
                model_bundle=None if cfg.PREDICT_BUNDLE is None else str(cfg.PREDICT_BUNDLE),
                weights_source=trained.checkpoint.weights_source, embeddings_included=cfg.PREDICT_EMBEDDINGS,
                route_precision=cfg.ROUTE_PRECISION, routed_confident=int((table.route == routing.CONFIDENT).sum()),
                class_thresholds=dict(zip(fitted["class_thresholds"].class_name,
                                          fitted["class_thresholds"].threshold.replace(np.inf, None))))


def predict_label_sets(cfg, paths, runtime, root: Path, relpaths: list[str], hashes: list[str], bad: dict) -> None:
    """A multi-label model: label sets from per-label thresholds (plankton/label_predictions.py); no
    drift check, figure or EcoTaxa import."""
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = provenance.start_stage(paths, "predict", [paths.best, paths.split])
    print(f"predict.py  {len(relpaths)} readable images in {root} ({len(bad)} unreadable), model {paths.best}")
    cache = trained.trunk_cache(cfg, paths, runtime)
    logits, embeddings = unlabelled.new_image_outputs(trained, cache, runtime, root, relpaths, hashes)
    folder = fileio.own_folder(paths.predictions_dir)  # never a link
    outputs = label_predictions.label_set_outputs(cfg, trained, cache, runtime, root, relpaths, hashes, logits,
                                                  embeddings, bad_files_table(bad), folder)
    provenance.save_provenance(paths, "predict", inputs, outputs, cfg)
    print("-> " + ", ".join(map(str, outputs)))


def run(cfg) -> None:
    registry.require_task("predict", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    root, relpaths, hashes, bad = unlabelled.find_new_images(cfg.PREDICT_DIR, paths)
    runtime = dataloader.runtime_from_settings(cfg)
    if cfg.TASK == "multilabel" and cfg.PREDICT_BUNDLE is None:
        predict_label_sets(cfg, paths, runtime, root, relpaths, hashes, bad)
        return
    cfg, trained, cache, fitted, read = model_and_fitted(cfg, paths, runtime)
    inputs = provenance.start_stage(paths, "predict", read)
    names = trained.class_names
    print(f"predict.py  {len(relpaths)} readable images in {root} ({len(bad)} unreadable), model {read[0]}")
    warning = openset.small_data_warning(fitted["val_images"], openset.recorded_auroc(paths, cfg.PREDICT_SCORE),
                                         cfg.PREDICT_SCORE)
    fitted["warnings"] = [warning] if warning else []
    logits, embeddings = unlabelled.new_image_outputs(trained, cache, runtime, root, relpaths, hashes)
    open_scores = openset.SCORES[cfg.PREDICT_SCORE](logits, embeddings, fitted["reference"])
    table = prediction_table(relpaths, hashes, calibrate.probabilities(logits, fitted["temperature"]), names,
                             open_scores, fitted["threshold"], embeddings if cfg.PREDICT_EMBEDDINGS else None)
    # a flagged unknown is always reviewed; a known one goes through when its class's threshold says so
    routes = routing.route(calibrate.probabilities(logits, fitted["temperature"]), fitted["class_thresholds"])
    table.insert(table.columns.get_loc("unknown") + 1, "route", np.where(table.unknown, routing.REVIEW, routes))
    fileio.own_folder(paths.predictions_dir)  # never a link: the predictions would land where it points
    abundance.save_abundance(cfg, root, table, calibrate.probabilities(logits, fitted["temperature"]), names,
                             fitted.get("held_out"), fitted["temperature"], paths.predictions_dir)
    outputs = [paths.out / name for name in registry.stage("predict").outputs]
    for_ecotaxa, left_out = ecotaxa.import_table(table, root)
    fileio.save_csv(table, outputs[0], index=False)
    drifted = drift.check_campaign(cfg, trained, cache, runtime, root, relpaths, embeddings, open_scores, fitted,
                                   paths.predictions_dir / drift.FIGURE)
    fileio.save_json(dict(summary(cfg, trained, root, table, bad, fitted, len(relpaths) + len(bad)), drift=drifted),
                     outputs[1])
    fileio.save_csv(bad_files_table(bad), outputs[2], index=False)
    plot_predictions(root, sample_rows(table, names, cfg.PREDICT_SAMPLES, cfg.SEED), cfg.PREDICT_SAMPLES, fitted,
                     cfg.PREDICT_SCORE, outputs[3])
    ecotaxa.write_tsv(for_ecotaxa, ecotaxa.IMPORT_TYPES, outputs[4])
    if cfg.ECOTAXA_IMPORT_ZIP:
        ecotaxa.write_import_zip(outputs[4], root, list(for_ecotaxa.img_file_name), outputs[5])
    else:
        outputs[5].unlink(missing_ok=True)  # an earlier run's zip would no longer match the TSV
    provenance.save_provenance(paths, "predict", inputs, [p for p in outputs if p.is_file()], cfg)
    if left_out:
        print(f"warning: {left_out} image(s) left out of {outputs[4].name}: a value over {ecotaxa.MAX_VALUE} "
              f"characters or with a tab or line break (a long path or class name); they are in {outputs[0].name}",
              file=sys.stderr)
    if bad:
        print(f"warning: {len(bad)} unreadable file(s) left out; see {outputs[2]}", file=sys.stderr)
    for warning in fitted["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{int(table.unknown.sum())} of {len(table)} images flagged unknown ({cfg.PREDICT_SCORE} score > "
          f"{fitted['threshold']:.4g}, the threshold keeping {fitted['val_kept']:.1%} of {fitted['val_images']} "
          f"validation images); scores at temperature {fitted['temperature']:.3g} ({fitted['temperature_note']})")
    written = [p for p in outputs if p.is_file() and p != outputs[2]]  # bad_files.csv is named above when not empty
    print("-> " + ", ".join(map(str, written)))


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
