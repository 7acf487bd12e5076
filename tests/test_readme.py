"""README.md's Python snippets run as written (the model folder swapped for a freshly saved untrained model)."""

import re
from pathlib import Path

import torch

from qg_tokenizer import QGPriorConfig, QGPriorForCausalLM, QGVAEConfig, QGVAEImageProcessor, QGVAEModel
from qg_tokenizer.codec import read_header
from qg_tokenizer.metrics import psnr

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_use_snippet(tmp_path) -> tuple[QGVAEModel, dict]:
    torch.manual_seed(0)
    model = QGVAEModel(QGVAEConfig.from_preset("mnist-cpu")).eval()
    model.save_pretrained(tmp_path)
    QGVAEImageProcessor.from_model_config(model.config).save_pretrained(tmp_path)
    snippets = python_snippets()
    assert snippets and '"outputs/demo"' in snippets[0]
    namespace: dict = {}
    exec(snippets[0].replace('"outputs/demo"', repr(str(tmp_path))), namespace)  # noqa: S102
    return model, namespace


def test_use_snippet_runs_and_its_comments_hold(tmp_path):
    model, namespace = run_use_snippet(tmp_path)
    c = model.config.num_tokens
    pixels = namespace["pixels"]
    assert pixels.shape == (8, 1, 28, 28) and 0 <= pixels.min() <= pixels.max() <= 1
    assert namespace["ids"].shape == (8, c) and namespace["ids"].dtype == torch.int64
    assert namespace["recon"].shape == namespace["coarse"].shape == (8, 1, 28, 28)
    assert not namespace["recon"].requires_grad
    assert len(namespace["pictures"]) == 8 and namespace["pictures"][0].size == (28, 28)
    assert all(len(s) == 20 + model.config.bytes_per_image for s in namespace["streams"])
    torch.testing.assert_close(namespace["restored"], namespace["recon"])


def test_entropy_coding_snippet_runs_and_its_comments_hold(tmp_path):
    model, namespace = run_use_snippet(tmp_path / "model")
    snippet = python_snippets()[1]
    assert '"outputs/entropy-coding/prior-mnist"' in snippet
    prior = QGPriorForCausalLM(QGPriorConfig(
        num_image_tokens=model.config.num_tokens, codebook_size=model.config.codebook_size, num_classes=0,
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ))  # fmt: skip
    prior.save_pretrained(tmp_path / "prior")
    exec(snippet.replace('"outputs/entropy-coding/prior-mnist"', repr(str(tmp_path / "prior"))), namespace)  # noqa: S102
    torch.testing.assert_close(namespace["restored"], namespace["recon"])
    assert all(len(s) <= 30 for s in namespace["small"])
    c, pixels, prior = model.config.num_tokens, namespace["pixels"], namespace["prior"]
    kept = [read_header(s, c, model.config.codebook_size).prefix_length for s in namespace["good"]]
    reached = psnr(model.decompress(namespace["good"], prior=prior), pixels) >= 20.0
    for k, ok, image in zip(kept, reached, pixels):  # the shortest prefix that reaches 20 dB, else all C tokens
        assert ok or k == c
        if k > 1:
            shorter = model.decode(model.encode(image[None]).token_ids, prefix_length=k - 1).pixel_values
            assert psnr(shorter, image[None]) < 20.0


def test_every_python_snippet_is_covered():
    assert len(python_snippets()) == 2, "a new README snippet needs a test here"
