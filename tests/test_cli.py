"""The `qg-tokenizer` console script: end to end in a subprocess, every command and every bad input in-process."""

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.utils import logging

import qg_tokenizer.cli
import qg_tokenizer_cli
from qg_tokenizer import QGVAEImageProcessor, QGVAEModel
from qg_tokenizer.codec import HEADER_NUM_BYTES, checksum
from qg_tokenizer.data import load_embedded_mnist
from qg_tokenizer.visualize import READABLE_WIDTH, prefix_label, prefix_lengths
from tests.conftest import tiny_config
from tests.hub_utils import lay_out_hf_cache

CONSOLE_SCRIPT = Path(sys.executable).with_name("qg-tokenizer")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def save_model(path: Path, seed: int = 0, **overrides) -> QGVAEModel:
    torch.manual_seed(seed)
    model = QGVAEModel(tiny_config(**{"codebook_size": 300, **overrides})).eval()
    model.save_pretrained(path)
    QGVAEImageProcessor.from_model_config(model.config).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny model (C=8, K=300) in `model/`, models that differ from it, and three digits as PNG files."""
    root = tmp_path_factory.mktemp("cli")
    save_model(root / "model")
    save_model(root / "other-weights", seed=1)
    save_model(root / "other-c", num_tokens=4)
    save_model(root / "other-k", codebook_size=64)
    for i, example in enumerate(load_embedded_mnist()["test"].select(range(3))):
        example["image"].save(root / f"digit{i}.png")
    (root / "notes.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def model(workspace) -> QGVAEModel:
    return QGVAEModel.from_pretrained(workspace / "model").eval()


@pytest.fixture(scope="module")
def processor(workspace) -> QGVAEImageProcessor:
    return QGVAEImageProcessor.from_pretrained(workspace / "model")


@pytest.fixture
def out(tmp_path, monkeypatch) -> Path:
    """An empty output folder, also the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def cli(capsys, workspace):
    """Run `main(argv)` in-process (paths relative to the workspace); returns (exit status, stdout, stderr)."""
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what the test printed before
        argv = [str(workspace / a) if (workspace / a).exists() and a != "." else a for a in argv]
        status = qg_tokenizer_cli.main(argv)
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run
    logging.set_verbosity(verbosity)  # main() quietens transformers for the process
    if bars:
        logging.enable_progress_bar()


def pixels(processor, path: Path) -> torch.Tensor:
    return processor(PIL.Image.open(path), return_tensors="pt")["pixel_values"]


def png_array(image: PIL.Image.Image | Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(image) if isinstance(image, Path) else image)


# ----------------------------------------------------------------------------------------------- subprocess
def test_console_script_compresses_and_decompresses_a_prefix(workspace, model, processor, out, tmp_path_factory):
    assert CONSOLE_SCRIPT.exists(), "run `pip install -e .` to create the qg-tokenizer console script"
    hf_home = tmp_path_factory.mktemp("hf")
    lay_out_hf_cache(workspace / "model", hf_home, "some-org/qgvae-tiny")  # the repo id resolves offline
    model_dir, digit = str(workspace / "model"), str(workspace / "digit0.png")
    run = [str(CONSOLE_SCRIPT), "compress", digit, "--model", "some-org/qgvae-tiny", "-o", "digit.qgt"]
    env = {**ENV, "HF_HOME": str(hf_home)}
    result = subprocess.run(run, capture_output=True, text=True, env=env, cwd=out, timeout=300)
    assert result.returncode == 0, result.stderr
    data = (out / "digit.qgt").read_bytes()
    assert data == model.compress(pixels(processor, workspace / "digit0.png"))[0]
    assert len(data) == HEADER_NUM_BYTES + 9  # ceil(8 * log2(300) / 8)

    run = [str(CONSOLE_SCRIPT), "decompress", "digit.qgt", "--model", model_dir, "-o", "prefix.png", "--num-tokens=4"]
    result = subprocess.run(run, capture_output=True, text=True, env=ENV, cwd=out, timeout=300)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        token_ids = model.encode(pixels(processor, workspace / "digit0.png")).token_ids
        expected = processor.postprocess(model.decode(token_ids, prefix_length=4).pixel_values)[0]
    np.testing.assert_array_equal(png_array(out / "prefix.png"), png_array(expected))
    assert sorted(os.listdir(out)) == ["digit.qgt", "prefix.png"]


def test_console_script_error_is_one_line_without_traceback_or_output(workspace, model, processor, out):
    (out / "cut.qgt").write_bytes(model.compress(pixels(processor, workspace / "digit0.png"))[0][:-2])
    run = [str(CONSOLE_SCRIPT), "decompress", "cut.qgt", "--model", str(workspace / "model"), "-o", "image.png"]
    result = subprocess.run(run, capture_output=True, text=True, env=ENV, cwd=out, timeout=300)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "qg-tokenizer decompress: error: 'cut.qgt': truncated payload: 7 bytes, the header implies 9"
    ]
    assert os.listdir(out) == ["cut.qgt"]


# ------------------------------------------------------------------------------------------------- commands
def test_encode_writes_npy_and_jsonl_in_image_order(cli, workspace, model, processor, out):
    digits = [f"digit{i}.png" for i in range(3)]
    assert cli("encode", *digits, "--model", "model", "-o", "tokens.npy", "--batch-size", "2")[0] == 0
    tokens = np.load(out / "tokens.npy")
    with torch.no_grad():
        expected = torch.cat([model.encode(pixels(processor, workspace / d)).token_ids for d in digits])
    assert tokens.dtype == np.int16 and np.array_equal(tokens, expected.numpy())

    assert cli("encode", str(workspace), "--model", "model", "-o", "tokens.jsonl")[0] == 0  # a folder's images
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == digits
    assert [r["token_ids"] for r in rows] == expected.tolist()


def test_decode_writes_a_folder_or_one_image(cli, model, processor, out):
    token_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [299, 0, 299, 0, 299, 0, 299, 0]])
    np.save(out / "tokens.npy", token_ids.numpy().astype(np.int16))
    assert cli("decode", "tokens.npy", "--model", "model", "-o", "images")[0] == 0
    with torch.no_grad():
        expected = processor.postprocess(model.decode(token_ids).pixel_values)
        prefix = processor.postprocess(model.decode(token_ids[1:], prefix_length=2).pixel_values)[0]
    assert sorted(os.listdir(out / "images")) == ["0.png", "1.png"]
    for name, image in zip(("0.png", "1.png"), expected):
        np.testing.assert_array_equal(png_array(out / "images" / name), png_array(image))

    (out / "one.jsonl").write_text(json.dumps({"token_ids": token_ids[1].tolist()}) + "\n")
    assert cli("decode", "one.jsonl", "--model", "model", "-o", "one.png", "--prefix-length", "2")[0] == 0
    np.testing.assert_array_equal(png_array(out / "one.png"), png_array(prefix))


def test_progressive_and_influence_grids(cli, model, out):
    """Labelled, readable grids whose labels and layout are PNG text chunks (tests/test_visualize.py: the layout)."""
    status, text, _ = cli("progressive", "digit1.png", "--model", "model", "-o", "grid.png")
    labels = ["input"] + [prefix_label(k, 8, 300) for k in prefix_lengths(model.config.num_tokens)]  # k = 1, 2, 4, 8
    grid = PIL.Image.open(out / "grid.png")
    assert status == 0 and json.loads(grid.text["row_labels"]) == labels and grid.width >= READABLE_WIDTH
    assert f"grid.png: {grid.width}x{grid.height} px, labelled rows top to bottom: {'; '.join(labels)}" in text
    layout = json.loads(grid.text["layout"])
    assert layout["rows"] == 5 and layout["columns"] == 1 and layout["cell_size"] == [16 * layout["scale"]] * 2
    assert cli("progressive", "digit1.png", "--model", "model", "-o", "grid2.png", "--scale", "2")[0] == 0
    assert json.loads(PIL.Image.open(out / "grid2.png").text["layout"])["scale"] == 2 * layout["scale"]

    assert cli("influence", "digit1.png", "--model", "model", "-o", "map.png")[0] == 0
    grid = PIL.Image.open(out / "map.png")
    captions = json.loads(grid.text["cell_labels"])  # 2 + C = 10 panels, 4 per row
    assert captions == [["input", "all tokens", "token 0", "token 1"], [f"token {c}" for c in range(2, 6)],
                        ["token 6", "token 7", "", ""]]  # fmt: skip
    layout = json.loads(grid.text["layout"])
    assert grid.mode == "RGB" and grid.width >= READABLE_WIDTH and (layout["rows"], layout["columns"]) == (3, 4)
    (x, y), (dx, _), (w, h) = layout["origin"], layout["step"], layout["cell_size"]
    panels = np.asarray(grid)
    assert panels[y : y + h, x + dx : x + dx + w].max() > 0  # the all-tokens panel is not black: every token counts


def test_info_reports_budget_parameters_and_usage(cli, workspace, model, tmp_path):
    status, text, _ = cli("info", "--model", "model")
    assert status == 0
    assert "8 x log2(300) = 65.8 bits -> 9 bytes per image" in text
    assert "codebook usage: not recorded" in text

    used = model.quantizer.usage_counts.clone()
    model.quantizer.usage_counts[:, :150] = 1  # half of every codebook used in training
    model.save_pretrained(tmp_path / "trained")
    model.quantizer.usage_counts.copy_(used)
    status, text, _ = cli("info", "--model", str(tmp_path / "trained"), "--json")
    info = json.loads(text)
    assert info["num_tokens"] == 8 and info["codebook_size"] == 300 and info["bytes_per_image"] == 9
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["fingerprint"] == model.codebook_fingerprint().hex()
    assert info["codebook_usage"]["used_fraction_mean"] == 0.5 and info["codebook_usage"]["dead_codewords"] == 8 * 150


# ----------------------------------------------------------------------------------------------- bad inputs
def stream_for(workspace: Path, model_dir: str) -> bytes:
    model = QGVAEModel.from_pretrained(workspace / model_dir)
    return model.compress(pixels(QGVAEImageProcessor.from_model_config(model.config), workspace / "digit0.png"))[0]


def header_with(data: bytes, **fields) -> bytes:
    """`data` with these header fields changed and its checksum made valid again."""
    magic, version, c, k, kept, fingerprint, _ = struct.unpack_from(">3sBHIH4sI", data)
    values = {"magic": magic, "version": version, "c": c, "k": k, "kept": kept, "fingerprint": fingerprint} | fields
    changed = struct.pack(">3sBHIH4sI", *values.values(), 0) + data[HEADER_NUM_BYTES:]
    return changed[:16] + checksum(changed).to_bytes(4, "big") + changed[HEADER_NUM_BYTES:]


BAD_STREAMS = {
    "truncated": (lambda d: d[:-1], "truncated payload: 8 bytes, the header implies 9"),
    "header only": (lambda d: d[: HEADER_NUM_BYTES - 3], "too short to hold a header"),
    "corrupt payload": (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "corrupt stream: checksum"),
    "corrupt header": (lambda d: header_with(d, kept=9), "prefix_length is 9, must be in [1, num_tokens=8]"),
    "wrong magic": (lambda d: b"PNG" + d[3:], "not a QG-VAE token stream: magic is b'PNG'"),
    "wrong version": (lambda d: header_with(d, version=1), "unsupported format version 1"),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_streams_fail_cleanly(cli, workspace, out, case):
    edit, message = BAD_STREAMS[case]
    (out / "bad.qgt").write_bytes(edit(stream_for(workspace, "model")))
    (out / "image.png").write_bytes(b"previous output")  # survives a failed run untouched
    status, _, err = cli("decompress", "bad.qgt", "--model", "model", "-o", "image.png")
    assert status == 1 and len(err.splitlines()) == 1 and message in err
    assert err.startswith("qg-tokenizer decompress: error: ") and "Traceback" not in err
    assert sorted(os.listdir(out)) == ["bad.qgt", "image.png"]
    assert (out / "image.png").read_bytes() == b"previous output"


@pytest.mark.parametrize(
    "maker, message",
    [("other-weights", "fingerprint is"), ("other-c", "num_tokens is 4 in the stream, expected 8"),
     ("other-k", "codebook_size is 64 in the stream, expected 300")],
)  # fmt: skip
def test_streams_of_another_model_are_refused(cli, workspace, out, maker, message):
    (out / "other.qgt").write_bytes(stream_for(workspace, maker))
    status, _, err = cli("decompress", "other.qgt", "--model", "model", "-o", "image.png")
    assert status == 1 and len(err.splitlines()) == 1
    assert "the stream was made for another model" in err and message in err
    assert os.listdir(out) == ["other.qgt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "notes.txt", "--model", "model", "-o", "x.qgt"], "is not a readable image"),
        (["encode", "digit0.png", "notes.txt", "--model", "model", "-o", "x.npy"], "notes.txt' is not a readable"),
        (["progressive", "missing.png", "--model", "model", "-o", "x.png"], "'missing.png': no such file"),
        (["compress", "digit0.png", "--model", "no/such/model", "-o", "x.qgt"], "--model 'no/such/model': no such"),
        (["compress", "digit0.png", "--model", ".", "-o", "x.qgt"], "has no config.json"),
        (["info", "--model", "./missing-model"], "no such model folder"),
        (["encode", "digit0.png", "--model", "model", "-o", "x.csv"], "expected a file ending in .npy, .jsonl"),
        (["compress", "digit0.png", "--model", "model", "-o", "no/dir/x.qgt"], "the folder 'no/dir' does not exist"),
        (["decompress", "digit0.png", "--model", "model", "-o", "x.png"], "not a QG-VAE token stream"),
        (["decode", "digit0.png", "--model", "model", "-o", "x"], "expected a .npy or .jsonl token file"),
        (["progressive", "digit0.png", "--model", "model", "-o", "x.png", "--lengths", "1,9"], "must be in [1, 8]"),
    ],
)  # fmt: skip
def test_bad_inputs_fail_with_one_line_and_no_output(cli, out, argv, message):
    status, _, err = cli(*argv)
    assert status == 1 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert os.listdir(out) == []


@pytest.mark.parametrize(
    "tokens, message",
    [([[0, 1, 2, 3, 4, 5, 6, 300]], "token_ids must be in [0, 300)"), ([[0, 1, 2]], "shape [batch, 8]")],
)
def test_token_files_that_do_not_fit_the_model_leave_no_folder(cli, out, tokens, message):
    np.save(out / "tokens.npy", np.array(tokens))
    status, _, err = cli("decode", "tokens.npy", "--model", "model", "-o", "images")
    assert status == 1 and len(err.splitlines()) == 1 and message in err
    assert os.listdir(out) == ["tokens.npy"]


def test_usage_errors_are_one_line_and_debug_shows_the_exception(cli, capsys, out):
    with pytest.raises(SystemExit) as exit_info:
        cli("compress", "digit0.png", "--model", "model")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "qg-tokenizer compress: error: the following arguments are required: -o/--output (see --help)"
    ]
    with pytest.raises(qg_tokenizer_cli.CLIError, match="no such model folder"):
        cli("info", "--model", "./missing-model", "--debug")


def test_info_takes_the_model_as_an_option_like_every_command(cli, capsys, model):
    status, text, err = cli("info", "--model", "model", "--json")
    assert status == 0 and json.loads(text)["num_tokens"] == 8 and err == ""
    with pytest.raises(SystemExit) as exit_info:
        cli("info", "model")  # the positional form of before
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "qg-tokenizer info: error: the following arguments are required: --model (see --help)"
    ]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model (locally or from the hub)."""

    def load_tokenizer(*args, **kwargs):
        raise AssertionError(f"the model was loaded: {args} {kwargs}")

    monkeypatch.setattr(qg_tokenizer.cli, "load_tokenizer", load_tokenizer)


@pytest.mark.parametrize(
    "model, message",
    [
        ("runs/final", ": no such model folder ('runs' is a folder here, so this is a path)"),  # `org/name` in form
        ("weights.safetensors", ": no such model folder"),
        ("my model", ": no such model folder"),  # not a hub repo id
        ("~/no-such-qg-model", ": no such model folder"),
        ("config.json", " is a file, expected a saved model folder (the one holding config.json)"),
    ],
)  # fmt: skip
def test_local_looking_models_that_do_not_exist_fail_before_the_hub(cli, out, no_loading, model, message):
    (out / "runs").mkdir()
    (out / "config.json").write_text("{}")
    status, _, err = cli("compress", "digit0.png", "--model", model, "-o", "x.qgt")
    assert status == 1 and err.splitlines() == [f"qg-tokenizer compress: error: --model {model!r}{message}"]
    assert sorted(os.listdir(out)) == ["config.json", "runs"]


@pytest.mark.parametrize("name", ["gpt2", "some-org/qgvae-tiny", "org/model-v1.5", "org/runs"])
def test_hub_repo_ids_are_left_to_the_hub(out, name):
    (out / "runs").mkdir()  # a local folder named like a repo (not an owner) does not make `org/runs` a path
    assert qg_tokenizer_cli.check_model(name) == name


def test_remote_code_is_refused_without_a_prompt(cli, out, monkeypatch):
    (out / "custom").mkdir()
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel"}
    (out / "custom" / "config.json").write_text(json.dumps({"model_type": "x-custom", "auto_map": auto_map}))
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt="": prompts.append(prompt) or "n")  # transformers asks so
    status, _, err = cli("compress", "digit0.png", "--model", "custom", "-o", "x.qgt")
    assert prompts == [] and status == 1 and len(err.splitlines()) == 1
    assert "not a model type of qg_tokenizer, and the code its repo ships runs only with --trust-remote-code" in err

    asked = []

    def load_tokenizer(name, **kwargs):
        asked.append(kwargs["trust_remote_code"])
        raise qg_tokenizer_cli.CLIError("stop here")

    monkeypatch.setattr(qg_tokenizer.cli, "load_tokenizer", load_tokenizer)
    assert cli("compress", "digit0.png", "--model", "custom", "-o", "x.qgt", "--trust-remote-code")[0] == 1
    assert asked == [True] and os.listdir(out) == ["custom"]


def test_decode_to_an_unknown_suffix_is_an_error_not_a_folder(cli, out, no_loading):
    np.save(out / "tokens.npy", np.zeros((2, 8), dtype=np.int16))
    status, _, err = cli("decode", "tokens.npy", "--model", "model", "-o", "images.xyz")
    assert status == 1 and "-o 'images.xyz': expected an image file (.png, .jpg, ...) for one image, or a folder" in err
    assert err.rstrip().endswith("got the suffix '.xyz'") and os.listdir(out) == ["tokens.npy"]


@pytest.mark.parametrize("argv", [["compress", "digit0.png", "-o", "ro/x.qgt"], ["decode", "t.npy", "-o", "ro/images"]])
def test_a_read_only_output_folder_is_an_error_before_any_work(cli, out, monkeypatch, no_loading, argv):
    np.save(out / "t.npy", np.zeros((2, 8), dtype=np.int16))
    (out / "ro").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: answer as the OS does for everyone else
        access, read_only = os.access, (out / "ro").resolve()
        monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not (
            mode & os.W_OK and Path(p).resolve() == read_only))  # fmt: skip
    status, _, err = cli(*argv, "--model", "model")
    assert status == 1 and err.splitlines() == [
        f"qg-tokenizer {argv[0]}: error: -o {argv[-1]!r}: the folder 'ro' is not writable"
    ]
    assert os.listdir(out / "ro") == []


def test_a_failed_write_names_the_output_and_leaves_nothing(cli, workspace, model, processor, out, monkeypatch):
    (out / "digit.qgt").write_bytes(model.compress(pixels(processor, workspace / "digit0.png"))[0])

    def save(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PIL.Image.Image, "save", save)
    status, _, err = cli("decompress", "digit.qgt", "--model", "model", "-o", "image.png")
    assert status == 1 and err.splitlines() == [
        "qg-tokenizer decompress: error: -o 'image.png': cannot write (No space left on device)"
    ]
    assert os.listdir(out) == ["digit.qgt"]


def test_cli_and_tokenize_dataset_read_an_exif_rotated_jpeg_alike(cli, out, model, processor):
    """One image loader: the CLI's tokens of an EXIF-rotated JPEG are `tokenize_dataset`'s."""
    from datasets import Dataset, Image

    from qg_tokenizer import tokenize_dataset

    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6  # shown rotated by 90 degrees
    ramp = np.add.outer(np.arange(12) * 20, np.arange(24) * 10).clip(0, 255).astype(np.uint8)
    PIL.Image.fromarray(ramp).save(out / "rotated.jpg", format="JPEG", quality=95, exif=exif)
    assert cli("encode", "rotated.jpg", "--model", "model", "-o", "tokens.npy")[0] == 0
    dataset = Dataset.from_dict({"image": [str(out / "rotated.jpg")]}).cast_column("image", Image())
    expected = tokenize_dataset(dataset, model, processor, batch_size=1)["token_ids"]
    np.testing.assert_array_equal(np.load(out / "tokens.npy"), np.asarray(expected))


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is not a valid token file (EOFError"), (np.zeros((0, 8), np.int64), "holds no token ids (shape (0, 8))")],
)
def test_empty_token_files_are_clear_errors(cli, out, content, message):
    if isinstance(content, bytes):
        (out / "t.npy").write_bytes(content)
    else:
        np.save(out / "t.npy", content)
    status, _, err = cli("decode", str(out / "t.npy"), "--model", "model", "-o", str(out / "images"))
    assert status == 1 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["nan", "truncate"])
def test_corrupt_weights_are_refused_before_any_output(cli, workspace, out, tmp_path, damage):
    """NaN weights would give NaN images with exit 0, a truncated file a raw SafetensorError."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(workspace / "model", broken)
    weights = broken / "model.safetensors"
    if damage == "nan":
        tensors = load_file(weights)
        tensors["decoder.residual.weight"][0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    status, _, err = cli("compress", str(workspace / "digit0.png"), "--model", str(broken), "-o", str(out / "x.qgt"))
    assert status == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    expected = "decoder.residual.weight): the file is corrupt" if damage == "nan" else "cannot load the model"
    assert expected in err and not (out / "x.qgt").exists()


# ------------------------------------------------------------------------------------------- entropy coding
@pytest.fixture(scope="module")
def prior_dir(workspace, model, processor) -> Path:
    """A prior fitted to the three digits' tokens (so they code shorter than the fixed width), saved as a folder."""
    from qg_tokenizer import QGPriorConfig, QGPriorForCausalLM

    torch.manual_seed(0)
    prior = QGPriorForCausalLM(QGPriorConfig(
        num_image_tokens=model.config.num_tokens, codebook_size=model.config.codebook_size, num_classes=0,
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ))  # fmt: skip
    images = torch.cat([pixels(processor, workspace / f"digit{i}.png") for i in range(3)])
    inputs = prior.prepare_input_ids(model.encode(images).token_ids)
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        prior(inputs, labels=inputs).loss.backward()
        optimizer.step()
    prior.eval().save_pretrained(workspace / "prior")
    return workspace / "prior"


def test_cli_entropy_codes_with_a_prior_and_needs_it_back(cli, workspace, model, processor, prior_dir, out):
    from qg_tokenizer import QGPriorForCausalLM
    from qg_tokenizer.codec import PRIOR_FORMAT_VERSION

    status, stdout, _ = cli("compress", "digit0.png", "--model", "model", "--prior", str(prior_dir), "-o", "d.qgt")
    data = (out / "d.qgt").read_bytes()
    prior = QGPriorForCausalLM.from_pretrained(prior_dir).eval()
    assert status == 0 and data[3] == PRIOR_FORMAT_VERSION and "entropy-coded payload" in stdout
    assert data == model.compress(pixels(processor, workspace / "digit0.png"), prior=prior)[0]
    assert len(data) < len(model.compress(pixels(processor, workspace / "digit0.png"))[0])
    status, _, err = cli("decompress", "d.qgt", "--model", "model", "-o", "d.png")
    assert status == 1 and "is entropy-coded with a prior" in err and "--prior DIR" in err
    status, stdout, _ = cli("decompress", "d.qgt", "--model", "model", "--prior", str(prior_dir), "-o", "d.png",
                            "--prefix-length", "3")  # fmt: skip
    expected = processor.postprocess(model.decompress([data], prior=prior, prefix_length=3), "pil")[0]
    assert status == 0 and "from 3 of 8 tokens" in stdout
    assert np.array_equal(png_array(out / "d.png"), png_array(expected))


def test_cli_rate_control(cli, capsys, workspace, model, processor, prior_dir, out):
    for prior in ([], ["--prior", str(prior_dir)]):
        status, stdout, _ = cli(
            "compress", "digit1.png", "--model", "model", *prior, "--max-bytes", "24", "-o", "m.qgt"
        )
        assert status == 0 and len((out / "m.qgt").read_bytes()) <= 24
    image = pixels(processor, workspace / "digit1.png")
    with torch.no_grad():  # the PSNR of the first 4 tokens: a target that needs a prefix
        decoded = model.decode(model.encode(image).token_ids, prefix_length=4).pixel_values.clamp(0, 1)
    target = float(10 * torch.log10(1 / (decoded - image).pow(2).mean()))
    status, stdout, _ = cli("compress", "digit1.png", "--model", "model", "--target-psnr", str(target), "-o", "t.qgt")
    expected = model.compress(image, target_psnr=target)[0]
    assert status == 0 and (out / "t.qgt").read_bytes() == expected
    status, _, err = cli("compress", "digit1.png", "--model", "model", "--max-bytes", "5", "-o", "x.qgt")
    assert status == 1 and "max_bytes=5 is below the smallest stream" in err
    status, _, err = cli("compress", "digit1.png", "--model", "model", "--prior", "no-such-dir", "-o", "x.qgt")
    assert status == 1 and "--prior 'no-such-dir': not a prior folder" in err
    for bad, message in ((["--target-psnr", "abc"], "expected a number, got 'abc'"),
                         (["--max-bytes", "0"], "expected an integer >= 1")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli("compress", "digit1.png", "--model", "model", *bad, "-o", "x.qgt")
        assert message in capsys.readouterr().err
