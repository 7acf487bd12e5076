"""Tokenise an image data set with a trained QG-VAE, for training a downstream transformer on the token ids.

    accelerate launch training/tokenize_dataset.py --model outputs/demo --dataset embedded-mnist \
        --output_dir outputs/mnist-tokens [--push_to_hub ORG/NAME]

Every split of `--dataset` (the embedded MNIST, a `.npz`, a `save_to_disk` folder, an image folder or a hub data set
name; see `qg_tokenizer.data.load_image_dataset`) becomes a split with the kept columns (default: all but the images)
and `token_ids` (C ids, the smallest integer type holding K). With several processes (`accelerate launch
--num_processes N`, one per GPU; on CPU `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N`)
each process tokenises one contiguous shard on its own device; the main process joins the shards in order, so row i
of the output is row i of the input. The result is written with `DatasetDict.save_to_disk(output_dir)` (load it with
`datasets.load_from_disk`) and, with `--push_to_hub`, pushed as a hub data set.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import datasets
from accelerate import PartialState
from datasets import DatasetDict, concatenate_datasets, load_from_disk

from qg_tokenizer.data import EMBEDDED_MNIST, load_image_splits
from qg_tokenizer.tokenize import load_tokenizer, tokenize_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a saved QG-VAE folder or hub repo id")
    parser.add_argument("--dataset", default=EMBEDDED_MNIST, help=f"data set source (default {EMBEDDED_MNIST})")
    parser.add_argument("--dataset_config", help="configuration name of a hub data set")
    parser.add_argument("--splits", nargs="+", help="splits to tokenise (default: all)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--keep_columns", nargs="*", help="columns kept beside token_ids (default: all but images)")
    parser.add_argument("--max_samples", type=int, help="tokenise only the first N rows of each split")
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoder call")
    parser.add_argument("--output_dir", required=True, help="where `save_to_disk` writes the tokenised DatasetDict")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also push the tokenised data set to this hub repo")
    parser.add_argument("--private", action="store_true", help="make the pushed data set private")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> DatasetDict | None:
    """Tokenise; returns the tokenised `DatasetDict` on the main process, None on the others."""
    args = parse_args(argv)
    state = PartialState()
    if not state.is_main_process:
        datasets.disable_progress_bars()
    splits = load_image_splits(args.dataset, streaming=False, name=args.dataset_config)
    names = args.splits or list(splits)
    missing = [name for name in names if name not in splits]
    if missing:
        raise ValueError(f"--splits {missing} not found in {args.dataset!r}; available: {sorted(splits)}")
    model, processor = load_tokenizer(args.model, device=state.device)
    output_dir, shard_dir = Path(args.output_dir), Path(args.output_dir) / ".shards"

    tokens = {}
    for name in names:
        # each process takes one contiguous shard, so joining the shards in rank order keeps the row order
        split = splits[name] if args.max_samples is None else splits[name].select(range(args.max_samples))
        shard = split.shard(state.num_processes, state.process_index, contiguous=True)
        tokens[name] = tokenize_dataset(
            shard, model, processor, image_column=args.image_column, batch_size=args.batch_size,
            keep_columns=args.keep_columns, desc=f"Tokenizing {name} (process {state.process_index})",
        )  # fmt: skip
        if state.num_processes > 1:
            tokens[name].save_to_disk(shard_dir / name / f"{state.process_index:05d}")
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    if state.num_processes > 1:
        tokens = {
            name: concatenate_datasets([
                load_from_disk(shard_dir / name / f"{rank:05d}") for rank in range(state.num_processes)
            ])  # fmt: skip
            for name in names
        }
    result = DatasetDict(tokens)
    result.save_to_disk(output_dir)
    shutil.rmtree(shard_dir, ignore_errors=True)
    if args.push_to_hub:
        result.push_to_hub(args.push_to_hub, private=args.private)
    summary = ", ".join(f"{name} {len(ds)} rows" for name, ds in result.items())
    print(f"tokenised {args.dataset!r} with {args.model!r} ({model.config.num_tokens} tokens): {summary}")
    print(f"saved to {output_dir}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return result


if __name__ == "__main__":
    main()
