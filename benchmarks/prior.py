"""The autoregressive prior on QG-VAE tokens versus patch VQ-VAE tokens (issue 5 part 5), embedded MNIST, 18 bytes.

    python benchmarks/prior.py [--qgvae DIR] [--patch DIR] [--tokenizer-steps 2000] [--prior-steps 3000] \
        [--layouts offset shared] [--samples-per-class 100] [--guidance 1 2 3] [--update-readme]

1. Tokenizers: `--qgvae` / `--patch` checkpoints, or trained here with `training/train.py` (the `mnist-demo` config
   for QG-VAE, the `mnist-cpu` preset for the patch VQ-VAE: both 16 tokens x 9 bits), then the embedded digits are
   tokenised with `tokenize_dataset` (train 9,000 / test 1,000).
2. (a) The same prior (`training/configs/prior-mnist.yaml`, same steps and seed) trained with `training/train_prior.py`
   on each tokenizer's tokens and in each vocabulary layout (`--jobs` runs side by side, one thread each): held-out
   bits per image (lower is better; uniform is 16 * 9 = 144). The layout with the fewer bits on QG-VAE tokens is
   "chosen" and used for (b) and (c) for both tokenizers.
3. (b) Class-conditional samples of each tokenizer's prior in the chosen layout, with every guidance scale: accuracy
   of a small CNN trained here on the 9,000 training digits (does the sample show the requested digit?) and a
   Frechet distance on that CNN's 128-d features against the 1,000 test digits (a "classifier FID": NOT comparable
   to published Inception FIDs). The tokenizer's own test reconstructions give the floor of that distance.
4. (c) Sampling speed (images/s, whole batches of `--speed-batch` images) with the KV cache versus without, timed
   alternately.

Everything goes to `--workdir` (default outputs/bench-prior). Tokenizers and priors trained there are reused when
their run finished with the same settings (recorded in `configs/`), go on from their newest checkpoint when it was
interrupted, and are deleted (with a note) and trained again when it had other settings (`common.reusable_run`); the
tokens of a tokenizer trained again are made again, and its priors trained again. The numbers go to
benchmarks/results/prior.json and a markdown table to stdout; `--update-readme` rewrites README.md's generation block
from that JSON (`render_prior`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # demo.run_training

from common import reusable_run  # noqa: E402
from demo import DEMO_CONFIG, TRAIN_PRIOR_SCRIPT, run_training  # noqa: E402
from readme_blocks import replace_block  # noqa: E402

from qg_tokenizer import PATCH_VQVAE_PRESETS, QGPriorForCausalLM, QGVAEPipeline  # noqa: E402
from qg_tokenizer.data import MNIST_NUM_TRAIN, MNIST_PATH, load_embedded_mnist  # noqa: E402
from qg_tokenizer.tokenize import load_tokenizer, tokenize_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRIOR_CONFIG = REPO / "training" / "configs" / "prior-mnist.yaml"
README_START, README_END = "<!-- prior:start -->", "<!-- prior:end -->"
TARGET_ACCURACY = 0.8
NAMES = {"qgvae": "QG-VAE", "patch": "patch VQ-VAE"}


class DigitClassifier(nn.Module):
    """Small CNN on `[B, 1, 28, 28]` in [0, 1]; `features` gives the 128-d penultimate activations."""

    num_features = 128  # read by torchmetrics' FID

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(self.num_features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.convs(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ClassifierFeatures(nn.Module):
    """The classifier's feature extractor as the `feature` module of torchmetrics' `FrechetInceptionDistance`."""

    num_features = DigitClassifier.num_features

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def mnist_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded digits as float `[N, 1, 28, 28]` in [0, 1] and labels: train (9,000) and test (1,000)."""
    with np.load(MNIST_PATH) as npz:
        images = torch.from_numpy(npz["images"]).float().div(255).unsqueeze(1)
        labels = torch.from_numpy(npz["labels"]).long()
    return images[:MNIST_NUM_TRAIN], labels[:MNIST_NUM_TRAIN], images[MNIST_NUM_TRAIN:], labels[MNIST_NUM_TRAIN:]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3) -> DigitClassifier:
    torch.manual_seed(0)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images)).split(128):
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([classifier(batch).argmax(-1) for batch in images.split(500)])
    return (predictions == labels).float().mean().item()


@torch.no_grad()
def classifier_fid(classifier: DigitClassifier, real: torch.Tensor, fake: torch.Tensor) -> float:
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=True)
    for batch in real.split(500):
        fid.update(batch, real=True)
    for batch in fake.split(500):
        fid.update(batch, real=False)
    return fid.compute().item()


def tokenizer_run(name: str, steps: int) -> tuple[Path | None, list[str]]:
    """The training/train.py config file and overrides of the QG-VAE (`mnist-demo` config) or the patch VQ-VAE
    (`mnist-cpu` preset)."""
    common = [f"max_steps={steps}", "max_train_time=null", "report_to=none"]
    if name == "qgvae":
        return DEMO_CONFIG, common
    # TrainConfig defaults (lr 2e-4), the patch model's mnist-cpu preset
    model = ["model.model_type=patch_vqvae"] + [
        f"model.{key}={json.dumps(value)}" for key, value in PATCH_VQVAE_PRESETS["mnist-cpu"].items()
    ]
    return None, [*model, *common, "batch_size=32", "eval_every=500", "max_eval_samples=500"]


def run_record(config: Path | None, overrides: list[str], **inputs) -> dict:
    """What a run of `config` and `overrides` is, for `reusable_run`: the config file's keys, the overrides and the
    `inputs` it was trained from (the record of the tokenizer a prior's tokens came from)."""
    return {"config": yaml.safe_load(config.read_text()) if config else None, "overrides": overrides, **inputs}


@torch.no_grad()
def reconstructions(tokenizer, images: torch.Tensor) -> torch.Tensor:
    decoded = [tokenizer.decode(tokenizer.encode(batch).token_ids).pixel_values for batch in images.split(250)]
    return torch.cat(decoded).clamp(0, 1)


def sampling_speed(prior: QGPriorForCausalLM, batch: int, repeats: int) -> dict[str, float]:
    """Images per second of `generate_image_tokens` with and without the KV cache, timed alternately (median)."""
    labels = torch.arange(batch) % prior.config.num_classes
    times = {True: [], False: []}
    for round_ in range(repeats + 1):
        for use_cache in times:
            start = time.perf_counter()
            prior.generate_image_tokens(labels, use_cache=use_cache, generator=torch.Generator().manual_seed(round_))
            if round_:  # the first round warms up
                times[use_cache].append(time.perf_counter() - start)
    cached, uncached = (batch / statistics.median(times[c]) for c in (True, False))
    return {"images_per_s_kv_cache": cached, "images_per_s_no_cache": uncached, "speedup": cached / uncached}


def choose_layout(bits: dict) -> str:
    """The vocabulary layout with the fewest held-out bits per image on QG-VAE tokens."""
    layouts = {key.split("/")[1]: value["bits_per_image"] for key, value in bits.items() if key.startswith("qgvae/")}
    return min(layouts, key=layouts.get)


def evaluate_claims(results: dict) -> list[dict]:
    """Issue 5's targets as rows: QG-VAE tokens cost the prior fewer bits than patch tokens; guided samples show the
    requested digit at least 80% of the time."""
    bits = results["bits_per_image"]
    claims = []
    for layout in results["layouts"]:
        qg, patch = bits[f"qgvae/{layout}"]["bits_per_image"], bits[f"patch/{layout}"]["bits_per_image"]
        claims.append({
            "claim": f"the prior needs fewer held-out bits per image on QG-VAE tokens than on patch tokens ({layout} "
                     "layout, same prior and steps)",
            "measured": f"{qg:.2f} vs {patch:.2f} bits",
            "holds": qg < patch,
        })  # fmt: skip
    best = {
        name: min((bits[f"{name}/{layout}"]["bits_per_image"], layout) for layout in results["layouts"])
        for name in ("qgvae", "patch")
    }
    claims.append({
        "claim": "... and with each tokenizer's tokens in its own best layout",
        "measured": ", ".join(f"{NAMES[name]} {value:.2f} bits ({layout})" for name, (value, layout) in best.items()),
        "holds": best["qgvae"][0] < best["patch"][0],
    })  # fmt: skip
    for name, entry in results["samples"].items():
        scales = [k for k in entry if k.startswith("guidance_")]
        guided = [entry[k]["accuracy"] for k in scales if float(k.removeprefix("guidance_")) > 1]
        claims.append({
            "claim": f"guided class-conditional samples ({NAMES[name]} tokens) show the requested digit "
                     f">= {TARGET_ACCURACY:.0%} of the time",
            "measured": ", ".join(f"scale {k.removeprefix('guidance_')}: {entry[k]['accuracy']:.1%}" for k in scales),
            "holds": max(guided, default=0.0) >= TARGET_ACCURACY,
        })  # fmt: skip
    return claims


def render_prior(results: dict) -> str:
    """The README generation block, from the results JSON only."""
    mark = {True: "yes", False: "**no**"}
    lines = [
        README_START,
        f"Generated by `{results['command']}` from `benchmarks/results/prior.json` ({results['machine']['cpus']}-core "
        f"CPU). Prior: {results['prior_parameters']:,} parameters, {results['prior_steps']} steps on each tokenizer's "
        f"tokens of the 9,000 training digits; held-out: the 1,000 test digits (uniform: "
        f"{results['uniform_bits_per_image']:.0f} bits). Vocabulary layout chosen: **{results['chosen_layout']}** "
        "(fewer held-out bits on QG-VAE tokens).",
        "",
        "| tokens (test PSNR of the tokenizer) | layout | held-out bits/image | given the null token |",
        "|---|---|---|---|",
    ]
    for key, value in results["bits_per_image"].items():
        name, layout = key.split("/")
        lines.append(f"| {NAMES[name]} ({results['tokenizers'][name]['psnr']:.2f} dB) | {layout} | "
                     f"{value['bits_per_image']:.2f} | {value['bits_per_image_null']:.2f} |")  # fmt: skip
    lines += [
        "",
        f"Samples ({results['samples_per_class']} per digit) judged by a small CNN trained on the 9,000 training "
        f"digits (test accuracy {results['classifier_test_accuracy']:.1%}); \"classifier FID\": Frechet distance on "
        "its 128-d features against the 1,000 test digits, **not comparable to published FIDs** (training vs test "
        f"digits: {results['classifier_fid_train_vs_test']:.2f}).",
        "",
        "| tokens | guidance scale | accuracy | classifier FID | sampling img/s, KV cache / none |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["samples"].items():
        speed = entry["speed"]
        lines.append(f"| {NAMES[name]} reconstructions | - | - | {entry['reconstruction_fid']:.2f} | "
                     f"{speed['images_per_s_kv_cache']:.0f} / {speed['images_per_s_no_cache']:.0f} "
                     f"({speed['speedup']:.1f}x) |")  # fmt: skip
        for key in (k for k in entry if k.startswith("guidance_")):
            lines.append(f"| {NAMES[name]} | {key.removeprefix('guidance_')} | {entry[key]['accuracy']:.1%} | "
                         f"{entry[key]['classifier_fid']:.2f} | |")  # fmt: skip
    lines += ["", "| claim | measured | holds |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']} | {mark[c['holds']]} |" for c in results["claims"]]
    return "\n".join([*lines, README_END])


def write_results(results: dict, path: Path, update_readme: bool) -> None:
    """Write the JSON, print the README block and, with `update_readme`, put it into README.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    block = render_prior(results)
    print(block)
    if update_readme:
        replace_block(block, README_START, README_END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qgvae", type=Path, help="a trained QG-VAE folder (default: train one in the workdir)")
    parser.add_argument("--patch", type=Path, help="a trained patch VQ-VAE folder (default: train one)")
    parser.add_argument("--tokenizer-steps", type=int, default=2000)
    parser.add_argument("--prior-steps", type=int, default=3000)
    parser.add_argument("--layouts", nargs="+", default=["offset", "shared"], choices=["offset", "shared"])
    parser.add_argument("--prior-overrides", nargs="*", default=[], help="more train_prior.py key=value overrides")
    parser.add_argument("--samples-per-class", type=int, default=100)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--speed-batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench-prior")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "prior.json")
    parser.add_argument("--jobs", type=int, default=2, help="priors trained side by side, one thread each")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README.md's generation block")
    parser.add_argument("--render-only", action="store_true", help="re-derive claims and README block from --output")
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads(args.output.read_text())
        results["claims"] = evaluate_claims(results)
        write_results(results, args.output, args.update_readme)
        return
    command = " ".join(["python benchmarks/prior.py", *(argv if argv is not None else sys.argv[1:])])
    datasets.disable_progress_bars()
    train_images, train_labels, test_images, test_labels = mnist_tensors()

    tokenizers, tokenizer_records = {}, {}
    for name, given in (("qgvae", args.qgvae), ("patch", args.patch)):
        path = given or args.workdir / f"tokenizer-{name}"
        tokens = args.workdir / f"tokens-{name}"
        if given is not None:  # used as it is: never trained, resumed or deleted here
            if not (given / "results.json").is_file():
                raise SystemExit(f"--{name}: {given} is not a folder trained by training/train.py (no results.json)")
            tokenizer_records[name] = None  # its path is in the prior's overrides
        else:
            config, overrides = tokenizer_run(name, args.tokenizer_steps)
            tokenizer_records[name] = run_record(config, overrides)
            record = args.workdir / "configs" / f"{path.name}.yaml"
            if reusable_run(path, record, tokenizer_records[name]) is None:
                shutil.rmtree(tokens, ignore_errors=True)  # made by the tokenizer this run replaces, if any
                run_training(path, [*overrides, "--resume", "latest"], config)
        tokenizers[name] = path
        if not (tokens / "dataset_dict.json").is_file():
            tokenize_dataset(load_embedded_mnist(), *load_tokenizer(path), keep_columns=["label"]).save_to_disk(tokens)

    results = {
        "command": command, "prior_steps": args.prior_steps, "layouts": args.layouts,
        "samples_per_class": args.samples_per_class,
        "tokenizers": {
            name: {"path": str(path), "psnr": json.loads((path / "results.json").read_text())["eval"]["psnr"]}
            for name, path in tokenizers.items()
        },
        "bits_per_image": {}, "samples": {},
    }  # fmt: skip

    def train(key: tuple[str, str]) -> dict:
        name, layout = key
        run = args.workdir / f"prior-{name}-{layout}"
        overrides = [
            f"tokens={args.workdir / f'tokens-{name}'}", f"tokenizer={tokenizers[name]}",
            f"model.vocab_layout={layout}", f"max_steps={args.prior_steps}", "max_train_time=null",
            "report_to=none", *args.prior_overrides,
        ]  # fmt: skip
        record = run_record(PRIOR_CONFIG, overrides, tokenizer=tokenizer_records[name])
        results = reusable_run(run, args.workdir / "configs" / f"{run.name}.yaml", record)
        if results is None:
            results = run_training(run, [*overrides, "--resume", "latest"], PRIOR_CONFIG, num_threads=1,
                                   log_file=args.workdir / f"{run.name}.log", script=TRAIN_PRIOR_SCRIPT)  # fmt: skip
        return results

    keys = [(name, layout) for name in tokenizers for layout in args.layouts]
    with ThreadPoolExecutor(args.jobs) as pool:
        for (name, layout), run_results in zip(keys, pool.map(train, keys)):
            results["bits_per_image"][f"{name}/{layout}"] = {
                key: run_results["eval"][key] for key in ("bits_per_image", "bits_per_image_null")
            } | {"train_time": run_results["train_time"], "steps": run_results["step"]}
            results["prior_parameters"] = run_results["num_parameters"]
            results["uniform_bits_per_image"] = run_results["uniform_bits_per_image"]
    results["chosen_layout"] = choose_layout(results["bits_per_image"])
    priors = {name: args.workdir / f"prior-{name}-{results['chosen_layout']}" for name in tokenizers}

    classifier = train_classifier(train_images, train_labels)
    results["classifier_test_accuracy"] = accuracy(classifier, test_images, test_labels)
    results["classifier_fid_train_vs_test"] = classifier_fid(classifier, test_images, train_images[:1000])
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    for name, run in priors.items():
        pipe = QGVAEPipeline.from_pretrained(run / "pipeline")
        entry = {"layout": pipe.prior.config.vocab_layout}
        entry["reconstruction_fid"] = classifier_fid(classifier, test_images, reconstructions(pipe.vqvae, test_images))
        for scale in args.guidance:
            images = pipe(
                labels.tolist(), guidance_scale=scale, generator=torch.Generator().manual_seed(0), output_type="pt"
            ).images
            entry[f"guidance_{scale:g}"] = {
                "accuracy": accuracy(classifier, images, labels),
                "classifier_fid": classifier_fid(classifier, test_images, images),
            }
        entry["speed"] = sampling_speed(pipe.prior, args.speed_batch, args.repeats)
        results["samples"][name] = entry

    results["claims"] = evaluate_claims(results)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    write_results(results, args.output, args.update_readme)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
