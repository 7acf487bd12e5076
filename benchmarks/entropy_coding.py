"""Entropy-coded tokens (issue 12): the autoregressive prior as a lossless coder of QG-VAE token ids.

    nohup python benchmarks/entropy_coding.py priors > outputs/entropy-coding.log 2>&1 &
    python benchmarks/entropy_coding.py measure [--update-readme]

`priors` tokenises each benchmark's images with the tokenizer `benchmarks/converged.py` trained (MNIST, 16 tokens x 9
bits = 18 bytes; `photo_set`, 64 tokens x 9 bits = 72 bytes) and trains an unconditional prior on the training tokens
with `training/train_prior.py` (the two side by side, one thread each), evaluated on a validation split (MNIST: the
last 1,000 training digits; photo_set: 1,000 fresh crops of the training photos); the test split is only measured.
Runs resume and are reused as in the other benchmarks (`common.reusable_run`).

`measure` compresses the test images with and without the prior and writes `benchmarks/results/entropy_coding.json`,
the figure `benchmarks/results/figures/entropy_coding_rate_distortion.png` and, with `--update-readme`, the README
block.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # demo.run_training

from common import reusable_run  # noqa: E402
from demo import REPO_ROOT, TRAIN_PRIOR_SCRIPT, run_training  # noqa: E402

from qg_tokenizer.data import load_embedded_mnist, load_npz_dataset, load_photos, photo_crop_dataset  # noqa: E402
from qg_tokenizer.tokenize import load_tokenizer, tokenize_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "entropy_coding.json"
PRIOR_CONFIG = REPO_ROOT / "training" / "configs" / "prior-mnist.yaml"
PHOTO_SET = REPO_ROOT.parent / "shared" / "data" / "photo_set.npz"


@dataclass(frozen=True)
class Benchmark:
    name: str
    tokenizer: Path  # trained by benchmarks/converged.py
    prior_steps: int
    # "offset" for C*K ids (best on MNIST in benchmarks/prior.py); "shared" keeps the 64-token output layer small
    vocab_layout: str
    prior_model: tuple[str, ...] = ()  # more train_prior.py overrides (the model size)


BENCHMARKS = {
    # 9,000 digits: a small prior, trained briefly (a 7.6M-parameter one for 4,000 steps overfits from step 500 on)
    "mnist": Benchmark(
        "mnist", REPO_ROOT / "outputs" / "converged" / "mnist-qgvae", 1500, "offset",
        ("model.hidden_size=128", "model.num_hidden_layers=3", "model.intermediate_size=384", "batch_size=32",
         "eval_every=250"),
    ),  # fmt: skip
    "photo_set": Benchmark("photo_set", REPO_ROOT / "outputs" / "converged" / "photo_set-qgvae", 2500, "shared"),
}
NUM_PHOTO_CROPS, NUM_VALIDATION = 40_000, 1000


def image_splits(name: str) -> datasets.DatasetDict:
    """train / validation / test images of a benchmark (validation from the training images, never the test)."""
    if name == "mnist":
        mnist = load_embedded_mnist()
        cut = len(mnist["train"]) - NUM_VALIDATION
        return datasets.DatasetDict(
            train=mnist["train"].select(range(cut)),
            validation=mnist["train"].select(range(cut, len(mnist["train"]))),
            test=mnist["test"],
        )
    photos = list(load_photos(PHOTO_SET).values())
    return datasets.DatasetDict(
        train=photo_crop_dataset(photos, 32, NUM_PHOTO_CROPS, seed=1),
        validation=photo_crop_dataset(photos, 32, NUM_VALIDATION, seed=2),
        test=load_npz_dataset(PHOTO_SET)["test"],
    )


def token_splits(bench: Benchmark, workdir: Path) -> Path:
    """The folder of `bench`'s tokenised splits (made once per tokenizer)."""
    folder = workdir / f"tokens-{bench.name}"
    if not (folder / "dataset_dict.json").is_file():
        splits = tokenize_dataset(image_splits(bench.name), *load_tokenizer(bench.tokenizer), keep_columns=[])
        splits.save_to_disk(folder)
    return folder


def prior_overrides(bench: Benchmark, tokens: Path) -> list[str]:
    return [
        f"tokens={tokens}", f"tokenizer={bench.tokenizer}", "label_column=null", "data.train_split=train",
        "data.eval_split=validation", f"model.vocab_layout={bench.vocab_layout}", "model.class_dropout_prob=0.0",
        f"max_steps={bench.prior_steps}", "max_train_time=null", "report_to=none", "samples_per_class=16",
        *bench.prior_model,
    ]  # fmt: skip


def train_prior(bench: Benchmark, workdir: Path) -> dict:
    tokens = token_splits(bench, workdir)
    run, overrides = workdir / f"prior-{bench.name}", prior_overrides(bench, tokens)
    record = {"config": str(PRIOR_CONFIG.relative_to(REPO_ROOT)), "overrides": overrides}
    results = reusable_run(run, workdir / "configs" / f"{run.name}.yaml", record)
    if results is None:
        results = run_training(
            run, [*overrides, "--resume", "latest"], PRIOR_CONFIG, num_threads=1,
            log_file=workdir / f"{run.name}.log", script=TRAIN_PRIOR_SCRIPT,
        )  # fmt: skip
    return results


def priors(workdir: Path) -> None:
    for bench in BENCHMARKS.values():  # tokenise first (both cores), then train side by side
        token_splits(bench, workdir)
    with ThreadPoolExecutor(len(BENCHMARKS)) as pool:
        for bench, results in zip(BENCHMARKS.values(), pool.map(train_prior, BENCHMARKS.values(), [workdir] * 2)):
            print(f"{bench.name}: {results['eval']['bits_per_image']:.2f} bits/image on validation")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["priors", "measure"])
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "outputs" / "entropy-coding")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    if args.stage == "priors":
        priors(args.workdir)


if __name__ == "__main__":
    main()
