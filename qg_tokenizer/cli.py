"""The commands of the `qg-tokenizer` console script (see `qg_tokenizer_cli` for the usage).

The console script's front, `qg_tokenizer_cli`, parses the arguments and checks every path before this module (and
with it torch and transformers) is imported; the commands here read the inputs' contents, still before the model is
loaded, then load it and write the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from qg_tokenizer_cli import CLIError, main  # noqa: F401 (main: `qg_tokenizer.cli.main` is the entry point too)

from .codec import CodecError, StreamHeader, read_header
from .image_io import ImageLoadError, load_image
from .tokenize import encode_images, load_tokenizer, token_dtype
from .visualize import influence_grid, prefix_lengths, progressive_grid, save_grid


# ------------------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def _atomic_output(path: Path, directory: bool = False) -> Iterator[Path]:
    """A temporary file (or folder) beside `path`, renamed onto it on success and removed on any failure.

    A failure to write (a full disk, a format Pillow cannot write the image in, ...) is a `CLIError` naming `-o`.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{'' if directory else path.suffix}")
    try:
        if directory:
            temporary.mkdir()
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            shutil.rmtree(temporary, ignore_errors=True) if directory else temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CLIError(f"-o {str(path)!r}: cannot write ({error.strerror or error})") from None
        raise


def _save_image(image: PIL.Image.Image, path: Path) -> None:
    with _atomic_output(path) as temporary:  # a grid's labels go into PNG text chunks
        save_grid(image, temporary, format=PIL.Image.registered_extensions()[path.suffix.lower()])


def _read_image(path: str) -> PIL.Image.Image:
    """The image at `path`, decoded as `tokenize_dataset` decodes it (`image_io.load_image`)."""
    try:
        return load_image(path)
    except ImageLoadError as error:
        raise CLIError(str(error)) from None


def _read_tokens(path: str) -> np.ndarray:
    """`[N, C]` integer token ids from a `.npy` (`[N, C]` or `[C]`) or `.jsonl` (one `{"token_ids": [...]}` a line)."""
    try:
        if Path(path).suffix.lower() == ".npy":
            tokens = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                tokens = np.array([json.loads(line)["token_ids"] for line in f if line.strip()])
    except FileNotFoundError:
        raise CLIError(f"{path!r}: no such file") from None
    except (ValueError, KeyError, TypeError, OSError, EOFError) as error:
        reason = f"{type(error).__name__}: {error or 'empty file'}"
        raise CLIError(f"{path!r} is not a valid token file ({reason})") from None
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.size == 0:
        raise CLIError(f"{path!r} holds no token ids (shape {tokens.shape})")
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise CLIError(f"{path!r}: expected integer token ids [images, tokens], got {tokens.dtype} {tokens.shape}")
    return tokens


def _read_stream(path: str, prefix_length: int | None) -> tuple[bytes, StreamHeader]:
    """A `.qgt` file's bytes and header, checked before the model is loaded (also that it holds `prefix_length`)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CLIError(f"{path!r}: no such file") from None
    except OSError as error:
        raise CLIError(f"{path!r}: cannot read ({error.strerror})") from None
    try:
        header = read_header(data)
    except CodecError as error:
        raise CLIError(f"{path!r}: {error}") from None
    if prefix_length is not None and prefix_length > header.prefix_length:
        raise CLIError(f"--prefix-length {prefix_length}: {path!r} holds only {header.prefix_length} tokens")
    return data, header


# ------------------------------------------------------------------------------------------------------ model
def _device(name: str | None) -> torch.device:
    try:
        return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise CLIError(f"--device {name!r}: {error}") from None


def _load(args: argparse.Namespace, device: str | None = None):
    """Model and processor of `--model`, a folder with a config.json or a hub repo id (the front checked which).

    `trust_remote_code` is False unless `--trust-remote-code` is given, so that transformers refuses a repo's own
    code at once instead of asking "run the custom code? [y/N]" on the terminal.
    """
    from safetensors import SafetensorError

    try:
        model, processor = load_tokenizer(args.model, device=_device(device), trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        message = " ".join(str(error).split())
        if "trust_remote_code" in message:
            raise CLIError(f"--model {args.model!r}: not a model type of qg_tokenizer, and the code its repo ships "
                           "runs only with --trust-remote-code (read that code first)") from None  # fmt: skip
        raise CLIError(f"--model {args.model!r}: cannot load the model ({type(error).__name__}: {message})") from None
    corrupt = model.non_finite_parameters()
    if corrupt:
        raise CLIError(f"--model {args.model!r}: the weights hold NaN or Inf ({', '.join(corrupt[:3])}"
                       f"{', ...' if len(corrupt) > 3 else ''}): the file is corrupt")  # fmt: skip
    return model, processor


def _pixel_values(processor, images: list[PIL.Image.Image], device: torch.device) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"].to(device)


def _progress(total: int, batch_size: int, desc: str):
    """A progress bar over images, shown on terminals when there is more than one batch."""
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=None if total > batch_size else True)


# --------------------------------------------------------------------------------------------------- commands
def cmd_encode(args: argparse.Namespace) -> None:
    out, paths = Path(args.output), args.images
    model, processor = _load(args, args.device)
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
    out, single = Path(args.output), args.single_image
    tokens = _read_tokens(args.tokens)
    if single and len(tokens) != 1:
        raise CLIError(f"-o {args.output!r} is one image but {args.tokens!r} holds {len(tokens)}: give a folder")
    model, processor = _load(args, args.device)
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


def _load_prior(args: argparse.Namespace):
    """The prior of `--prior` (a prior folder, or a pipeline folder with a `prior/` subfolder), or None."""
    if args.prior is None:
        return None
    from .modeling_qgprior import QGPriorForCausalLM

    folder = Path(args.prior)
    folder = folder / "prior" if (folder / "prior" / "config.json").is_file() else folder
    try:
        return QGPriorForCausalLM.from_pretrained(folder).eval()
    except (OSError, ValueError, KeyError) as error:
        message = " ".join(str(error).split())
        raise CLIError(f"--prior {args.prior!r}: cannot load the prior ({type(error).__name__}: {message})") from None


def cmd_compress(args: argparse.Namespace) -> None:
    out = Path(args.output)
    image = _read_image(args.image)
    model, processor = _load(args, args.device)
    prior = _load_prior(args)
    try:
        data = model.compress(
            _pixel_values(processor, [image], model.device), prefix_length=args.prefix_length, prior=prior,
            max_bytes=args.max_bytes, target_psnr=args.target_psnr,
        )[0]  # fmt: skip
    except (CodecError, ValueError) as error:
        raise CLIError(str(error)) from None
    with _atomic_output(out) as temporary:
        temporary.write_bytes(data)
    header = read_header(data)
    coding = "fixed-width" if header.prior_fingerprint is None else "entropy-coded"
    print(f"{out}: {len(data)} bytes ({len(header.payload)}-byte {coding} payload for {header.prefix_length} of "
          f"{model.config.num_tokens} tokens + {len(data) - len(header.payload)}-byte header)")  # fmt: skip


def cmd_decompress(args: argparse.Namespace) -> None:
    out = Path(args.output)
    data, header = _read_stream(args.file, args.prefix_length)
    if header.prior_fingerprint is not None and args.prior is None:
        raise CLIError(f"{args.file!r} is entropy-coded with a prior (fingerprint {header.prior_fingerprint.hex()}): "
                       "give it with --prior DIR")  # fmt: skip
    model, processor = _load(args, args.device)
    prior = _load_prior(args)
    try:
        pixel_values = model.decompress([data], prior=prior, prefix_length=args.prefix_length)
    except (CodecError, ValueError) as error:  # ValueError: a prior for another tokenizer
        raise CLIError(f"{args.file!r}: {error}") from None
    _save_image(processor.postprocess(pixel_values, "pil")[0], out)
    kept = args.prefix_length or header.prefix_length
    print(f"{out}: decoded from {kept} of {model.config.num_tokens} tokens")


def cmd_progressive(args: argparse.Namespace) -> None:
    out = Path(args.output)
    image = _read_image(args.image)
    model, processor = _load(args, args.device)
    lengths = args.lengths or prefix_lengths(model.config.num_tokens)
    if not all(1 <= k <= model.config.num_tokens for k in lengths):
        raise CLIError(f"--lengths {args.lengths}: token counts must be in [1, {model.config.num_tokens}]")
    grid = progressive_grid(model, _pixel_values(processor, [image], model.device), lengths, scale=args.scale)
    _save_image(grid, out)  # with its row labels as PNG text chunks
    rows = "; ".join(json.loads(grid.info["row_labels"]))
    print(f"{out}: {grid.width}x{grid.height} px, labelled rows top to bottom: {rows}")


def cmd_influence(args: argparse.Namespace) -> None:
    out = Path(args.output)
    image = _read_image(args.image)
    model, processor = _load(args, args.device)
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = _pixel_values(processor, [image], model.device)
    grid = influence_grid(model, pixel_values, args.samples, generator, batch_size=args.batch_size, scale=args.scale)
    _save_image(grid, out)  # with its panel captions as PNG text chunks
    print(f"{out}: {grid.width}x{grid.height} px, captioned panels: input, all tokens, "
          f"then tokens 0..{model.config.num_tokens - 1} one panel each")  # fmt: skip


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
    model, _ = _load(args, "cpu")
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


COMMANDS = {
    "encode": cmd_encode, "decode": cmd_decode, "compress": cmd_compress, "decompress": cmd_decompress,
    "progressive": cmd_progressive, "influence": cmd_influence, "info": cmd_info,
}  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Run the sub-command of arguments that `qg_tokenizer_cli.main` parsed and checked; errors are raised."""
    logging.set_verbosity_error()  # load-time notices and bars would bury the one-line messages
    logging.disable_progress_bar()
    COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
