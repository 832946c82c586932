"""Head losses, one table (LOSSES): what the head is trained with (HEAD_LOSS). "ce" is the study's
cross-entropy on the classifier's logits (the task's loss: binary cross-entropy for multilabel); the
others are metric losses on the embeddings, from pytorch-metric-learning (its losses and miners):

    ce            the task's loss on the logits (default; the study's training, unchanged)
    supcon        supervised contrastive (Khosla et al. 2020), temperature 0.1
    triplet       triplet margin loss (margin 0.2) on the triplets of each batch that violate the
                  margin, mined online ("batch all": TripletMarginMiner, type "all")
    arcface       additive angular margin (Deng et al. 2019): its own class weights, margin 28.6 deg, scale 64
    ce+<metric>   cross-entropy + HEAD_LOSS_WEIGHT x the metric loss: for every metric loss of the table

A head trained without cross-entropy has no softmax classifier of its own, so at each validation pass
train.py sets the classifier layer from the embeddings (fit_classifier): a cosine classifier whose
class directions are the means of the unit training embeddings (nearest class mean), or ArcFace's own
class weights. It is a plain Linear layer, so best.pth holds it and every later stage (evaluate,
embed, open_set, calibration, predict, report) gets its logits as usual. A new loss is one entry."""
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch

from plankton.errors import PipelineError

COMBINED = "ce+"  # "ce+<metric>": cross-entropy plus HEAD_LOSS_WEIGHT x the metric loss
# the fitted cosine classifier's logits are COSINE_SCALE x cos(embedding, class direction) for an image whose
# embedding has the median norm of the training images (a Linear layer cannot divide by each image's norm;
# the arg-max is the nearest direction whatever the scale). calibration.py fits a temperature over it.
COSINE_SCALE = 16.0


def _pml():
    """pytorch-metric-learning's losses and miners, imported only when a metric loss is built (3 s)."""
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        raise PipelineError("the metric head losses come from pytorch-metric-learning, which is not installed; "
                            "install it: pip install pytorch-metric-learning") from None
    return losses, miners


class MinedLoss(torch.nn.Module):
    """A pytorch-metric-learning loss on the tuples its miner picks from each batch (online mining)."""

    def __init__(self, loss, miner):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


@dataclass(frozen=True)
class HeadLoss:
    label: str  # how tables and figures name it
    # (classes, embedding size) -> a module loss(embeddings, labels); None: the task's loss on the logits alone
    build: Callable[[int, int], torch.nn.Module] | None
    # the trained loss module -> classes x embedding size: the fitted classifier's class directions;
    # None: the class means of the unit training embeddings (nearest class mean)
    class_directions: Callable[[torch.nn.Module], torch.Tensor] | None = None


LOSSES: dict[str, HeadLoss] = {
    "ce": HeadLoss("cross-entropy (the study's)", None),
    "supcon": HeadLoss("supervised contrastive", lambda classes, dim: _pml()[0].SupConLoss(temperature=0.1)),
    "triplet": HeadLoss("triplet, online mining", lambda classes, dim: MinedLoss(
        _pml()[0].TripletMarginLoss(margin=0.2), _pml()[1].TripletMarginMiner(margin=0.2, type_of_triplets="all"))),
    "arcface": HeadLoss("ArcFace", lambda classes, dim: _pml()[0].ArcFaceLoss(classes, dim),
                        class_directions=lambda loss: loss.W.detach().T),  # W: embedding size x classes
}


def metric_losses() -> list[str]:
    return [name for name, entry in LOSSES.items() if entry.build is not None]


class LossNames(Collection):
    """HEAD_LOSS's choices, read from LOSSES at each use (so an entry added at run time is accepted):
    every entry, then "ce+<metric>" for each metric loss."""

    def names(self) -> list[str]:
        return [*LOSSES, *(COMBINED + name for name in metric_losses())]

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.names())


LOSS_NAMES = LossNames()


def parts(name: str) -> tuple[bool, str | None]:
    """(trains the softmax classifier with cross-entropy, the metric loss or None) of a HEAD_LOSS value."""
    if name not in LOSS_NAMES:
        raise PipelineError(f"HEAD_LOSS={name!r}: must be one of {', '.join(map(repr, LOSS_NAMES))}")
    if name.startswith(COMBINED):
        return True, name[len(COMBINED):]
    return LOSSES[name].build is None, (name if LOSSES[name].build is not None else None)


def label(name: str) -> str:
    uses_ce, metric = parts(name)
    if metric is None:
        return LOSSES[name].label
    return ("cross-entropy + " if uses_ce else "") + LOSSES[metric].label


def check_loss(name: str, task_name: str, label_smoothing: float = 0.0) -> None:
    """A HEAD_LOSS that cannot train with these settings is one error line (train.py checks it first)."""
    uses_ce, metric = parts(name)
    if metric is not None and task_name != "multiclass":
        raise PipelineError(f"HEAD_LOSS={name!r}: a metric loss needs one class per image (its positives share the "
                            f"image's class, its negatives do not); TASK={task_name!r} trains with HEAD_LOSS='ce'")
    if label_smoothing and not uses_ce:
        raise PipelineError(f"LABEL_SMOOTHING={label_smoothing!r}: smooths the cross-entropy, and HEAD_LOSS={name!r} "
                            f"has none; set LABEL_SMOOTHING=0 or HEAD_LOSS='{COMBINED}{name}'")


class Criterion(torch.nn.Module):
    """What train_one_epoch minimises for HEAD_LOSS: the task's loss on the logits ("ce", exactly as
    before this setting), a metric loss on the embeddings, or cross-entropy + weight x the metric loss.
    A module, so that a loss's own parameters (ArcFace's class weights) are trained, moved to the
    device and saved in last.pth (state_dict) with the rest of the training state."""

    def __init__(self, name: str, task, num_classes: int, embedding_dim: int, weight: float = 1.0,
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        super().__init__()
        check_loss(name, task.name, label_smoothing)
        self.name, self.task, self.weight = name, task, float(weight)
        self.uses_ce, self.metric_name = parts(name)
        self.metric = LOSSES[self.metric_name].build(num_classes, embedding_dim) if self.metric_name else None
        # CLASS_WEIGHTS of the cross-entropy part (None: unweighted); a buffer, so it moves with .to(device),
        # but not saved in last.pth (it follows from the split and the setting)
        self.register_buffer("class_weights", class_weights, persistent=False)

    @property
    def replaces_task_loss(self) -> bool:
        """Training minimises this module rather than the task's plain loss (a metric loss or class weights)."""
        return self.metric is not None or self.class_weights is not None

    @property
    def fits_classifier(self) -> bool:
        """No cross-entropy trains the classifier: train.py sets it from the embeddings (fit_classifier)."""
        return not self.uses_ce

    def forward(self, logits: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor,
                label_smoothing: float = 0.0) -> torch.Tensor:
        if self.metric is None:
            return self.task.loss(logits, labels, label_smoothing=label_smoothing, weight=self.class_weights)
        metric = self.metric(embeddings.float(), labels)
        if not self.uses_ce:
            return metric
        return (self.task.loss(logits, labels, label_smoothing=label_smoothing, weight=self.class_weights)
                + self.weight * metric)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def fit_classifier(model: torch.nn.Module, criterion: Criterion, embeddings: np.ndarray, labels: np.ndarray) -> None:
    """Set model.classifier (a Linear layer) to a cosine classifier from the training images'
    embeddings: row c of its weight is COSINE_SCALE x unit(direction_c) / (their median norm), its
    bias 0, so its arg-max is the class of the nearest direction (cosine). Direction: the loss's own
    class weights (ArcFace), else the mean of the class's unit embeddings (a class absent from
    `labels` gets a zero row, logit 0)."""
    classifier = model.classifier
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    directions_of = LOSSES[criterion.metric_name].class_directions
    if directions_of is not None:
        directions = directions_of(criterion.metric).double().cpu()
    else:
        directions = torch.zeros(classifier.out_features, x.shape[1], dtype=torch.float64)
        directions.index_add_(0, labels, unit_rows(x))
    norm = float(x.norm(dim=1).median()) if len(x) else 0.0
    weight = COSINE_SCALE * unit_rows(directions) / (norm if norm > 0 else 1.0)
    classifier.weight.copy_(weight.to(classifier.weight.dtype))
    classifier.bias.zero_()
