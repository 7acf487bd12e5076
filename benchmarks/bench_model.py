"""Model speed side by side: today's QG-VAE against the baseline commit's, in one process, interleaved.

    git worktree add --detach ../qg-baseline 716926a    # the baseline's code, checked out beside this checkout
    python benchmarks/bench_model.py --baseline ../qg-baseline [--presets mnist-cpu photos32-cpu cifar10-demo]
        [--threads 2] [--repeats 7] [--bf16] [--output benchmarks/results/bench_model.json]

For each preset: the fp32 training step at batch 32 (forward, backward, reset statistic, fused AdamW step, as
`training/train.py` runs it), optionally (`--bf16`) the same step under bf16 autocast, and `encode` at batch 256. Each
row gives both sides' median seconds, the speed-up (baseline / today), FLOPs per image (`torch.utils.flop_counter`;
the two sides differ where today's code skips work, e.g. pixels a pooling drops) and the fraction of a dense-matmul
peak measured in the same run on the same threads (the best of 20 runs of a 2048x2048 fp32 matmul); the bf16 rows
give seconds only (the peak is an fp32 one).

Side by side: both models live in this process and every repeat times one call of each (today, baseline, today,
baseline, ...), so both see the same machine state; under a loaded machine the ratios stay meaningful, the seconds do
not. The baseline's `qg_tokenizer` package is imported under another module name without running its `__init__`
(which would re-register the "qgvae" Auto classes to its own classes): only its modeling file and the flat siblings it
imports relatively are loaded. Both models get the same weights (`state_dict`), and before any timing the bench checks
that they compute the same loss, token ids, reconstruction and gradients (fp32, the same input and an explicit token
mask, so the random token dropout cannot differ); it stops with an error if they do not.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.flop_counter import FlopCounterMode

from qg_tokenizer import QGVAEConfig, QGVAEModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = ROOT.parent / "qg-baseline"  # where the docstring's `git worktree add` puts it
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "bench_model.json"
SIDES = ("baseline", "today")
# the equivalence check: relative differences (gradients relative to the largest of the parameter's own gradient
# and GRADIENT_FLOOR times the largest gradient of the model, so that gradients that are zero up to rounding pass)
LOSS_RTOL, RECONSTRUCTION_ATOL, GRADIENT_RTOL, GRADIENT_FLOOR = 1e-5, 1e-4, 1e-3, 1e-3


# ------------------------------------------------------------------------------------------------------- the models
def load_baseline(root: Path) -> ModuleType:
    """The `modeling_qgvae` module of the qg-tokenizer checkout at `root`, imported as a package of its own name.

    The package's `__init__` is not run (its Auto-class registration would override today's); the modeling file's
    relative imports load its configuration, quantizer and helpers from the same checkout.
    """
    package_dir = Path(root).resolve() / "qg_tokenizer"
    if not (package_dir / "modeling_qgvae.py").is_file():
        raise ValueError(
            f"--baseline must be a qg-tokenizer checkout (with qg_tokenizer/modeling_qgvae.py), got {root}"
        )
    name = "qg_tokenizer_baseline_" + hashlib.sha1(str(package_dir).encode()).hexdigest()[:8]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
        )
        sys.modules[name] = importlib.util.module_from_spec(spec)  # not executed: no Auto-class registration
    return importlib.import_module(f"{name}.modeling_qgvae")


def build_models(config_kwargs: dict, baseline: ModuleType, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Today's model and the baseline's for the same config fields, the baseline holding today's weights."""
    torch.manual_seed(seed)
    today = QGVAEModel(QGVAEConfig(**config_kwargs))
    other = baseline.QGVAEModel(baseline.QGVAEConfig(**config_kwargs))
    other.load_state_dict(today.state_dict())  # strict: the same keys and shapes
    return {"baseline": other, "today": today}


def seeded_inputs(model: QGVAEModel, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch `[B, ch, H, W]` in [0, 1] and a `[B, C]` token mask drawn as the training's token dropout."""
    config, generator = model.config, torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(
        batch_size, config.num_channels, config.image_size, config.image_size, generator=generator
    )
    return pixel_values, model.token_dropout_mask(batch_size, generator=generator)


def check_equivalence(
    models: dict[str, torch.nn.Module], pixel_values: torch.Tensor, token_mask: torch.Tensor
) -> dict[str, float]:
    """Run both models in training mode (fp32) on the same input and mask; raise `RuntimeError` unless loss, token ids,
    reconstruction and every gradient agree to float tolerance. Returns the differences found."""
    results = {}
    for side, model in models.items():
        model.train()
        model.zero_grad(set_to_none=True)
        output = model(pixel_values, token_mask=token_mask)
        output.loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results[side] = (output, grads)
        model.zero_grad(set_to_none=True)
    (base, base_grads), (today, today_grads) = results["baseline"], results["today"]
    if base_grads.keys() != today_grads.keys():
        raise RuntimeError(
            f"the two models have gradients for different parameters: {base_grads.keys() ^ today_grads.keys()}"
        )
    scale = max(g.abs().max().item() for g in base_grads.values())
    gradient_diffs = {
        name: ((today_grads[name] - g).abs().max() / g.abs().max().clamp_min(GRADIENT_FLOOR * scale)).item()
        for name, g in base_grads.items()
    }
    worst = max(gradient_diffs, key=gradient_diffs.get)
    diffs = {
        "loss_relative": abs(today.loss.item() - base.loss.item()) / abs(base.loss.item()),
        "reconstruction_max_abs": (today.reconstruction - base.reconstruction).abs().max().item(),
        "gradient_max_relative": gradient_diffs[worst],
        "token_ids_equal": bool(torch.equal(today.token_ids, base.token_ids)),
    }
    failures = []
    if diffs["loss_relative"] > LOSS_RTOL:
        failures.append(f"the loss differs by {diffs['loss_relative']:.2e} (relative) > {LOSS_RTOL}")
    if not diffs["token_ids_equal"]:
        failures.append("the token ids differ")
    if diffs["reconstruction_max_abs"] > RECONSTRUCTION_ATOL:
        failures.append(f"the reconstruction differs by {diffs['reconstruction_max_abs']:.2e} > {RECONSTRUCTION_ATOL}")
    if diffs["gradient_max_relative"] > GRADIENT_RTOL:
        failures.append(f"the gradient of {worst} differs by {diffs['gradient_max_relative']:.2e} > {GRADIENT_RTOL}")
    if failures:
        raise RuntimeError("today's model and the baseline's disagree: " + "; ".join(failures))
    return diffs


def train_step(model: torch.nn.Module, pixel_values: torch.Tensor, token_mask: torch.Tensor, bf16: bool) -> Callable:
    """One training step as `training/train.py` runs it: forward, backward, reset statistic, fused AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01, fused=True)

    def step() -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values, token_mask=token_mask).loss
        loss.backward()
        model.accumulate_reset_statistic()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def encode(model: torch.nn.Module, pixel_values: torch.Tensor) -> Callable:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model.encode(pixel_values)

    return run


# ------------------------------------------------------------------------------------------------------- measuring
def interleaved_medians(fns: dict[str, Callable], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed one call of each in turn (`repeats` rounds after `warmup` rounds)."""
    times: dict[str, list[float]] = {side: [] for side in fns}
    for round_index in range(warmup + repeats):
        for side, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_index >= warmup:
                times[side].append(time.perf_counter() - start)
    return {side: statistics.median(t) for side, t in times.items()}


def matmul_peak_flops(size: int = 2048, runs: int = 20) -> float:
    """FLOP/s of the best of `runs` dense `size x size` fp32 matmuls on the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def count_flops(fn: Callable) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measurement_row(
    preset: str,
    measurement: str,
    batch_size: int,
    seconds: dict[str, float],
    flops: dict[str, int] | None = None,
    peak: float | None = None,
) -> dict:
    """One row of the results: both sides' median seconds and the speed-up, and with `flops` (per call, each side) and
    `peak` (FLOP/s) the GFLOPs per image and the fraction of the matmul peak."""
    row = {
        "preset": preset,
        "measurement": measurement,
        "batch_size": batch_size,
        **{f"{side}_s": seconds[side] for side in SIDES},
        "speedup": seconds["baseline"] / seconds["today"],
    }
    if flops is not None:
        for side in SIDES:
            row[f"{side}_gflops_per_image"] = flops[side] / batch_size / 1e9
            row[f"{side}_fraction_of_matmul_peak"] = flops[side] / seconds[side] / peak
    return row


def bench_preset(
    preset: str,
    baseline: ModuleType,
    peak: float,
    batch_size: int = 32,
    encode_batch_size: int = 256,
    repeats: int = 7,
    bf16: bool = False,
    config_overrides: dict | None = None,
) -> tuple[dict, list[dict]]:
    """Check and time one preset; returns its model facts (with the equivalence differences) and its rows."""
    config_kwargs = {**QGVAEConfig.presets[preset], **(config_overrides or {})}
    models = build_models(config_kwargs, baseline)
    config = models["today"].config
    pixel_values, token_mask = seeded_inputs(models["today"], batch_size)
    equivalence = check_equivalence(models, pixel_values, token_mask)
    counts = {side: sum(p.numel() for p in m.parameters()) for side, m in models.items()}
    if counts["baseline"] != counts["today"]:
        raise RuntimeError(f"the two models have different parameter counts: {counts}")
    facts = {
        "preset": preset,
        "parameters": counts["today"],
        "bytes_per_image": config.bytes_per_image,
        "equivalence": equivalence,
    }
    rows = []
    steps = {side: train_step(m, pixel_values, token_mask, bf16=False) for side, m in models.items()}
    flops = {side: count_flops(step) for side, step in steps.items()}
    rows.append(
        measurement_row(preset, "train_step_fp32", batch_size, interleaved_medians(steps, repeats), flops, peak)
    )
    if bf16:
        steps = {side: train_step(m, pixel_values, token_mask, bf16=True) for side, m in models.items()}
        rows.append(measurement_row(preset, "train_step_bf16", batch_size, interleaved_medians(steps, repeats)))
    encode_inputs = seeded_inputs(models["today"], encode_batch_size, seed=1)[0]
    encodes = {side: encode(m, encode_inputs) for side, m in models.items()}
    flops = {side: count_flops(fn) for side, fn in encodes.items()}
    rows.append(
        measurement_row(preset, "encode", encode_batch_size, interleaved_medians(encodes, repeats), flops, peak)
    )
    return facts, rows


def git_commit(path: Path) -> str | None:
    """`HEAD` of the checkout at `path` (with `+dirty` when it has uncommitted changes), or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, check=True, text=True
        )
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, check=True, text=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def print_table(result: dict) -> None:
    print(f"dense fp32 matmul peak: {result['matmul_peak_gflops']:.1f} GFLOP/s on {result['threads']} threads")
    for facts in result["models"]:
        eq = facts["equivalence"]
        print(
            f"{facts['preset']}: {facts['parameters']:,} parameters, same outputs (loss {eq['loss_relative']:.1e} rel, "
            f"reconstruction {eq['reconstruction_max_abs']:.1e} abs, gradients {eq['gradient_max_relative']:.1e} rel)"
        )
    print(f"{'preset':14} {'measurement':16} {'batch':>5} {'baseline':>9} {'today':>9} {'speed-up':>8} "
          f"{'GFLOP/img base/today':>21} {'% peak base/today':>18}")  # fmt: skip
    for r in result["rows"]:
        seconds = f"{r['baseline_s']:>8.3f}s {r['today_s']:>8.3f}s {r['speedup']:>7.2f}x"
        line = f"{r['preset']:14} {r['measurement']:16} {r['batch_size']:>5} {seconds}"
        if "today_gflops_per_image" in r:
            gflops = f"{r['baseline_gflops_per_image']:.3f}/{r['today_gflops_per_image']:.3f}"
            peak = f"{100 * r['baseline_fraction_of_matmul_peak']:.1f}/{100 * r['today_fraction_of_matmul_peak']:.1f}%"
            line += f" {gflops:>21} {peak:>18}"
        print(line)
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline", type=Path, default=DEFAULT_BASELINE,
        help="a checkout of the baseline commit, e.g. `git worktree add --detach ../qg-baseline 716926a`",
    )  # fmt: skip
    parser.add_argument("--presets", nargs="+", default=["mnist-cpu", "photos32-cpu", "cifar10-demo"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encode-batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time the training step under bf16 autocast")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.presets) - set(QGVAEConfig.presets))
    if unknown:
        parser.error(f"unknown presets {unknown}; available: {sorted(QGVAEConfig.presets)}")

    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline)
    peak = matmul_peak_flops()
    models, rows = [], []
    for preset in args.presets:
        facts, preset_rows = bench_preset(
            preset, baseline, peak, args.batch_size, args.encode_batch_size, args.repeats, args.bf16
        )
        models.append(facts)
        rows.extend(preset_rows)
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "today_commit": git_commit(ROOT),
        "baseline_commit": git_commit(args.baseline),
        "matmul_peak_gflops": peak / 1e9,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "models": models,
        "rows": rows,
    }
    print_table(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
