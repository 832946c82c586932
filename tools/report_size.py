"""How much the interactive UMAP adds to report.html for a given number of points with thumbnails
(a measurement, not a test: it prints figures).

    python tools/report_size.py                      # 6,000 points on 128-px photo patches
    python tools/report_size.py --points=2000 --size=256

Makes `points` images, each a random square patch of scikit-learn's two sample photographs (china.jpg,
flower.jpg; photo-like content, where thumbnails are larger than on the built-in digits), in ten class
folders in a temporary folder (deleted afterwards); lays them on a random plane as seen train/test and
unseen points; then builds the report's UMAP part with report.umap_html and prints its size, the size
of Bokeh's inline JavaScript, and the time taken. Writes nothing else.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402

SEEN, UNSEEN = [str(i) for i in range(6)], [str(i) for i in range(6, 10)]


def make_patches(root: Path, points: int, size: int, seed: int = 0) -> pd.DataFrame:
    """`points` photo patches saved as JPEG (quality 90) in class folders; their plane coordinates."""
    from sklearn.datasets import load_sample_images
    photos, rng, rows = load_sample_images().images, np.random.default_rng(seed), []
    for i in range(points):
        name = (SEEN + UNSEEN)[i % 10]
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        (root / name).mkdir(exist_ok=True)
        Image.fromarray(photo[y:y + size, x:x + size]).save(root / name / f"{i:05d}.jpg", quality=90)
        subset = "unseen" if name in UNSEEN else ("train", "test")[i % 2]
        rows.append(dict(class_name=name, path=f"{name}/{i:05d}.jpg", subset=subset))
    coords = pd.DataFrame(rows)
    coords["x"], coords["y"] = rng.normal(size=points), rng.normal(size=points)
    return coords


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=6000)
    parser.add_argument("--size", type=int, default=128, help="side of the photo patches, pixels")
    args = parser.parse_args()
    from bokeh.resources import Resources
    with tempfile.TemporaryDirectory() as folder:
        coords = make_patches(Path(folder), args.points, args.size)
        started = time.time()
        part = report.umap_html(coords, Path(folder), SEEN, UNSEEN)
        seconds = time.time() - started
    library = len(Resources(mode="inline", components=["bokeh"]).render().encode())
    size = len(part.encode())
    print(f"{args.points} points ({args.size}-px photo patches, {report.THUMBNAIL_PX}-px thumbnails): "
          f"interactive UMAP {size / 1e6:.2f} MB ({size / args.points:.0f} bytes a point), "
          f"Bokeh's JavaScript {library / 1e6:.2f} MB, built in {seconds:.1f} s")


if __name__ == "__main__":
    main()
