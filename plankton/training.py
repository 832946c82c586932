"""Reusable pieces of training and inference: placing a model on its device, the epoch's batches,
the optimizer and LR schedule, one training epoch with validation passes, the state that is saved
and restored to resume, running the head over a subset and the class-wise figures of a pass.
train.py strings them into the study's recipe; seeds.py repeats it; bench.py times the pieces."""
import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import backbone
from dataloader import FeatureSource, Rows, Runtime, feature_batches, in_order
from plankton import distributed, tasks
from plankton.errors import PipelineError
from plankton.progress import Progress


def place_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Move the model to the runtime's device; its convolutions in channels-last layout if asked."""
    model.to(runtime.device)
    if runtime.channels_last:
        backbone.to_channels_last(model)
    return model


def trainable_parameters(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model: torch.nn.Module, lr: float, finetune_lr: float) -> list[dict]:
    """The optimizer's parameter groups: the head at `lr`, then the fine-tuned trunk blocks (if
    any) at `finetune_lr`. A frozen trunk gives one group of trainable_parameters' list, in its order."""
    tuned = {id(p) for p in model.tuned_trunk.parameters()}
    groups = [dict(params=[p for p in trainable_parameters(model) if id(p) not in tuned], lr=lr)]
    if tuned:
        groups.append(dict(params=list(model.tuned_trunk.parameters()), lr=finetune_lr))
    return groups


# OPTIMIZER's choices: name -> builder(param_groups, lr, weight_decay, momentum). A new optimizer is one entry.
OPTIMIZERS = {
    "adam": lambda groups, lr, decay, momentum: torch.optim.Adam(groups, lr=lr, weight_decay=decay),
    "adamw": lambda groups, lr, decay, momentum: torch.optim.AdamW(groups, lr=lr, weight_decay=decay),
    "sgd": lambda groups, lr, decay, momentum: torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=decay),
}
# LR_SCHEDULE's choices: name -> builder(optimizer, max_epochs, step_epochs, gamma), stepped at each epoch end
SCHEDULES = {
    "none": lambda optimizer, max_epochs, step_epochs, gamma: None,  # the LR stays
    "step": lambda optimizer, max_epochs, step_epochs, gamma: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=step_epochs, gamma=gamma),
    "cosine": lambda optimizer, max_epochs, step_epochs, gamma: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max_epochs),  # from the LR down to 0 over max_epochs
}


def make_optimizer(name: str, param_groups, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """OPTIMIZERS[name] over `param_groups`: a list of parameters, or of dicts {"params": [...],
    "lr": ...} where a group's own lr replaces `lr` (e.g. trunk and head)."""
    return OPTIMIZERS[name](param_groups, lr, weight_decay, momentum)


def make_scheduler(name: str, optimizer, max_epochs: int, step_epochs: int = 5, gamma: float = 0.3):
    """SCHEDULES[name] for `optimizer`, or None for "none"."""
    return SCHEDULES[name](optimizer, max_epochs, step_epochs, gamma)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int,
                  labels: np.ndarray | None = None) -> list[list[int]]:
    """A shuffled order for one epoch that depends only on (seed, epoch): resumable, device-free.
    With `labels` (BALANCED_SAMPLING), n draws with replacement, each class equally likely
    (torch's WeightedRandomSampler, each image weighted 1 / its class's count)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if labels is None:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        labels = np.asarray(labels, dtype=np.int64)
        weights = 1.0 / np.bincount(labels)[labels]
        order = list(torch.utils.data.WeightedRandomSampler(weights.tolist(), n, replacement=True, generator=generator))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


# ---- rare classes: class weights, a cap per class, what picks the best model ---------------------

def _balanced_weights(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's "balanced" class weights: images / (classes x images of the class)."""
    from sklearn.utils.class_weight import compute_class_weight
    labels = np.repeat(np.arange(len(counts)), counts)
    return compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels)


# CLASS_WEIGHTS' choices: name -> (images per class) -> the cross-entropy's weight per class, or None (unweighted)
CLASS_WEIGHTS = {
    "none": lambda counts: None,
    "balanced": _balanced_weights,
    "sqrt": lambda counts: np.sqrt(_balanced_weights(counts)),
}


def class_weights(scheme: str, labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """The cross-entropy's class weights for the training labels under CLASS_WEIGHTS[scheme] (float32),
    or None for "none". A class without training images would get an infinite weight: refused."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if scheme != "none" and (counts == 0).any():
        raise PipelineError(f"CLASS_WEIGHTS={scheme!r}: class number {int(np.flatnonzero(counts == 0)[0])} has no "
                            f"training image, so no weight; give it images or use CLASS_WEIGHTS='none'")
    weights = CLASS_WEIGHTS[scheme](counts)
    return None if weights is None else torch.as_tensor(weights, dtype=torch.float32)


def capped_indices(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Indices (sorted) of at most `cap` images per class: a fixed random subset of each larger class
    (MAX_PER_CLASS; None keeps all)."""
    labels = np.asarray(labels)
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    kept = [rng.choice(members, size=cap, replace=False) if len(members) > cap else members
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(kept)) if kept else np.arange(0)


@dataclass(frozen=True)
class Selection:
    """What picks best.pth among the validation passes: a history column and its direction."""
    monitor: str  # the history column
    monitor_sign: float  # 1: lower is better; -1: higher is better (the state keeps sign x value, lower better)
    monitor_words: str


# SELECT_BY's choices: name -> Selection; "auto": the task's own (tasks.py: validation loss, or mAP for multilabel)
SELECTIONS = {
    "auto": None,
    "val_loss": Selection("val_loss", 1.0, "lowest validation loss"),
    "balanced_accuracy": Selection("val_balanced_accuracy", -1.0, "highest validation balanced accuracy"),
    "macro_f1": Selection("val_macro_f1", -1.0, "highest validation macro F1"),
}


# a figure such as the balanced accuracy of a small validation set takes few values, so passes often tie;
# a tie goes to the pass with the lower validation loss (this small a share of it never outweighs a real step)
TIE_BREAK = 1e-6


def selection_figure(task, row) -> float:
    """The figure a validation pass (a history row, or a DataFrame of them) is ranked by, lower is
    better: the task's monitored column (times its sign); SELECT_BY's balanced accuracy and macro F1
    have their ties broken by the validation loss."""
    figure = task.monitor_sign * row[task.monitor]
    return figure if task.monitor in ("val_loss", "val_map") else figure + TIE_BREAK * row["val_loss"]


def selecting_task(task, select_by: str = "auto"):
    """The task with its monitored figure replaced by SELECT_BY's (the task itself for "auto")."""
    chosen = SELECTIONS[select_by]
    if chosen is None:
        return task
    return dataclasses.replace(task, monitor=chosen.monitor, monitor_sign=chosen.monitor_sign,
                               monitor_words=chosen.monitor_words)


def validation_points(n_batches: int, per_epoch: int) -> set[int]:
    """Indices of the batches after which to validate: evenly spread, the last batch always."""
    passes = max(1, min(per_epoch, n_batches))
    return {int(round((k + 1) * n_batches / passes)) - 1 for k in range(passes)}


# ---- the state that survives a kill --------------------------------------------------------------

@dataclass
class TrainingState:
    """Where training stands; with the model, optimizer, LR schedule and RNG it is what last.pth holds."""
    epoch: int = -1  # last completed epoch (-1: none yet)
    history: list = field(default_factory=list)  # one dict per validation pass
    best_val_loss: float = float("inf")  # of the monitored figure, lower is better: multilabel keeps -(validation mAP)
    best_epoch: float = 0.0
    bad_passes: int = 0  # validation passes since the best one
    finished: bool = False
    stop_reason: str = ""

    def record(self, model, optimizer, scheduler=None) -> dict:
        """The resumable part of last.pth: this state, the optimizer, the LR schedule and the RNG states."""
        return dict(asdict(self), optimizer=optimizer.state_dict(), rng=rng_states(),
                    scheduler=scheduler.state_dict() if scheduler is not None else None)

    @classmethod
    def restore(cls, last, model=None, optimizer=None, scheduler=None) -> "TrainingState":
        """A last.pth's (a checkpoints.Checkpoint) training state; with a model and optimizer, also load
        its model, optimizer, LR schedule and RNG states into them."""
        saved = dict(last.training, epoch=last.epoch)
        if model is not None:
            model.load_state_dict(last.model_state)
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            restore_rng(saved["rng"])
        names = cls.__dataclass_fields__
        return cls(**{k: (list(v) if k == "history" else v) for k, v in saved.items() if k in names})

    def improved(self, val_loss: float, position: float) -> bool:
        """Count a validation pass; True when it is the best so far."""
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_passes = val_loss, position, 0
            return True
        self.bad_passes += 1
        return False


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- one epoch -----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, source: FeatureSource, batches: list, runtime: Runtime, checks: set,
                    on_check, seed: int = 0, desc: str = "", label_smoothing: float = 0.0, forward=None,
                    task=tasks.MULTICLASS, criterion=None, keep_outputs: bool = False) -> bool:
    """Train the head over `batches` on the task's loss; after each batch in `checks` call
    on_check(b, train_loss, train_acc, outputs) with the running figures since the last check (acc: the
    task's hits per image) and, with keep_outputs, outputs = (logits, labels) of those batches as
    trained on (training mode, before each step; numpy, on rank 0 every rank's), else None. Return
    True if on_check asked to stop. label_smoothing changes the loss that is
    minimised; train_loss stays the plain loss. `criterion` (a heads.Criterion with a metric loss,
    HEAD_LOSS other than "ce", one process only; or with CLASS_WEIGHTS): what is minimised instead,
    from the logits and the embeddings; train_loss is then the task's plain loss of the logits too.

    Under torchrun, `forward` is data_parallel's wrapper: each rank trains on its block of every
    batch (no batch may be shorter than the ranks), with its share of the batch's mean loss, so the
    averaged gradient is the whole batch's; the figures handed to on_check are the whole batches',
    and rank 0's answer is every rank's."""
    forward, ranks = forward or model.forward_head, distributed.world_size()
    model.train()
    loss_sum, correct, seen, kept = 0.0, 0, 0, []
    mine = [distributed.shard(batch) for batch in batches]
    bar = Progress(feature_batches(source, mine, model.trunk, runtime, seed=seed), desc or "training",
                   total=len(batches), unit="batches")
    try:
        for b, (features, labels) in enumerate(bar):
            logits, embeddings = forward(features)
            if criterion is not None and (criterion.metric is not None or ranks == 1):
                loss = criterion(logits, embeddings, labels, label_smoothing=label_smoothing)  # (a metric loss:
                # one process only, train.py refuses it under torchrun)
            elif ranks == 1:
                loss = task.loss(logits, labels, label_smoothing=label_smoothing)
            else:  # DDP averages the ranks' gradients: each contributes ranks / batch size x its (weighted) sum
                loss = task.loss(logits, labels, reduction="sum", label_smoothing=label_smoothing,
                                 weight=None if criterion is None else criterion.class_weights) \
                    * (ranks / len(batches[b]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if label_smoothing or ranks > 1 or criterion is not None:
                loss = task.loss(logits.detach(), labels)
            loss_sum += loss.item() * len(labels)  # .item() also waits for CUDA, every batch
            correct += task.hits(logits, labels).item()
            seen += len(labels)
            if keep_outputs:
                kept.append((logits.detach().float().cpu().numpy(), labels.cpu().numpy()))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            if b in checks:
                loss_sum, correct, seen = distributed.sum_all([loss_sum, correct, seen])
                outputs = batch_outputs(kept) if keep_outputs else None
                stop = distributed.broadcast(on_check(b, loss_sum / seen, correct / seen, outputs))
                model.train()
                loss_sum, correct, seen, kept = 0.0, 0, 0, []
                if stop:
                    return True
        return False
    finally:
        bar.close()


def batch_outputs(kept: list) -> tuple[np.ndarray, np.ndarray]:
    """The (logits, labels) of the batches in `kept` as one pair; under torchrun rank 0 gets every
    rank's rows (in rank order) and the other ranks keep their own."""
    logits = np.concatenate([k[0] for k in kept]) if kept else np.zeros((0, 0), np.float32)
    labels = np.concatenate([k[1] for k in kept]) if kept else np.zeros(0, np.int64)
    every_logit, every_label = distributed.gather_rows(logits), distributed.gather_rows(labels)
    return (logits, labels) if every_logit is None else (every_logit, every_label)


class TrainablePart(torch.nn.Module):
    """The modules forward_head runs (tuned blocks, head, embedding, classifier), shared with the
    model, as one module for DistributedDataParallel: the frozen trunk stays outside it, so its
    buffers are never sent between ranks."""

    def __init__(self, model):
        super().__init__()
        self.tuned_trunk, self.head, self.embed, self.classifier = (model.tuned_trunk, model.head, model.embed,
                                                                    model.classifier)

    forward = backbone.PlanktonNet.forward_head  # the model's own, run on these same modules


def data_parallel(model, runtime: Runtime):
    """The forward pass train_one_epoch trains with: under torchrun, the trainable part wrapped in
    DistributedDataParallel (it starts from rank 0's weights and averages gradients, and rank 0's
    BatchNorm statistics are sent to every rank each step); in a single process, model.forward_head."""
    if distributed.world_size() == 1:
        return model.forward_head
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(TrainablePart(model), device_ids=device_ids)


def evaluate_loss(model, source: FeatureSource, runtime: Runtime, task=tasks.MULTICLASS) -> tuple[float, float]:
    """Mean loss and the task's hits per image (accuracy) of the model on a FeatureSource (eval mode)."""
    logits, _ = head_outputs(model, source, runtime)
    return loss_and_hits(logits, source.labels, task)


def loss_and_hits(logits: np.ndarray, labels: torch.Tensor, task=tasks.MULTICLASS) -> tuple[float, float]:
    """The task's mean loss and hits per image of logits already computed (evaluate_loss's figures)."""
    logits = torch.from_numpy(logits)
    return (task.loss(logits, labels, reduction="sum").item() / len(labels),
            task.hits(logits, labels).item() / len(labels))


# A head-only pass (eval mode, no gradients) over cached trunk features runs in batches of about this
# many bytes of float32 input, never fewer images than BATCH_SIZE. On an idle 2-core CPU the head ran
# fastest at 64-128 images of 64 x 16 x 16 (0.19 ms/image) and 1.8x slower at 512 (docs/speed.md): 8 MB
# keeps a batch in cache. Images through the trunk keep BATCH_SIZE.
HEAD_BATCH_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
MAX_HEAD_BATCH = 4096


def inference_batch_size(source: FeatureSource, runtime: Runtime) -> int:
    """Images per batch of a head-only pass over `source` on the runtime's device (see HEAD_BATCH_BYTES)."""
    if source.features is None or len(source.features.shape) < 2:
        return runtime.batch_size
    row_bytes = 4 * max(1, int(np.prod(source.features.shape[1:])))
    fits = HEAD_BATCH_BYTES.get(runtime.device.type, HEAD_BATCH_BYTES["cpu"]) // row_bytes
    return int(max(runtime.batch_size, min(MAX_HEAD_BATCH, fits)))


@torch.inference_mode()
def head_outputs(model, source: FeatureSource, runtime: Runtime,
                 batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) of every item of a FeatureSource, in order, model in eval mode; in batches
    of `batch_size` images (default: inference_batch_size's)."""
    model.eval()
    logits, embeddings = Rows(len(source), np.float32), Rows(len(source), np.float32)  # see Rows: no batch list
    if batch_size is None:  # fine-tuned trunk blocks widen the activations far beyond the input: BATCH_SIZE
        tuned = any(True for _ in getattr(model, "tuned_trunk", torch.nn.Identity()).parameters())
        batch_size = runtime.batch_size if tuned else inference_batch_size(source, runtime)
    batches = in_order(len(source), batch_size)
    for features, _ in feature_batches(source, batches, model.trunk, runtime):
        out, emb = model.forward_head(features)
        logits.add(out.float())
        embeddings.add(emb.float())
    return logits.result(), embeddings.result()


@torch.inference_mode()
def classifier_logits(model, embeddings: np.ndarray, runtime: Runtime) -> np.ndarray:
    """model.classifier on embeddings already computed: forward_head's logits in eval mode (dropout off)."""
    return model.classifier(torch.from_numpy(embeddings).to(runtime.device)).float().cpu().numpy()


# ---- class-wise figures --------------------------------------------------------------------------

classwise_metrics = tasks.MULTICLASS.classwise_metrics  # the multiclass figures (tasks.py owns both tasks')


def classwise_pass(model, sources: dict[str, FeatureSource], runtime: Runtime, class_names: list[str],
                   task=tasks.MULTICLASS) -> dict:
    """The task's classwise_metrics of the model (eval mode) on each named source, keys prefixed "<name>_"."""
    row = {}
    for name, source in sources.items():
        logits, _ = head_outputs(model, source, runtime)
        row.update({f"{name}_{key}": value for key, value in
                    task.classwise_metrics(logits, source.labels.numpy(), class_names).items()})
    return row


def validation_pass(model, sources: dict[str, FeatureSource], runtime: Runtime, class_names: list[str],
                    task=tasks.MULTICLASS, fit_classifier=None, trained=None) -> tuple[float, float, dict]:
    """One validation pass with the head run once over each source ("train": the class-wise curves'
    training images, "val"): (validation loss, validation hits per image, class-wise figures of every
    source), the same figures as evaluate_loss on "val" and classwise_pass on all of them, which ran
    the head over the validation images twice.

    fit_classifier(embeddings, labels), if given, sets the classifier from the "train" source's
    embeddings before any logits are taken (a head trained without cross-entropy); the "train"
    logits then come from those embeddings and the new classifier, with no second pass.

    trained, if given (CLASSWISE_TRAIN="batches"): the (logits, labels) of the training batches since
    the previous pass (train_one_epoch's outputs); the "train_" figures come from them, and `sources`
    holds no "train" source, so the pass runs the head over the validation images only."""
    if fit_classifier is not None and next(iter(sources)) != "train":
        raise ValueError("fit_classifier needs the 'train' source first")
    row, val = {}, None
    if trained is not None:
        if not np.isfinite(trained[0]).all():  # diverged: as below
            return float("nan"), 0.0, {}
        row.update({f"train_{key}": value for key, value in
                    task.classwise_metrics(trained[0], trained[1], class_names).items()})
    for name, source in sources.items():
        logits, embeddings = head_outputs(model, source, runtime)
        if name == "train" and fit_classifier is not None:
            fit_classifier(embeddings, source.labels.numpy())
            logits = classifier_logits(model, embeddings, runtime)
        if not np.isfinite(logits).all():  # diverged: train.py stops on the non-finite loss, in one line
            return float("nan"), 0.0, {}
        if name == "val":
            val = loss_and_hits(logits, source.labels, task)
        row.update({f"{name}_{key}": value for key, value in
                    task.classwise_metrics(logits, source.labels.numpy(), class_names).items()})
    return val[0], val[1], row


def new_model(cfg, num_classes: int) -> tuple[torch.nn.Module, dict, str]:
    """(model, arch, weights source): a fresh model with the trunk's weights as WEIGHTS says."""
    arch = backbone.architecture_args(num_classes, cfg.IMAGE_SIZE, cfg.EMBEDDING_DIM, cfg.DROPOUT, cfg.TRUNK,
                                      cfg.FINETUNE_BLOCKS)
    model = backbone.build_model(arch)
    return model, arch, backbone.load_trunk_weights(model, cfg.WEIGHTS)
