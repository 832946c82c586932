"""Fine-tuning the trunk's last FINETUNE_BLOCKS blocks: which parameters train, the cache boundary,
checkpoints that later stages rebuild, resuming, and FINETUNE_BLOCKS=0 being the frozen model."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_tensors, model_tensors, tiny_config, train_killed_after_first

import backbone
import dataloader
import embed
import evaluate
import train
from plankton import (
    checkpoints,
    embedding_files,
    hashing,
    locations,
    safepickle,
    settings,
    splits,
    system,
    training,
    trunk_cache,
)
from plankton.errors import PipelineError

PREPROCESS = dataloader.Preprocess(32, "stretch", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RUNTIME = dataloader.Runtime(torch.device("cpu"), batch_size=8, workers=0, channels_last=True, mixed_precision=False)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _one_step(model, optimizer) -> None:
    model.train()
    logits, _ = model(torch.randn(8, 3, 32, 32) * 3 + 1)  # inputs far from BatchNorm's running stats
    F.cross_entropy(logits, LABELS).backward()
    optimizer.step()


@pytest.mark.parametrize("name, blocks", [("efficientnet_v2_s", 1), ("efficientnet_v2_s", 2), ("resnet18", 1),
                                          ("convnext_tiny", 1)])
def test_exactly_the_last_blocks_train_and_the_frozen_ones_and_their_bn_stats_do_not(name, blocks):
    torch.manual_seed(0)
    model = backbone.PlanktonNet(num_classes=3, image_size=32, trunk=name, finetune_blocks=blocks)
    names = backbone.trunk_blocks(name)
    assert [n for n, _ in model.tuned_trunk.named_children()] == names[-blocks:]
    assert [n for n, _ in model.trunk.named_children()] == names[:-blocks]
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    tuned = {f"tuned_trunk.{k}" for k, _ in model.tuned_trunk.named_parameters()}
    head = {k for k in trainable if k.split(".")[0] in ("head", "embed", "classifier")}
    assert tuned and trainable == tuned | head and not trainable & {f"trunk.{k}" for k, _ in model.trunk.named_parameters()}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _one_step(model, torch.optim.Adam(training.parameter_groups(model, 0.01, 0.001)))
    assert model.tuned_trunk.training and not model.trunk.training
    after = model.state_dict()
    frozen = [k for k in before if k.startswith("trunk.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BN running stats
    assert all(not torch.equal(before[k], after[k]) for k in tuned)  # every tuned weight moved
    tuned_stats = [k for k in before if k.startswith("tuned_trunk.") and k.endswith("running_mean")]
    if name != "convnext_tiny":  # ConvNeXt has LayerNorm, no running statistics
        assert tuned_stats and all(not torch.equal(before[k], after[k]) for k in tuned_stats)


def test_the_tuned_blocks_get_their_own_learning_rate():
    model = backbone.PlanktonNet(num_classes=3, image_size=32, finetune_blocks=1)
    groups = training.parameter_groups(model, 0.01, 0.0005)
    assert [g["lr"] for g in groups] == [0.01, 0.0005]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.tuned_trunk.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(training.trainable_parameters(model))


def test_zero_blocks_is_the_frozen_model_bit_for_bit():
    """The hash is of the base commit's model (before fine-tuning existed), same seed and settings:
    only torch's CPU generator draws it, so it holds on any machine."""
    system.set_seed(0)
    model = backbone.build_model(backbone.architecture_args(3, 32, 16, 0.2, "efficientnet_v2_s"))
    assert hashing.tensors_sha256(model.state_dict()) == \
        "4bc2d57a0c377f760dbcac6c0fa6a7ec2b8a28d6895ddf8daa64b24f9e79dcc7"
    assert len(model.tuned_trunk) == 0
    assert backbone.frozen_trunk_sha256(model) == hashing.tensors_sha256(model.trunk.state_dict())  # the old key
    # one group of the very list the optimizer had before: the same step, bit for bit
    twin = backbone.build_model(backbone.architecture_args(3, 32, 16, 0.2, "efficientnet_v2_s"))
    twin.load_state_dict(model.state_dict())
    for net, optimizer in ((model, torch.optim.Adam(training.parameter_groups(model, 0.01, 0.5), lr=0.01)),
                           (twin, torch.optim.Adam(training.trainable_parameters(twin), lr=0.01))):
        torch.manual_seed(1)
        _one_step(net, optimizer)
    assert_same_tensors(model.state_dict(), twin.state_dict())


def test_cached_frozen_blocks_then_tuned_blocks_and_head_are_the_full_forward(tmp_path, tiny_folder):
    torch.manual_seed(0)
    model = backbone.PlanktonNet(num_classes=3, image_size=32, finetune_blocks=1).eval()
    relpaths = [f"{c}/img_{j:03d}.png" for c in "abc" for j in range(4)]
    cache = trunk_cache.TrunkCache(tmp_path / "cache", model.trunk, backbone.frozen_trunk_sha256(model), PREPROCESS,
                                   RUNTIME, "float32")
    store = cache.features(tiny_folder, relpaths)
    dataset = dataloader.ImageDataset(tiny_folder, relpaths, np.zeros(len(relpaths)), PREPROCESS)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        full_logits, full_embedding = model(images)
        logits, embedding = model.forward_head(torch.from_numpy(store[:]))
    assert store.shape[1:] == (48, 8, 8)  # stage 2's output at 32 px: the cache holds the frozen blocks' features
    torch.testing.assert_close(logits, full_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embedding, full_embedding, rtol=1e-4, atol=1e-5)


def test_the_cache_key_changes_with_the_cut_even_where_the_weights_do_not():
    """ResNet's relu and maxpool hold no tensors: cuts before and after them freeze the same weights
    but give other features, so the frozen trunk's hash must name the cut."""
    models = {}
    for n in (0, 1, 3, 4):
        torch.manual_seed(0)  # the same weights in every model
        models[n] = backbone.PlanktonNet(num_classes=3, image_size=32, trunk="resnet18", finetune_blocks=n)
    assert models[3].trunk.state_dict().keys() == models[4].trunk.state_dict().keys()  # conv1, bn1 either way
    hashes = {n: backbone.frozen_trunk_sha256(m) for n, m in models.items()}
    assert len(set(hashes.values())) == 4


def test_too_many_blocks_is_one_error_line_naming_the_setting_and_the_trunks_blocks(tmp_path, capsys):
    argv = [f"--OUTPUT_DIR={tmp_path / 'out'}", f"--CHECKPOINT_DIR={tmp_path / 'ck'}", f"--CACHE_DIR={tmp_path / 'c'}",
            "--TRUNK=resnet18", "--FINETUNE_BLOCKS=7"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: FINETUNE_BLOCKS=7: the resnet18 trunk has 6 blocks (conv1, bn1, relu, maxpool, layer1, "
                   "layer2); use 0 (frozen) to 6")
    assert not (tmp_path / "out").exists()
    settings.load_settings(["--FINETUNE_BLOCKS=4"])  # efficientnet_v2_s: 4 blocks, all may be tuned
    with pytest.raises(PipelineError, match=r"^FINETUNE_BLOCKS=5: the efficientnet_v2_s trunk has 4 blocks"):
        settings.load_settings(["--FINETUNE_BLOCKS=5"])
    with pytest.raises(PipelineError, match="FINETUNE_BLOCKS=-1: must be an integer >= 0"):
        settings.load_settings(["--FINETUNE_BLOCKS=-1"])


def test_a_fine_tuned_checkpoint_gives_evaluate_and_embed_the_in_memory_models_outputs(tmp_path, tiny_folder,
                                                                                       monkeypatch):
    cfg = tiny_config(tmp_path, tiny_folder, FINETUNE_BLOCKS=1, MAX_EPOCHS=1, VAL_PER_EPOCH=1, CACHE_DTYPE="float32")
    in_memory = []
    real_place = training.place_model
    monkeypatch.setattr(training, "place_model", lambda model, runtime: in_memory.append(model) or
                        real_place(model, runtime))
    train.run(cfg)  # one epoch, one validation pass: best.pth is the model left in memory
    model = in_memory[0].eval()
    paths = locations.Paths.from_settings(cfg)
    checkpoint = checkpoints.open_checkpoint(paths.best)
    assert checkpoint.arch["finetune_blocks"] == 1 and checkpoint.trunk_sha256 == backbone.frozen_trunk_sha256(model)
    evaluate.run(cfg)
    embed.run(cfg)
    split = splits.split_from_settings(cfg, paths, create=False)
    relpaths, labels = split.subset("test")
    dataset = dataloader.ImageDataset(tiny_folder, relpaths, labels, PREPROCESS)
    with torch.no_grad():
        logits, embeddings = model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    frame = safepickle.load_dataframe(paths.embeddings("test"))
    np.testing.assert_allclose(embedding_files.embedding_matrix(frame), embeddings.numpy(), rtol=1e-4, atol=1e-5)
    trained = checkpoints.open_trained_model(cfg, paths, torch.device("cpu"))
    cache = trunk_cache.from_settings(cfg, paths.cache, trained.model.trunk, checkpoint.trunk_sha256,
                                      trained.preprocess, RUNTIME)
    opened_logits, _ = training.head_outputs(trained.model, trained.source("test", cache), RUNTIME)
    np.testing.assert_allclose(opened_logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    metrics = (paths.out / "test_metrics.csv").read_text().splitlines()[-1].split(",")
    assert float(metrics[-1]) == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()))
    # the tuned block was trained: it is not the trunk's initialisation any more
    fresh = backbone.build_model(checkpoint.arch).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in checkpoint.model_state.items() if k.startswith("tuned_trunk."))


def test_a_killed_fine_tuning_run_resumes_to_the_same_model(tmp_path, tiny_folder, monkeypatch):
    settings_ = dict(FINETUNE_BLOCKS=1, MAX_EPOCHS=2, VAL_PER_EPOCH=1, TRUNK="resnet18")  # resnet18: cheaper per batch
    reference = tiny_config(tmp_path / "reference", tiny_folder, **settings_)
    train.run(reference)
    cfg = tiny_config(tmp_path / "killed", tiny_folder, **settings_)
    train_killed_after_first(cfg, monkeypatch)
    with pytest.raises(PipelineError, match="FINETUNE_BLOCKS"):
        train.run(tiny_config(tmp_path / "killed", tiny_folder, **{**settings_, "FINETUNE_BLOCKS": 2}))
    train.run(cfg)
    for name in ("best.pth", "last.pth"):
        assert_same_tensors(model_tensors(Path(cfg.CHECKPOINT_DIR) / name),
                            model_tensors(Path(reference.CHECKPOINT_DIR) / name))
