"""The fast paths of issue 24 against simple references on small inputs: one validation pass instead
of three, head-only passes in device-sized batches, leaks' blocked nearest neighbours, images
decoded once for feature_maps.py, and bench.py's table of the targets at scale."""
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, make_image_folder

import dataloader
import feature_maps
import leaks
import train
from dataloader import FeatureSource, Runtime, feature_batches, in_order
from plankton import tasks, training

sys.path.insert(0, str(REPO / "tools"))
import bench  # noqa: E402

CLASSES = ["a", "b", "c"]
CPU = Runtime(torch.device("cpu"), 8, 0, False, False)


class TinyNet(torch.nn.Module):
    """PlanktonNet's shape in miniature: a frozen trunk, a conv head, an embedding, a classifier."""

    def __init__(self, channels: int = 4, side: int = 4, classes: int = 3):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, stride=4, padding=1))
        self.tuned_trunk = torch.nn.Identity()
        self.head = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.Flatten())
        self.embed = torch.nn.Sequential(torch.nn.Linear(8 * side * side, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3))
        self.classifier = torch.nn.Linear(16, classes)

    def forward_head(self, features):
        embedding = self.embed(self.head(self.tuned_trunk(features)))
        return self.classifier(embedding), embedding

    def forward(self, images):
        with torch.no_grad():
            features = self.trunk(images)
        return self.forward_head(features)


def sources(seed: int = 0, n_train: int = 150, n_val: int = 70) -> dict:
    rng = np.random.default_rng(seed)
    made = {}
    for name, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % 3
        features = rng.normal(size=(n, 4, 4, 4)).astype(np.float16) + labels[:, None, None, None].astype(np.float16)
        made[name] = FeatureSource(torch.as_tensor(labels), features=features)
    made["train_classwise"] = dataloader.sample_source(made["train"], 100, seed)
    return made


def old_validation(model, sources, runtime, class_names, task=tasks.MULTICLASS, fit_classifier=None, trained=None):
    """train.py's validation before issue 24: evaluate_loss over "val" batch by batch, then the head
    again over every source (classwise_pass), all at BATCH_SIZE; a fitted classifier a pass before."""
    def logits_of(source):
        model.eval()
        with torch.no_grad():
            return np.concatenate([model.forward_head(f)[0].numpy() for f, _ in
                                   feature_batches(source, in_order(len(source), runtime.batch_size), None, runtime)])

    if fit_classifier is not None:
        model.eval()
        with torch.no_grad():
            embeddings = np.concatenate([model.forward_head(f)[1].numpy() for f, _ in feature_batches(
                sources["train"], in_order(len(sources["train"]), runtime.batch_size), None, runtime)])
        fit_classifier(embeddings, sources["train"].labels.numpy())
    val, loss_sum, hits = sources["val"], 0.0, 0
    model.eval()
    with torch.no_grad():
        for f, labels in feature_batches(val, in_order(len(val), runtime.batch_size), None, runtime):
            out, _ = model.forward_head(f)
            loss_sum += F.cross_entropy(out, labels, reduction="sum").item()
            hits += int((out.argmax(1) == labels).sum())
    row = {}
    for name, source in sources.items():
        row.update({f"{name}_{k}": v for k, v in
                    task.classwise_metrics(logits_of(source), source.labels.numpy(), class_names).items()})
    return loss_sum / len(val), hits / len(val), row


def class_mean_classifier(model):
    """A stand-in for heads.fit_classifier: the classifier set from the class means of the embeddings."""
    def fit(embeddings, labels):
        means = np.stack([embeddings[labels == c].mean(0) for c in range(3)])
        with torch.no_grad():
            model.classifier.weight.copy_(torch.as_tensor(means))
            model.classifier.bias.zero_()
    return fit


@pytest.mark.parametrize("fitted", [False, True])
def test_one_validation_pass_gives_the_figures_of_the_three_it_replaces(fitted):
    made = sources()
    passes = {}
    for name, validate in (("old", old_validation), ("new", training.validation_pass)):
        torch.manual_seed(0)
        model = TinyNet()
        fit = class_mean_classifier(model) if fitted else None
        passes[name] = validate(model, dict(train=made["train_classwise"], val=made["val"]), CPU, CLASSES,
                                fit_classifier=fit)
    (old_loss, old_acc, old_row), (new_loss, new_acc, new_row) = passes["old"], passes["new"]
    assert new_loss == pytest.approx(old_loss, rel=1e-6) and new_acc == old_acc
    # per source: accuracy and AP per class, mAP, balanced accuracy and macro F1 (SELECT_BY's figures)
    assert set(new_row) == set(old_row) and len(new_row) == 2 * (2 * len(CLASSES) + 3)
    for key in old_row:
        assert new_row[key] == pytest.approx(old_row[key], rel=1e-6, abs=1e-9), key


def test_training_keeps_its_history_with_the_single_validation_pass(monkeypatch):
    """train.fit with a fixed seed: the same history as with the three passes at BATCH_SIZE."""
    cfg = types.SimpleNamespace(TASK="multiclass", MAX_EPOCHS=2, BATCH_SIZE=16, SEED=3, VAL_PER_EPOCH=2, PATIENCE=100,
                                LR=0.01, LABEL_SMOOTHING=0.0, SEEN_CLASSES=CLASSES, SELECT_BY="auto",
                                BALANCED_SAMPLING=False, CLASSWISE_TRAIN="pass", HEAD_LOSS="ce")
    histories = {}
    for name in ("old", "new"):
        with monkeypatch.context() as patch:
            if name == "old":
                patch.setattr(training, "validation_pass", old_validation)
            torch.manual_seed(0)
            model = TinyNet()
            optimizer = torch.optim.Adam(training.trainable_parameters(model), lr=cfg.LR)
            state = training.TrainingState()
            train.fit(model, optimizer, None, state, sources(), CPU, cfg, save_best=lambda **kw: None,
                      save_last=lambda: None)
            histories[name] = state.history
    assert len(histories["new"]) == len(histories["old"]) == 2 * 2
    for old, new in zip(histories["old"], histories["new"]):
        assert set(old) == set(new)
        for key in old:
            assert new[key] == pytest.approx(old[key], rel=1e-5, abs=1e-9), key


def test_head_passes_over_cached_features_run_in_device_sized_batches():
    small = FeatureSource(torch.zeros(10), features=np.zeros((10, 64, 16, 16), np.float16))  # 64 KiB a row as float32
    assert training.inference_batch_size(small, CPU) == (8 << 20) // (4 * 64 * 16 * 16) == 128
    cuda = Runtime(torch.device("cuda"), 64, 0, False, False)
    assert training.inference_batch_size(small, cuda) == training.MAX_HEAD_BATCH
    huge = FeatureSource(torch.zeros(3), features=dataloader.RowView(np.zeros((5, 512, 64, 64), np.float16), [0, 2, 4]))
    assert huge.features.shape == (3, 512, 64, 64)
    assert training.inference_batch_size(huge, CPU) == CPU.batch_size  # never below BATCH_SIZE
    images = FeatureSource(torch.zeros(3), dataset=object())
    assert training.inference_batch_size(images, CPU) == CPU.batch_size  # the trunk's batches stay BATCH_SIZE


def test_leaks_nearest_training_row_equals_brute_force_in_any_block_size():
    rng = np.random.default_rng(1)
    train_rows = leaks.unit_rows(rng.normal(size=(300, 24)), np.zeros(24))
    queries = leaks.unit_rows(rng.normal(size=(101, 24)), np.zeros(24))
    queries[5] = train_rows[17]  # an exact copy: distance 0
    similarity = queries.astype(np.float64) @ train_rows.T.astype(np.float64)
    for block_bytes in (1, 4 * 300 * 7, None):  # one query at a time, 7 at a time, the device's default
        index, distance = leaks.nearest_training(queries, train_rows, torch.device("cpu"), block_bytes)
        assert index.tolist() == similarity.argmax(1).tolist()
        np.testing.assert_allclose(distance, np.clip(1 - similarity.max(1), 0, 2), atol=1e-6)
        assert index[5] == 17 and distance[5] < 1e-6
    empty_index, empty_distance = leaks.nearest_training(queries[:0], train_rows)
    assert empty_index.shape == empty_distance.shape == (0,)


def test_images_decoded_once_are_exactly_the_loaders_images(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 5}, size=20)
    relpaths = [f"a/img_{j:03d}.png" for j in range(5)]
    preprocess = dataloader.Preprocess(16, "pad", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = dataloader.decode_images(root, relpaths, preprocess, CPU)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 16, 16)
    dataset = dataloader.ImageDataset(root, relpaths, np.zeros(5), preprocess)
    assert torch.equal(dataloader.normalise(pixels, preprocess), torch.stack([dataset[i][0] for i in range(5)]))


def test_the_loaders_numpy_normalisation_is_bit_for_bit_torchs(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 3}, size=20)
    relpaths = [f"a/img_{j:03d}.png" for j in range(4)] + [f"b/img_{j:03d}.png" for j in range(3)]
    preprocess = dataloader.Preprocess(24, "stretch", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dataset = dataloader.ImageDataset(root, relpaths, np.arange(7) % 2, preprocess)
    mean, std = torch.tensor(preprocess.mean).view(3, 1, 1), torch.tensor(preprocess.std).view(3, 1, 1)
    for i in range(7):  # what __getitem__ computed in torch before
        assert torch.equal(dataset[i][0], (dataset.pixels(i).float().div_(255.0) - mean) / std)
    images, labels = next(iter(dataloader.image_loader(dataset, CPU)))
    assert images.shape == (7, 3, 24, 24) and images.is_contiguous() and labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert torch.equal(images, torch.stack([dataset[i][0] for i in range(7)]))


def test_feature_map_statistics_from_decoded_images_equal_those_from_the_files(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 11}, size=16)
    relpaths = [f"a/img_{j:03d}.png" for j in range(11)]
    preprocess = dataloader.Preprocess(16, "stretch", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(0)
    model = TinyNet().eval()
    names = ["trunk.0", "head.0", "embed.0"]
    stats = feature_maps.collect(model, names, dataloader.decode_images(root, relpaths, preprocess, CPU), preprocess,
                                 CPU)
    dataset = dataloader.ImageDataset(root, relpaths, np.zeros(11), preprocess)
    with feature_maps.hooked(model, names) as reference, torch.inference_mode():
        model(torch.stack([dataset[i][0] for i in range(11)]))
    for name in names:
        assert stats[name].nonpositive == reference[name].nonpositive > 0
        assert stats[name].values == reference[name].values
        np.testing.assert_allclose(stats[name].pooled_matrix(), reference[name].pooled_matrix(), rtol=1e-5, atol=1e-6)


def test_head_statistics_from_a_kept_trunk_output_equal_those_from_the_images(tmp_path):
    """feature_maps.py's head_init condition reads the trunk's output kept from seen_test."""
    root = make_image_folder(tmp_path / "data", {"a": 11}, size=16)
    preprocess = dataloader.Preprocess(16, "stretch", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pictures = dataloader.decode_images(root, [f"a/img_{j:03d}.png" for j in range(11)], preprocess, CPU)
    torch.manual_seed(0)
    model = TinyNet().eval()
    kept = []
    first = feature_maps.collect(model, ["trunk.0", "head.0"], pictures, preprocess, CPU, keep_trunk=kept)
    assert len(kept) == 2 and kept[0].shape == (8, 4, 4, 4)  # two batches of BATCH_SIZE 8
    again = feature_maps.collect(model, ["head.0", "embed.0"], pictures, preprocess, CPU, trunk_outputs=kept)
    assert "trunk.0" not in again
    reference = feature_maps.collect(model, ["head.0", "embed.0"], pictures, preprocess, CPU)
    for name in ("head.0", "embed.0"):
        assert again[name].nonpositive == reference[name].nonpositive
        np.testing.assert_array_equal(again[name].pooled_matrix(), reference[name].pooled_matrix())
    np.testing.assert_array_equal(first["head.0"].pooled_matrix(), reference["head.0"].pooled_matrix())


def fake_run(n: int, stage_s: dict, wall: float, peak: float) -> dict:
    return dict(stage_s={**stage_s, "total": sum(stage_s.values())}, wall_s=wall, peak_mib=peak, peak_anon_mib=peak / 2)


def test_bench_prints_the_study_stages_and_the_whole_run_against_the_limit_cold_and_warm():
    stages = dict(dataset_overview=2.0, train=20.0, evaluate=3.0, leaks=4.0, embed=1.0, compute_average_distances=1.0,
                  dimensionality_reduction=5.0, transfer_learning=4.0, report=1.0)
    runs = []
    for n, trunk_pass in ((5_000, 23.0), (50_000, 230.0)):
        scale = n / 5_000
        cold = fake_run(n, {k: v * scale for k, v in stages.items()}, wall=45.0 * scale, peak=2000.0)
        warm = fake_run(n, {k: v * scale / 2 for k, v in stages.items()}, wall=25.0 * scale, peak=1500.0)
        study = sum(stages[s] for s in bench.STUDY_STAGES) * scale
        runs.append(dict(images=n, cold=cold, warm=warm, umap=dict(seconds=3.0, points=4000), trunk_pass_s=trunk_pass,
                         study_cold_s=study, study_ratio=study / trunk_pass, whole_ratio=cold["wall_s"] / trunk_pass,
                         embeddings_mib=10.0 * scale))
    table = bench.scale_rows(runs)
    study = [r[1:] for r in table if r[0] == "  six study stages cold / limit"]
    assert study == [("1.48x", "<= 1.5x", "PASS"), ("1.48x", "", "")]  # 34 s / 23 s; a target at 5,000 only
    verdicts = [r[1:] for r in table if r[0] == "  whole run_all cold / limit"]
    assert verdicts == [("1.96x", "<= 2.5x", "PASS"), ("1.96x", "<= 1.3x", "MISS")]
    assert ("  train [study]: cold / warm", "200.0 s / 100.0 s (4.00 ms/img cold)", "", "") in table
    assert ("  leaks: cold / warm", "4.0 s / 2.0 s (0.80 ms/img cold)", "", "") in table
    assert ("  peak memory cold / warm", "2000 / 1500 MiB", "< 3 GB", "PASS") in table


def test_classwise_training_figures_come_from_the_batches_trained_on(monkeypatch):
    """CLASSWISE_TRAIN="batches": no validation pass runs the head over training images, and each pass's
    training figures are those of the batches since the previous one: their accuracies per class,
    weighted by the classes' images in those batches, give the running train_acc."""
    cfg = types.SimpleNamespace(TASK="multiclass", MAX_EPOCHS=2, BATCH_SIZE=16, SEED=3, VAL_PER_EPOCH=3, PATIENCE=100,
                                LR=0.01, LABEL_SMOOTHING=0.0, SEEN_CLASSES=CLASSES, SELECT_BY="auto",
                                BALANCED_SAMPLING=False, CLASSWISE_TRAIN="batches", HEAD_LOSS="ce")
    made, passed_over = sources(), []
    made.pop("train_classwise")
    real_outputs = training.head_outputs
    monkeypatch.setattr(training, "head_outputs", lambda model, source, *a, **k: passed_over.append(len(source))
                        or real_outputs(model, source, *a, **k))
    torch.manual_seed(0)
    model = TinyNet()
    state = training.TrainingState()
    train.fit(model, torch.optim.Adam(training.trainable_parameters(model), lr=cfg.LR), None, state, made, CPU, cfg,
              save_best=lambda **kw: None, save_last=lambda: None)
    assert passed_over == [len(made["val"])] * len(state.history) == [70] * 6  # the validation images only
    labels = made["train"].labels.numpy()
    for epoch in range(2):
        batches = training.epoch_batches(len(labels), cfg.BATCH_SIZE, cfg.SEED, epoch)
        checks = sorted(training.validation_points(len(batches), cfg.VAL_PER_EPOCH))
        for k, (start, end) in enumerate(zip([-1] + checks[:-1], checks)):
            row = state.history[3 * epoch + k]
            seen = np.concatenate([labels[i] for i in batches[start + 1:end + 1]])
            counts = np.bincount(seen, minlength=3)
            weighted = sum(row[f"train_acc_{c}"] * counts[i] for i, c in enumerate(CLASSES)) / counts.sum()
            assert weighted == pytest.approx(row["train_acc"], abs=1e-9)
            assert {f"train_ap_{c}" for c in CLASSES} <= set(row) and 0 <= row["train_map"] <= 1
