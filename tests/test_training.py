"""`training/train.py` and `training/common.py`: configs, resume, two processes, bf16, QGGAN; the QGGAN module."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from datasets import Dataset, DatasetDict, IterableDataset
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModel

from qg_tokenizer import QGVAEConfig, QGVAEModel
from qg_tokenizer.cli import model_info
from qg_tokenizer.data import MNIST_PATH, load_image_dataset
from qg_tokenizer.metrics import usage_summary
from qg_tokenizer.modeling_qggan import (
    QGGANDiscriminator,
    adaptive_gan_weight,
    decoder_last_layer,
    hinge_discriminator_loss,
    qggan_autoencoder_loss,
)

from .conftest import TINY, tiny_config

TRAINING = Path(__file__).resolve().parents[1] / "training"
sys.path.insert(0, str(TRAINING))

import train  # noqa: E402
from common import ConfigError, DataConfig, build_model_config, eval_prefix_lengths, load_config  # noqa: E402
from demo import plot_training_curves, write_figures  # noqa: E402

MODEL_OVERRIDES = [f"model.{k}={v}" for k, v in {**TINY, "reset_interval": 3, "token_dropout_prob": 0.5}.items()]


def reset_accelerate_state() -> None:
    """Every in-process run builds its own `Accelerator` (mixed precision and plugins differ between runs)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def isolated_run():
    """One intra-op thread (tiny models; OpenMP threads spin badly on shared cores) and a fresh accelerate state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate_state()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """64 training and 8 test MNIST digits as a `.npz` (the processor resizes them to the tiny model's 16x16)."""
    with np.load(MNIST_PATH) as npz:
        images = npz["images"][:72]
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, train=images[:64], test=images[64:])
    return path


def tiny_argv(output_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output_dir}", f"data.source={data}", "batch_size=8", "eval_batch_size=8", "max_steps=6",
        "eval_every=3", "log_every=1", "checkpoint_every=3", "num_grid_images=4", "report_to=none", *MODEL_OVERRIDES,
        *extra,
    ]  # fmt: skip


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------- configs
def test_load_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 7\nlearning_rate: 1e-3\ndata:\n  source: foo.npz\nmodel:\n  model_type: qgvae\n")
    cfg = load_config(
        train.TrainConfig, path,
        ["data.horizontal_flip=true", "max_train_time=90", "model.num_tokens=32", "seed=3", "mixed_precision=no"],
    )  # fmt: skip
    assert cfg.mixed_precision == "no"  # YAML 1.2 booleans: only true/false
    assert (cfg.max_steps, cfg.learning_rate, cfg.seed) == (7, 1e-3, 3)
    assert isinstance(cfg.data, DataConfig) and cfg.data.source == "foo.npz" and cfg.data.horizontal_flip is True
    assert cfg.max_train_time == 90.0 and isinstance(cfg.max_train_time, float)  # int accepted for a float key
    assert cfg.model == {"model_type": "qgvae", "num_tokens": 32}
    assert cfg.gan == train.GANConfig() and cfg.max_grad_norm is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["max_stepz=3"], "unknown config key 'max_stepz'"),
        (["data.image_colum=img"], "unknown config key 'data.image_colum'"),
        (["max_steps=ten"], "max_steps must be int, got str 'ten'"),
        (["max_steps=2.5"], "max_steps must be int, got float 2.5"),
        (["data.streaming=3"], "data.streaming must be bool, got int 3"),
        (["mixed_precision=fp8"], "mixed_precision must be 'no' or 'fp16' or 'bf16' or null, got str 'fp8'"),
        (["data=3"], "data must be a section"),
        (["max_steps"], "override 'max_steps' must have the form key=value"),
        (["max_steps.x=1"], "max_steps must be int, got dict {'x': 1}"),
        (["max_steps=3", "max_steps.x=1"], "override 'max_steps.x=1': 'max_steps' is not a section"),
    ],
)
def test_load_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(train.TrainConfig, None, overrides)


def test_build_model_config_checks_keys_and_types():
    config = build_model_config({"model_type": "qgvae", "num_tokens": 32, "token_dropout_prob": 0})
    assert isinstance(config, QGVAEConfig) and config.num_tokens == 32 and config.token_dropout_prob == 0
    with pytest.raises(ConfigError, match="unknown config key 'model.num_tokenz' for model_type 'qgvae'"):
        build_model_config({"model_type": "qgvae", "num_tokenz": 32})
    with pytest.raises(ConfigError, match="model.num_tokens must be int, got float 1.5"):
        build_model_config({"model_type": "qgvae", "num_tokens": 1.5})
    with pytest.raises(ConfigError, match=r"model: QGVAEConfig.num_tokens \(6\) must be divisible by num_heads \(4\)"):
        build_model_config({"model_type": "qgvae", "num_tokens": 6, "num_heads": 4})
    with pytest.raises(ConfigError, match="model.model_type must name a registered model type"):
        build_model_config({"model_type": "qgvea"})


@pytest.mark.parametrize("name", ["mnist-demo", "photo-set", "photos32", "cifar10", "celeba64", "imagenet128"])
def test_shipped_configs_parse_and_build(name):
    cfg = load_config(train.TrainConfig, TRAINING / "configs" / f"{name}.yaml")
    config = build_model_config(cfg.model)
    expected_bytes = {
        "mnist-demo": 18, "photo-set": 72, "photos32": 72, "cifar10": 72, "celeba64": 288, "imagenet128": 288
    }[name]  # fmt: skip
    assert config.bytes_per_image == expected_bytes
    with torch.device("meta"):  # builds every module without allocating ImageNet-sized weights
        model = AutoModel.from_config(config)
    assert model.quantizer.codebook.shape == (config.num_tokens, config.codebook_size, config.codeword_dim)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["learning_rat=1e-3"], "unknown config key 'learning_rat'"),
        (["data.image_column=img"], "data.image_column: image_column 'img' not found in split 'train'"),
        (["data.eval_split=validation"], "data.eval_split: split 'validation' not found"),
        (["gan.enabled=true", "gan.perceptual_loss=lpips"], "the LPIPS perceptual loss needs the `lpips` package"),
    ],
)
def test_config_errors_stop_before_training(tmp_path, digits, extra, message):
    with pytest.raises((ConfigError, ImportError), match=message):
        train.main(tiny_argv(tmp_path / "out", digits, *extra))
    assert not (tmp_path / "out" / "train_log.jsonl").exists()
    assert not (tmp_path / "out-training" / "checkpoints").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        ("/nonexistent/d.npz", "data.source: no .npz dataset file at '/nonexistent/d.npz'"),
        ("/nonexistent/images", "data.source: no data set file or folder at '/nonexistent/images'"),
    ],
)
def test_missing_dataset_is_a_config_error(tmp_path, source, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.main(tiny_argv(tmp_path / "out", Path(source)))


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("train.py", ["learning_rat=1e-3"], "error: unknown config key 'learning_rat'; known keys: output_dir,"),
        ("train_prior.py", ["tokens=/nonexistent"], "error: tokens: '/nonexistent' is not a DatasetDict folder"),
    ],
)
def test_scripts_end_a_config_error_with_one_line(tmp_path, script, argv, message):
    command = [sys.executable, str(TRAINING / script), f"output_dir={tmp_path / 'out'}", *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and done.stderr.startswith(message) and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_run_training_reports_a_failed_run(tmp_path):
    from demo import run_training

    log = tmp_path / "run.log"
    with pytest.raises(RuntimeError, match=rf"training into .*out failed \(exit 1\); see {re.escape(str(log))}"):
        run_training(tmp_path / "out", ["learning_rat=1e-3"], log_file=log, num_threads=1)
    assert "error: unknown config key 'learning_rat'" in log.read_text()
    with pytest.raises(RuntimeError, match=r"failed \(exit 1\)$"):
        run_training(tmp_path / "out", ["learning_rat=1e-3"], config=None)


def test_eval_prefix_lengths():
    assert eval_prefix_lengths(16) == [2, 4, 8, 16]
    assert eval_prefix_lengths(256) == [32, 64, 128, 256]
    assert eval_prefix_lengths(4) == [1, 2, 4]


def test_load_image_dataset_sources(tmp_path, digits):
    """`qg_tokenizer.data.load_image_dataset`: .npz, image folder, save_to_disk folder, streaming, and its errors."""
    npz = load_image_dataset(digits, "test")
    assert npz.num_rows == 8 and npz.column_names == ["image"]
    digits_images = list(npz["image"])
    for split, images in (("train", digits_images[:3]), ("test", digits_images[3:5])):
        (tmp_path / "folder" / split).mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(tmp_path / "folder" / split / f"{i}.png")
    folder = load_image_dataset(tmp_path / "folder", "test")
    assert folder.num_rows == 2 and np.array_equal(np.asarray(folder[1]["image"]), np.asarray(npz[4]["image"]))
    DatasetDict(test=Dataset.from_dict({"img": digits_images, "n": list(range(8))})).save_to_disk(tmp_path / "disk")
    disk = load_image_dataset(tmp_path / "disk", "test", image_column="img")
    assert disk.column_names == ["img"] and disk.num_rows == 8
    streamed = load_image_dataset(digits, "train", streaming=True, num_shards=2)
    assert isinstance(streamed, IterableDataset) and streamed.n_shards == 2 and len(list(streamed)) == 64
    with pytest.raises(ValueError, match=r"split 'valid' not found in data set .*; available splits: \['test', 'tr"):
        load_image_dataset(tmp_path / "folder", "valid")
    with pytest.raises(ValueError, match="image_column 'n' of .* must be an Image feature"):
        load_image_dataset(tmp_path / "disk", "test", image_column="n")


# ------------------------------------------------------------------------------------------------------ training
def test_train_resume_matches_straight_run(tmp_path, digits):
    common = ["max_steps=8", "checkpoint_every=4", "eval_every=4", "data.horizontal_flip=true"]
    straight = train.main(tiny_argv(tmp_path / "straight", digits, *common))
    reset_accelerate_state()
    train.main(tiny_argv(tmp_path / "split", digits, *common, "max_steps=4"))  # stops at step 4 ...
    assert [p.name for p in (tmp_path / "split-training" / "checkpoints").iterdir()] == ["checkpoint-4"]
    reset_accelerate_state()
    resumed = train.main(tiny_argv(tmp_path / "split", digits, *common, "--resume", "latest"))  # ... and goes on

    results = json.loads((tmp_path / "split" / "results.json").read_text())
    expected = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["step"] == expected["step"] == 8
    assert results["eval"]["psnr"] == pytest.approx(expected["eval"]["psnr"], abs=1e-4)
    for name, param in straight.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(name), param, rtol=1e-5, atol=1e-6, msg=name)
    log = read_log(tmp_path / "split")  # the resumed run continued the log of the first
    assert [entry["step"] for entry in log] == list(range(1, 9))
    assert [entry["step"] for entry in log if entry.get("codewords_reset", 0) > 0] == [3, 6]


def test_train_outputs_load_and_report(tmp_path, digits):
    out = tmp_path / "out"
    train.main(tiny_argv(out, digits, "checkpoints_total_limit=1"))
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, QGVAEModel) and model.config.num_tokens == TINY["num_tokens"]
    # checkpoints and tensorboard logs are beside the output folder, which holds what goes to the hub
    assert [p.name for p in (tmp_path / "out-training" / "checkpoints").iterdir()] == ["checkpoint-6"]  # 3 pruned
    assert not (out / "checkpoints").exists() and not (out / "logs").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".py")) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "results.json", "samples",
        "train_config.json", "train_log.jsonl",
    ]  # fmt: skip
    umask = os.umask(0o077)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors writes 0o600 on its own
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 6 and results["bytes_per_image"] == 5  # 8 tokens x log2(32) bits
    assert results["eval"]["num_images"] == 8 and set(results["eval"]) >= {"psnr", "ssim", "psnr_k1", "psnr_k2"}
    assert 5 < results["eval"]["psnr"] < 40 and 0 < results["eval"]["ssim"] <= 1
    usage = results["train_set_usage"]
    assert usage["num_images"] == 64 and len(usage["used_fraction_per_token"]) == TINY["num_tokens"]
    assert min(usage["used_fraction_per_token"]) == usage["usage_min"] > 0
    # the saved model keeps the final usage count over the training set (`qg-tokenizer info` reports it)
    counts = model.quantizer.usage_counts
    assert counts.sum() == 64 * TINY["num_tokens"] and usage_summary(counts) == pytest.approx(
        {k: usage[k] for k in ("usage_mean", "usage_min", "perplexity_mean", "dead_codewords")}
    )
    assert model_info(model)["codebook_usage"]["used_fraction_min"] == pytest.approx(usage["usage_min"])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    card = (out / "README.md").read_text()
    assert "\n# QG-VAE (8 tokens x 5 bits) trained on digits.npz\n" in card
    assert "**5 bytes\nper image**" in card and f"| PSNR | {results['eval']['psnr']:.2f} |" in card
    assert "6 optimizer steps" in card
    metadata = ModelCard(card).data.to_dict()
    assert metadata["model-index"][0]["name"] == "QG-VAE (8 tokens x 5 bits) trained on digits.npz"
    metrics = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"psnr": round(results["eval"]["psnr"], 4), "ssim": round(results["eval"]["ssim"], 4)}
    steps = [entry["step"] for entry in read_log(out)]
    assert steps == [1, 2, 3, 4, 5, 6]

    # the demo's figures, from the same folder
    write_figures(out, num_images=4)
    plot_training_curves(results, out / "codebook_usage.png")
    for name, shape in {"reconstructions": (2, 4), "progressive": (5, 2)}.items():  # rows, columns; labelled
        layout = json.loads(Image.open(out / f"{name}.png").text["layout"])  # (tests/test_visualize.py)
        assert (layout["rows"], layout["columns"]) == shape
    assert Image.open(out / "codebook_usage.png").size == (1200, 432)


def test_bf16_run(tmp_path, digits):
    model = train.main(tiny_argv(tmp_path, digits, "mixed_precision=bf16", "max_steps=3"))
    assert model.quantizer.codebook.dtype == torch.float32
    log = read_log(tmp_path)
    assert all(np.isfinite(entry["loss"]) for entry in log) and log[-1]["codewords_reset"] > 0
    assert np.isfinite(json.loads((tmp_path / "results.json").read_text())["eval"]["psnr"])


def test_streaming_run(tmp_path, digits):
    """A streamed data set (converted from the .npz) trains, evaluates and counts usage on a bounded sample."""
    train.main(tiny_argv(tmp_path, digits, "data.streaming=true", "max_eval_samples=8", "final_usage_samples=40"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["step"] == 6 and results["eval"]["num_images"] == 8
    assert results["train_set_usage"]["num_images"] == 40
    with pytest.raises(ConfigError, match="data.streaming needs max_eval_samples and final_usage_samples"):
        train.main(tiny_argv(tmp_path, digits, "data.streaming=true"))


def test_qggan_run_alternates_and_stays_finite(tmp_path, digits):
    train.main(
        tiny_argv(
            tmp_path, digits, "max_steps=7", "gan.enabled=true", "gan.warmup_steps=3", "gan.perceptual_loss=none",
            "gan.discriminator_channels=4", "gan.discriminator_max_channels=8",
        )
    )  # fmt: skip
    log = read_log(tmp_path)
    # steps 1-3 plain QG-VAE, then the discriminator (odd steps) and the autoencoder with the GAN term alternate
    kinds = [("d_loss" in entry, "gan_weight" in entry) for entry in log]
    assert kinds == [(False, False)] * 3 + [(True, False), (False, True)] * 2
    for entry in log:
        assert all(np.isfinite(v) for v in entry.values())
    assert all(e["gan_weight"] > 0 for e in log if "gan_weight" in e)


def test_two_processes_keep_identical_codebooks(tmp_path, digits):
    """DDP on two CPU processes, with resets at steps 3 and 6: both processes end with the same parameters."""
    script = tmp_path / "run_and_checksum.py"
    script.write_text(
        "import hashlib, sys\n"
        f"sys.path.insert(0, {str(TRAINING)!r})\n"
        "from accelerate import PartialState\n"
        "import train\n"
        "model = train.main(sys.argv[1:])\n"
        "digest = hashlib.sha256()\n"
        "for name, param in model.named_parameters():\n"
        "    digest.update(name.encode() + param.detach().numpy().tobytes())\n"
        f"open(f'{tmp_path}/checksum-{{PartialState().process_index}}.txt', 'w').write(digest.hexdigest())\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(script), *tiny_argv(tmp_path / "out", digits, "batch_size=4"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checksums = [(tmp_path / f"checksum-{rank}.txt").read_text() for rank in (0, 1)]
    assert checksums[0] == checksums[1]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["num_processes"] == 2 and results["step"] == 6
    assert results["train_set_usage"]["num_images"] == 64  # both processes' shards, counted once
    resets = [e["codewords_reset"] for e in read_log(tmp_path / "out") if "codewords_reset" in e]
    assert len(resets) == 2 and resets[0] > 0


# ------------------------------------------------------------------------------------------------------- QGGAN
def test_discriminator_matches_reference_parameter_count():
    """The reference discriminator has 422,432 parameters at 32x32 (RES_BLOCKS=1), 5,488 of them in its unused
    1x1 `full_residual` convolutions (16*16+16, 32*32+32, 64*64+64 over three levels)."""
    discriminator = QGGANDiscriminator(QGVAEConfig.from_preset("cifar10-demo"))
    assert sum(p.numel() for p in discriminator.parameters()) == 422_432 - 5_488
    assert discriminator(torch.rand(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))


def test_adaptive_weight_and_autoencoder_loss():
    torch.manual_seed(0)
    model = QGVAEModel(tiny_config()).train()
    discriminator = QGGANDiscriminator(model.config, 4, 8)
    pixel_values = torch.rand(2, 1, 16, 16)
    output = model(pixel_values)
    fake_logits = discriminator(output.reconstruction)
    last_layer = decoder_last_layer(model)
    loss, terms = qggan_autoencoder_loss(pixel_values, output, fake_logits, last_layer, factor=0.75)

    l1 = (output.reconstruction - pixel_values).abs().mean()
    gan = -fake_logits.mean()
    grad_l1 = torch.autograd.grad(l1, last_layer, retain_graph=True)[0]
    grad_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    expected_weight = 0.75 * grad_l1.norm() / (grad_gan + 1e-6).norm()
    torch.testing.assert_close(terms["gan_weight"], expected_weight)
    torch.testing.assert_close(adaptive_gan_weight(l1, gan, last_layer), expected_weight)
    vq = 0.25 * output.codebook_loss + 1.0 * output.commitment_loss
    torch.testing.assert_close(loss, l1 + vq + expected_weight * gan)
    assert not terms["gan_weight"].requires_grad
    loss.backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0 and last_layer.grad.abs().sum() > 0


def test_patch_vqvae_trains_and_counts_its_shared_codebook(tmp_path, digits):
    """The baseline goes through the same script; its final usage is over its ONE codebook, each image counted once."""
    patch = dict(
        model_type="patch_vqvae", image_size=16, num_channels=1, grid_size=4, codebook_size=32, codeword_dim=8,
        block_out_channels="[8,16,16]", num_res_blocks=1, reset_interval=3,
    )  # fmt: skip
    argv = tiny_argv(tmp_path, digits)[: -len(MODEL_OVERRIDES)] + [f"model.{k}={v}" for k, v in patch.items()]
    model = train.main(argv)
    assert model.config.model_type == "patch_vqvae" and model.config.num_tokens == 16
    results = json.loads((tmp_path / "results.json").read_text())
    usage = results["train_set_usage"]
    assert usage["num_images"] == 64 and len(usage["used_fraction_per_token"]) == 1
    assert results["history"][0]["train_usage_images"] == 24  # 3 steps x batch 8 in the first window


def test_training_clock_leaves_out_paused_time():
    import time

    from accelerate import Accelerator
    from common import TrainerState, TrainingClock

    state = TrainerState(step=3, train_time=5.0)  # as resumed from a checkpoint
    clock = TrainingClock(state)
    with clock.paused():
        time.sleep(0.3)
    clock.tick()
    assert 5.0 <= state.train_time < 5.2
    accelerator = Accelerator(cpu=True)
    assert not clock.out_of_time(None, accelerator) and not clock.out_of_time(5.5, accelerator)
    assert clock.out_of_time(5.0, accelerator)
