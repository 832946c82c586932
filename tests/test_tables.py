"""Each extension table grows by one entry, added here at run time, and the entry is accepted,
run, plotted and reported with no other change: a stage (the registry), a trunk, a probe, a metric,
an optimizer. docs/extending.md's recipes are these steps."""
import json
import textwrap

import numpy as np
import torch
from conftest import tiny_config
from sklearn.linear_model import RidgeClassifier

import backbone
import run_all
import transfer_learning
from plankton import locations, metrics, probes, registry, settings, training

NEW_STAGE = textwrap.dedent('''
    """Brightness per class: a stage added by a test, to prove a stage is its script plus one entry."""
    import pandas as pd

    from plankton import fileio, locations, plots, provenance, runner


    def run(cfg) -> None:
        paths = locations.prepare_output_dirs(cfg)
        inputs = provenance.start_stage(paths, "brightness", [])
        table = pd.DataFrame(dict(class_name=["a", "b"], brightness=[0.25, 0.75]))
        fileio.save_csv(table, paths.out / "brightness.csv", index=False)
        plt = plots.pyplot()
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.bar(table.class_name, table.brightness)
        plots.save_figure(fig, paths.out / "brightness.png")
        provenance.save_provenance(paths, "brightness", inputs, [paths.out / "brightness.csv",
                                                                 paths.out / "brightness.png"], cfg)


    def main(argv=None):
        runner.run_script(run, argv)
''')


def test_a_stage_is_its_script_plus_one_registry_entry(tmp_path, monkeypatch):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "brightness.py").write_text(NEW_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "scripts"))
    entry = registry.Stage("brightness", "mean brightness per class", ("brightness.csv", "brightness.png"))
    report_stage = registry.stage("report")
    # only the new stage and the report, so that the test takes seconds; the order is the table's
    monkeypatch.setattr(registry, "STAGES", [entry, report_stage])
    cfg = tiny_config(tmp_path)
    times = run_all.run(cfg)
    assert set(times) == {"brightness", "report", "total"}
    paths = locations.Paths.from_settings(cfg)
    record = json.loads((paths.out / "provenance_brightness.json").read_text())
    assert sorted(record["outputs"]) == ["brightness.csv", "brightness.png"]
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Stage: brightness</h2>" in page and "Brightness per class: a stage added by a test" in page
    assert registry.stage_of("brightness.png") == "brightness"
    # a second run skips both: their records vouch for their inputs, outputs, settings and code
    assert run_all.run(cfg).keys() == {"total"}
    cfg.CLOSE_FAR_COUNT += 1  # any setting changed: both run again
    assert run_all.run(cfg).keys() == {"brightness", "report", "total"}
    (paths.out / "brightness.png").unlink()  # an output gone: that stage runs again; the report embeds
    assert run_all.run(cfg).keys() == {"brightness", "total"}  # the same figure again, so it stays
    assert run_all.run(cfg, force=True).keys() == {"brightness", "report", "total"}


def test_a_stage_for_one_task_is_skipped_for_the_other_with_its_reason(tmp_path, monkeypatch, capsys):
    entry = registry.Stage("brightness", "x", ("b.csv",), tasks=("multiclass",), not_for="needs class folders")
    monkeypatch.setattr(registry, "STAGES", [entry])
    cfg = tiny_config(tmp_path, TASK="multilabel")
    assert run_all.run(cfg).keys() == {"total"}
    assert "skipped: brightness.py is multiclass only (TASK='multilabel'): needs class folders" in capsys.readouterr().out


def test_a_trunk_is_one_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(backbone.TRUNKS, "resnet18_copy", backbone.TRUNKS["resnet18"])
    cfg = settings.load_settings(["--TRUNK=resnet18_copy", "--WEIGHTS=None"])
    assert cfg.TRUNK == "resnet18_copy"
    model = backbone.build_model(backbone.architecture_args(3, 32, 16, 0.0, cfg.TRUNK, 0))
    logits, embedding = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 3) and embedding.shape == (2, 16)
    assert "'resnet18_copy'" in settings.accepts(settings.SCHEMA["TRUNK"])


def test_a_probe_is_one_entry_and_is_fitted_plotted_and_tabled(tmp_path, monkeypatch):
    ridge = probes.Probe("ridge regression (one-vs-rest)", "P", "#8c564b",
                         lambda y, s, seed: RidgeClassifier(random_state=seed))
    monkeypatch.setitem(probes.PROBES, "Ridge", ridge)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 8)) + 3 * np.eye(8)[labels]
    curves = probes.transfer_curves(x, labels, 0.3, 1, probes.ProbeSettings(knn_k=3), 0, n_jobs=1)
    assert set(curves.method) == set(probes.PROBES) and "Ridge" in set(curves.method)
    runs = probes.fewshot_runs(x, labels, 0.3, 2, probes.ProbeSettings(knn_k=3), 0, n_jobs=1)
    summary = probes.fewshot_summary(runs)
    drawn = []
    monkeypatch.setattr(transfer_learning.plots, "save_figure",
                        lambda fig, path: drawn.append([t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]))
    transfer_learning.plot_curves(curves, list(probes.PROBES), 1 / 3, "all", tmp_path / "a.png")
    transfer_learning.plot_fewshot(summary, 1 / 3, "few", tmp_path / "f.png")
    assert any("ridge regression (one-vs-rest) (mean)" in text for text in drawn[0])
    assert "ridge regression (one-vs-rest)" in drawn[1]


def test_a_metric_is_one_entry(monkeypatch):
    monkeypatch.setitem(metrics.METRICS, "error_rate", lambda y, p, s, k: (
        np.array([np.mean(p[y == c] != c) for c in range(k)]), float(np.mean(p != y))))
    labels, predicted = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    table = metrics.metrics_table(labels, predicted, np.eye(2)[predicted], ["a", "b"])
    assert table.error_rate.tolist() == [0.5, 0.0, 0.25]


def test_an_optimizer_is_one_entry(monkeypatch):
    monkeypatch.setitem(training.OPTIMIZERS, "rmsprop",
                        lambda groups, lr, decay, momentum: torch.optim.RMSprop(groups, lr=lr, weight_decay=decay))
    cfg = settings.load_settings(["--OPTIMIZER=rmsprop"])
    optimizer = training.make_optimizer(cfg.OPTIMIZER, [torch.nn.Parameter(torch.zeros(2))], 0.1)
    assert isinstance(optimizer, torch.optim.RMSprop)


def test_an_annotation_strategy_is_one_entry(monkeypatch):
    from plankton import annotation
    monkeypatch.setitem(annotation.STRATEGIES, "least_confident",
                        annotation.Strategy("lowest top score", lambda c, rng: 1 - c.probabilities.max(1)))
    cfg = settings.load_settings(["--ANNOTATE_STRATEGY=least_confident"])
    probabilities = np.array([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3]])
    pool = annotation.Candidates(probabilities, np.eye(3), annotation.labelled_reference(np.eye(3)[:1], 1, "cosine"))
    picked, _ = annotation.select(cfg.ANNOTATE_STRATEGY, pool, 2)
    assert list(picked) == [1, 2]
