"""The trunk table: every trunk's size, shapes, initialisation and weights files (CPU, small images)."""
import dataclasses
import re

import pytest
import torch
import torch.nn as nn
from torchvision.models import efficientnet_v2_s
from torchvision.models.convnext import CNBlock

import backbone
from plankton.errors import PipelineError

# What each trunk should be, written out here rather than read from the table: the prefix that
# torchvision's full model puts before the trunk's keys, the full model's parameters it keeps, and
# its output channels.
EXPECTED = {
    "efficientnet_v2_s": ("features.", ("features.0.", "features.1.", "features.2.", "features.3."), 64),
    "resnet18": ("", ("conv1.", "bn1.", "layer1.", "layer2."), 128),
    "resnet50": ("", ("conv1.", "bn1.", "layer1.", "layer2."), 512),
    "convnext_tiny": ("features.", ("features.0.", "features.1.", "features.2.", "features.3."), 192),
    "efficientnet_lite0": ("", ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2."), 40),  # timm's
}
NAMES = list(backbone.TRUNKS)


@pytest.fixture(scope="module")
def full_models() -> dict[str, nn.Module]:
    """Each trunk's whole torchvision model, randomly initialised, built once (ResNet-50 and
    ConvNeXt take a while)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return {name: spec.builder(weights=None) for name, spec in backbone.TRUNKS.items()}


def _reference_trunk_state(name: str, full: nn.Module) -> dict[str, torch.Tensor]:
    prefix, kept, _ = EXPECTED[name]
    return {k[len(prefix):]: v for k, v in full.state_dict().items() if k.startswith(kept)}


def _head_parameters(channels: int, pooled_side: int, embedding_dim: int, num_classes: int) -> int:
    conv_bn = lambda c_in: c_in * 64 * 9 + 64 + 2 * 64  # noqa: E731  (weight, bias, BatchNorm's scale and shift)
    return (conv_bn(channels) + conv_bn(64) + 64 * pooled_side ** 2 * embedding_dim + embedding_dim
            + embedding_dim * num_classes + num_classes)


def test_every_trunk_has_its_expectations_here():
    assert set(EXPECTED) == set(backbone.TRUNKS)
    assert {name: spec.channels for name, spec in backbone.TRUNKS.items()} == {k: v[2] for k, v in EXPECTED.items()}


# ---- size and shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name, full_models):
    _, kept, channels = EXPECTED[name]
    trunk = sum(p.numel() for k, p in full_models[name].named_parameters() if k.startswith(kept))
    head = _head_parameters(channels, 128 // 8 // 2, 128, 6)  # 128 px, stride 8, then MaxPool 2
    model = backbone.PlanktonNet(num_classes=6, image_size=128, trunk=name)
    assert backbone.parameter_counts(model) == (trunk + head, head)
    if name == "efficientnet_v2_s":
        assert backbone.parameter_counts(model) == (1_503_198, 599_302)  # the study's


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [32, 60])  # at 60 px the trunks round differently: 8 x 8, but 7 x 7 for ConvNeXt
def test_every_trunk_gives_logits_embeddings_and_the_announced_shape(name, size):
    model = backbone.PlanktonNet(num_classes=4, image_size=size, embedding_dim=16, trunk=name).eval()
    logits, embedding = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 4) and embedding.shape == (2, 16)
    with torch.no_grad():
        features = model.trunk(torch.zeros(1, 3, size, size))
    channels, height, width = backbone.trunk_output_shape(name, size)
    assert tuple(features.shape[1:]) == (channels, height, width)
    assert channels == EXPECTED[name][2] and height == width and height in (size // 8, -(-size // 8))  # stride 8


@pytest.mark.parametrize("name", NAMES)
def test_too_small_images_name_image_size_and_16_is_enough(name):
    for size in (3, 8):  # 3: the trunk itself cannot run (ConvNeXt's 4x4 stem); 8: nothing left to pool
        with pytest.raises(PipelineError, match=f"IMAGE_SIZE={size} is too small for the {name} trunk"):
            backbone.PlanktonNet(3, size, trunk=name)
    backbone.PlanktonNet(3, 16, trunk=name)  # what the message advises


def test_an_unknown_trunk_lists_the_choices():
    calls = [lambda: backbone.PlanktonNet(3, 32, trunk="vgg16"),
             lambda: backbone.architecture_args(3, 32, trunk="vgg16"),
             lambda: backbone.trunk_output_shape("vgg16", 32), lambda: backbone.normalization("vgg16"),
             lambda: backbone.build_model(dict(num_classes=3, image_size=32, trunk="vgg16"))]
    for call in calls:
        with pytest.raises(PipelineError, match="TRUNK='vgg16' is not a known trunk; choose one of: "
                                                "efficientnet_v2_s, resnet18, resnet50, convnext_tiny"):
            call()


# ---- initialisation ------------------------------------------------------------------------------

def _todays_build_trunk() -> nn.Sequential:
    """backbone.build_trunk as it was before the trunk table, copied unchanged."""
    with torch.device("meta"):
        trunk = efficientnet_v2_s(weights=None).features[:4]
    trunk.to_empty(device="cpu")
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()
    return trunk


class _TodaysPlanktonNet(nn.Module):
    """PlanktonNet's construction before the trunk table (the forward pass is not needed here)."""

    def __init__(self, num_classes: int, image_size: int = 128, embedding_dim: int = 128, dropout: float = 0.2):
        super().__init__()
        self.trunk = _todays_build_trunk()
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        side = image_size
        for _ in range(3):
            side = (side - 1) // 2 + 1
        pooled = side // 2
        self.embed = nn.Sequential(nn.Linear(64 * pooled * pooled, embedding_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(embedding_dim, num_classes)


@pytest.mark.parametrize("size", [100, 128])
def test_the_study_model_is_bit_for_bit_the_one_before_the_table(size):
    torch.manual_seed(7)
    before = _TodaysPlanktonNet(6, size).state_dict()
    next_draw_before = torch.rand(4)
    torch.manual_seed(7)
    after = backbone.PlanktonNet(6, size).state_dict()
    next_draw_after = torch.rand(4)
    assert list(after) == list(before)  # same names ("trunk.0.0.0.weight", ...), same order
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert torch.equal(next_draw_after, next_draw_before)  # and the same random numbers used up


@pytest.mark.parametrize("name", NAMES)
def test_trunk_has_torchvisions_layout_and_initialisation(name, full_models):
    reference = _reference_trunk_state(name, full_models[name])
    trunk = backbone.build_trunk(name).state_dict()
    assert {k: v.shape for k, v in trunk.items()} == {k: v.shape for k, v in reference.items()}
    for key, tensor in trunk.items():
        assert torch.isfinite(tensor.float()).all(), key
        expected = reference[key].float()
        if expected.min() == expected.max():  # constants: norms' scale and shift, biases, layer_scale, statistics
            assert torch.equal(tensor, reference[key]), key
        else:  # random draws: the same distribution, other draws
            assert abs(tensor.std().item() / expected.std().item() - 1) < 0.25, key
            assert abs(tensor.mean().item()) < 0.25 * expected.std().item(), key


def _build_trunk_on_poisoned_memory(name: str) -> nn.Sequential:
    """build_trunk with to_empty's memory filled with NaN (floats) or -1 (integers), so that a tensor
    the initialisation misses shows, instead of passing for weights by chance."""
    empty_like = torch.empty_like

    def poisoned_empty_like(tensor, **kwargs):
        return empty_like(tensor, **kwargs).fill_(float("nan") if tensor.is_floating_point() else -1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty_like", poisoned_empty_like)
        return backbone.build_trunk(name)


def _left_uninitialised(trunk: nn.Module) -> list[str]:
    return [name for name, tensor in list(trunk.named_parameters()) + list(trunk.named_buffers())
            if not torch.isfinite(tensor.float()).all() or (not tensor.is_floating_point() and (tensor < 0).any())]


@pytest.mark.parametrize("name", NAMES)
def test_no_tensor_keeps_the_empty_memory_of_the_meta_build(name):
    trunk = _build_trunk_on_poisoned_memory(name)
    assert _left_uninitialised(trunk) == []
    norms = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.running_var == 1) and torch.all(m.running_mean == 0) and m.num_batches_tracked == 0
               for m in norms)
    scales = [m.layer_scale for m in trunk.modules() if isinstance(m, CNBlock)]
    assert all(torch.all(s == backbone.CONVNEXT_LAYER_SCALE) for s in scales)
    assert len(norms if name != "convnext_tiny" else scales) > 0


def test_the_poisoned_build_would_catch_a_forgotten_tensor(monkeypatch):
    spec = backbone.TRUNKS["convnext_tiny"]

    def forgets_layer_scale(module: nn.Module) -> None:
        if not isinstance(module, CNBlock):
            spec.init_module(module)
    monkeypatch.setitem(backbone.TRUNKS, "convnext_tiny", dataclasses.replace(spec, init_module=forgets_layer_scale))
    trunk = _build_trunk_on_poisoned_memory("convnext_tiny")
    assert _left_uninitialised(trunk) == [f"{stage}.{block}.layer_scale" for stage in (1, 3) for block in range(3)]


# ---- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_a_local_weights_file_fills_the_trunk(name, full_models, tmp_path):
    full = full_models[name].state_dict()
    path = tmp_path / f"{name}_full.pth"
    torch.save(full, path)
    model = backbone.PlanktonNet(3, 32, trunk=name)
    reference = _reference_trunk_state(name, full_models[name])
    assert not all(torch.equal(v, reference[k]) for k, v in model.trunk.state_dict().items())
    assert str(path) in backbone.load_trunk_weights(model, str(path))
    trunk = model.trunk.state_dict()
    for key, tensor in trunk.items():
        assert torch.equal(tensor, reference[key]), key
    # the trunk alone, and a PlanktonNet's state dict ("trunk." keys), fill a fresh model the same way
    for state in (trunk, model.state_dict()):
        torch.save(state, tmp_path / "part.pth")
        other = backbone.PlanktonNet(3, 32, trunk=name)
        backbone.load_trunk_weights(other, str(tmp_path / "part.pth"))
        assert all(torch.equal(v, trunk[k]) for k, v in other.trunk.state_dict().items())


def test_another_trunks_file_is_refused_by_name_and_changes_nothing(full_models, tmp_path):
    for file_trunk, model_trunk, message in (
            ("resnet18", "efficientnet_v2_s", r"is not an efficientnet_v2_s state dict \(missing 0\.0\.weight"),
            ("efficientnet_v2_s", "convnext_tiny", r"is not a convnext_tiny state dict \(missing"),
            # the same names with other shapes
            ("resnet50", "resnet18", r"is not a resnet18 state dict \(layer1\.0\.conv1\.weight: \[64, 64, 1, 1\], "
                                     r"expected shape \[64, 64, 3, 3\]\)")):
        path = tmp_path / f"{file_trunk}.pth"
        torch.save(full_models[file_trunk].state_dict(), path)
        model = backbone.PlanktonNet(3, 32, trunk=model_trunk)
        before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
        with pytest.raises(PipelineError, match=re.escape(str(path)) + " " + message):
            backbone.load_trunk_weights(model, str(path))
        assert all(torch.equal(v, before[k]) for k, v in model.trunk.state_dict().items())


def test_imagenet_files_are_each_trunks_own_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # restored afterwards
    names = {name: backbone.imagenet_weights_path(name).name for name in NAMES}
    assert names == {"efficientnet_v2_s": "efficientnet_v2_s-dd5fe13b.pth", "resnet18": "resnet18-f37072fd.pth",
                     "resnet50": "resnet50-11ad3fa6.pth", "convnext_tiny": "convnext_tiny-983f1562.pth",
                     "efficientnet_lite0": "efficientnet-lite0-57934424.pth"}  # in its pip package's folder
    model = backbone.PlanktonNet(3, 32, trunk="resnet18")
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(PipelineError, match=re.escape(f"{path} does not exist; download "
                                                      f"https://download.pytorch.org/models/resnet18-f37072fd.pth")):
        backbone.load_trunk_weights(model, "imagenet")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the published weights" * 100)
    for setting in ("imagenet", "auto"):
        with pytest.raises(PipelineError, match="SHA-256 .* the name says f37072fd"):
            backbone.load_trunk_weights(model, setting)


def test_normalization_is_what_each_trunks_weights_expect():
    for name in NAMES:
        if name == "efficientnet_lite0":  # TensorFlow's preprocessing: tests/test_pretrained_lite0.py
            continue
        mean, std = backbone.normalization(name)
        assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
        assert all(type(v) is float for v in mean + std)
    assert (backbone.IMAGENET_MEAN, backbone.IMAGENET_STD) == backbone.normalization("efficientnet_v2_s")


# ---- checkpoints ---------------------------------------------------------------------------------

def test_a_checkpoint_rebuilds_its_own_trunk_and_an_old_one_the_studys():
    torch.manual_seed(0)
    arch = backbone.architecture_args(3, 32, 16, 0.1, "resnet18")
    assert arch == dict(num_classes=3, image_size=32, embedding_dim=16, dropout=0.1, trunk="resnet18",
                        finetune_blocks=0)
    model = backbone.build_model(arch).eval()
    rebuilt = backbone.build_model(arch).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert rebuilt.trunk_name == "resnet18"
    torch.testing.assert_close(rebuilt(images), model(images))
    # made before the table (and before fine-tuning): no "trunk" in arch, and the study's trunk's weights
    old_arch = {k: v for k, v in arch.items() if k not in ("trunk", "finetune_blocks")}
    old_model = backbone.PlanktonNet(**old_arch)
    rebuilt = backbone.build_model(old_arch)
    rebuilt.load_state_dict(old_model.state_dict())
    assert rebuilt.trunk_name == "efficientnet_v2_s"


def test_the_study_model_has_the_studys_parameter_counts():
    from torchinfo import summary
    model = backbone.PlanktonNet(num_classes=6, image_size=128)
    stats = summary(model, input_size=(1, 3, 128, 128), verbose=0)
    assert (stats.total_params, stats.trainable_params) == (1_503_198, 599_302)
    assert backbone.parameter_counts(model) == (1_503_198, 599_302)


@pytest.mark.parametrize("name", ["efficientnet_v2_s", "resnet18"])
def test_frozen_trunk_is_unchanged_by_a_training_step(name):
    torch.manual_seed(0)
    model = backbone.PlanktonNet(num_classes=3, image_size=32, trunk=name)
    before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    head_before = model.head[0].weight.clone()
    model.train()
    assert not model.trunk.training, "the trunk must stay in eval mode (BatchNorm statistics frozen)"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    logits, _ = model(torch.randn(8, 3, 32, 32) * 3 + 1)  # inputs far from BN's running stats
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    optimizer.step()
    after = model.trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert not torch.equal(head_before, model.head[0].weight)  # while the head did learn
