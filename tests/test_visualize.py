"""`qg_tokenizer.visualize`: the grids are labelled, readable and carry their layout; the cells are the images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qg_tokenizer import QGVAEImageProcessor, QGVAEModel
from qg_tokenizer.visualize import (
    READABLE_WIDTH,
    image_grid,
    influence_grid,
    prefix_label,
    prefix_lengths,
    progressive_grid,
    save_grid,
)

from .conftest import tiny_config

TRAINING = Path(__file__).resolve().parents[1] / "training"


@pytest.fixture(scope="module")
def model() -> QGVAEModel:
    torch.manual_seed(0)
    return QGVAEModel(tiny_config(codebook_size=300)).eval()  # C = 8, K = 300, 16 x 16 grey images


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def layout(image: Image.Image) -> dict:
    return json.loads(image.info["layout"])


def cell(image: Image.Image, row: int, column: int) -> np.ndarray:
    """The pixels of cell (row, column), `[h, w]` or `[h, w, 3]` uint8, from the layout in `image.info`."""
    grid = layout(image)
    (x, y), (dx, dy), (w, h) = grid["origin"], grid["step"], grid["cell_size"]
    x, y = x + column * dx, y + row * dy
    return np.asarray(image)[y : y + h, x : x + w]


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """`[B, ch, H, W]` in [0, 1] as the grids store it: `[B, H, W]` (one channel) or `[B, H, W, ch]` uint8."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def saved(image: Image.Image, path: Path) -> Image.Image:
    save_grid(image, path)  # as the CLI, the demo and training/common.py save the grids
    reopened = Image.open(path)
    reopened.load()
    return reopened


def test_image_grid_without_labels_keeps_the_images_at_their_size(pixel_values):
    grid = image_grid([pixel_values, 1 - pixel_values])
    assert grid.mode == "L" and grid.size == (3 * 17 + 1, 2 * 17 + 1)
    assert layout(grid) == {
        "rows": 2, "columns": 3, "scale": 1, "cell_size": [16, 16], "origin": [1, 1], "step": [17, 17]
    }  # fmt: skip
    assert "row_labels" not in grid.info and "cell_labels" not in grid.info
    np.testing.assert_array_equal(cell(grid, 1, 2), as_uint8(1 - pixel_values)[2])


def test_progressive_grid_labels_each_row_with_its_prefix_and_bytes(model, pixel_values, tmp_path):
    grid = progressive_grid(model, pixel_values)
    labels = [
        "input", "first 1 token (2 bytes)", "first 2 tokens (3 bytes)", "first 4 tokens (5 bytes)",
        "all 8 tokens (9 bytes)",
    ]  # fmt: skip
    assert json.loads(grid.info["row_labels"]) == labels
    assert READABLE_WIDTH <= grid.width < 2 * READABLE_WIDTH
    grid_layout = layout(grid)
    s = grid_layout["scale"]
    assert grid_layout["rows"] == 5 and grid_layout["columns"] == 3 and s > 1
    assert grid_layout["cell_size"] == [16 * s, 16 * s] and grid.height >= 5 * 16 * s
    x, y = grid_layout["origin"]
    assert np.asarray(grid)[y : y + 16 * s, :x].min() < 128  # "input" in the margin left of the first row

    # every cell is its image, each pixel an s x s block
    with torch.no_grad():
        token_ids = model.encode(pixel_values).token_ids
        rows = [pixel_values] + [model.decode(token_ids, prefix_length=k).pixel_values for k in prefix_lengths(8)]
    for r, row in enumerate(rows):
        for b, expected in enumerate(as_uint8(row)):
            np.testing.assert_array_equal(cell(grid, r, b), np.kron(expected, np.ones((s, s), np.uint8)))

    reopened = saved(grid, tmp_path / "progressive.png")
    assert reopened.size == grid.size and json.loads(reopened.text["row_labels"]) == labels
    assert json.loads(reopened.info["layout"]) == grid_layout


def test_progressive_grid_keeps_the_training_call_and_its_row_order(model, pixel_values, tmp_path):
    """training/common.py: `progressive_grid(model, pixel_values, lengths=[C, C/8, C/4, C/2])` for samples/*.png."""
    grid = progressive_grid(model, pixel_values, lengths=[8, 1, 2, 4])
    labels = ["input", "all 8 tokens (9 bytes)", "first 1 token (2 bytes)", "first 2 tokens (3 bytes)",
              "first 4 tokens (5 bytes)"]  # fmt: skip
    assert json.loads(saved(grid, tmp_path / "step-0000001.png").text["row_labels"]) == labels


def test_scale_enlarges_cells_and_text_together(model, pixel_values):
    one, two = progressive_grid(model, pixel_values), progressive_grid(model, pixel_values, scale=2)
    assert layout(two)["scale"] == 2 * layout(one)["scale"]
    assert abs(two.width - 2 * one.width) < 0.02 * two.width and two.height == 2 * one.height  # text: near 2x
    np.testing.assert_array_equal(cell(two, 2, 1)[::2, ::2], cell(one, 2, 1))


def test_influence_grid_captions_its_panels(model, pixel_values, tmp_path):
    grid = influence_grid(model, pixel_values[0], generator=torch.Generator().manual_seed(0))
    captions = [
        ["input", "all tokens", "token 0", "token 1"],
        ["token 2", "token 3", "token 4", "token 5"],
        ["token 6", "token 7", "", ""],
    ]  # 2 + C = 10 panels, 4 a row, 2 blank
    assert grid.mode == "RGB" and json.loads(grid.info["cell_labels"]) == captions and "row_labels" not in grid.info
    grid_layout = layout(grid)
    assert grid_layout["rows"] == 3 and grid_layout["columns"] == 4 and grid.width >= READABLE_WIDTH
    s, (x, y), (dx, dy) = grid_layout["scale"], grid_layout["origin"], grid_layout["step"]
    grey = np.repeat(as_uint8(pixel_values[:1])[0][..., None], 3, axis=-1)
    np.testing.assert_array_equal(cell(grid, 0, 0)[::s, ::s], grey)  # the input panel is the input
    assert cell(grid, 0, 1).max() > 0  # the all-tokens panel is not black: every token changes some pixel
    pixels = np.asarray(grid)
    assert pixels[y - (dy - 16 * s) + s : y, x : x + 16 * s].min() < 128  # "input" above the first panel
    assert pixels[2 * dy + s : y + 2 * dy + 16 * s, x + 2 * dx : x + 4 * dx - s].min() == 255  # blanks, uncaptioned

    reopened = saved(grid, tmp_path / "influence.png")
    assert json.loads(reopened.text["cell_labels"]) == captions and reopened.info["layout"] == grid.info["layout"]


def test_prefix_label_counts_tokens_and_payload_bytes():
    assert prefix_label(1, 8, 300) == "first 1 token (2 bytes)"
    assert prefix_label(4, 8, 256) == "first 4 tokens (4 bytes)"
    assert prefix_label(8, 8, 300) == "all 8 tokens (9 bytes)"
    assert prefix_label(1, 1, 256) == "all 1 token (1 byte)"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"row_labels": ["input"]}, "row_labels must be a list of 2 strings"),
        ({"row_labels": "input"}, "row_labels must be a list of 2 strings"),
        ({"cell_labels": [["a", "b", "c"]]}, "cell_labels must be 2 lists of 3 strings"),
        ({"cell_labels": [["a", "b", "c"], ["a", "b"]]}, "cell_labels[1] must be a list of 3 strings"),
        ({"scale": 0}, "scale must be an integer >= 1, got 0"),
    ],
)
def test_image_grid_rejects_bad_labels_and_scale(pixel_values, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        image_grid([pixel_values, pixel_values], **kwargs)


def test_demo_figures_are_labelled_and_readable(model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TRAINING))
    from demo import write_figures

    model.save_pretrained(tmp_path)
    QGVAEImageProcessor.from_model_config(model.config).save_pretrained(tmp_path)
    write_figures(tmp_path, num_images=4)
    grids = {name: Image.open(tmp_path / f"{name}.png") for name in ("reconstructions", "progressive")}
    assert {name: (layout(g)["rows"], layout(g)["columns"]) for name, g in grids.items()} == {
        "reconstructions": (2, 4), "progressive": (5, 2)
    }  # fmt: skip
    assert all(g.width >= READABLE_WIDTH for g in grids.values())
    assert json.loads(grids["reconstructions"].text["row_labels"]) == ["input", "reconstruction (9 bytes)"]
    assert json.loads(grids["progressive"].text["row_labels"])[-1] == "all 8 tokens (9 bytes)"
