"""Where every artifact lives (Paths: fixed file names in OUTPUT_DIR, CHECKPOINT_DIR and CACHE_DIR),
and creating that tree."""
from dataclasses import dataclass
from pathlib import Path

from plankton import distributed
from plankton.fileio import remove_abandoned_temporaries


@dataclass(frozen=True)
class Paths:
    """Every artifact's fixed location (nothing is created by building this)."""
    out: Path
    checkpoints: Path
    cache: Path

    @classmethod
    def from_settings(cls, cfg) -> "Paths":
        return cls(Path(cfg.OUTPUT_DIR), Path(cfg.CHECKPOINT_DIR), Path(cfg.CACHE_DIR))

    split = property(lambda self: self.out / "split.csv")
    bad_images = property(lambda self: self.out / "bad_images.csv")
    best = property(lambda self: self.checkpoints / "best.pth")
    last = property(lambda self: self.checkpoints / "last.pth")
    history = property(lambda self: self.out / "training_history.csv")
    training_plot = property(lambda self: self.out / "training_plot.png")
    model_summary = property(lambda self: self.out / "model_summary.txt")
    predictions = property(lambda self: self.out / "test_predictions.csv")
    scores = property(lambda self: self.out / "test_scores.npz")
    classwise_accuracy_plot = property(lambda self: self.out / "training_classwise_accuracy.png")
    classwise_ap_plot = property(lambda self: self.out / "training_classwise_ap.png")
    seeds = property(lambda self: self.out / "seeds")  # seeds.py: seed_<n>/ folders
    predictions_dir = property(lambda self: self.out / "predictions")  # predict.py: new images' predictions
    bundle_dir = property(lambda self: self.out / "model_bundle")  # export_model.py: the model another lab runs
    annotate_dir = property(lambda self: self.out / "annotate")  # annotate_next.py: the batch to annotate
    umap_coordinates = property(lambda self: self.out / "umap_coordinates.csv")  # dimensionality_reduction.py
    leaks_summary = property(lambda self: self.out / "leaks_summary.json")  # leaks.py: counts beside evaluate's

    def coordinates(self, method: str) -> Path:
        """dimensionality_reduction.py's 2-d plane of DIMRED=method (umap_coordinates.csv, tsne_..., pca_...)."""
        return self.out / f"{method}_coordinates.csv"

    def embeddings(self, subset: str) -> Path:
        return self.out / f"embeddings_{subset}.pkl"

    def scan_cache(self, root: Path) -> Path:
        import hashlib
        return self.cache / f"scan_{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.csv"


def prepare_output_dirs(cfg) -> Paths:
    """Create the output tree and remove the temporary files of killed runs (never a running one's;
    under torchrun only rank 0 looks, as another node cannot tell whether a process is alive)."""
    paths = Paths.from_settings(cfg)
    for folder in (paths.out, paths.checkpoints, paths.cache):
        folder.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            remove_abandoned_temporaries(folder)
    return paths
