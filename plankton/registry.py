"""The stages, in one table: the only place that says which scripts make up the pipeline, in what
order, for which task, what each reads and writes, and where the report shows it.

run_all.py runs them in this order, report.py lays out its page from them, provenance.py looks up a
stage's output patterns here, and verify.py checks every stage listed. A new stage is its script
`<name>.py` (with `run(cfg)` and `main()`) plus one `Stage(...)` entry below; see docs/extending.md.
"""
import ast
import importlib
import importlib.util
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from plankton.errors import PipelineError
from plankton.projection import METHODS as PROJECTIONS
from plankton.projection import output_names as projection_outputs
from plankton.tasks import ALL_TASKS


@dataclass(frozen=True)
class Stage:
    name: str  # the script <name>.py (its run(cfg)) and its record provenance_<name>.json
    summary: str  # one line: what it does (the README's and --help's list)
    outputs: tuple[str, ...] = ()  # patterns of its files in OUTPUT_DIR (relative paths)
    reads: tuple[str, ...] = ()  # the stages whose outputs it reads (they come before it)
    tasks: tuple[str, ...] = ALL_TASKS  # the TASK values it handles; run_all skips it for others
    not_for: str = ""  # why it does not handle the other task, in one line
    run_all: bool = True  # False: run by hand only (seeds.py)
    when_set: str | None = None  # run_all runs it only when this setting is not None (predict: PREDICT_DIR)
    recorded: bool = True  # keeps provenance_<name>.json (train.py's best.pth records its own inputs)
    resumable: bool = True  # run_all may skip it when its record shows nothing changed (see provenance.why_rerun)
    front: tuple[tuple[str, tuple[str, ...]], ...] = ()  # report sections before the stages: (title, files)
    section: str = field(default="")  # the report's title of its own section ("" = "Stage: <name>")

    @property
    def script(self) -> str:
        return f"{self.name}.py"

    @property
    def title(self) -> str:
        return self.section or f"Stage: {self.name}"

    def explanation(self) -> str:
        """The first paragraph of the script's docstring, as one line (read, not imported)."""
        spec = importlib.util.find_spec(self.name)  # the script beside this package, or wherever it is importable
        path = Path(spec.origin) if spec and spec.origin else Path(__file__).resolve().parents[1] / self.script
        source = path.read_text(encoding="utf-8")
        first = (ast.get_docstring(ast.parse(source)) or self.summary).split("\n\n")[0]
        return " ".join(first.split())

    def module(self):
        """The stage's script, imported (importing a script runs nothing)."""
        return importlib.import_module(self.name)

    def handles(self, task: str) -> bool:
        return task in self.tasks

    def wanted(self, cfg) -> bool:
        """Whether run_all.py runs it with these settings (task aside)."""
        return self.run_all and (self.when_set is None or getattr(cfg, self.when_set) is not None)


OVERVIEW = ("class_counts.csv", "class_counts.png", "label_counts.csv", "label_counts.png",  # label_*: multilabel
            "label_cooccurrence.csv", "label_cooccurrence.png", "sample_images.png")
EMBEDDINGS = tuple(f"embeddings_{s}.{ext}" for s in ("train", "test", "unseen") for ext in ("pkl", "parquet", "csv"))

STAGES: list[Stage] = [
    Stage("dataset_overview", "class (or label) counts per subset, label co-occurrence, a grid of sample images",
          OVERVIEW,
          front=(("Data overview", OVERVIEW),)),
    Stage("train", "trains the head on the frozen trunk; writes best.pth and the training curves",
          ("model_summary.txt", "training_history.csv", "training_plot.png", "training_classwise_accuracy.png",
           "training_classwise_ap.png"), recorded=False,
          front=(("Model summary", ("model_summary.txt",)),
                 ("Training curves", ("training_plot.png", "training_classwise_accuracy.png",
                                      "training_classwise_ap.png")))),
    Stage("evaluate", "test-set metrics, confusion matrix, misclassified images, tail accuracy",
          ("test_metrics.csv", "test_metrics.json", "confusion_matrix.png", "test_predictions.csv",
           "test_predictions.parquet", "test_scores.npz", "misclassified_test_images.png", "tail_accuracy.csv",
           "tail_accuracy.png", "test_label_metrics.png"), reads=("train",),
          front=(("Test metrics", ("test_metrics.csv", "confusion_matrix.png", "misclassified_test_images.png",
                                   "test_label_metrics.png")),)),
    Stage("leaks", "near-duplicate images between training and val/test/unseen",
          ("leaks.csv", "leaks.png", "leaks_summary.json"), reads=("train",)),
    Stage("suspicious_labels", "training images whose given class is most likely wrong (out-of-fold probabilities)",
          ("suspicious_labels.csv", "suspicious_labels.png"), reads=("train",),
          tasks=("multiclass",), not_for="doubts each image's one given class"),
    Stage("reproduce", "recomputes the test scores and compares them with the saved ones",
          ("reproduction_check.csv", "reproduction_check.json"), reads=("train", "evaluate")),
    Stage("ranked_images", "top and bottom 10 test images of each class (or label) by its score",
          ("ranked_*_*.png",), reads=("train", "evaluate")),
    Stage("embed", "embeddings of the train, test and unseen images", EMBEDDINGS, reads=("train",)),
    Stage("feature_maps", "statistics and spectra of the trunk's feature maps (fine-tuned vs pretrained trunk)",
          ("feature_map_stats.csv", "feature_map_spectra.csv", "feature_map_spectra.png",
           "feature_map_nonpositive.png", "feature_map_finetune_vs_pretrained.csv",
           "feature_map_finetune_vs_pretrained.png"), reads=("train",)),
    Stage("compute_average_distances", "average Euclidean and cosine distances between classes",
          ("average_*_distances_*.csv", "average_*_distances_*.png"), reads=("embed",)),
    Stage("dimensionality_reduction", "UMAP (or t-SNE, PCA: DIMRED) of the embeddings, closest and furthest images",
          (*(name for method in PROJECTIONS for name in projection_outputs(method)),
           "close_faraway_closeotherclass_class_*.png", "close_far_images.csv"), reads=("embed",)),
    Stage("embedding_quality", "silhouette, neighbour recall and the 2-d plane's trustworthiness",
          ("embedding_quality.csv", "embedding_quality_labels.csv"), reads=("embed", "dimensionality_reduction")),
    Stage("transfer_learning", "classifiers trained on the unseen classes' embeddings; few-shot",
          ("transfer_learning.csv", "accuracy_*.png", "fewshot.csv", "fewshot_summary.csv", "fewshot_all.png",
           "fewshot_per_class.png", "transfer_learning_labels.csv", "fewshot_labels.csv", "fewshot_labels_summary.csv",
           "transfer_learning_labels.png", "fewshot_labels.png"), reads=("embed",)),
    Stage("open_set", "how well scores tell unseen classes from seen ones (AUROC, FPR)",
          ("open_set_scores.csv", "open_set_image_scores.csv", "open_set_roc.png"), reads=("train",)),
    Stage("calibration", "reliability of the scores (per label for multilabel), temperature scaling, thresholds",
          ("calibration.csv", "calibration_bins.csv", "calibration.json", "reliability_diagram.png",
           "class_thresholds.csv", "class_thresholds.png", "calibration_labels.csv", "calibration_label_bins.csv",
           "reliability_diagram_labels.png", "label_thresholds.csv"), reads=("train",)),
    Stage("export_model", "one file another lab predicts with: model, thresholds, kNN reference, settings, hash",
          ("model_bundle/model_bundle.pt", "model_bundle/README.txt", "model_bundle/model.onnx"),
          reads=("train",), tasks=("multiclass",), not_for="the unknown flag and routing of one class per image"),
    Stage("predict", "classifies a folder of new images (PREDICT_DIR), flags unknowns",
          ("predictions/predictions.csv", "predictions/predictions.json", "predictions/bad_files.csv",
           "predictions/predictions.png", "predictions/ecotaxa_import.tsv", "predictions/ecotaxa_import.zip",
           "predictions/drift.png",
           "predictions/abundance.csv", "predictions/abundance_ecotaxa.tsv", "predictions/abundance.png"),
          reads=("train",), when_set="PREDICT_DIR", resumable=False),
    Stage("annotate_next", "ranks unlabelled images (PREDICT_DIR or EcoTaxa objects not yet validated) for annotation",
          ("annotate/annotate_next.csv", "annotate/annotate_next.tsv", "annotate/annotate_next.png"),
          reads=("train",), when_set="PREDICT_DIR", resumable=False,
          tasks=("multiclass",), not_for="margin and entropy of one softmax per image"),
    Stage("seeds", "trains once per seed in SEEDS and compares the results (by hand, minutes)",
          ("seed_robustness.csv", "seed_robustness_summary.csv", "seed_training_curves.png"),
          run_all=False, tasks=("multiclass",), not_for="the single-label recipe per seed"),
    Stage("compare_heads", "trains the head once per loss in HEAD_COMPARE_LOSSES and compares them (by hand, minutes)",
          ("compare_heads.csv", "compare_heads.png"), run_all=False, tasks=("multiclass",),
          not_for="metric losses and few-shot probes need one class per image"),
    Stage("report", "one HTML page of everything the other stages wrote", ("report.html",)),
]


def stage(name: str) -> Stage:
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(f"no stage {name!r} in plankton/registry.py's STAGES")


def names() -> list[str]:
    return [entry.name for entry in STAGES]


def run_all_stages(cfg) -> list[Stage]:
    """The stages run_all.py runs with these settings, in order (those not for TASK included: it
    says why it skips them)."""
    return [entry for entry in STAGES if entry.wanted(cfg)]


def require_task(name: str, task: str) -> None:
    """Stop a stage run by hand for a task it does not handle, with one line."""
    entry = stage(name)
    if not entry.handles(task):
        raise PipelineError(f"{entry.script} is {' and '.join(entry.tasks)} only ({entry.not_for}); "
                            f"TASK={task!r} has no such analysis here (run_all.py skips it)")


def stage_of(output: str) -> str | None:
    """The stage whose output patterns match `output` (relative to the output folder), if any."""
    return next((entry.name for entry in STAGES if any(fnmatch(output, p) for p in entry.outputs)), None)


def front_sections() -> list[tuple[str, tuple[str, ...]]]:
    """The report's sections before the stages, in stage order: (title, file names)."""
    return [section for entry in STAGES for section in entry.front]
