"""The classifier: a frozen, ImageNet-pretrained EfficientNetV2-S trunk cut after its first four
feature blocks, and a small trainable head whose second-to-last layer is the embedding.

    trunk (frozen):  stem + 3 stages of torchvision's efficientnet_v2_s  -> 64 x S/8 x S/8
    head:            2 x (Conv 3x3 64->64, BatchNorm, ReLU), MaxPool 2, Flatten
    embed:           Linear(-> EMBEDDING_DIM), ReLU, Dropout
    classifier:      Linear(EMBEDDING_DIM -> classes)
"""
import hashlib
import os
import socket
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models import EfficientNet_V2_S_Weights, efficientnet_v2_s

from common import PipelineError

TRUNK_BLOCKS = 4  # stem + three stages
TRUNK_CHANNELS = 64
IMAGENET_WEIGHTS = EfficientNet_V2_S_Weights.IMAGENET1K_V1
IMAGENET_MEAN = list(IMAGENET_WEIGHTS.transforms().mean)  # the normalisation these weights expect
IMAGENET_STD = list(IMAGENET_WEIGHTS.transforms().std)


def trunk_output_size(image_size: int) -> int:
    """Side of the trunk's feature map: three stride-2 convolutions with padding 1."""
    side = image_size
    for _ in range(3):
        side = (side - 1) // 2 + 1
    return side


def build_trunk() -> nn.Sequential:
    """torchvision's efficientnet_v2_s up to its fourth feature block, randomly initialised as
    torchvision initialises it. The whole network is laid out on the "meta" device (no memory, no
    initialisation) and only the kept blocks are materialised: building and initialising all 21M
    parameters took 0.36 s, three times per pipeline run, for blocks that are thrown away."""
    with torch.device("meta"):
        trunk = efficientnet_v2_s(weights=None).features[:TRUNK_BLOCKS]
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


class PlanktonNet(nn.Module):
    def __init__(self, num_classes: int, image_size: int = 128, embedding_dim: int = 128,
                 dropout: float = 0.2):
        super().__init__()
        self.trunk = build_trunk()
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.head = nn.Sequential(
            nn.Conv2d(TRUNK_CHANNELS, TRUNK_CHANNELS, 3, padding=1), nn.BatchNorm2d(TRUNK_CHANNELS), nn.ReLU(),
            nn.Conv2d(TRUNK_CHANNELS, TRUNK_CHANNELS, 3, padding=1), nn.BatchNorm2d(TRUNK_CHANNELS), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        pooled = trunk_output_size(image_size) // 2
        if pooled < 1:
            raise PipelineError(f"IMAGE_SIZE={image_size} is too small for this trunk; use 16 or more")
        self.embed = nn.Sequential(nn.Linear(TRUNK_CHANNELS * pooled * pooled, embedding_dim), nn.ReLU(),
                                   nn.Dropout(dropout))
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.trunk.eval()

    def train(self, mode: bool = True):
        """Train the head only: the frozen trunk stays in eval mode so its BatchNorm never drifts."""
        super().train(mode)
        self.trunk.eval()
        return self

    def forward_head(self, trunk_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(self.head(trunk_features))
        return self.classifier(embedding), embedding

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, embedding)."""
        with torch.no_grad():
            trunk_features = self.trunk(images)
        return self.forward_head(trunk_features)


DEFAULT_TRUNK = "efficientnet_v2_s"


def normalization(trunk):
    return IMAGENET_MEAN, IMAGENET_STD


def architecture_args(num_classes, image_size, embedding_dim, dropout, trunk) -> dict:
    return dict(num_classes=num_classes, image_size=int(image_size),
                embedding_dim=int(embedding_dim), dropout=float(dropout), trunk=trunk)


# ---- trunk weights -------------------------------------------------------------------------------

def imagenet_weights_path() -> Path:
    """Where torchvision looks for the ImageNet file: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_WEIGHTS.url)


def check_published_hash(path: Path) -> None:
    """torchvision's file names end in the first hex digits of the file's SHA-256."""
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise PipelineError(f"{path} is corrupt or incomplete (SHA-256 {digest[:8]}…, the name says {prefix}); "
                            f"delete it and download {IMAGENET_WEIGHTS.url} again")


def _load_trunk_state(model: PlanktonNet, state: dict, source: str) -> None:
    """Accept a full efficientnet_v2_s state dict ("features.N...") or a trunk-only one."""
    for prefix in ("trunk.", "features."):  # a PlanktonNet checkpoint, or a full torchvision model
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    wanted = model.trunk.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise PipelineError(f"{source} is not an efficientnet_v2_s state dict (missing {missing[0]} and "
                            f"{len(missing) - 1} more)")
    model.trunk.load_state_dict({k: state[k] for k in wanted})


def _load_file(model: PlanktonNet, path: Path, check_hash: bool) -> None:
    if check_hash:
        check_published_hash(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PipelineError(f"cannot read weights file {path} ({type(err).__name__}); replace it")
    _load_trunk_state(model, state, str(path))


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
    cached = imagenet_weights_path()
    if cached.is_file():
        _load_file(model, cached, check_hash=True)
        return f"ImageNet ({cached.name})"
    if setting == "auto":
        reason = _try_download(cached)
        if reason is None:
            _load_file(model, cached, check_hash=True)
            return f"ImageNet ({cached.name}, downloaded)"
        print(f"{'!' * 78}\nWARNING: ImageNet weights unavailable ({reason}).\nThe trunk is RANDOMLY "
              f"INITIALISED: embeddings and accuracy will be far below the study's.\nPut "
              f"{cached.name} in {cached.parent} for pretrained weights.\n{'!' * 78}", file=sys.stderr)
        return f"random initialisation (ImageNet weights unavailable: {reason})"
    raise PipelineError(f"WEIGHTS='imagenet' but {cached} does not exist; download {IMAGENET_WEIGHTS.url} "
                        f"on a machine with internet and copy it there (or set TORCH_HOME)")


def _try_download(target: Path) -> str | None:
    """Download the ImageNet file into torch's cache; return why not, or None on success."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(IMAGENET_WEIGHTS.url, str(target), hash_prefix=None, progress=False)
        return None
    except Exception as err:
        target.unlink(missing_ok=True)
        return f"download failed: {type(err).__name__}"
    finally:
        socket.setdefaulttimeout(old_timeout)


def build_model(arch: dict) -> PlanktonNet:
    return PlanktonNet(**{k: v for k, v in arch.items() if k != "trunk"})


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def model_from_checkpoint(checkpoint: dict, device: torch.device, channels_last: bool = True) -> PlanktonNet:
    """Rebuild the trained model from what the checkpoint says, in eval mode on `device`."""
    model = build_model(checkpoint["arch"])
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    if channels_last:
        model.trunk.to(memory_format=torch.channels_last)
    return model
