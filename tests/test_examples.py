"""Each script in `examples/` runs on a tiny saved model and produces what it says."""

import math
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import load_from_disk

from qg_tokenizer import QGVAEImageProcessor
from qg_tokenizer.codec import payload_num_bytes
from qg_tokenizer.data import load_embedded_mnist
from tests.test_cli import save_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, model, processor) of a tiny QG-VAE, C=8, K=300."""
    folder = tmp_path_factory.mktemp("examples") / "model"
    model = save_model(folder)
    return folder, model, QGVAEImageProcessor.from_model_config(model.config)


def run_example(name: str, monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    capsys.readouterr()
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_encode_decode(saved, monkeypatch, capsys, tmp_path):
    folder, model, processor = saved
    out = run_example(
        "encode_decode.py", monkeypatch, capsys, "--model", str(folder), "--num-images", "3",
        "--output", str(tmp_path / "grid.png"),
    )  # fmt: skip
    images = list(load_embedded_mnist()["test"].select(range(3))["image"])
    with torch.no_grad():
        token_ids = model.encode(processor(images, return_tensors="pt")["pixel_values"]).token_ids
    assert f"token_ids [3, 8] in [0, 300); image 0: {token_ids[0].tolist()}" in out
    reported = {int(k): int(b) for k, b in re.findall(r"(\d+) tokens = +(\d+) bytes", out)}
    assert reported == {k: payload_num_bytes(k, 300) for k in (1, 2, 4, 8)} == {1: 2, 2: 3, 4: 5, 8: 9}
    assert PIL.Image.open(tmp_path / "grid.png").size == (3 * 17 + 1, 5 * 17 + 1)  # inputs + 4 prefix rows


def test_compress_image(saved, monkeypatch, capsys, tmp_path):
    folder, model, processor = saved
    out = run_example("compress_image.py", monkeypatch, capsys, "--model", str(folder), "--output-dir", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "image.qgt", "prefix-1.png", "prefix-2.png", "prefix-4.png", "reconstruction.png"
    ]  # fmt: skip
    pixel_values = processor(load_embedded_mnist()["test"][0]["image"], return_tensors="pt")["pixel_values"]
    data = (tmp_path / "image.qgt").read_bytes()
    assert data == model.compress(pixel_values)[0] and "QG-VAE stream 29 bytes (20 header + 9 payload)" in out
    with torch.no_grad():
        token_ids = model.encode(pixel_values).token_ids
        for name, k in (("prefix-2.png", 2), ("reconstruction.png", 8)):
            expected = processor.postprocess(model.decode(token_ids, prefix_length=k).pixel_values)[0]
            np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / name)), np.asarray(expected))


def test_tokenize_dataset(saved, monkeypatch, capsys, tmp_path):
    folder, model, processor = saved
    out = run_example(
        "tokenize_dataset.py", monkeypatch, capsys, "--model", str(folder), "--num-images", "40",
        "--output-dir", str(tmp_path / "tokens"), "--prior-steps", "3",
    )  # fmt: skip
    tokens, mnist = load_from_disk(tmp_path / "tokens"), load_embedded_mnist()
    for split in ("train", "test"):
        assert tokens[split].column_names == ["label", "token_ids"]
        assert tokens[split]["label"] == mnist[split]["label"][:40]
    images = list(mnist["test"].select(range(40))["image"])
    with torch.no_grad():
        expected = model.encode(processor(images, return_tensors="pt")["pixel_values"]).token_ids
    assert torch.equal(torch.tensor(tokens["test"]["token_ids"]), expected)
    bits = [float(b) for b in re.findall(r"prior step \d+: ([\d.]+) bits per token", out)]
    assert len(bits) == 2 and abs(bits[0] - math.log2(300)) < 0.5 and bits[1] < bits[0]  # starts near uniform, learns
