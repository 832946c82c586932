"""The 2-D map of the embeddings, one method of METHODS (the DIMRED setting): UMAP on exact
neighbours (umap-learn's numba code cached on disk and optionally compiled ahead in a low-priority
process while earlier stages run), scikit-learn's t-SNE, or scikit-learn's PCA. Every method is fitted
on the same standardised points. A new method is one entry in METHODS."""
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plankton import system


def cache_umap_compilation() -> int:
    """Ask numba to keep umap-learn's compiled functions on disk too.

    umap-learn marks few of its numba functions cache=True, so every new process compiled them
    again: the first fit in a process took 11 s here, a second one 3.3 s. With the compiled code
    cached, a new process's first fit takes 3.4 s. Returns how many functions were switched."""
    import umap.distances
    import umap.layouts
    import umap.spectral
    import umap.umap_
    import umap.utils
    from numba.core.registry import CPUDispatcher
    switched = 0
    for module in (umap.umap_, umap.layouts, umap.utils, umap.spectral, umap.distances):
        for function in vars(module).values():
            if isinstance(function, CPUDispatcher):
                try:
                    function.enable_caching()
                    switched += 1
                except Exception:  # a function numba cannot cache is compiled as before
                    pass
    return switched


def exact_neighbours(points: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each point's k nearest points (itself first, at distance 0), exactly, by blocked matrix
    products in torch: (indices, Euclidean distances), as umap-learn's precomputed_knn takes them.

    umap-learn finds neighbours exactly below 4,096 points and with pynndescent's approximate search
    above; pynndescent's compiled code is not kept between processes and took 26 s of a 31 s first
    fit on 4,600 points. The exact search here costs O(n^2 d) multiply-adds: 0.1 s for 6,000 points."""
    import torch
    x = torch.as_tensor(points, dtype=torch.float32)
    squares = (x * x).sum(1)
    indices, distances = [], []
    for start in range(0, len(x), block):
        rows = slice(start, min(start + block, len(x)))
        d2 = squares[rows, None] - 2.0 * (x[rows] @ x.T) + squares[None, :]
        own = torch.arange(rows.start, rows.stop)
        d2[own - start, own] = -1.0  # itself first, whatever the rounding
        values, nearest = torch.topk(d2, k, dim=1, largest=False)  # sorted, nearest first
        values[:, 0] = 0.0
        indices.append(nearest.numpy())
        distances.append(values.clamp_(min=0.0).sqrt_().numpy())
    return np.concatenate(indices).astype(np.int64), np.concatenate(distances).astype(np.float32)


_compiling: subprocess.Popen | None = None  # compile_ahead's process, waited for by fit_umap


def umap_code_cached() -> bool:
    """Whether numba's cache folder already holds umap-learn's compiled layout code."""
    folder = os.environ.get("NUMBA_CACHE_DIR")
    return folder is None or any(Path(folder).rglob("layouts.*.nbi"))


def _low_priority_child() -> None:
    os.nice(10)
    system.die_with_parent()


def compile_ahead() -> None:
    """On a cold numba cache, fit a small UMAP in a background process at low priority, so that
    numba compiles umap-learn's code (about 18 s on one core) into the cache while the stages before
    this one run; fit_umap then waits for it and loads the compiled code. Does nothing when the code
    is cached already or numba keeps no cache."""
    global _compiling
    if _compiling is not None or umap_code_cached():
        return
    warm_up = ("import numpy as np; from plankton import projection as d; "
               "d.fit_umap(np.random.default_rng(0).normal(size=(64, 8)), 15, 0)")
    _compiling = subprocess.Popen([sys.executable, "-c", warm_up], cwd=system.REPO_DIR, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_low_priority_child)


def stop_compiling(wait: bool) -> None:
    """Wait for compile_ahead's process (or stop it: wait=False); a failed one changes nothing, as
    fit_umap then compiles what it needs itself."""
    global _compiling
    if _compiling is None:
        return
    try:
        _compiling.wait(timeout=600 if wait else 0)
    except subprocess.TimeoutExpired:
        _compiling.kill()
        _compiling.wait()
    _compiling = None


def fit_umap(points: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """Standardise, find exact neighbours, then one UMAP fit to 2-d (numba's compiled code is
    cached on disk; a compile_ahead process still compiling it is waited for first)."""
    stop_compiling(wait=True)
    import umap  # imported here: it compiles with numba on first use
    from sklearn.preprocessing import StandardScaler
    cache_umap_compilation()
    scaled = StandardScaler().fit_transform(points).astype(np.float32)
    neighbours = max(2, min(n_neighbors, len(points) - 1))
    knn = exact_neighbours(scaled, neighbours)
    # a seed makes UMAP reproducible (and single-threaded)
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed, n_jobs=1,
                        init="spectral" if len(points) > 10 else "random", precomputed_knn=knn)
    with warnings.catch_warnings():  # "no search index: transform() unavailable": never used here
        warnings.filterwarnings("ignore", message="precomputed_knn")
        return reducer.fit_transform(scaled)


def fit_tsne(points: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """Standardise, then scikit-learn's t-SNE to 2-d (Barnes-Hut, PCA initialisation). Its
    perplexity is scikit-learn's default, 30, below the number of points; n_neighbors is not used.

    One OpenMP thread: beside torch's own OpenMP runtime, whose idle threads keep spinning, scikit-
    learn's threads fought them for the cores (30 points took 16.6 s after a torch matrix product,
    0.3 s on one thread); one thread also makes the sums, and so the plane, the same on every machine."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    scaled = StandardScaler().fit_transform(points).astype(np.float32)
    perplexity = min(30.0, max(1.0, (len(points) - 1) / 3))
    with threadpool_limits(limits=1, user_api="openmp"):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(scaled)


def fit_pca(points: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """Standardise, then the first two principal components (scikit-learn's PCA, exact SVD)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler
    scaled = StandardScaler().fit_transform(points)
    return PCA(n_components=2, svd_solver="full", random_state=seed).fit_transform(scaled)


@dataclass(frozen=True)
class Method:
    label: str  # what figures call it ("t-SNE")
    axis: str  # the axes are "<axis> 1" and "<axis> 2"
    fit: Callable[[np.ndarray, int, int], np.ndarray]  # (points, UMAP_NEIGHBORS, seed) -> (n, 2)
    reading: str  # how to read the plane, one sentence for the figure's title


METHODS = {  # the DIMRED setting's choices; the stage writes <name>_embeddings.png, <name>_coordinates.csv
    "umap": Method("UMAP", "UMAP", fit_umap, "UMAP keeps neighbourhoods; distances between clusters mean little."),
    "tsne": Method("t-SNE", "t-SNE", fit_tsne, "t-SNE keeps neighbourhoods; distances between clusters and "
                                               "cluster sizes mean little."),
    "pca": Method("PCA", "PC", fit_pca, "PCA is a linear view along the two directions of largest variance; "
                                         "classes that differ elsewhere overlap here."),
}


def coordinates_name(method: str) -> str:
    return f"{method}_coordinates.csv"


def figure_name(method: str) -> str:
    return f"{method}_embeddings.png"


def output_names(method: str) -> tuple[str, str, str]:
    """The plane's files for one method: figure, coordinates CSV and its Parquet copy."""
    return figure_name(method), coordinates_name(method), coordinates_name(method).replace(".csv", ".parquet")
