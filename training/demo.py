"""The main job: train the `mnist-demo` QG-VAE on the packaged MNIST digits on a CPU in under ten minutes.

    python training/demo.py [--output_dir outputs/demo] [key=value ...]   # or: make demo

It runs the training script beside it, `training/train.py --config training/configs/mnist-demo.yaml` (part of the
source checkout, like this file), which stops at the config's wall-clock budget (`max_train_time`), then writes to
the output folder:
`reconstructions.png` (test digits over their reconstructions), `progressive.png` (decoding from the first
1, 2, 4, 8, 16 tokens), `codebook_usage.png` (codeword usage and test PSNR over training), plus the trained model
(`save_pretrained`), its model card and `results.json`. It prints the final test PSNR, SSIM and bytes per image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from common import run_folder
from transformers import AutoImageProcessor, AutoModel

from qg_tokenizer.data import EMBEDDED_MNIST, load_image_dataset
from qg_tokenizer.visualize import READABLE_WIDTH, image_grid, progressive_grid, save_grid

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
TRAIN_PRIOR_SCRIPT = REPO_ROOT / "training" / "train_prior.py"
DEMO_CONFIG = REPO_ROOT / "training" / "configs" / "mnist-demo.yaml"


def run_training(
    output_dir: str | Path, overrides: list[str] = (), config: str | Path | None = DEMO_CONFIG,
    num_threads: int | None = None, log_file: str | Path | None = None, script: Path = TRAIN_SCRIPT,
) -> dict:  # fmt: skip
    """Run `script [--config config] output_dir=... *overrides` in a fresh process; returns `results.json`.

    `script` is `training/train.py` (tokenizers) or `TRAIN_PRIOR_SCRIPT` (`training/train_prior.py`, the prior).

    One process, as `accelerate launch` starts on a machine without GPUs. OpenMP threads sleep instead of spinning
    while they wait (`OMP_WAIT_POLICY=PASSIVE`, unless set): spinning threads slow training many times over when
    other jobs share the cores. `num_threads` caps the process's intra-op threads (`OMP_NUM_THREADS`), so that
    several runs can share the cores side by side; `log_file` takes its output instead of the terminal.
    """
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: the training scripts are part of the source checkout")
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if num_threads is not None:
        env["OMP_NUM_THREADS"] = str(num_threads)
    config_args = [] if config is None else ["--config", str(config)]
    command = [sys.executable, str(script), *config_args, f"output_dir={output_dir}", *overrides]
    with open(log_file, "w") if log_file else contextlib.nullcontext() as log:
        completed = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
    if completed.returncode:
        where = f"; see {log_file}" if log_file else ""
        raise RuntimeError(f"training into {output_dir} failed (exit {completed.returncode}){where}")
    return json.loads((Path(output_dir) / "results.json").read_text())


def plot_training_curves(results: dict, path: str | Path) -> None:
    """PNG of the codeword usage (fraction of each token's codebook chosen in the training batches since the previous
    evaluation: mean over tokens and worst token) and of the test PSNR over training, with the final usage over the
    whole training set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = results["history"]
    steps = [h["step"] for h in history]
    # a window much shorter than the others (the last one, cut by the time budget) cannot show full usage
    windows = [h for h in history if h["train_usage_images"] >= 0.5 * max(h["train_usage_images"] for h in history)]
    window_steps = [h["step"] for h in windows]
    fig, (usage_ax, psnr_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    usage_ax.plot(window_steps, [h["train_usage_mean"] for h in windows], "o-", label="mean over tokens (window)")
    usage_ax.plot(window_steps, [h["train_usage_min"] for h in windows], "s--", label="worst token (window)")
    final = results["train_set_usage"]
    usage_ax.plot([steps[-1]], [final["usage_min"]], "k*", markersize=12, label="worst token, whole train set")
    usage_ax.set(xlabel="step", ylabel="fraction of codewords in use", ylim=(0, 1.02), title="codebook usage")
    usage_ax.legend(loc="lower right", fontsize=8)
    psnr_ax.plot(steps, [h["psnr"] for h in history], "o-")
    psnr_ax.set(xlabel="step", ylabel="test PSNR (dB)", title="reconstruction")
    for ax in (usage_ax, psnr_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def write_figures(output_dir: str | Path, num_images: int = 16) -> None:
    """Reconstruction and progressive-decoding grids of the first test digits, from the saved model folder, with
    labelled rows and at least `READABLE_WIDTH` px wide."""
    output_dir = Path(output_dir)
    model = AutoModel.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    images = list(load_image_dataset(EMBEDDED_MNIST, "test").select(range(num_images))["image"])
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    reconstruction = model.decode(model.encode(pixel_values).token_ids).pixel_values
    labels = ["input", f"reconstruction ({model.config.bytes_per_image} bytes)"]
    grid = image_grid([pixel_values, reconstruction], row_labels=labels, min_width=READABLE_WIDTH)
    save_grid(grid, output_dir / "reconstructions.png")  # labelled rows, the labels also as PNG text chunks
    save_grid(progressive_grid(model, pixel_values[: num_images // 2]), output_dir / "progressive.png")


def clear_previous_run(output_dir: str | Path) -> None:
    """`make demo` trains afresh every time: a previous run's output folder and run folder (its checkpoints, beside
    it) are removed, with a note; a folder that holds something other than a training run is refused."""
    output_dir, run_dir = Path(output_dir), run_folder(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / "train_config.json").is_file():
        raise SystemExit(f"error: {output_dir} exists and is not a training run's folder: pick another --output_dir")
    if output_dir.exists() or run_dir.exists():
        print(f"note: replacing the previous run in {output_dir}", flush=True)
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="mnist-demo.yaml overrides")
    args = parser.parse_args(argv)
    clear_previous_run(args.output_dir)
    results = run_training(args.output_dir, args.overrides)
    write_figures(args.output_dir)
    plot_training_curves(results, Path(args.output_dir) / "codebook_usage.png")
    final, usage = results["eval"], results["train_set_usage"]
    print(
        f"\nQG-VAE mnist-demo: {results['step']} steps in {results['train_time'] / 60:.1f} min "
        f"({results['seconds_per_step']:.2f} s/step)\n"
        f"  test PSNR {final['psnr']:.2f} dB, SSIM {final['ssim']:.3f} on {final['num_images']} test digits\n"
        f"  {results['bytes_per_image']} bytes per image\n"
        f"  codewords in use over the {usage['num_images']} training digits: mean {usage['usage_mean']:.1%}, "
        f"worst token {usage['usage_min']:.1%}\n"
        f"  figures and model in {args.output_dir}/"
    )
    return results


if __name__ == "__main__":
    main()
