"""DIMRED: UMAP, t-SNE or PCA from one table; each method's own file names; a changed DIMRED
leaves no other method's plane behind; the readers take whichever plane the record says ran."""
import numpy as np
import pandas as pd
import pytest
from conftest import one_error_line, tiny_config

import dimensionality_reduction
from plankton import embedding_files, fileio, locations, projection, provenance, registry, settings
from plankton.errors import PipelineError


@pytest.mark.parametrize("method", ["tsne", "pca"])  # UMAP: numba compiles it; the pipeline tests fit it
def test_each_method_maps_points_to_a_finite_plane_the_same_way_twice(method):
    points = np.random.default_rng(0).normal(size=(30, 8)) + np.repeat(np.eye(8)[:3] * 6, 10, axis=0)
    fit = projection.METHODS[method].fit
    first, again = fit(points, 15, 0), fit(points, 15, 0)
    assert first.shape == (30, 2) and np.isfinite(first).all()
    np.testing.assert_allclose(first, again, rtol=1e-5, atol=1e-5)
    centres = np.stack([first[i * 10:(i + 1) * 10].mean(0) for i in range(3)])
    spread = max(first[i * 10:(i + 1) * 10].std(0).max() for i in range(3))
    gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 2 * spread  # three well-separated groups stay apart in the plane


def test_every_method_has_its_files_in_the_registry_and_is_a_choice_of_dimred(tmp_path, capsys):
    patterns = registry.stage("dimensionality_reduction").outputs
    for method in projection.METHODS:
        assert set(projection.output_names(method)) <= set(patterns)
        assert registry.stage_of(f"{method}_embeddings.png") == "dimensionality_reduction"
    assert settings.load_settings(["--DIMRED=pca"]).DIMRED == "pca"
    line = one_error_line(capsys, dimensionality_reduction.main, ["--DIMRED=isomap", f"--OUTPUT_DIR={tmp_path}"])
    assert "DIMRED" in line and "'tsne'" in line


def write_plane(paths: locations.Paths, method: str) -> pd.DataFrame:
    coords = pd.DataFrame(dict(label=[0, 1], class_name=["Chaetoceros_socialis_colony", "detritus"],
                               path=["a.png", "b.png"], subset=["test", "test"], x=[0.0, 1.0], y=[1.0, 0.0]))
    fileio.save_csv(coords, paths.coordinates(method), index=False)
    (paths.out / projection.figure_name(method)).write_bytes(b"png")
    provenance.save_provenance(paths, "dimensionality_reduction", {},
                               [paths.coordinates(method), paths.out / projection.figure_name(method)])
    return coords


def test_a_changed_dimred_removes_the_other_plane_and_readers_take_the_one_recorded(tmp_path, capsys):
    paths = locations.prepare_output_dirs(tiny_config(tmp_path))
    write_plane(paths, "umap")
    assert embedding_files.projection_method(paths) == "umap"
    dimensionality_reduction.remove_other_planes(paths.out, "tsne")
    assert not paths.umap_coordinates.exists() and not (paths.out / "umap_embeddings.png").exists()
    assert "removed umap_embeddings.png, umap_coordinates.csv" in capsys.readouterr().out
    coords = write_plane(paths, "tsne")
    method, opened = embedding_files.open_projection_coordinates(paths)
    assert method == "tsne" and opened.equals(coords)
    with pytest.raises(PipelineError, match="umap coordinates"):
        embedding_files.open_umap_coordinates(paths)
    paths.coordinates("tsne").write_text(paths.coordinates("tsne").read_text() + "0,x,c.png,test,2,2\n")
    with pytest.raises(PipelineError, match="not made from the current"):  # edited since: not vouched for
        embedding_files.open_projection_coordinates(paths)
    provenance.provenance_path(paths, "dimensionality_reduction").unlink()
    with pytest.raises(PipelineError, match="run dimensionality_reduction.py first"):
        embedding_files.open_projection_coordinates(paths)


@pytest.mark.slow
def test_tsne_then_pca_through_the_stages(tmp_path, tiny_folder):
    import embed
    import embedding_quality
    import report
    import train
    cfg = tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=1, TRUNK="resnet18", DIMRED="tsne")
    train.run(cfg)
    embed.run(cfg)
    dimensionality_reduction.run(cfg)
    paths = locations.Paths.from_settings(cfg)
    assert paths.coordinates("tsne").is_file() and (paths.out / "tsne_embeddings.png").is_file()
    embedding_quality.run(cfg)
    quality = pd.read_csv(paths.out / "embedding_quality.csv")
    assert set(quality.projection) == {"tsne"} and quality.trustworthiness.between(0, 1).all()
    cfg.DIMRED = "pca"
    dimensionality_reduction.run(cfg)
    assert not paths.coordinates("tsne").exists() and not (paths.out / "tsne_embeddings.png").exists()
    assert not provenance.stale_outputs(paths, "dimensionality_reduction")
    assert provenance.why_rerun(paths, "embedding_quality", cfg)  # its plane is gone: it must run again
    embedding_quality.run(cfg)
    assert set(pd.read_csv(paths.out / "embedding_quality.csv").projection) == {"pca"}
    part = report.interactive_umap(paths)
    assert "Interactive PCA" in part and "pca_embeddings.png" in part and "PC 1" in part
