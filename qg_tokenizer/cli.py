"""`qg-tokenizer`: a QG-VAE from the shell. Images <-> token ids, images <-> compressed `.qgt` files, visualisations.

    qg-tokenizer encode IMAGES... --model DIR_OR_REPO -o tokens.npy|tokens.jsonl
    qg-tokenizer decode tokens.npy --model M -o OUT_DIR|image.png [--prefix-length k]
    qg-tokenizer compress IMAGE --model M -o FILE.qgt [--prefix-length k]
    qg-tokenizer decompress FILE.qgt --model M -o IMAGE.png [--prefix-length k]
    qg-tokenizer progressive IMAGE --model M -o grid.png       # reconstructions from k = 1, 2, 4, ... tokens
    qg-tokenizer influence IMAGE --model M -o map.png          # pixels each token changes, coloured per token
    qg-tokenizer info MODEL [--json]

Every failure exits non-zero with one line on stderr (`--debug` shows the traceback) and leaves no output behind:
outputs are written to a temporary name beside the target and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .codec import HEADER_NUM_BYTES, CodecError, decode_tokens, truncate
from .tokenize import encode_images, load_tokenizer, token_dtype
from .visualize import influence_grid, prefix_lengths, progressive_grid

PROG = "qg-tokenizer"
TOKEN_SUFFIXES = (".npy", ".jsonl")
IMAGE_SUFFIXES = tuple(sorted(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.SAVE))


class CLIError(Exception):
    """A user error, printed as one line (exit status 1)."""


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit status 2), like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------------------------------------------ files
def _check_output(path: str, suffixes: tuple[str, ...] | None = None, directory_ok: bool = False) -> Path:
    """Validate `-o` before any work: known suffix, existing parent folder, not an existing folder."""
    out = Path(path)
    if suffixes is not None and out.suffix.lower() not in suffixes and not directory_ok:
        raise CLIError(f"-o {path!r}: expected a file ending in {', '.join(suffixes)}")
    if not out.parent.is_dir():
        raise CLIError(f"-o {path!r}: the folder {str(out.parent)!r} does not exist")
    if out.is_dir() and not directory_ok:
        raise CLIError(f"-o {path!r} is a folder, expected a file")
    return out


@contextlib.contextmanager
def _atomic_output(path: Path, directory: bool = False) -> Iterator[Path]:
    """A temporary file (or folder) beside `path`, renamed onto it on success and removed on any failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{'' if directory else path.suffix}")
    if directory:
        temporary.mkdir()
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True) if directory else temporary.unlink(missing_ok=True)
        raise


def _save_image(image: PIL.Image.Image, path: Path) -> None:
    with _atomic_output(path) as temporary:
        image.save(temporary, format=PIL.Image.registered_extensions()[path.suffix.lower()])


def _read_image(path: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(path)
        image.load()
    except FileNotFoundError:
        raise CLIError(f"{path!r}: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"{path!r} is a folder, expected an image file") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError) as error:
        raise CLIError(f"{path!r} is not a readable image ({error})") from None
    return image


def _image_paths(inputs: list[str]) -> list[str]:
    """Files as given; folders expanded to their image files, sorted by name."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            extensions = PIL.Image.registered_extensions()
            found = sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in extensions and p.is_file())
            if not found:
                raise CLIError(f"{item!r}: the folder holds no image files")
            paths.extend(found)
        else:
            paths.append(item)
    return paths


def _read_tokens(path: str) -> np.ndarray:
    """`[N, C]` integer token ids from a `.npy` (`[N, C]` or `[C]`) or `.jsonl` (one `{"token_ids": [...]}` a line)."""
    suffix = Path(path).suffix.lower()
    if suffix not in TOKEN_SUFFIXES:
        raise CLIError(f"{path!r}: expected a .npy or .jsonl token file")
    try:
        if suffix == ".npy":
            tokens = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                tokens = np.array([json.loads(line)["token_ids"] for line in f if line.strip()])
    except FileNotFoundError:
        raise CLIError(f"{path!r}: no such file") from None
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise CLIError(f"{path!r} is not a valid token file ({type(error).__name__}: {error})") from None
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise CLIError(f"{path!r}: expected integer token ids [images, tokens], got {tokens.dtype} {tokens.shape}")
    return tokens


def _read_stream(path: str, prefix_length: int | None) -> bytes:
    """A `.qgt` file's bytes, header checked before the model is loaded, optionally cut to its first k tokens."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CLIError(f"{path!r}: no such file") from None
    except OSError as error:
        raise CLIError(f"{path!r}: cannot read ({error.strerror})") from None
    try:
        decode_tokens(data)
        return data if prefix_length is None else truncate(data, prefix_length)
    except CodecError as error:
        raise CLIError(f"{path!r}: {error}") from None


# ------------------------------------------------------------------------------------------------------ model
def _device(name: str | None) -> torch.device:
    try:
        return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise CLIError(f"--device {name!r}: {error}") from None


def _load(name_or_path: str, device: str | None):
    """Model and processor from a local folder or a hub repo id (the local cache serves it offline)."""
    name_or_path = os.path.expanduser(name_or_path)
    local = os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1
    if local and not os.path.isdir(name_or_path):
        raise CLIError(f"--model {name_or_path!r}: no such model folder")
    if local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise CLIError(f"--model {name_or_path!r}: the folder has no config.json (not a saved model)")
    try:
        return load_tokenizer(name_or_path, device=_device(device))
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"--model {name_or_path!r}: cannot load the model ({' '.join(str(error).split())})") from None


def _pixel_values(processor, images: list[PIL.Image.Image], device: torch.device) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"].to(device)


def _progress(total: int, batch_size: int, desc: str):
    """A progress bar over images, shown on terminals when there is more than one batch."""
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=None if total > batch_size else True)


# --------------------------------------------------------------------------------------------------- commands
def cmd_encode(args: argparse.Namespace) -> None:
    out = _check_output(args.output, TOKEN_SUFFIXES)
    paths = _image_paths(args.images)
    model, processor = _load(args.model, args.device)
    rows = []
    with _progress(len(paths), args.batch_size, "encode") as bar:
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start : start + args.batch_size]
            rows.append(encode_images(model, processor, [_read_image(p) for p in batch], batch).cpu().numpy())
            bar.update(len(batch))
    tokens = np.concatenate(rows).astype(token_dtype(model.config.codebook_size))
    with _atomic_output(out) as temporary:
        if out.suffix.lower() == ".npy":
            with open(temporary, "wb") as f:
                np.save(f, tokens)
        else:
            with open(temporary, "w") as f:
                f.writelines(json.dumps({"image": p, "token_ids": t.tolist()}) + "\n" for p, t in zip(paths, tokens))
    print(f"{out}: {tokens.shape[0]} images x {tokens.shape[1]} tokens ({tokens.dtype})")


def cmd_decode(args: argparse.Namespace) -> None:
    single = Path(args.output).suffix.lower() in IMAGE_SUFFIXES
    out = _check_output(args.output, IMAGE_SUFFIXES, directory_ok=not single)
    if not single and out.exists() and any(out.iterdir()):
        raise CLIError(f"-o {args.output!r}: the folder exists and is not empty")
    tokens = _read_tokens(args.tokens)
    if single and len(tokens) != 1:
        raise CLIError(f"-o {args.output!r} is one image but {args.tokens!r} holds {len(tokens)}: give a folder")
    model, processor = _load(args.model, args.device)
    images = []  # all decoded before anything is written
    with _progress(len(tokens), args.batch_size, "decode") as bar, torch.inference_mode():
        for chunk in torch.from_numpy(tokens.astype(np.int64)).to(model.device).split(args.batch_size):
            try:
                pixel_values = model.decode(chunk, prefix_length=args.prefix_length).pixel_values
            except ValueError as error:
                raise CLIError(f"{args.tokens!r} does not fit the model: {error}") from None
            images += processor.postprocess(pixel_values, "pil")
            bar.update(len(chunk))
    if single:
        _save_image(images[0], out)
    else:
        with _atomic_output(out, directory=True) as folder:
            width = len(str(len(images) - 1))
            for i, image in enumerate(images):
                image.save(folder / f"{i:0{width}d}.png")
    print(f"{out}: {len(images)} image(s) from {args.prefix_length or model.config.num_tokens} tokens each")


def cmd_compress(args: argparse.Namespace) -> None:
    out = _check_output(args.output)
    image = _read_image(args.image)
    model, processor = _load(args.model, args.device)
    data = model.compress(_pixel_values(processor, [image], model.device), prefix_length=args.prefix_length)[0]
    with _atomic_output(out) as temporary:
        temporary.write_bytes(data)
    kept = decode_tokens(data).prefix_length
    print(f"{out}: {len(data)} bytes ({len(data) - HEADER_NUM_BYTES}-byte payload for {kept} of "
          f"{model.config.num_tokens} tokens + {HEADER_NUM_BYTES}-byte header)")  # fmt: skip


def cmd_decompress(args: argparse.Namespace) -> None:
    out = _check_output(args.output, IMAGE_SUFFIXES)
    data = _read_stream(args.file, args.prefix_length)
    model, processor = _load(args.model, args.device)
    try:
        pixel_values = model.decompress([data])
    except CodecError as error:
        raise CLIError(f"{args.file!r}: {error}") from None
    _save_image(processor.postprocess(pixel_values, "pil")[0], out)
    print(f"{out}: decoded from {decode_tokens(data).prefix_length} of {model.config.num_tokens} tokens")


def _parse_lengths(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 1,2,4, got {text!r}") from None


def _upscale(image: PIL.Image.Image, scale: int) -> PIL.Image.Image:
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)


def cmd_progressive(args: argparse.Namespace) -> None:
    out = _check_output(args.output, IMAGE_SUFFIXES)
    image = _read_image(args.image)
    model, processor = _load(args.model, args.device)
    lengths = args.lengths or prefix_lengths(model.config.num_tokens)
    if not all(1 <= k <= model.config.num_tokens for k in lengths):
        raise CLIError(f"--lengths {args.lengths}: token counts must be in [1, {model.config.num_tokens}]")
    grid = progressive_grid(model, _pixel_values(processor, [image], model.device), lengths)
    _save_image(_upscale(grid, args.scale), out)
    print(f"{out}: input, then prefixes of {', '.join(map(str, lengths))} tokens (top to bottom)")


def cmd_influence(args: argparse.Namespace) -> None:
    out = _check_output(args.output, IMAGE_SUFFIXES)
    image = _read_image(args.image)
    model, processor = _load(args.model, args.device)
    generator = torch.Generator().manual_seed(args.seed)
    grid = influence_grid(
        model, _pixel_values(processor, [image], model.device), args.samples, generator, batch_size=args.batch_size
    )
    _save_image(_upscale(grid, args.scale), out)
    print(f"{out}: input, all tokens, then tokens 0..{model.config.num_tokens - 1} one panel each")


def model_info(model) -> dict:
    """Config, token budget, parameter counts and recorded codebook usage of a loaded model."""
    config = model.config
    info = {
        "model_type": config.model_type,
        "image_size": config.image_size,
        "num_channels": config.num_channels,
        "num_tokens": config.num_tokens,
        "codebook_size": config.codebook_size,
        "bits_per_image": config.bits_per_image,
        "bytes_per_image": config.bytes_per_image,
        "parameters": {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()},
        "fingerprint": model.codebook_fingerprint().hex(),
        "config": config.to_diff_dict(),
    }
    info["parameters"]["total"] = sum(p.numel() for p in model.parameters())
    usage = model.codebook_usage()
    if model.quantizer.usage_counts.sum() > 0:  # counted in training; zero for a model saved before any step
        info["codebook_usage"] = {
            "used_fraction_mean": usage["used_fraction"].mean().item(),
            "used_fraction_min": usage["used_fraction"].min().item(),
            "perplexity_mean": usage["perplexity"].mean().item(),
            "dead_codewords": int(usage["dead"].sum().item()),
        }
    return info


def cmd_info(args: argparse.Namespace) -> None:
    model, _ = _load(args.model, "cpu")
    info = model_info(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    size = f"{info['image_size']}x{info['image_size']}x{info['num_channels']}"
    print(f"{args.model}: {info['model_type']}, {size} images")
    print(f"tokens: {info['num_tokens']} x log2({info['codebook_size']}) = {info['bits_per_image']:.1f} bits "
          f"-> {info['bytes_per_image']} bytes per image (codebook fingerprint {info['fingerprint']})")  # fmt: skip
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in info["parameters"].items()))
    usage = info.get("codebook_usage")
    if usage is None:
        print("codebook usage: not recorded (counted during training)")
    else:
        print(
            f"codebook usage: {usage['used_fraction_mean']:.1%} of codewords used on average "
            f"(min over tokens {usage['used_fraction_min']:.1%}), mean perplexity {usage['perplexity_mean']:.1f}, "
            f"{usage['dead_codewords']} dead"
        )


# ------------------------------------------------------------------------------------------------------ parser
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    common.add_argument("--batch-size", type=_positive, default=64, help="images per model call (default 64)")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    with_model = argparse.ArgumentParser(add_help=False, parents=[common])
    with_model.add_argument("--model", required=True, help="saved model folder or hub repo id")
    prefix = argparse.ArgumentParser(add_help=False)
    prefix.add_argument("--prefix-length", "--num-tokens", dest="prefix_length", type=_positive, metavar="K",
                        help="use only the first K tokens (progressive decoding; --num-tokens is a deprecated alias)")
    visual = argparse.ArgumentParser(add_help=False)
    visual.add_argument("--scale", type=_positive, default=1, help="enlarge the output image this many times")

    parser = _ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    def add(
        name: str, function, help: str, parents: list, source: dict, output_help: str = "an image file (.png, ...)"
    ) -> argparse.ArgumentParser:
        """A sub-command with one positional input (`source`: its `add_argument` keywords) and `-o/--output`."""
        sub = commands.add_parser(name, help=help, description=help, parents=parents)
        sub.set_defaults(function=function)
        sub.add_argument(source.pop("dest"), **source)
        sub.add_argument("-o", "--output", required=True, help=output_help)
        return sub

    add("encode", cmd_encode, "images -> token ids (.npy [N, C] or .jsonl)", [with_model],
        {"dest": "images", "nargs": "+", "help": "image files or folders of images"}, "tokens.npy or tokens.jsonl")
    add("decode", cmd_decode, "token ids (.npy or .jsonl) -> images", [with_model, prefix],
        {"dest": "tokens", "help": "a .npy or .jsonl file written by `encode`"},
        "an image file (one row) or a new folder of PNGs")
    add("compress", cmd_compress, "one image -> a .qgt byte stream", [with_model, prefix], {"dest": "image"},
        "FILE.qgt")
    add("decompress", cmd_decompress, "a .qgt byte stream -> an image", [with_model, prefix],
        {"dest": "file", "help": "a .qgt file written by `compress`"})
    sub = add("progressive", cmd_progressive, "grid of reconstructions from 1, 2, 4, ... tokens", [with_model, visual],
              {"dest": "image"})
    sub.add_argument("--lengths", type=_parse_lengths, help="token counts, e.g. 1,4,16 (default 1,2,4,...,C)")
    sub = add("influence", cmd_influence, "per-token influence map, coloured per token", [with_model, visual],
              {"dest": "image"})
    sub.add_argument("--samples", type=_positive, default=1, help="replacement codewords averaged per token")
    sub.add_argument("--seed", type=int, default=0, help="seed of the replacement codewords")
    help = "config, bytes per image, parameters, codebook usage"
    sub = commands.add_parser("info", help=help, description=help, parents=[common])
    sub.set_defaults(function=cmd_info)
    sub.add_argument("model", help="saved model folder or hub repo id")
    sub.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qg-tokenizer` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_error()  # load-time notices and bars would bury the one-line messages
    logging.disable_progress_bar()
    try:
        args.function(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        known = isinstance(error, (CLIError, ValueError))  # our checks and the library's say what is wrong
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG} {args.command}: error: {message if known else f'{type(error).__name__}: {message}'}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
