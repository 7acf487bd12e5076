"""README.md's Python snippets run as written (the model folder swapped for a freshly saved untrained model)."""

import re
from pathlib import Path

import torch

from qg_tokenizer import QGVAEConfig, QGVAEImageProcessor, QGVAEModel

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_use_snippet_runs_and_its_comments_hold(tmp_path):
    torch.manual_seed(0)
    model = QGVAEModel(QGVAEConfig.from_preset("mnist-cpu")).eval()
    model.save_pretrained(tmp_path)
    QGVAEImageProcessor.from_model_config(model.config).save_pretrained(tmp_path)
    snippets = python_snippets()
    assert snippets and '"outputs/demo"' in snippets[0]
    namespace: dict = {}
    exec(snippets[0].replace('"outputs/demo"', repr(str(tmp_path))), namespace)  # noqa: S102
    c = model.config.num_tokens
    pixels = namespace["pixels"]
    assert pixels.shape == (8, 1, 28, 28) and 0 <= pixels.min() <= pixels.max() <= 1
    assert namespace["ids"].shape == (8, c) and namespace["ids"].dtype == torch.int64
    assert namespace["recon"].shape == namespace["coarse"].shape == (8, 1, 28, 28)
    assert not namespace["recon"].requires_grad
    assert len(namespace["pictures"]) == 8 and namespace["pictures"][0].size == (28, 28)
    assert all(len(s) == 20 + model.config.bytes_per_image for s in namespace["streams"])
    torch.testing.assert_close(namespace["restored"], namespace["recon"])


def test_every_python_snippet_is_covered():
    assert len(python_snippets()) == 1, "a new README snippet needs a test here"
