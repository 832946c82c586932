"""Train the classifier head on the frozen EfficientNetV2-S trunk.

    python train.py                      # settings from configfile.py
    python train.py --RESUME=False       # start over instead of resuming checkpoints/last.pth

Reads:  the image folder (DATA_DIR, or the built-in digits).
Writes: outputs/split.csv (drawn once, then re-read), checkpoints/best.pth (lowest validation loss),
        checkpoints/last.pth (every epoch end, for resuming), outputs/training_history.csv,
        outputs/training_plot.png, outputs/bad_images.csv (only if some images are unreadable).
"""
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import backbone
import common
import dataloader
from common import PipelineError

# settings that must be unchanged for a resumed run to be the same run
RESUME_KEYS = ("SEEN_CLASSES", "UNSEEN_CLASSES", "IMAGE_SIZE", "RESIZE_MODE", "AUGMENT", "WEIGHTS",
               "EMBEDDING_DIM", "DROPOUT", "BATCH_SIZE", "LR", "SEED", "VAL_PER_EPOCH", "CACHE_TRUNK",
               "CACHE_DTYPE")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A shuffled order for one epoch that depends only on (seed, epoch): resumable, device-free."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def validation_points(n_batches: int, per_epoch: int) -> set[int]:
    """Indices of the batches after which to validate: evenly spread, the last batch always."""
    passes = max(1, min(per_epoch, n_batches))
    return {int(round((k + 1) * n_batches / passes)) - 1 for k in range(passes)}


@torch.no_grad()
def evaluate_loss(model, source, device, cfg) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model on a FeatureSource (eval mode)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for features, labels in dataloader.feature_batches(source, dataloader.in_order(len(source), cfg.BATCH_SIZE),
                                                       model.trunk, device, cfg):
        logits, _ = model.forward_head(features)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    model.train()
    return loss_sum / len(source), correct / len(source)


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_payload(model, cfg, split, arch, weights_source, trunk_sha256, **extra) -> dict:
    """A self-describing checkpoint: what a later script needs to rebuild and trust the model."""
    return dict(model={k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                arch=arch, class_names=list(split.seen_classes), unseen_classes=list(split.unseen_classes),
                image_size=int(cfg.IMAGE_SIZE), resize_mode=cfg.RESIZE_MODE,
                normalization=dict(mean=backbone.IMAGENET_MEAN, std=backbone.IMAGENET_STD),
                weights_source=weights_source, trunk_sha256=trunk_sha256, split_sha256=split.sha256,
                data_dir=str(split.root), config=common.config_dict(cfg), code_version=common.code_version(),
                **extra)


def check_resumable(last: dict, cfg, split) -> None:
    if last["split_sha256"] != split.sha256:
        raise PipelineError("checkpoints/last.pth was trained on another split.csv; "
                            "run with --RESUME=False to start over")
    changed = [k for k in RESUME_KEYS if last["config"].get(k) != common.config_dict(cfg).get(k)]
    if changed:
        raise PipelineError(f"checkpoints/last.pth was made with other settings ({', '.join(changed)}); "
                            f"restore them to resume, or run with --RESUME=False to start over")


def plot_history(history: pd.DataFrame, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    best_epoch = history.epoch[history.val_loss.idxmin()]
    for ax, metric, title in ((axes[0], "loss", "Cross-entropy loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(history.epoch, history[f"train_{metric}"], "o-", ms=3, label="train")
        ax.plot(history.epoch, history[f"val_{metric}"], "o-", ms=3, label="validation")
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label="best model (lowest validation loss)")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_ylim(min(0.0, float(np.nanmin(history[["train_acc", "val_acc"]].values))), 1.02)
    fig.suptitle(f"Training: best validation loss {history.val_loss.min():.4f} at epoch {best_epoch:.2f}")
    common.save_figure(fig, path)


def run(cfg) -> None:
    paths = common.make_output_dirs(cfg)
    common.set_seed(cfg.SEED)
    device = common.pick_device(cfg.DEVICE)
    if cfg.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    print(f"train.py  device={device}  seed={cfg.SEED}  code={common.code_version()}")
    split = dataloader.prepare_split(cfg, paths, create=True)

    last = None
    if not cfg.RESUME:  # starting over: an old finished last.pth must not vouch for the new best.pth
        paths.last.unlink(missing_ok=True)
    if paths.last.is_file() and cfg.RESUME:
        last = common.load_checkpoint(paths.last)
        if last.get("finished"):
            print(f"training already finished ({last['stop_reason']}); {paths.best} holds epoch "
                  f"{last['best_epoch']:.2f}, validation loss {last['best_val_loss']:.4f}.\n"
                  f"To train again from scratch: python train.py --RESUME=False")
            return
        check_resumable(last, cfg, split)

    # ---- model -----------------------------------------------------------------------------------
    arch = backbone.architecture_args(len(split.seen_classes), cfg)
    model = backbone.build_model(arch)
    weights_source = last["weights_source"] if last else backbone.load_trunk_weights(model, cfg.WEIGHTS)
    if last:
        model.load_state_dict(last["model"])
    from torchinfo import summary
    print(summary(model, input_size=(1, 3, cfg.IMAGE_SIZE, cfg.IMAGE_SIZE), verbose=0, device="cpu",
                  col_names=("output_size", "num_params", "trainable")))
    print(f"trunk weights: {weights_source}")
    model.to(device)
    if cfg.CHANNELS_LAST:
        model.trunk.to(memory_format=torch.channels_last)
    trunk_sha256 = common.tensors_sha256(model.trunk.state_dict())
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=cfg.LR)

    # ---- data: the trunk's output from the cache, unless augmentation makes it random ------------
    if cfg.CACHE_TRUNK and cfg.AUGMENT:
        print("AUGMENT=True makes the trunk's input random: training runs the trunk on every batch "
              "(the cache still serves validation)")
    sources = {s: dataloader.feature_source(split, s, model.trunk, trunk_sha256, cfg, paths.cache, device,
                                            use_cache=bool(cfg.CACHE_TRUNK) and not (cfg.AUGMENT and s == "train"),
                                            augment=bool(cfg.AUGMENT) and s == "train")
               for s in ("train", "val")}
    n_train = len(sources["train"])
    if len(sources["val"]) < 20:
        print(f"note: the validation set has {len(sources['val'])} images; early stopping rests on very few")

    # ---- state (fresh or resumed) ----------------------------------------------------------------
    history, start_epoch, best_val_loss, best_epoch, bad_passes = [], 0, float("inf"), 0.0, 0
    if last:
        optimizer.load_state_dict(last["optimizer"])
        restore_rng(last["rng"])
        history, start_epoch = list(last["history"]), last["epoch"] + 1
        best_val_loss, best_epoch, bad_passes = last["best_val_loss"], last["best_epoch"], last["bad_passes"]
        print(f"resuming after epoch {last['epoch'] + 1} from {paths.last}")

    def save_last(epoch, finished, stop_reason=""):
        common.save_torch(checkpoint_payload(
            model, cfg, split, arch, weights_source, trunk_sha256, optimizer=optimizer.state_dict(), epoch=epoch,
            history=history, best_val_loss=best_val_loss, best_epoch=best_epoch, bad_passes=bad_passes,
            rng=rng_states(), finished=finished, stop_reason=stop_reason), paths.last)

    # ---- the loop --------------------------------------------------------------------------------
    model.train()
    stop_reason, started = f"reached MAX_EPOCHS={cfg.MAX_EPOCHS}", time.time()
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.MAX_EPOCHS):
        batches = epoch_batches(n_train, cfg.BATCH_SIZE, cfg.SEED, epoch)
        checks = validation_points(len(batches), cfg.VAL_PER_EPOCH)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(dataloader.feature_batches(sources["train"], batches, model.trunk, device, cfg,
                                              seed=cfg.SEED * 100_003 + epoch),
                   total=len(batches), desc=f"epoch {epoch + 1}/{cfg.MAX_EPOCHS}", leave=False, disable=None)
        for b, (features, labels) in enumerate(bar):
            logits, _ = model.forward_head(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            if b not in checks:
                continue
            val_loss, val_acc = evaluate_loss(model, sources["val"], device, cfg)
            position = epoch + (b + 1) / len(batches)
            history.append(dict(epoch=position, train_loss=loss_sum / seen, train_acc=correct / seen,
                                val_loss=val_loss, val_acc=val_acc))
            loss_sum, correct, seen = 0.0, 0, 0
            if val_loss < best_val_loss:
                best_val_loss, best_epoch, bad_passes = val_loss, position, 0
                common.save_torch(checkpoint_payload(model, cfg, split, arch, weights_source, trunk_sha256,
                                                     epoch=position, val_loss=val_loss, val_acc=val_acc),
                                  paths.best)
            else:
                bad_passes += 1
                if bad_passes >= cfg.PATIENCE:
                    break
        bar.close()
        row = history[-1]
        print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
              f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | best {best_val_loss:.4f}")
        if bad_passes >= cfg.PATIENCE:
            stop_reason = f"early stop: {bad_passes} validation passes without improvement"
            break
        save_last(epoch, finished=False)

    # ---- wrap up ---------------------------------------------------------------------------------
    frame = pd.DataFrame(history)
    common.save_csv(frame, paths.history, index=False)
    if len(frame):
        plot_history(frame, paths.training_plot)
    save_last(epoch, finished=True, stop_reason=stop_reason)
    print(f"{stop_reason}; {time.time() - started:.1f}s of training. Best validation loss {best_val_loss:.4f} "
          f"at epoch {best_epoch:.2f} -> {paths.best}; plot -> {paths.training_plot}")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
