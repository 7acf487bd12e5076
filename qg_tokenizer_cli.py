"""`qg-tokenizer`: a QG-VAE from the shell. Images <-> token ids, images <-> compressed `.qgt` files, visualisations.

    qg-tokenizer encode IMAGES... --model DIR_OR_REPO -o tokens.npy|tokens.jsonl
    qg-tokenizer decode tokens.npy --model M -o OUT_DIR|image.png [--prefix-length k]
    qg-tokenizer compress IMAGE --model M -o FILE.qgt [--prefix-length k] [--prior DIR] [--max-bytes N]
                          [--target-psnr DB]
    qg-tokenizer decompress FILE.qgt --model M -o IMAGE.png [--prefix-length k] [--prior DIR]
    qg-tokenizer progressive IMAGE --model M -o grid.png       # reconstructions from k = 1, 2, 4, ... tokens
    qg-tokenizer influence IMAGE --model M -o map.png          # pixels each token changes, coloured per token
    qg-tokenizer info --model M [--json]

Every failure exits non-zero with one line on stderr (`--debug` shows the traceback) and leaves no output behind:
outputs are written to a temporary name beside the target and renamed when complete. Models load with
`trust_remote_code=False` unless `--trust-remote-code` is given.

This module is the console script's front, and it sits outside the `qg_tokenizer` package on purpose: importing any
module of the package runs `qg_tokenizer/__init__.py`, which registers the models with the transformers Auto classes
and so imports torch and transformers (seconds). Here the arguments are parsed and every path is checked with the
standard library (and Pillow's list of image formats), so `--help` and usage errors answer at once; the commands, in
`qg_tokenizer.cli`, are imported once the checks pass. They read the files' contents and load the model.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from pathlib import Path

PROG = "qg-tokenizer"
TOKEN_SUFFIXES = (".npy", ".jsonl")
IMAGE_FILE = "an image file (.png, .jpg, ...: a format Pillow writes)"
DECODE_OUTPUT = "an image file (.png, .jpg, ...) for one image, or a folder (no suffix, new or empty) for a PNG each"
# names ending so are files, never hub repo ids (`org/name` ids may hold dots, e.g. `org/model-v1.5`)
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".onnx", ".gguf", ".yaml",
                       ".yml", ".qgt")  # fmt: skip
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # `name` or `org/name`, the hub's characters


class CLIError(Exception):
    """A user error, printed as one line (exit status 1)."""


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit status 2), like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@functools.cache
def image_suffixes() -> tuple[str, ...]:
    """The suffixes of the formats Pillow writes (.png, .jpg, ...); Pillow is imported on the first call only."""
    import PIL.Image

    return tuple(sorted(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.SAVE))


# ------------------------------------------------------------------------------------------------------ paths
def check_output(path: str, suffixes: tuple[str, ...] | None = None, expected: str | None = None) -> Path:
    """`-o` before any work: a known suffix, an existing writable folder to write it in, not an existing folder."""
    out = Path(path)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise CLIError(f"-o {path!r}: expected {expected or 'a file ending in ' + ', '.join(suffixes)}")
    _check_output_folder(out, path)
    if out.is_dir():
        raise CLIError(f"-o {path!r} is a folder, expected a file")
    return out


def _check_output_folder(out: Path, path: str) -> None:
    """The folder `-o` is written in exists and takes new files (outputs are renamed into place from a sibling)."""
    if not out.parent.is_dir():
        raise CLIError(f"-o {path!r}: the folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CLIError(f"-o {path!r}: the folder {str(out.parent)!r} is not writable")


def check_input(path: str, expected: str) -> None:
    """An input file exists and may be read; its contents are checked by the command, before the model loads."""
    if not os.path.exists(path):
        raise CLIError(f"{path!r}: no such file")
    if os.path.isdir(path):
        raise CLIError(f"{path!r} is a folder, expected {expected}")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{path!r}: cannot read (permission denied)")


def image_paths(inputs: list[str]) -> list[str]:
    """Files as given, each checked to exist; folders expanded to their image files, sorted by name."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            import PIL.Image

            extensions = PIL.Image.registered_extensions()
            found = sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in extensions and p.is_file())
            if not found:
                raise CLIError(f"{item!r}: the folder holds no image files")
            paths.extend(found)
        else:
            check_input(item, "an image file")
            paths.append(item)
    return paths


def check_model(name: str) -> str:
    """`--model`: a saved model folder, or a hub repo id. Returns what to load (`~` expanded).

    A name that can only be a local path (starts with `.`, `/` or `~`, has more than the one `/` of `org/name`, ends
    in a file suffix, or its `org` is a folder here) and does not exist is an error now: transformers would treat it as
    a repo id and spend tens of seconds retrying the hub before failing.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"--model {name!r}: the folder has no config.json (not a saved model)")
        return path
    if os.path.exists(path):
        raise CLIError(f"--model {name!r} is a file, expected a saved model folder (the one holding config.json)")
    if name.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(name) or name.lower().endswith(MODEL_FILE_SUFFIXES):
        raise CLIError(f"--model {name!r}: no such model folder")
    owner = name.partition("/")[0]
    if "/" in name and os.path.isdir(owner):
        raise CLIError(f"--model {name!r}: no such model folder ({owner!r} is a folder here, so this is a path)")
    return name


# ------------------------------------------------------------------------------------------------- commands
def _check_encode(args: argparse.Namespace) -> None:
    check_output(args.output, TOKEN_SUFFIXES)
    args.images = image_paths(args.images)


def _check_decode(args: argparse.Namespace) -> None:
    out = Path(args.output)
    args.single_image = out.suffix.lower() in image_suffixes()
    if args.single_image:
        check_output(args.output, image_suffixes(), IMAGE_FILE)
    elif out.is_dir():
        _check_output_folder(out, args.output)
        if any(out.iterdir()):
            raise CLIError(f"-o {args.output!r}: the folder exists and is not empty")
    elif out.exists() or out.suffix:
        what = "a file" if out.exists() else f"the suffix {out.suffix!r}"
        raise CLIError(f"-o {args.output!r}: expected {DECODE_OUTPUT}, got {what}")
    else:
        _check_output_folder(out, args.output)
    if Path(args.tokens).suffix.lower() not in TOKEN_SUFFIXES:
        raise CLIError(f"{args.tokens!r}: expected a .npy or .jsonl token file")
    check_input(args.tokens, "a .npy or .jsonl token file")


def _check_prior(args: argparse.Namespace) -> None:
    if args.prior is not None and not os.path.isfile(os.path.join(args.prior, "config.json")) and not os.path.isfile(
        os.path.join(args.prior, "prior", "config.json")
    ):
        raise CLIError(f"--prior {args.prior!r}: not a prior folder (no config.json in it or in its prior/)")


def _check_compress(args: argparse.Namespace) -> None:
    check_output(args.output)
    check_input(args.image, "an image file")
    _check_prior(args)


def _check_decompress(args: argparse.Namespace) -> None:
    check_output(args.output, image_suffixes(), IMAGE_FILE)
    check_input(args.file, "a .qgt file")
    _check_prior(args)


def _check_visualisation(args: argparse.Namespace) -> None:
    check_output(args.output, image_suffixes(), IMAGE_FILE)
    check_input(args.image, "an image file")


# ------------------------------------------------------------------------------------------------------ parser
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def _parse_lengths(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 1,2,4, got {text!r}") from None


TRUST_HELP = "run the model code a hub repo ships, for model types qg_tokenizer does not know (default: refuse)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    common.add_argument("--batch-size", type=_positive, default=64, help="images per model call (default 64)")
    common.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    with_model = argparse.ArgumentParser(add_help=False, parents=[common])
    with_model.add_argument("--model", required=True, help="saved model folder or hub repo id")
    prefix = argparse.ArgumentParser(add_help=False)
    prefix.add_argument("--prefix-length", "--num-tokens", dest="prefix_length", type=_positive, metavar="K",
                        help="use only the first K tokens (progressive decoding; --num-tokens is a deprecated alias)")
    with_prior = argparse.ArgumentParser(add_help=False)
    with_prior.add_argument("--prior", metavar="DIR",
                            help="a prior (or pipeline) folder trained on the model's tokens: entropy-code the tokens "
                                 "with it (`compress`); needed to decode such a file (`decompress`)")  # fmt: skip
    visual = argparse.ArgumentParser(add_help=False)
    visual.add_argument("--scale", type=_positive, default=1, help="enlarge the output image this many times")

    parser = _ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    def add(
        name: str, check, help: str, parents: list, source: dict, output_help: str = "an image file (.png, ...)"
    ) -> argparse.ArgumentParser:
        """A sub-command with one positional input (`source`: its `add_argument` keywords) and `-o/--output`."""
        sub = commands.add_parser(name, help=help, description=help, parents=parents)
        sub.set_defaults(check=check)
        sub.add_argument(source.pop("dest"), **source)
        sub.add_argument("-o", "--output", required=True, help=output_help)
        return sub

    add("encode", _check_encode, "images -> token ids (.npy [N, C] or .jsonl)", [with_model],
        {"dest": "images", "nargs": "+", "help": "image files or folders of images"}, "tokens.npy or tokens.jsonl")
    add("decode", _check_decode, "token ids (.npy or .jsonl) -> images", [with_model, prefix],
        {"dest": "tokens", "help": "a .npy or .jsonl file written by `encode`"},
        "an image file (one row) or a new folder of PNGs")
    sub = add("compress", _check_compress, "one image -> a .qgt byte stream", [with_model, prefix, with_prior],
              {"dest": "image"}, "FILE.qgt")
    sub.add_argument("--max-bytes", type=_positive, metavar="N",
                     help="keep the longest token prefix whose stream (header included) fits N bytes")
    sub.add_argument("--target-psnr", type=_finite, metavar="DB",
                     help="keep the shortest token prefix whose image reaches DB dB PSNR")
    add("decompress", _check_decompress, "a .qgt byte stream -> an image", [with_model, prefix, with_prior],
        {"dest": "file", "help": "a .qgt file written by `compress`"})
    sub = add("progressive", _check_visualisation, "grid of reconstructions from 1, 2, 4, ... tokens",
              [with_model, visual], {"dest": "image"})
    sub.add_argument("--lengths", type=_parse_lengths, help="token counts, e.g. 1,4,16 (default 1,2,4,...,C)")
    sub = add("influence", _check_visualisation, "per-token influence map, coloured per token", [with_model, visual],
              {"dest": "image"})
    sub.add_argument("--samples", type=_positive, default=1, help="replacement codewords averaged per token")
    sub.add_argument("--seed", type=int, default=0, help="seed of the replacement codewords")
    help = "config, bytes per image, parameters, codebook usage"
    sub = commands.add_parser("info", help=help, description=help, parents=[with_model])
    sub.set_defaults(check=lambda args: None)  # `--model`, checked for every command, is its one path
    sub.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qg-tokenizer` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.check(args)
        args.model = check_model(args.model)
        from qg_tokenizer.cli import run  # torch and transformers: imported only for arguments that passed

        run(args)
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
