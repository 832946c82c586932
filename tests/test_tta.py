"""Test-time augmentation (TTA, plankton/orientations.py): the eight orientations, outputs that no
longer depend on how an image lies, the cached path equal to the uncached one, and the setting."""
import types

import numpy as np
import pytest
import torch
from conftest import made_up_checkpoint, make_image_folder
from PIL import Image

import dataloader
from plankton import checkpoints, hashing, orientations, settings, trunk_cache, unlabelled
from plankton.errors import PipelineError


def test_the_eight_orientations_are_distinct_and_undo_each_other():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)  # no symmetry of its own
    turned = [orientations.orient(x, o) for o in range(8)]
    assert len({tuple(t.flatten().tolist()) for t in turned}) == 8
    assert torch.equal(turned[4], x.flip(-1)) and torch.equal(turned[6], x.flip(-2))  # mirrored each way
    assert torch.equal(orientations.orient(orientations.orient(x, 1), 3), x)  # a quarter turn, then three more
    assert set(orientations.TTA["flips"]) < set(orientations.TTA["dihedral"]) == set(range(8))


def test_averaged_takes_the_mean_and_keeps_none():
    logits, nothing = orientations.averaged(lambda o: (np.full((2, 3), float(o)), None), (0, 4, 6, 2))
    assert np.allclose(logits, 3) and nothing is None


@pytest.fixture
def model_and_images(tmp_path):
    """A small untrained model and three pictures of one image: as is, turned a quarter, mirrored.
    At IMAGE_SIZE already, so resizing is the identity and turning commutes with it exactly."""
    folder = make_image_folder(tmp_path / "images", {"a": 2, "b": 2, "u": 2}, size=32)
    best = made_up_checkpoint(tmp_path / "best.pth", folder, ["a", "b"], ["u"], image_size=32)
    model = checkpoints.open_checkpoint(best).build_model(torch.device("cpu"), channels_last=False)
    new = tmp_path / "new"
    new.mkdir()
    array = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name, picture in (("x", array), ("turned", np.rot90(array)), ("mirrored", array[:, ::-1])):
        Image.fromarray(np.ascontiguousarray(picture)).save(new / f"{name}.png")
    relpaths = ["x.png", "turned.png", "mirrored.png"]
    runtime = dataloader.Runtime(torch.device("cpu"), 8, 0, False, False)
    preprocess = dataloader.Preprocess.for_trunk("resnet18", 32, "stretch")
    cache = trunk_cache.TrunkCache(tmp_path / "cache", model.trunk, "0" * 64, preprocess, runtime, dtype="float32")
    hashes = [hashing.sha256_file(new / r) for r in relpaths]
    return model, preprocess, runtime, cache, new, relpaths, hashes


def _logits(model_and_images, tta: str, cached: bool = True) -> np.ndarray:
    model, preprocess, runtime, cache, new, relpaths, hashes = model_and_images
    trained = types.SimpleNamespace(model=model, preprocess=preprocess, orientations=orientations.TTA[tta])
    logits, embeddings = unlabelled.new_image_outputs(trained, cache if cached else None, runtime, new, relpaths, hashes)
    assert embeddings.shape == (3, 8)
    return logits


def test_dihedral_tta_gives_a_turned_or_mirrored_image_the_same_outputs(model_and_images):
    plain = _logits(model_and_images, "none")
    assert not np.allclose(plain[0], plain[1], atol=1e-3)  # without TTA the model sees which way is up
    both = _logits(model_and_images, "dihedral")
    assert np.allclose(both[0], both[1], atol=1e-5) and np.allclose(both[0], both[2], atol=1e-5)
    flips = _logits(model_and_images, "flips")
    assert np.allclose(flips[0], flips[2], atol=1e-5)  # flips: mirrored left-right is covered, a quarter turn not
    assert not np.allclose(flips[0], flips[1], atol=1e-3)


def test_each_orientation_has_its_own_cache_folder_and_equals_the_uncached_pass(model_and_images):
    cache = model_and_images[3]
    cached = _logits(model_and_images, "dihedral")
    assert len(list(cache.cache_dir.glob("trunk_*"))) == 8
    assert np.allclose(cached, _logits(model_and_images, "dihedral", cached=False), atol=1e-5)
    upright = trunk_cache.cache_key("0" * 64, model_and_images[4], cache.preprocess, "float32")
    assert (cache.cache_dir / f"trunk_{upright}").is_dir()  # orientation 0 keeps the key it had before TTA


def test_a_misspelt_tta_is_one_error_line():
    with pytest.raises(PipelineError, match="TTA"):
        settings.load_settings(["--TTA=sideways"])
