"""The fast paths of the QG-VAE against straightforward reference formulas, today's model against the baseline commit's
(`benchmarks/bench_model.py`'s equivalence check), and the bench's rows and JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from qg_tokenizer import QGVAEModel
from qg_tokenizer.modeling_qgvae import (
    QGVAEResidualBlock,
    QGVAETokenProjection,
    pooled_conv_weight,
    preferred_layout,
)

from .conftest import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_model  # noqa: E402

BASELINE_COMMIT = "716926a"


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory) -> Path:
    """The baseline commit's code: `QG_BASELINE` or the bench's default checkout if present, else exported from this
    repository's history with `git archive` (a clone has it); skipped only where neither exists."""
    given = Path(os.environ.get("QG_BASELINE", bench_model.DEFAULT_BASELINE))
    if (given / "qg_tokenizer" / "modeling_qgvae.py").is_file():
        return given
    target = tmp_path_factory.mktemp("baseline")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE_COMMIT, "qg_tokenizer"], capture_output=True)
    if archive.returncode:
        pytest.skip(f"no baseline checkout and commit {BASELINE_COMMIT} is not in this repository's history")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


# ---------------------------------------------------------------------------------------- fast paths vs formulas
def test_token_projection_is_one_affine_map_per_head():
    torch.manual_seed(0)
    projection = QGVAETokenProjection(num_heads=3, in_features=5, out_features=4)
    torch.nn.init.normal_(projection.weight)
    torch.nn.init.normal_(projection.bias)
    x = torch.randn(2, 6, 5)  # 6 tokens, 2 per head
    head = torch.arange(6) // 2
    reference = torch.stack([x[:, c] @ projection.weight[head[c]] + projection.bias[head[c], 0] for c in range(6)], 1)
    torch.testing.assert_close(projection(x), reference)


@pytest.mark.parametrize("downsample", [False, True])
@pytest.mark.parametrize("num_position", [0, 4])
def test_residual_block_equals_the_formula_on_the_concatenated_conditioning(downsample, num_position):
    """The block projects `inputs` and `position` apart and folds the 2x2 pooling into its convolutions; the result
    and the gradients are those of `[avg_pool](conv(SiLU(GN(conv(SiLU(GN(x + W concat(inputs, position))))))) + W' x)`
    on plain NCHW tensors."""
    torch.manual_seed(0)
    block = QGVAEResidualBlock(8, 6, 5, 3 + num_position)
    x, inputs, grad = torch.randn(2, 8, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)
    position = torch.randn(1, num_position, 8, 8) if num_position else None
    cond = torch.cat((inputs, position.expand(2, -1, -1, -1)), 1) if num_position else inputs
    h = F.silu(block.norm1(x + block.cond_proj(cond)))
    reference = block.conv2(F.silu(block.norm2(block.conv1(h)))) + block.skip(x)
    if downsample:
        reference, grad = F.avg_pool2d(reference, 2), grad[..., ::2, ::2]
    reference_grads = torch.autograd.grad((reference * grad).sum(), list(block.parameters()))

    layout_position = preferred_layout(position) if num_position else None
    out = block(preferred_layout(x), preferred_layout(inputs), layout_position, downsample)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((out * grad).sum(), list(block.parameters()))
    for name, g, r in zip([n for n, _ in block.named_parameters()], grads, reference_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("factor", [2, 4])
def test_pooled_conv_weight_is_the_convolution_then_the_pooling(factor):
    torch.manual_seed(0)
    x, weight = torch.randn(2, 3, 16, 16), torch.randn(5, 3, 3, 3)
    reference = F.avg_pool2d(F.conv2d(x, weight, padding=1), factor)
    out = F.conv2d(x, pooled_conv_weight(weight, factor), stride=factor, padding=1)
    assert pooled_conv_weight(weight, factor).shape == (5, 3, factor + 2, factor + 2)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_preferred_layout_restrides_single_channel_images():
    image = torch.rand(2, 1, 6, 6)
    assert image.is_contiguous(memory_format=torch.channels_last)  # already, by the strides' rules
    out = preferred_layout(image)
    assert out.stride(1) == 1 and torch.equal(out, image)
    assert F.conv2d(out, torch.randn(4, 1, 3, 3), padding=1).is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------- today vs baseline
def test_loading_a_checkout_leaves_the_auto_classes_alone():
    baseline = bench_model.load_baseline(ROOT)  # this checkout, under another module name
    assert baseline.QGVAEModel is not QGVAEModel
    assert type(AutoModel.from_config(tiny_config())) is QGVAEModel
    with pytest.raises(ValueError, match="--baseline must be a qg-tokenizer checkout"):
        bench_model.load_baseline(ROOT / "tests")


def test_equivalence_check_fails_loudly_on_different_weights():
    models = bench_model.build_models({**TINY, "token_dropout_prob": 0.5}, bench_model.load_baseline(ROOT))
    pixel_values, token_mask = bench_model.seeded_inputs(models["today"], 4)
    assert bench_model.check_equivalence(models, pixel_values, token_mask)["gradient_max_relative"] == 0
    with torch.no_grad():
        models["today"].decoder.hourglass.out_proj.weight.mul_(1.01)
    with pytest.raises(RuntimeError, match="disagree: the loss differs"):
        bench_model.check_equivalence(models, pixel_values, token_mask)


@pytest.mark.parametrize("overrides", [{"token_dropout_prob": 0.5}, {"num_channels": 3, "downsample_factor": 2}])
def test_same_outputs_and_gradients_as_the_baseline(overrides, baseline_dir):
    models = bench_model.build_models({**TINY, **overrides}, bench_model.load_baseline(baseline_dir))
    assert models["today"].state_dict().keys() == models["baseline"].state_dict().keys()
    pixel_values, token_mask = bench_model.seeded_inputs(models["today"], 4)
    if overrides.get("token_dropout_prob"):
        assert 0 < token_mask.mean() < 1  # some suffixes dropped
    diffs = bench_model.check_equivalence(models, pixel_values, token_mask)
    assert diffs["token_ids_equal"] and diffs["reconstruction_max_abs"] < 1e-5
    assert diffs["loss_relative"] < 1e-6 and diffs["gradient_max_relative"] < 1e-4
    for model in models.values():  # and in eval mode, through the public entry points
        model.eval()
    with torch.no_grad():
        encoded = {side: m.encode(pixel_values) for side, m in models.items()}
        assert torch.equal(encoded["today"].token_ids, encoded["baseline"].token_ids)
        decoded = {side: m.decode(encoded["today"].token_ids, 3).pixel_values for side, m in models.items()}
    torch.testing.assert_close(decoded["today"], decoded["baseline"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the bench's rows
def test_measurement_row_ratios():
    row = bench_model.measurement_row(
        "p", "train_step_fp32", 4, {"baseline": 2.0, "today": 0.5}, {"baseline": 8e9, "today": 4e9}, peak=1e10
    )
    assert row["speedup"] == 4.0
    assert (row["baseline_gflops_per_image"], row["today_gflops_per_image"]) == (2.0, 1.0)
    assert row["baseline_fraction_of_matmul_peak"] == pytest.approx(0.4)
    assert row["today_fraction_of_matmul_peak"] == pytest.approx(0.8)
    seconds_only = bench_model.measurement_row("p", "train_step_bf16", 4, {"baseline": 1.0, "today": 2.0})
    assert seconds_only["speedup"] == 0.5 and "today_gflops_per_image" not in seconds_only


def test_timings_interleave_the_sides():
    calls = []
    medians = bench_model.interleaved_medians(
        {"baseline": lambda: calls.append("b"), "today": lambda: calls.append("t")}, repeats=3, warmup=1
    )
    assert calls == ["b", "t"] * 4 and medians.keys() == {"baseline", "today"}


def test_bench_writes_its_rows(tmp_path):
    threads = torch.get_num_threads()
    output = tmp_path / "bench_model.json"
    try:
        bench_model.main([
            "--baseline", str(ROOT), "--presets", "mnist-cpu", "--repeats", "1", "--batch-size", "4",
            "--encode-batch-size", "4", "--threads", "1", "--output", str(output),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    result = json.loads(output.read_text())
    assert result["threads"] == 1 and result["repeats"] == 1 and result["matmul_peak_gflops"] > 0
    (facts,) = result["models"]
    assert facts["preset"] == "mnist-cpu" and facts["bytes_per_image"] == 18 and facts["equivalence"]["token_ids_equal"]
    assert [(r["measurement"], r["batch_size"]) for r in result["rows"]] == [("train_step_fp32", 4), ("encode", 4)]
    peak = result["matmul_peak_gflops"] * 1e9
    for row in result["rows"]:
        assert row["speedup"] == pytest.approx(row["baseline_s"] / row["today_s"])
        assert row["today_gflops_per_image"] == pytest.approx(row["baseline_gflops_per_image"])  # the same code
        for side in bench_model.SIDES:
            flops = row[f"{side}_gflops_per_image"] * 1e9 * row["batch_size"]
            assert row[f"{side}_fraction_of_matmul_peak"] == pytest.approx(flops / row[f"{side}_s"] / peak)


def test_a_model_saved_by_the_baseline_code_loads_today(baseline_dir, tmp_path):
    """Checkpoints of the code before `tokenizer_utils.py` was folded into the modeling file load unchanged."""
    torch.manual_seed(1)
    baseline = bench_model.load_baseline(baseline_dir)
    old = baseline.QGVAEModel(baseline.QGVAEConfig(**tiny_config(token_dropout_prob=0.0).to_dict())).eval()
    old.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is QGVAEModel
    pixel_values = torch.rand(3, old.config.num_channels, old.config.image_size, old.config.image_size)
    with torch.no_grad():
        ids = old.encode(pixel_values).token_ids
        assert torch.equal(loaded.encode(pixel_values).token_ids, ids)
        torch.testing.assert_close(loaded.decode(ids, 2).pixel_values, old.decode(ids, 2).pixel_values)
