"""Multi-label paths compared by where the image is, not by their text (issue 19, item 6):
img/x.png, ./img/x.png, img/./x.png and a linked alias of img/ are one image (listed twice: one
error line, as any repeated image), and a linked sub-folder cannot reach images outside DATA_DIR."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plankton import labelsets
from plankton.errors import PipelineError


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for name in ("x", "y", "z"):
        image(root / "img" / f"{name}.png")
    return root


def read(root, rows):
    csv = root / "labels.csv"
    pd.DataFrame(rows, columns=["path", "labels"]).to_csv(csv, index=False)
    return labelsets.read_labels_csv(csv, root.resolve(), ["a", "b"], [])


@pytest.mark.parametrize("again", ["./img/x.png", "img/./x.png", "img//x.png", "alias/x.png", "./alias/../img/x.png"])
def test_one_image_spelt_twice_is_listed_a_second_time(data, again):
    (data / "alias").symlink_to(data / "img")
    rows = [("img/x.png", "a"), ("img/y.png", "b"), (again, "a;b")]
    with pytest.raises(PipelineError, match="line 4 .*listed a second time \\(first on line 2\\)|without '..'"):
        read(data, rows)


def test_a_linked_sub_folder_cannot_reach_images_outside_the_data(tmp_path, data):
    image(tmp_path / "private" / "secret.png")
    (data / "door").symlink_to(tmp_path / "private")
    with pytest.raises(PipelineError, match="line 4 .*leads outside DATA_DIR"):
        read(data, [("img/x.png", "a"), ("img/y.png", "b"), ("door/secret.png", "a")])


def test_different_images_and_a_linked_image_file_are_still_read(tmp_path, data):
    image(tmp_path / "elsewhere.png")
    (data / "img" / "linked.png").symlink_to(tmp_path / "elsewhere.png")  # a linked image file is an image
    found = read(data, [("./img/x.png", "a"), ("img/y.png", "b"), ("img/linked.png", "a;b")])
    assert found == {"./img/x.png": ("a",), "img/y.png": ("b",), "img/linked.png": ("a", "b")}
