"""Start-up: what the console script and `import qg_tokenizer` import, in fresh processes (benchmarks/startup.py times
them; no test here is timed), and the benchmark's committed results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from startup import CONSOLE_SCRIPT, imported_modules  # noqa: E402

HEAVY = {"torch", "transformers", "qg_tokenizer"}


@pytest.mark.parametrize(
    "argv, status, stderr",
    [
        (["--help"], 0, ""),
        (["decode", "--help"], 0, ""),
        (["compress", "missing.png", "--model", "some-org/model", "-o", "x.qgt"], 1,
         "qg-tokenizer compress: error: 'missing.png': no such file"),
        (["decode", "tokens.npy", "--model", "some-org/model", "-o", "x.xyz"], 1,
         "qg-tokenizer decode: error: -o 'x.xyz'"),
        (["info", "--model", "./no-such-model"], 1, "qg-tokenizer info: error: --model './no-such-model': no such"),
        (["compress", "--model", "some-org/model"], 2, "qg-tokenizer compress: error: the following arguments"),
    ],
)  # fmt: skip
def test_help_and_argument_errors_import_neither_torch_nor_transformers(tmp_path, argv, status, stderr):
    assert "qg_tokenizer_cli" in CONSOLE_SCRIPT.read_text(), "stale console script: run `pip install -e .`"
    modules = imported_modules([str(CONSOLE_SCRIPT), *argv], status, str(tmp_path))
    assert "qg_tokenizer_cli" in modules and "argparse" in modules  # the importtime log is read right
    assert not modules & HEAVY
    result = subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == status and result.stderr.startswith(stderr)
    assert len(result.stderr.splitlines()) == (0 if status == 0 else 1) and os.listdir(tmp_path) == []


def test_import_registers_the_auto_classes_and_leaves_optional_libraries_unimported():
    code = """
import json, sys
import qg_tokenizer
optional = sorted(m for m in ("matplotlib", "datasets", "diffusers") if m in sys.modules)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
vae = AutoConfig.for_model("qgvae", image_size=16, num_channels=1, num_tokens=4, codebook_size=16, codeword_dim=4,
                           num_heads=1, downsample_factor=1, min_channels=4, max_channels=8, num_octaves=4)
print(json.dumps({
    "optional": optional,
    "configs": [type(AutoConfig.for_model(t)).__name__ for t in ("qgvae", "patch_vqvae", "qgprior")],
    "model": type(AutoModel.from_config(vae)).__name__,
    "causal_lm": AutoModelForCausalLM._model_mapping[qg_tokenizer.QGPriorConfig].__name__,
}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found == {
        "optional": [],
        "configs": ["QGVAEConfig", "PatchVQVAEConfig", "QGPriorConfig"],
        "model": "QGVAEModel",
        "causal_lm": "QGPriorForCausalLM",
    }


def test_startup_results_hold_every_row_and_meet_the_targets():
    results = json.loads((ROOT / "benchmarks" / "results" / "startup.json").read_text())
    assert {"platform", "cpus", "python", "torch", "transformers", "note"} <= set(results["machine"])
    rows = results["rows"]
    names = ["python", "floor", "import qg_tokenizer", "--help", "argument error", "qg_tokenizer.cli"]
    assert set(names) < set(rows)
    for name in names:
        assert len(rows[name]["seconds"]) == results["runs"] and rows[name]["best_s"] <= rows[name]["median_s"]
        assert {"ratio_to_floor", "paired_ratio_to_floor", "imports"} <= set(rows[name])
    assert all(results["targets_met"].values()), results["targets_met"]
    for name in ("--help", "argument error"):
        assert not set(rows[name]["imports"]) & HEAVY
        assert rows[name]["median_s"] < rows["qg_tokenizer.cli"]["median_s"] / 10  # what every call paid before
    assert rows["import qg_tokenizer"]["imports"] and not {"datasets", "diffusers", "matplotlib"} & set(
        rows["import qg_tokenizer"]["imports"]
    )
