"""predict.py's drift check (plankton/drift.py): the two-sample test holds its level and finds shifts,
the image statistics against numpy, and on a tiny trained model a campaign from the same
distribution passes while an inverted or blurred copy of it is flagged, in predictions.json, the
console, drift.png and the report."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_image_folder, tiny_config
from PIL import Image, ImageFilter

import predict
import report
import train
from plankton import drift, locations


def side(rng, n: int, shift: float = 0.0, brightness: float = 100.0, unknown_rate: float = 0.05) -> drift.Side:
    """Synthetic embeddings (16-d, correlated), statistics and unknown flags."""
    mixing = np.random.default_rng(99).normal(size=(16, 16)) / 4  # the same for every side
    statistics = pd.DataFrame({name: rng.normal(50, 10, n) for name in drift.STATISTICS})
    statistics["brightness"] = rng.normal(brightness, 10, n)
    return drift.Side(rng.normal(size=(n, 16)) @ mixing + shift, statistics, rng.random(n) < unknown_rate,
                      [f"{i}.png" for i in range(n)], rng.random(n))


@pytest.mark.parametrize("n_new", [40, 300])
def test_a_campaign_from_the_same_distribution_is_not_flagged(n_new):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        result = drift.compare(side(rng, 300), side(rng, n_new), alpha=0.01, seed=seed)
        assert not result["drift"], result["verdict"]
        assert result["verdict"].startswith("no drift detected") and 0.3 < result["tests"]["embeddings"]["value"] < 0.7


def test_a_two_sample_test_and_a_statistic_are_one_table_entry_each(tmp_path, monkeypatch):
    """docs/extending.md's recipe: an entry in TWO_SAMPLE_TESTS, one in STATISTICS, and compare() runs them."""
    def mean_distance(reference, new, seed):  # distance between the means, p-value from 50 permutations
        both, n = np.r_[reference, new], len(reference)
        gap = lambda rows: float(np.linalg.norm(rows[:n].mean(0) - rows[n:].mean(0)))  # noqa: E731
        rng = np.random.default_rng(seed)
        more = sum(gap(rng.permutation(both)) >= gap(both) for _ in range(50))
        scores = np.linalg.norm(both - reference.mean(0), axis=1)
        return drift.TwoSample(gap(both), (more + 1) / 51, scores[n:], scores[:n])

    monkeypatch.setitem(drift.TWO_SAMPLE_TESTS, "means",
                        drift.TwoSampleTest("distance of the means", "distance", mean_distance))
    monkeypatch.setitem(drift.STATISTICS, "width",
                        drift.ImageStatistic("width (pixels)", lambda image, grey: image.width))
    folder = make_image_folder(tmp_path / "images", {"a": 12}, size=24)
    relpaths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    table = drift.image_statistics(folder, relpaths, 32, "stretch")
    assert (table.width == 24).all()
    rng = np.random.default_rng(0)
    flags = np.zeros(12, dtype=bool)
    result = drift.compare(drift.Side(rng.normal(size=(12, 4)), table, flags, relpaths, np.zeros(12)),
                           drift.Side(rng.normal(size=(12, 4)) + 3, table, flags, relpaths, np.zeros(12)),
                           alpha=0.2, test="means")
    assert result["tests"]["embeddings"]["test"] == "means" and result["tests"]["width"]["p_value"] == 1.0
    assert result["drifted"] == ["embeddings"] and result["per_test_alpha"] == pytest.approx(0.2 / 7)


@pytest.mark.slow
def test_the_classifier_test_holds_its_level():
    """Under the null its p-values are (at most) uniform. A Mann-Whitney test of pooled out-of-fold
    scores is not (each fold's scores share that fold's model): here it gives p < 0.1 about twice as
    often as it should."""
    p_values = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        test = drift.classifier_two_sample(rng.normal(size=(300, 32)), rng.normal(size=(30, 32)), seed)
        p_values.append(test.p_value)
    assert np.mean(np.array(p_values) < 0.1) <= 0.13 and np.median(p_values) > 0.5


def test_shifted_embeddings_brighter_images_and_more_unknowns_are_flagged_by_name():
    rng = np.random.default_rng(0)
    reference = side(rng, 300)
    shifted = drift.compare(reference, side(rng, 100, shift=0.5), alpha=0.01)
    assert shifted["drifted"] == ["embeddings"] and shifted["tests"]["embeddings"]["value"] > 0.8
    assert shifted["verdict"].startswith("DRIFT: embeddings (AUROC")
    assert "differ between 100 new images and 300 held-out test images" in shifted["verdict"]
    brighter = drift.compare(reference, side(rng, 100, brightness=115), alpha=0.01)
    assert brighter["drifted"] == ["brightness"] and "median 1" in brighter["verdict"]
    unknowns = drift.compare(reference, side(rng, 100, unknown_rate=0.3), alpha=0.01)
    assert unknowns["drifted"] == ["unknown_share"] and "unknown share (" in unknowns["verdict"]
    assert unknowns["per_test_alpha"] == pytest.approx(0.01 / (2 + len(drift.STATISTICS)))
    few = drift.compare(reference, side(rng, drift.MIN_IMAGES - 1, shift=5.0), alpha=0.01)
    assert few["verdict"].startswith("not tested") and not few["drift"]


def test_image_statistics_against_numpy(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (20, 30)).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(pixels, mode="L").filter(ImageFilter.GaussianBlur(2)).save(tmp_path / "blurred.png")
    Image.fromarray(255 - pixels, mode="L").save(tmp_path / "inverted.png")
    table = drift.image_statistics(tmp_path, ["grey.png", "blurred.png", "inverted.png", "gone.png"], 30, "stretch")
    grey = np.asarray(Image.fromarray(pixels).resize((30, 30), Image.BILINEAR), dtype=np.float64)
    assert table["size"][0] == pytest.approx(np.sqrt(20 * 30))
    assert table.brightness[0] == pytest.approx(grey.mean(), abs=0.5)
    assert table.contrast[0] == pytest.approx(grey.std(), abs=0.5)
    expected = (np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2
    assert table.sharpness[0] == pytest.approx(expected, abs=0.5)
    assert table.sharpness[1] < table.sharpness[0] / 2 and table.contrast[1] < table.contrast[0] / 2
    assert table.brightness[2] == pytest.approx(255 - table.brightness[0], abs=0.5)
    assert table.iloc[3].isna().all()  # an image gone since the scan is left out, not fatal


# ---- the stage, on a tiny trained model ----------------------------------------------------------

def _campaigns(tmp_path):
    """Fresh images of the seen classes (never trained on), and an inverted and a blurred copy."""
    fresh = make_image_folder(tmp_path / "fresh", {"a": 12, "b": 12, "c": 12}, size=24, seed=11)
    for name, change in (("inverted", lambda im: Image.eval(im, lambda v: 255 - v)),
                         ("blurred", lambda im: im.filter(ImageFilter.GaussianBlur(1.5)))):
        for image in fresh.rglob("*.png"):
            target = tmp_path / name / image.relative_to(fresh)
            target.parent.mkdir(parents=True, exist_ok=True)
            change(Image.open(image).convert("RGB")).save(target)
    return {name: tmp_path / name for name in ("fresh", "inverted", "blurred")}


def test_the_image_statistics_alone_flag_an_inverted_or_blurred_copy_of_a_folder(tmp_path):
    """Folder to verdict without a model (the embeddings and unknown flags made identical on both sides):
    a fresh draw of the same images passes, the inverted and blurred copies are flagged by what changed."""
    reference_folder = make_image_folder(tmp_path / "reference", {"a": 12, "b": 12, "c": 12}, size=24, seed=3)
    rng = np.random.default_rng(0)
    embeddings, unknown = rng.normal(size=(36, 4)), np.zeros(36, dtype=bool)

    def folder_side(folder):
        relpaths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        return drift.Side(embeddings, drift.image_statistics(folder, relpaths, 32, "stretch"), unknown, relpaths,
                          np.zeros(36))

    reference = folder_side(reference_folder)
    results = {name: drift.compare(reference, folder_side(folder), alpha=0.01)
               for name, folder in _campaigns(tmp_path).items()}
    assert not results["fresh"]["drift"]
    assert results["inverted"]["drifted"] == ["brightness"]
    assert {"contrast", "sharpness"} <= set(results["blurred"]["drifted"]) <= {"contrast", "sharpness", "brightness"}


@pytest.mark.slow
def test_predict_passes_the_same_distribution_and_flags_inverted_or_blurred_images(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", {"a": 40, "b": 40, "c": 40, "u": 3, "v": 3})
    cfg = tiny_config(tmp_path, folder, MAX_EPOCHS=2)
    train.run(cfg)
    paths = locations.Paths.from_settings(cfg)
    verdicts = {}
    for name, campaign in _campaigns(tmp_path).items():
        cfg.PREDICT_DIR = str(campaign)
        capsys.readouterr()
        predict.run(cfg)
        found = json.loads((paths.predictions_dir / "predictions.json").read_text())["drift"]
        verdicts[name] = found
        console = capsys.readouterr()
        assert found["verdict"] in (console.err if found["drift"] else console.out)
        assert found["reference_images"] >= drift.MIN_IMAGES and found["new_images"] == 36
        assert len(found["most_atypical"]) == drift.ATYPICAL
        assert Image.open(paths.predictions_dir / drift.FIGURE).size[0] > 1000
        assert "predictions/drift.png" in json.loads((paths.out / "provenance_predict.json").read_text())["outputs"]
        page = report.drift_verdict(paths)
        assert found["verdict"].split(" (")[0] in page and ('class="warn"' in page) == found["drift"]
    assert not verdicts["fresh"]["drift"] and verdicts["fresh"]["verdict"].startswith("no drift detected")
    assert verdicts["inverted"]["drift"] and "brightness" in verdicts["inverted"]["drifted"]
    assert verdicts["blurred"]["drift"] and "sharpness" in verdicts["blurred"]["drifted"]

    cfg.DRIFT_ALPHA = None  # off: no figure, and predictions.json says so
    predict.run(cfg)
    found = json.loads((paths.predictions_dir / "predictions.json").read_text())["drift"]
    assert found == dict(verdict="not checked (DRIFT_ALPHA = None)", drift=False)
    assert not (paths.predictions_dir / drift.FIGURE).exists()
