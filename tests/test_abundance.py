"""Abundance per sample (plankton/abundance.py): the quantification estimators against known mixes,
the bootstrap interval, samples by folder / CSV, and the files predict.py writes."""
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, one_error_line
from PIL import Image

from plankton import abundance
from plankton.errors import PipelineError

K = 4
MEANS = np.array([[0.0, 0.0], [1.6, 0.0], [0.0, 1.6], [1.6, 1.6]])  # overlapping classes: many mistakes


def gaussian_images(shares, n: int, rng, prior=np.full(K, 1 / K)):
    """Images of classes drawn with `shares`, each a 2-d point around its class mean; the probabilities
    are the exact posteriors under `prior` (calibrated for the training mix, as EM assumes)."""
    labels = rng.choice(K, n, p=shares)
    x = MEANS[labels] + rng.normal(size=(n, 2))
    log_like = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(2) + np.log(prior)
    probs = np.exp(log_like - log_like.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True), labels


def test_every_correction_recovers_a_shifted_mix_better_than_counting():
    rng = np.random.default_rng(0)
    held_probs, held_labels = gaussian_images(np.full(K, 1 / K), 4000, rng)
    rates = abundance.held_out_rates(held_probs, held_labels)
    for shares in ([0.7, 0.2, 0.07, 0.03], [0.02, 0.03, 0.15, 0.8]):  # far from the training mix
        probs, labels = gaussian_images(np.array(shares), 4000, rng)
        truth = np.bincount(labels, minlength=K) / len(labels)
        error = {name: np.abs(e.estimate(probs, rates) - truth).mean() for name, e in abundance.ESTIMATORS.items()}
        assert error["cc"] > 0.04  # counting is biased towards the training mix
        for name in ("acc", "pacc", "em"):
            assert error[name] < error["cc"] / 3, (shares, error)


def test_adjusted_count_inverts_an_exact_confusion():
    """Predictions that follow the held-out confusion exactly: ACC gives back the true counts."""
    confusion = np.array([[0.8, 0.1, 0.1], [0.15, 0.7, 0.1], [0.05, 0.2, 0.8]])  # [predicted, true]
    counts = np.array([600, 300, 100])
    predicted = np.concatenate([np.repeat(np.arange(3), np.round(confusion[:, j] * n).astype(int))
                                for j, n in enumerate(counts)])
    probs = np.eye(3)[predicted]
    held = np.concatenate([np.repeat(np.arange(3), np.round(confusion[:, j] * 1000).astype(int)) for j in range(3)])
    rates = abundance.held_out_rates(np.eye(3)[held], np.repeat(np.arange(3), 1000))
    np.testing.assert_allclose(rates.crisp, confusion)
    probs_held, labels_held = gaussian_images(np.array([0.4, 0.3, 0.3, 0.0]), 300, np.random.default_rng(5))
    soft = abundance.held_out_rates(probs_held, labels_held).soft  # against a loop over the classes
    expected = np.stack([probs_held[labels_held == j].mean(0) if (labels_held == j).any() else np.eye(K)[j]
                         for j in range(K)], axis=1)
    np.testing.assert_allclose(soft, expected)
    np.testing.assert_allclose(abundance.adjusted_count(probs, rates), counts / counts.sum(), atol=1e-6)
    assert abs(abundance.classify_and_count(probs, rates)[2] - 0.17) < 1e-9  # 100 true, 170 predicted


def test_adjustment_stays_on_the_simplex_and_em_keeps_an_unshifted_mix():
    rng = np.random.default_rng(1)
    held_probs, held_labels = gaussian_images(np.full(K, 1 / K), 2000, rng)
    rates = abundance.held_out_rates(held_probs, held_labels)
    probs, _ = gaussian_images(np.array([0.97, 0.01, 0.01, 0.01]), 300, rng)
    for name, estimator in abundance.ESTIMATORS.items():
        shares = estimator.estimate(probs, rates)
        assert shares.min() >= 0 and shares.sum() == pytest.approx(1.0), name
    same = np.full(K, 1 / K)  # many held-out images: with classes this confused, few would leave M noisy
    rates = abundance.held_out_rates(*gaussian_images(same, 20000, rng))
    np.testing.assert_allclose(rates.recalibration, np.r_[1.0, np.zeros(K)], atol=0.05)  # calibrated already
    probs, _ = gaussian_images(same, 20000, rng)
    np.testing.assert_allclose(abundance.em_prior_adjustment(probs, rates), same, atol=0.02)


def test_the_bootstrap_interval_covers_the_truth_and_narrows_with_more_images():
    """95 % intervals: over 6 samples x 4 classes x 3 corrections, at least 85 % contain the true share
    (each also contains its own estimate); ten times the images give narrower intervals."""
    rng = np.random.default_rng(2)
    held = abundance.HeldOut(*gaussian_images(np.full(K, 1 / K), 1500, rng))
    draws = abundance.rate_draws(held, 40, rng)
    covered = []
    for _ in range(6):
        probs, labels = gaussian_images(np.array([0.5, 0.3, 0.15, 0.05]), 300, rng)
        truth = np.bincount(labels, minlength=K) / len(labels)
        found = abundance.estimate_with_interval(probs, held.rates(), draws, rng)
        for name in ("acc", "pacc", "em"):
            share, low, high = found[name].T
            covered += list((low <= truth + 1e-9) & (truth <= high + 1e-9))
            assert ((low <= share + 1e-9) & (share <= high + 1e-9)).all()
    assert np.mean(covered) >= 0.85, np.mean(covered)
    pacc = {"pacc": abundance.ESTIMATORS["pacc"]}
    widths = [np.diff(abundance.estimate_with_interval(gaussian_images(np.full(K, 1 / K), n, rng)[0], held.rates(),
                                                       draws, rng, pacc)["pacc"][:, 1:]).mean() for n in (200, 2000)]
    assert widths[1] < widths[0]


def test_samples_by_folder_and_by_csv(tmp_path, capsys):
    root = tmp_path / "campaign"
    paths = ["top.png", "st1/a.png", "st1/deep/b.png"]
    assert abundance.samples_of("folder", root, paths) == ["campaign", "st1", "st1_deep"]
    csv = tmp_path / "samples.csv"
    pd.DataFrame(dict(image=["top.png", "st1/a.png"], sample=["s1", "s2"])).to_csv(csv, index=False)
    assert abundance.samples_of(str(csv), root, paths) == ["s1", "s2", None]
    assert "1 image(s)" in capsys.readouterr().err
    for text, expected in (("path,station\nx,y\n", "needs columns 'image'"),
                           ("image,sample\nelsewhere.png,s\n", "none of the 3 images")):
        csv.write_text(text)
        with pytest.raises(PipelineError, match=expected):
            abundance.samples_of(str(csv), root, paths)
    with pytest.raises(PipelineError, match="not 'folder', 'sample_id' or a CSV"):
        abundance.samples_of(str(tmp_path / "missing.csv"), root, paths)
    with pytest.raises(PipelineError, match="no EcoTaxa TSV"):
        abundance.samples_of("sample_id", root, paths)


def test_samples_by_ecotaxa_sample_id(tmp_path, capsys):
    from plankton import ecotaxa
    root = tmp_path / "export"
    (root / "imgs").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "imgs" / name)
    rows = pd.DataFrame(dict(object_id=["o1", "o2"], img_file_name=["imgs/a.png", "imgs/b.png"],
                             object_annotation_category=["x", "y"], object_annotation_status=["predicted"] * 2,
                             sample_id=["net_12", "net_13"]))
    ecotaxa.write_tsv(rows, {c: "[t]" for c in rows.columns}, root / "export.tsv")
    found = abundance.samples_of("sample_id", root, ["imgs/a.png", "imgs/b.png", "imgs/c.png"])
    assert found == ["net_12", "net_13", "imgs"]  # c.png is in no TSV: its folder
    assert "1 image(s) in no EcoTaxa TSV" in capsys.readouterr().err


def test_a_bad_sample_by_setting_is_one_error_line(capsys):
    import predict
    line = one_error_line(capsys, predict.main, ["--SAMPLE_BY=", "--PREDICT_DIR=/nowhere"])
    assert "SAMPLE_BY" in line


def test_save_abundance_writes_the_tables_and_the_figure(tmp_path):
    """Two samples of 12 and 30 images, 3 flagged unknown in the first."""
    import types
    rng = np.random.default_rng(3)
    names = ["Copepoda", "Chaetognatha", "detritus", "Appendicularia"]
    held = abundance.HeldOut(*gaussian_images(np.full(K, 1 / K), 400, rng))
    probs = np.r_[gaussian_images(np.array([0.7, 0.1, 0.1, 0.1]), 12, rng)[0],
                  gaussian_images(np.array([0.1, 0.1, 0.2, 0.6]), 30, rng)[0]]
    table = pd.DataFrame(dict(path=[f"st1/{i}.png" for i in range(12)] + [f"st2/{i}.png" for i in range(30)],
                              unknown=[True] * 3 + [False] * 39))
    cfg = types.SimpleNamespace(SAMPLE_BY="folder", ABUNDANCE_BOOTSTRAPS=20, SEED=0)
    (tmp_path / "out").mkdir()
    written = abundance.save_abundance(cfg, tmp_path, table, probs, names, held, 1.3, tmp_path / "out")
    assert [p.name for p in written] == list(abundance.OUTPUTS)
    found = pd.read_csv(written[0])
    assert len(found) == 2 * len(abundance.ESTIMATORS) * K
    first = found[found["sample"] == "st1"]
    assert (first.images == 9).all() and (first.flagged_unknown == 3).all()
    cc = first[first.estimator == "cc"]
    assert cc["count"].sum() == pytest.approx(9) and (cc["count"] % 1 == 0).all()
    for _, rows in found.groupby(["sample", "estimator"]):
        assert rows.proportion.sum() == pytest.approx(1.0)
    assert (found.low <= found.proportion + 1e-9).all() and (found.proportion <= found.high + 1e-9).all()
    ecotaxa = pd.read_csv(written[1], sep="\t")
    assert list(ecotaxa.columns[:3]) == ["sample_id", "object_annotation_category", "count"]
    assert len(ecotaxa) == 2 * K and set(ecotaxa.object_annotation_category) == set(names)
    assert {f"count_{name}" for name in abundance.ESTIMATORS} <= set(ecotaxa.columns)
    assert Image.open(written[2]).size[0] > 500


def test_the_simulation_tool_ranks_the_corrections_above_counting():
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    import abundance_simulation
    probs, labels = gaussian_images(np.full(K, 1 / K), 1200, np.random.default_rng(4))
    rows = abundance_simulation.simulate(np.log(probs), labels, repeats=1, mixes=6, size=400, draws=0)
    assert [r["kind"] for r in rows] == ["near", "flat", "far"] * 2
    error = {name: np.mean([r[f"{name}_mae"] for r in rows]) for name in abundance.ESTIMATORS}
    assert all(error[name] < error["cc"] for name in ("acc", "pacc", "em")), error
    table = abundance_simulation.summary_table(rows, draws=0)
    assert table.count("\n") == 5 and "| all | 6 |" in table


def test_without_held_out_images_only_raw_counts_are_given(tmp_path):
    """A model bundle carries no held-out images: cc alone, and the EcoTaxa table's count is cc's."""
    probs, _ = gaussian_images(np.array([0.7, 0.1, 0.1, 0.1]), 40, np.random.default_rng(6))
    table = abundance.abundance_table(probs, np.ones(40, bool), ["s"] * 40, list("abcd"), None, 10, 0)
    assert set(table.estimator) == {"cc"} and table["count"].sum() == pytest.approx(40)
    assert (table.low <= table.proportion + 1e-9).all()
    ecotaxa = abundance.ecotaxa_table(table)
    assert (ecotaxa.estimator == "cc").all() and ecotaxa.count_pacc.isna().all()
    abundance.plot_abundance(table, list("abcd"), tmp_path / "a.png", 1.0)
    assert (tmp_path / "a.png").stat().st_size > 1000
