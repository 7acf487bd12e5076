"""Tokenising throughput: `tokenize_dataset` against raw `model.encode` on the same images, and compression speed.

    python benchmarks/bench_tokenize.py [--preset mnist-cpu] [--num-images 2000] [--block-size 500] [--repeats 3]

The model is an untrained preset (throughput does not depend on the weights); the images are the embedded MNIST
training digits. Three ways to get token ids, taking turns every `--block-size` images so that load from other jobs
hits all of them alike:

- `raw encode`: `model.encode` on pixel values prepared beforehand (the ceiling);
- `loop`: a plain Python loop that decodes the PNGs, runs the image processor and encodes;
- `tokenize_dataset`: the library path (`Dataset.map`, Arrow in and out).

Target: `tokenize_dataset` keeps >= 85% of the raw encode throughput, judged by the median over blocks of the paired
ratio raw-encode time / tokenize_dataset time (robust to load that changes during the run; the ratio of the totals
is printed too). Compression is timed as `model.compress` / `model.decompress` (encode/decode included) and as the
byte packing alone (`codec.encode_batch` / `decode_batch`).
Writes benchmarks/results/tokenize.json. (Named `bench_tokenize.py`: a script called `tokenize.py` would shadow the
standard library's `tokenize` module, which Python imports at start-up, when run as `python benchmarks/tokenize.py`.)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch

from qg_tokenizer import QGVAEConfig, QGVAEImageProcessor, QGVAEModel
from qg_tokenizer.codec import decode_batch, encode_batch
from qg_tokenizer.data import load_embedded_mnist
from qg_tokenizer.tokenize import encode_images, tokenize_dataset


def interleaved_seconds(
    functions: dict[str, Callable[[int], object]], num_blocks: int, repeats: int
) -> dict[str, np.ndarray]:
    """Seconds `[repeats, num_blocks]` each function takes on each block.

    The functions take turns block by block, in an order rotated every block, so that load from other jobs on the
    machine hits them alike; the times of one block are taken within seconds of each other.
    """
    names = list(functions)
    seconds = {name: np.zeros((repeats, num_blocks)) for name in names}
    for repeat in range(repeats):
        for block in range(num_blocks):
            shift = (repeat + block) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                functions[name](block)
                seconds[name][repeat, block] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist-cpu")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=500, help="images per turn of each timed path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compress-images", type=int, default=256, help="images for the compression timings")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "tokenize.json")
    args = parser.parse_args()

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    config = QGVAEConfig.from_preset(args.preset)
    model = QGVAEModel(config).eval()
    processor = QGVAEImageProcessor.from_model_config(config)
    dataset = load_embedded_mnist()["train"].select(range(args.num_images))
    pixel_values = processor(list(dataset["image"]), return_tensors="pt")["pixel_values"]
    starts = range(0, args.num_images, args.block_size)
    blocks = [dataset.select(range(i, min(i + args.block_size, args.num_images))) for i in starts]

    @torch.inference_mode()
    def raw_encode(block: int) -> torch.Tensor:
        chunk = pixel_values[starts[block] : starts[block] + args.block_size]
        return torch.cat([model.encode(batch).token_ids for batch in chunk.split(args.batch_size)])

    def loop(block: int) -> torch.Tensor:
        images = list(blocks[block]["image"])  # decodes the PNGs
        return torch.cat([
            encode_images(model, processor, images[i : i + args.batch_size])
            for i in range(0, len(images), args.batch_size)
        ])  # fmt: skip

    def dataset_path(block: int) -> datasets.Dataset:
        return tokenize_dataset(blocks[block], model, processor, batch_size=args.batch_size, load_from_cache_file=False)

    tokens = dataset_path(0)  # also warms up the model
    if not torch.equal(torch.tensor(tokens["token_ids"]), raw_encode(0)):
        raise RuntimeError("tokenize_dataset and model.encode disagree")
    paths = {"raw encode": raw_encode, "loop": loop, "tokenize_dataset": dataset_path}
    seconds = interleaved_seconds(paths, len(blocks), args.repeats)

    subset = pixel_values[: args.compress_images]
    token_ids = model.encode(subset).token_ids.numpy()
    streams = model.compress(subset)
    fingerprint = model.codebook_fingerprint()
    compress_seconds = interleaved_seconds(
        {
            "model.compress": lambda _: [model.compress(batch) for batch in subset.split(args.batch_size)],
            "model.decompress": lambda _: [
                model.decompress(streams[i : i + args.batch_size]) for i in range(0, len(streams), args.batch_size)
            ],
            "codec.encode_batch": lambda _: encode_batch(token_ids, config.codebook_size, fingerprint),
            "codec.decode_batch": lambda _: decode_batch(streams),
        },
        1,
        args.repeats,
    )
    # throughput: the median over repeats of the whole pass; the ratio: the median over blocks of the paired ratios,
    # which cancels load that changes between blocks
    rows = {name: args.num_images / np.median(s.sum(1)) for name, s in seconds.items()}
    compress_rows = {name: len(subset) / np.median(s) for name, s in compress_seconds.items()}
    paired = {name: float(np.median(seconds["raw encode"] / s)) for name, s in seconds.items()}
    ratio = paired["tokenize_dataset"]
    result = {
        "preset": args.preset,
        "num_images": args.num_images,
        "compress_images": len(subset),
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_per_image": config.bytes_per_image,
        "stream_bytes_per_image": len(streams[0]),
        "images_per_s": rows | compress_rows,
        "fraction_of_raw_encode_paired_median": paired,
        "fraction_of_raw_encode_from_totals": {name: rate / rows["raw encode"] for name, rate in rows.items()},
        "tokenize_dataset_fraction_of_raw_encode": ratio,
        "target_fraction": 0.85,
    }
    print(f"{args.preset}: {args.num_images} images, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'tokenising':22} {'images/s':>10} {'vs raw (totals)':>16} {'vs raw (paired)':>16}")
    for name, rate in rows.items():
        print(f"{name:22} {rate:>10.0f} {rate / rows['raw encode']:>16.1%} {paired[name]:>16.1%}")
    print(f"{'compression (' + str(len(subset)) + ' images)':22} {'images/s':>10}")
    for name, rate in compress_rows.items():
        print(f"{name:22} {rate:>10.0f}")
    verdict = "ok" if ratio >= 0.85 else "MISSED"
    print(f"tokenize_dataset keeps {ratio:.1%} of the raw encode throughput (target 85%): {verdict}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
