import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoImageProcessor, AutoModel

from qg_tokenizer import QGVAEImageProcessor, QGVAEModel

from .conftest import tiny_config
from .hub_utils import FakeHub, lay_out_hf_cache

REPO = "some-org/qgvae-tiny"


def saved_tiny(tmp_path):
    torch.manual_seed(0)
    model = QGVAEModel(tiny_config())
    model.quantizer.usage_counts.add_(torch.arange(8 * 32, dtype=torch.float32).reshape(8, 32))
    model.quantizer.reset_statistic.add_(0.5)
    processor = QGVAEImageProcessor.from_model_config(model.config)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved"


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_save_load_round_trip_restores_every_tensor(tmp_path):
    model, saved = saved_tiny(tmp_path)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(saved))
    assert {"modeling_qgvae.py", "configuration_qgvae.py", "quantizer_qgvae.py", "codec.py"} <= set(os.listdir(saved))
    loaded = QGVAEModel.from_pretrained(saved)
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded.eval()(x).reconstruction, model.eval()(x).reconstruction)
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "qgvae" and config["auto_map"]["AutoModel"] == "modeling_qgvae.QGVAEModel"


def test_auto_classes_from_repo_id_in_offline_cache(tmp_path):
    model, saved = saved_tiny(tmp_path)
    lay_out_hf_cache(saved, tmp_path / "hf", REPO)
    cache = tmp_path / "hf" / "hub"
    loaded = AutoModel.from_pretrained(REPO, cache_dir=cache)
    processor = AutoImageProcessor.from_pretrained(REPO, cache_dir=cache)
    assert type(loaded) is QGVAEModel and type(processor) is QGVAEImageProcessor
    assert processor.image_size == 16 and processor.num_channels == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_trust_remote_code_without_the_package(tmp_path):
    model, saved = saved_tiny(tmp_path)
    lay_out_hf_cache(saved, tmp_path / "hf", REPO)
    x = torch.rand(2, 1, 16, 16)
    torch.save({"x": x, "ids": model.eval().encode(x).token_ids}, tmp_path / "io.pt")
    result = run_python(
        f"""
        import sys, torch
        from transformers import AutoModel, AutoImageProcessor
        model = AutoModel.from_pretrained("{REPO}", trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained("{REPO}", trust_remote_code=True)
        assert "qg_tokenizer" not in sys.modules, "the package was imported"
        io = torch.load("{tmp_path / 'io.pt'}")
        assert torch.equal(model.encode(io["x"]).token_ids, io["ids"])
        print(type(model).__module__, type(processor).__name__)
        """,
        {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, processor_name = result.stdout.split()
    assert module.startswith("transformers_modules.") and processor_name == "QGVAEImageProcessor"


def test_without_trust_remote_code_or_import_fails_clearly(tmp_path):
    _, saved = saved_tiny(tmp_path)
    lay_out_hf_cache(saved, tmp_path / "hf", REPO)
    result = run_python(
        f'from transformers import AutoModel; AutoModel.from_pretrained("{REPO}")',
        {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0 and "trust_remote_code" in result.stderr


def test_push_to_hub_uploads_safetensors_config_and_code(tmp_path):
    hub = FakeHub()
    with hub.running():
        result = run_python(
            """
            import torch, qg_tokenizer
            from tests.conftest import tiny_config
            model = qg_tokenizer.QGVAEModel(tiny_config())
            model.push_to_hub("some-org/qgvae-tiny")
            qg_tokenizer.QGVAEImageProcessor.from_model_config(model.config).push_to_hub("some-org/qgvae-tiny")
            """,
            {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "dummy", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    model_files, processor_files = hub.commits
    assert {"config.json", "model.safetensors", "modeling_qgvae.py", "configuration_qgvae.py"} <= set(model_files)
    assert not any(name.endswith((".bin", ".pt")) for name in model_files)
    assert json.loads(model_files["config.json"])["num_tokens"] == 8
    assert "preprocessor_config.json" in processor_files
