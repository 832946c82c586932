"""Train the classifier head on the frozen EfficientNetV2-S trunk.

    python train.py                      # settings from configfile.py
    python train.py --RESUME=False       # start over instead of resuming checkpoints/last.pth
    torchrun --standalone --nproc_per_node=4 train.py   # one process per GPU (DistributedDataParallel)

Reads:  the image folder (DATA_DIR, or the built-in digits).
Writes: outputs/split.csv (drawn once with SPLIT_SEED, then re-read), checkpoints/best.pth (lowest
        validation loss, or SELECT_BY's figure at its best), checkpoints/last.pth (every epoch end, for resuming), outputs/training_history.csv
        (one row per validation pass: losses, accuracies, LR, and per class accuracy and average precision
        on the training and validation sets), outputs/training_plot.png, outputs/training_classwise_accuracy.png,
        outputs/training_classwise_ap.png, outputs/bad_images.csv (only if some images are unreadable).

The optimizer (OPTIMIZER, WEIGHT_DECAY, MOMENTUM), LR schedule (LR_SCHEDULE, stepped at each epoch
end), COLOR_JITTER, LABEL_SMOOTHING and the head's loss (HEAD_LOSS, plankton/heads.py: cross-entropy,
or a metric loss whose classifier is then set from the training embeddings) come from the settings;
their defaults train as before them. So do the rare-class settings (docs/rare_classes.md): CLASS_WEIGHTS
(weighted cross-entropy), BALANCED_SAMPLING (every class equally likely in each epoch's draws),
MAX_PER_CLASS (a cap on training images per class) and SELECT_BY (what picks best.pth; training_history.csv
marks that pass in its `selected` column).
Under torchrun each process trains on its block of every batch (BATCH_SIZE is the whole batch) and
computes its block of the missing trunk features; rank 0 alone writes (distributed.py).
"""
import functools
import time

import numpy as np
import pandas as pd
import torch

import backbone
import dataloader
from plankton import (
    checkpoints,
    distributed,
    fileio,
    heads,
    locations,
    plots,
    provenance,
    runner,
    settings,
    splits,
    system,
    tasks,
    training,
    trunk_cache,
)
from plankton.errors import PipelineError

# settings that must be unchanged for a resumed run to be the same run
RESUME_KEYS = ("SEEN_CLASSES", "UNSEEN_CLASSES", "IMAGE_SIZE", "RESIZE_MODE", "AUGMENT", "WEIGHTS", "TRUNK",
               "EMBEDDING_DIM", "DROPOUT", "BATCH_SIZE", "LR", "SEED", "VAL_PER_EPOCH", "CACHE_TRUNK",
               "CACHE_DTYPE", "FINETUNE_BLOCKS", "FINETUNE_LR", "OPTIMIZER", "MOMENTUM", "WEIGHT_DECAY", "LR_SCHEDULE",
               "LR_STEP_EPOCHS", "LR_GAMMA", "COLOR_JITTER", "LABEL_SMOOTHING", "TASK", "HEAD_LOSS", "HEAD_LOSS_WEIGHT",
               "CLASS_WEIGHTS", "BALANCED_SAMPLING", "MAX_PER_CLASS", "SELECT_BY")
# what a checkpoint made before these settings existed trained with (so that it still resumes)
BEFORE_TRAINING_OPTIONS = dict(OPTIMIZER="adam", MOMENTUM=0.9, WEIGHT_DECAY=0.0, LR_SCHEDULE="none", LR_STEP_EPOCHS=5,
                               LR_GAMMA=0.3, COLOR_JITTER=0.0, LABEL_SMOOTHING=0.0, SPLIT_SEED=None,
                               TRUNK="efficientnet_v2_s", FINETUNE_BLOCKS=0, FINETUNE_LR=0.0001, TASK="multiclass",
                               LABELS_CSV=None, ECOTAXA_EXPORT=None, ECOTAXA_STATUSES=["validated"], ECOTAXA_MIN_COUNT=10,
                               HEAD_LOSS="ce", HEAD_LOSS_WEIGHT=1.0, CLASS_WEIGHTS="none", BALANCED_SAMPLING=False,
                               MAX_PER_CLASS=None, SELECT_BY="auto", GROUP_BY=None, GROUP_CSV=None)
# settings a finished run must share with this one for its best.pth to stand for these settings
FINISHED_KEYS = RESUME_KEYS + ("MAX_EPOCHS", "PATIENCE", "DATA_DIR", "TRAIN_FRACTION", "VAL_FRACTION", "TEST_FRACTION",
                               "LABELS_CSV", "ECOTAXA_EXPORT", "ECOTAXA_STATUSES", "ECOTAXA_MIN_COUNT", "GROUP_BY",
                               "GROUP_CSV")


def resumable_checkpoint(cfg, paths, split) -> "checkpoints.Checkpoint | None":
    """last.pth to resume from (or a finished run made with these settings), or None to start
    fresh. Starting over (RESUME=False) deletes an old last.pth first: a finished one must not
    vouch for the new best.pth."""
    if not cfg.RESUME and distributed.is_main():
        paths.last.unlink(missing_ok=True)
    if not paths.last.is_file():
        return None
    last = checkpoints.open_checkpoint(paths.last)
    if last.split_sha256 != split.sha256:
        raise PipelineError(f"{paths.last} was trained on another split.csv; run with --RESUME=False to start over")
    keys = FINISHED_KEYS if last.finished else RESUME_KEYS
    if cfg.LR_SCHEDULE == "cosine":  # the cosine runs over MAX_EPOCHS
        keys = tuple(dict.fromkeys(keys + ("MAX_EPOCHS",)))
    changed = settings.differences({**BEFORE_TRAINING_OPTIONS, **last.config}, settings.settings_dict(cfg), keys)
    if changed and last.finished:
        raise PipelineError(f"{paths.last} is a finished training run with other settings ({'; '.join(changed)}); "
                            f"restore them, or run train.py --RESUME=False to train again with these")
    if changed:
        raise PipelineError(f"{paths.last} was made with other settings ({'; '.join(changed)}); "
                            f"restore them to resume, or run with --RESUME=False to start over")
    return last


def build_model(cfg, split, last: "checkpoints.Checkpoint | None", summary_path) -> tuple[torch.nn.Module, dict, str]:
    """(model, arch, weights source), fresh or as the run being resumed left it; prints its summary
    and keeps it in summary_path (outputs/model_summary.txt)."""
    if last:
        arch, model, weights_source = last.arch, last.build_model(), last.weights_source
    else:
        model, arch, weights_source = training.new_model(cfg, len(split.seen_classes))
    from torchinfo import summary
    stats = summary(model, input_size=(1, 3, cfg.IMAGE_SIZE, cfg.IMAGE_SIZE), verbose=0, device="cpu",
                    col_names=("output_size", "num_params", "trainable"))
    text = f"{stats}\ntrunk weights: {weights_source}\n"
    print(text, end="")
    if distributed.is_main():
        with fileio.atomic_path(summary_path) as tmp:
            tmp.write_text(text)
    plots.note_trunk_weights(weights_source)
    return model, arch, weights_source


def kept_training_images(cfg, split) -> np.ndarray:
    """Indices of the training images trained on: all, or at most MAX_PER_CLASS per class (fixed by SEED)."""
    _, labels = split.subset("train")
    if cfg.MAX_PER_CLASS is None or cfg.TASK != "multiclass":
        return np.arange(len(labels))
    kept = training.capped_indices(labels, cfg.MAX_PER_CLASS, cfg.SEED)
    if len(kept) < len(labels):
        print(f"MAX_PER_CLASS={cfg.MAX_PER_CLASS}: training on {len(kept)} of the {len(labels)} training images")
    return kept


def training_sources(cfg, split, preprocess, cache, kept=None) -> dict:
    """Train and validation features: from the trunk cache, except training images under AUGMENT,
    whose trunk input is random and goes through the trunk every batch. "train_classwise": the
    training images un-augmented (cached if there is a cache), for the class-wise curves. `kept`:
    the training images' indices trained on (kept_training_images), None for all."""
    if cache is not None and cfg.AUGMENT:
        print("AUGMENT=True makes the trunk's input random: training runs the trunk on every batch "
              "(the cache still serves validation and the class-wise training curves, un-augmented)")
    sources = {}
    for subset in ("train", "val"):
        augment = bool(cfg.AUGMENT) and subset == "train"
        sources[subset] = split.source(subset, preprocess, cache=None if augment else cache, augment=augment,
                                       color_jitter=cfg.COLOR_JITTER if augment else 0.0)
    if kept is not None and len(kept) < len(sources["train"]):
        sources["train"] = dataloader.select_rows(sources["train"], kept)
    if classwise_pass(cfg):
        everything = split.source("train", preprocess, cache) if cfg.AUGMENT else sources["train"]
        if cfg.AUGMENT and kept is not None and len(kept) < len(everything):
            everything = dataloader.select_rows(everything, kept)
        sources["train_classwise"] = dataloader.sample_source(everything, cfg.CLASSWISE_SAMPLES, cfg.SEED)
        if len(sources["train_classwise"]) < len(everything):
            print(f"note: the class-wise training curves use a fixed random sample of {cfg.CLASSWISE_SAMPLES} of the "
                  f"{len(everything)} training images (CLASSWISE_SAMPLES)")
        if cache is None:
            print(f"note: without the trunk cache the class-wise training curves run the trunk over the "
                  f"{len(sources['train_classwise'])} training images at every validation pass")
    if len(sources["val"]) < 20:
        print(f"note: the validation set has {len(sources['val'])} images; early stopping rests on very few")
    return sources


def classwise_pass(cfg) -> bool:
    """True when each validation pass runs the head over training images (CLASSWISE_TRAIN="pass", or a
    head trained without cross-entropy, whose classifier is set from those images' embeddings at each
    pass); False when the training figures come from the training batches' own outputs ("batches")."""
    return cfg.CLASSWISE_TRAIN == "pass" or not heads.parts(cfg.HEAD_LOSS)[0]


def fit(model, optimizer, scheduler, state, sources, runtime, cfg, save_best, save_last, forward=None,
        criterion=None) -> float:
    """Epochs until MAX_EPOCHS or PATIENCE validation passes without a better monitored figure (the
    task's: validation loss, or validation mAP for multilabel); the LR schedule steps at each epoch
    end. Returns the seconds spent in the validation passes (loss and class-wise figures, the head run
    once over each of their sources: training.validation_pass). `criterion` (heads.Criterion) is what is
    minimised; a head trained without cross-entropy gets its classifier set from the embeddings of the
    class-wise curves' training images (heads.fit_classifier) in each validation pass, so the
    validation figures, best.pth and every later stage use that classifier.
    Under torchrun (`forward` from training.data_parallel) every rank validates on the whole
    validation set and rank 0's verdict stops them all; a last batch with fewer images than ranks
    is left out of its epoch (each rank needs one; a different few images each epoch)."""
    task = training.selecting_task(tasks.for_name(cfg.TASK), cfg.SELECT_BY)
    state.stop_reason = f"reached MAX_EPOCHS={cfg.MAX_EPOCHS}"
    balanced = sources["train"].labels.numpy() if cfg.BALANCED_SAMPLING else None
    passes_train = classwise_pass(cfg)  # else the training figures come from the batches trained on
    classwise = dict(train=sources["train_classwise"], val=sources["val"]) if passes_train else dict(val=sources["val"])
    classwise_seconds = 0.0
    fits = criterion is not None and criterion.fits_classifier
    fit_classifier = functools.partial(heads.fit_classifier, model, criterion) if fits else None
    for epoch in range(state.epoch + 1, cfg.MAX_EPOCHS):
        batches = training.epoch_batches(len(sources["train"]), cfg.BATCH_SIZE, cfg.SEED, epoch, balanced)
        batches = [batch for batch in batches if len(batch) >= distributed.world_size()]

        def validate(b: int, train_loss: float, train_acc: float, trained) -> bool:
            nonlocal classwise_seconds
            started = time.perf_counter()
            val_loss, val_acc, per_class = training.validation_pass(model, classwise, runtime, list(cfg.SEEN_CLASSES),
                                                                    task, fit_classifier=fit_classifier, trained=trained)
            classwise_seconds += time.perf_counter() - started
            position = epoch + (b + 1) / len(batches)
            if not np.isfinite(val_loss) or not np.isfinite(train_loss):
                raise PipelineError(f"training diverged at epoch {position:.2f} (train loss {train_loss}, validation "
                                    f"loss {val_loss}); lower LR (now {cfg.LR}) and run train.py --RESUME=False")
            state.history.append(dict(epoch=position, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                                      val_acc=val_acc, lr=optimizer.param_groups[0]["lr"], **per_class))
            if state.improved(training.selection_figure(task, state.history[-1]), position):
                save_best(epoch=position, val_loss=val_loss, val_acc=val_acc, val_map=per_class["val_map"])
            return state.bad_passes >= cfg.PATIENCE

        stopped = training.train_one_epoch(model, optimizer, sources["train"], batches, runtime,
                                           training.validation_points(len(batches), cfg.VAL_PER_EPOCH), validate,
                                           seed=cfg.SEED * 100_003 + epoch, desc=f"epoch {epoch + 1}/{cfg.MAX_EPOCHS}",
                                           label_smoothing=cfg.LABEL_SMOOTHING, forward=forward, task=task,
                                           criterion=criterion if criterion is not None and criterion.replaces_task_loss
                                           else None, keep_outputs=not passes_train)
        state.epoch = epoch
        print_epoch(epoch, state, task)
        if stopped:
            state.stop_reason = f"early stop: {state.bad_passes} validation passes without improvement"
            return classwise_seconds
        if scheduler is not None:
            scheduler.step()
        save_last()
    return classwise_seconds


def print_epoch(epoch: int, state, task=tasks.MULTICLASS) -> None:
    row = state.history[-1]
    print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
          f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} mAP {row['val_map']:.4f} | "
          f"best {best_words(state.best_val_loss, task).split()[-1]} | lr {row['lr']:.3g}")


def best_words(monitored: float, task) -> str:
    """The best model's monitored figure in words: "validation loss 0.1234" or "validation mAP 0.9876"."""
    if task.monitor == "val_loss":
        return f"validation loss {monitored:.4f}"
    name = {"val_map": "mAP", "val_balanced_accuracy": "balanced accuracy", "val_macro_f1": "macro F1"}[task.monitor]
    return f"validation {name} {task.monitor_sign * monitored:.4f}"


def best_position(history: pd.DataFrame, task) -> float:
    """The epoch of the best model: the task's monitored column at its best."""
    return history.epoch[training.selection_figure(task, history).idxmin()]


HISTORY_PANELS = {"multiclass": (("loss", "Cross-entropy loss"), ("acc", "Accuracy")),
                  "multilabel": (("loss", "Binary cross-entropy loss (BCEWithLogitsLoss)"),
                                 ("map", "mAP (mean over labels of the average precision)"))}


def plot_history(history: pd.DataFrame, path, task=tasks.MULTICLASS) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    best_epoch = best_position(history, task)
    for ax, (metric, title) in zip(axes, HISTORY_PANELS[task.name]):
        ax.plot(history.epoch, history[f"train_{metric}"], "o-", ms=3, label="train")
        ax.plot(history.epoch, history[f"val_{metric}"], "o-", ms=3, label="validation")
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"best model ({task.monitor_words})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    second = HISTORY_PANELS[task.name][1][0]
    axes[1].set_ylim(min(0.0, float(np.nanmin(history[[f"train_{second}", f"val_{second}"]].values))), 1.02)
    best = history[task.monitor][history.epoch == best_epoch].iloc[0]
    fig.suptitle(f"Training: best {task.monitor_words.split(' ', 1)[1]} {best:.4f} at epoch {best_epoch:.2f}")
    plots.save_figure(fig, path)


CLASSWISE = {("multiclass", "acc"): ("accuracy", "mean over classes (balanced accuracy)"),
             ("multiclass", "ap"): ("average precision (one-vs-rest, softmax score)", "mean over classes (mAP)"),
             ("multilabel", "acc"): ("recall at score 0.5 (share of the label's images scored >= 0.5)",
                                     "mean over labels"),
             ("multilabel", "ap"): ("average precision (sigmoid score)", "mean over labels (mAP)")}


# the training panel's title, by where the training figures come from (CLASSWISE_TRAIN; train.classwise_pass)
TRAIN_PANEL = {False: "training batches (train mode)", True: "training sample (eval mode)"}


def plot_classwise(history: pd.DataFrame, class_names: list[str], metric: str, path, task=tasks.MULTICLASS,
                   train_title: str = TRAIN_PANEL[True]) -> None:
    """A train panel and a validation panel: one line per class, the mean over classes thicker."""
    plt = plots.pyplot()
    what, mean_label = CLASSWISE[task.name, metric]
    kind = "class" if task.name == "multiclass" else "label"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True, layout="constrained")
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    best_epoch = best_position(history, task)
    for ax, subset, title in ((axes[0], "train", train_title), (axes[1], "val", "validation set")):
        for i, name in enumerate(class_names):
            ax.plot(history.epoch, history[f"{subset}_{metric}_{name}"], lw=1.1, alpha=0.85,
                    color=colours(i % colours.N), label=name)
        mean = history[[f"{subset}_{metric}_{name}" for name in class_names]].mean(axis=1)
        ax.plot(history.epoch, mean, color="black", lw=3, label=mean_label)
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label="best model")
        ax.set_title(f"{what.split(' (')[0].capitalize()} per {kind}, {title}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(what)
    axes[0].set_ylim(0, 1.01)  # the whole range, the same for accuracy and AP: figures side by side compare honestly
    axes[1].legend(title=kind, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8,
                   ncol=1 if len(class_names) <= 20 else 2)
    fig.suptitle(f"Class-wise {what} at each validation pass")
    plots.save_figure(fig, path)


def optimizer_and_schedule(cfg, model, criterion=None) -> tuple[torch.optim.Optimizer, object]:
    """The optimizer over the trainable parameters (and a head loss's own, ArcFace's class weights, at
    LR) and the LR schedule (None for "none"), as the settings say."""
    groups = training.parameter_groups(model, cfg.LR, cfg.FINETUNE_LR)
    if criterion is not None and list(criterion.parameters()):
        groups.append(dict(params=list(criterion.parameters()), lr=cfg.LR))
    optimizer = training.make_optimizer(cfg.OPTIMIZER, groups, cfg.LR, cfg.WEIGHT_DECAY, cfg.MOMENTUM)
    return optimizer, training.make_scheduler(cfg.LR_SCHEDULE, optimizer, cfg.MAX_EPOCHS, cfg.LR_STEP_EPOCHS, cfg.LR_GAMMA)


def save_history(history: list[dict], paths, class_names: list[str], task=tasks.MULTICLASS,
                 train_title: str = TRAIN_PANEL[True]) -> None:
    """training_history.csv and its three plots (none when no validation pass was made); rank 0's."""
    if not distributed.is_main():
        return
    frame = pd.DataFrame(history)
    if len(frame):  # the validation pass best.pth holds (SELECT_BY's figure at its best)
        frame["selected"] = frame.epoch == best_position(frame, task)
    fileio.save_csv(frame, paths.history, index=False)
    if len(frame):
        plot_history(frame, paths.training_plot, task)
        plot_classwise(frame, class_names, "acc", paths.classwise_accuracy_plot, task, train_title)
        plot_classwise(frame, class_names, "ap", paths.classwise_ap_plot, task, train_title)


def head_criterion(cfg, num_classes: int, runtime, last, class_weights=None) -> heads.Criterion:
    """What training minimises (HEAD_LOSS, its cross-entropy weighted by `class_weights` if given), on
    the device; a resumed run's loss parameters restored."""
    criterion = heads.Criterion(cfg.HEAD_LOSS, tasks.for_name(cfg.TASK), num_classes, cfg.EMBEDDING_DIM,
                                cfg.HEAD_LOSS_WEIGHT, cfg.LABEL_SMOOTHING, class_weights)
    if criterion.metric is not None and distributed.world_size() > 1:
        raise PipelineError(f"HEAD_LOSS={cfg.HEAD_LOSS!r} trains in one process only (its pairs and triplets come "
                            f"from the whole batch, under torchrun each process sees its block); start it with python")
    criterion.to(runtime.device)
    if last and last.training.get("head_loss"):
        criterion.load_state_dict(last.training["head_loss"])
    return criterion


def loss_state(criterion: heads.Criterion) -> dict:
    """The head loss's own tensors (ArcFace's class weights; {} for the others), for last.pth."""
    return {k: v.detach().cpu().contiguous() for k, v in criterion.state_dict().items()}


def run(cfg) -> None:
    heads.check_loss(cfg.HEAD_LOSS, cfg.TASK, cfg.LABEL_SMOOTHING)  # before anything is written
    if cfg.CLASS_WEIGHTS != "none" and not heads.parts(cfg.HEAD_LOSS)[0]:
        raise PipelineError(f"CLASS_WEIGHTS={cfg.CLASS_WEIGHTS!r}: weighs the cross-entropy, and HEAD_LOSS="
                            f"{cfg.HEAD_LOSS!r} has none; set CLASS_WEIGHTS='none' or HEAD_LOSS='ce+{cfg.HEAD_LOSS}'")
    paths = locations.prepare_output_dirs(cfg)
    system.set_seed(cfg.SEED)
    runtime = dataloader.runtime_from_settings(cfg)
    if cfg.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    ranks = distributed.world_size()
    print(f"train.py  device={runtime.device}  seed={cfg.SEED}  code={provenance.code_version()}"
          + (f"  processes={ranks} (torchrun)" if ranks > 1 else ""))
    if cfg.BATCH_SIZE < ranks:
        raise PipelineError(f"BATCH_SIZE={cfg.BATCH_SIZE} is smaller than the {ranks} processes; each needs an "
                            f"image of every batch: raise BATCH_SIZE or start fewer processes")
    with distributed.main_first():  # rank 0 draws and writes the split; the others then read it
        split = splits.split_from_settings(cfg, paths, create=True)
        last = resumable_checkpoint(cfg, paths, split)
    if last and last.finished:
        done = training.TrainingState.restore(last)
        task = training.selecting_task(tasks.for_name(cfg.TASK), cfg.SELECT_BY)
        print(f"training already finished ({done.stop_reason}); {paths.best} holds epoch "
              f"{done.best_epoch:.2f}, {best_words(done.best_val_loss, task)}.\n"
              f"To train again from scratch: python train.py --RESUME=False")
        return

    model, arch, weights_source = build_model(cfg, split, last, paths.model_summary)
    training.place_model(model, runtime)
    trunk_sha256 = backbone.frozen_trunk_sha256(model)  # of what the cache serves: the frozen blocks
    kept = kept_training_images(cfg, split)
    class_weights = None
    if cfg.TASK == "multiclass":
        class_weights = training.class_weights(cfg.CLASS_WEIGHTS, split.subset("train")[1][kept],
                                               len(split.seen_classes))
    if class_weights is not None:
        print(f"CLASS_WEIGHTS={cfg.CLASS_WEIGHTS!r}: " + ", ".join(
            f"{name} {w:.3g}" for name, w in zip(split.seen_classes, class_weights.tolist())))
    criterion = head_criterion(cfg, len(split.seen_classes), runtime, last, class_weights)
    optimizer, scheduler = optimizer_and_schedule(cfg, model, criterion)
    state = training.TrainingState.restore(last, model, optimizer, scheduler) if last else training.TrainingState()
    if last:
        print(f"resuming after epoch {state.epoch + 1} from {paths.last}")
    forward = training.data_parallel(model, runtime)  # model.forward_head, or DDP under torchrun
    preprocess = dataloader.Preprocess.for_trunk(arch["trunk"], cfg.IMAGE_SIZE, cfg.RESIZE_MODE)
    cache = trunk_cache.from_settings(cfg, paths.cache, model.trunk, trunk_sha256, preprocess, runtime)
    sources = training_sources(cfg, split, preprocess, cache, kept)

    def record(**extra) -> dict:
        return checkpoints.checkpoint_record(model, arch, preprocess, split, weights_source, trunk_sha256,
                                           settings.settings_dict(cfg), **extra)

    def save_last() -> None:  # rank 0's files only, here and below: the other ranks write nothing
        if distributed.is_main():
            fileio.save_torch(record(**state.record(model, optimizer, scheduler), head_loss=loss_state(criterion)),
                              paths.last)

    def save_best(**extra) -> None:
        if distributed.is_main():
            fileio.save_torch(record(**extra), paths.best)

    started = time.time()
    classwise_seconds = fit(model, optimizer, scheduler, state, sources, runtime, cfg, save_best=save_best,
                            save_last=save_last, forward=forward, criterion=criterion)
    task = training.selecting_task(tasks.for_name(cfg.TASK), cfg.SELECT_BY)
    save_history(state.history, paths, list(split.seen_classes), task, TRAIN_PANEL[classwise_pass(cfg)])
    state.finished = True
    save_last()
    passes = max(1, sum(1 for row in state.history if "val_map" in row))
    print(f"{state.stop_reason}; {time.time() - started:.1f}s of training, of which {classwise_seconds:.1f}s for the "
          f"validation passes and class-wise curves ({1000 * classwise_seconds / passes:.0f} ms per validation pass). "
          f"Best: "
          f"{best_words(state.best_val_loss, task)} at epoch {state.best_epoch:.2f} -> {paths.best}; plots -> {paths.out}")


def main(argv=None):
    runner.run_script(run, argv, distributed_ok=True)


if __name__ == "__main__":
    main()
