"""The converging recipe (issue 11): random whole-photo crops, EMA weights, data-dependent codebook initialisation and
the learning-rate schedule on the training-time clock."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from qg_tokenizer.data import RandomCropStream, load_image_dataset, load_photos, photo_crop_dataset
from qg_tokenizer.quantizer_qgvae import PerTokenQuantizer

from .conftest import TINY
from .test_training import isolated_run, read_log, reset_accelerate_state  # noqa: F401 (autouse fixture)

TRAINING = Path(__file__).resolve().parents[1] / "training"
sys.path.insert(0, str(TRAINING))

import train  # noqa: E402
from common import ConfigError, DataConfig, load_splits  # noqa: E402

COLOUR = [f"model.{k}={v}" for k, v in {**TINY, "num_channels": 3, "reset_interval": 3}.items()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A photo_set-like .npz: three whole 'photos' (smooth colour ramps of different sizes), fixed crops and a test
    split."""
    rng = np.random.default_rng(0)
    whole = {}
    for name, (h, w) in {"a": (40, 56), "b": (48, 48), "c": (36, 60)}.items():
        y, x = np.mgrid[:h, :w]
        ramp = np.stack([x / w, y / h, (x + y) / (h + w)], -1) * 200 + rng.integers(0, 50, (h, w, 3))
        whole[f"photo_train_{name}"] = ramp.astype(np.uint8)
    path = tmp_path_factory.mktemp("photos") / "photos.npz"
    fixed = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(path, train=fixed, test=fixed[:8], test64=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), **whole)
    return path


def crop_argv(output_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output_dir}", f"data.source={data}", "data.random_crops=true", "data.crop_min_side=16",
        "batch_size=4", "eval_batch_size=8", "max_steps=6", "eval_every=3", "log_every=1", "checkpoint_every=3",
        "num_grid_images=2", "report_to=none", *COLOUR, *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------- random crops
def test_random_crops_are_seeded_per_process_and_inside_the_photo(photos):
    whole = list(load_photos(photos).values())
    assert [p.shape for p in whole] == [(40, 56, 3), (48, 48, 3), (36, 60, 3)]
    stream = RandomCropStream(whole, 16, seed=3, min_side=16)
    boxes = [stream.crop_box(i) for i in range(300)]
    for photo, top, left, side, _ in boxes:
        height, width = whole[photo].shape[:2]
        assert 16 <= side <= min(height, width) and 0 <= top <= height - side and 0 <= left <= width - side
    assert {b[0] for b in boxes} == {0, 1, 2} and len({b[3] for b in boxes}) > 10  # every photo, many scales
    assert 0.35 < np.mean([b[4] for b in boxes]) < 0.65  # flips about half the time

    again = RandomCropStream(whole, 16, seed=3, min_side=16)
    other_process = RandomCropStream(whole, 16, seed=3, process_index=1, min_side=16)
    assert [again.crop_box(i) for i in range(300)] == boxes
    assert [other_process.crop_box(i) for i in range(50)] != boxes[:50]
    # the stream yields crop i, i+1, ... from `start` on (a resumed run continues where it stopped)
    resumed = iter(RandomCropStream(whole, 16, seed=3, start=7, min_side=16))
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), np.asarray(stream.crop(7)))
    image = stream.crop(0)
    assert image.size == (16, 16) and image.mode == "RGB"


def test_random_crop_pixels_are_the_resized_region(photos):
    """A crop of side == output size is the region itself (flipped when its box says so)."""
    whole = list(load_photos(photos).values())
    stream = RandomCropStream([whole[1]], 48, seed=0, min_side=48)  # the only possible region: the whole photo
    for i in range(4):
        expected = whole[1][:, ::-1] if stream.crop_box(i)[4] else whole[1]
        np.testing.assert_array_equal(np.asarray(stream.crop(i)), expected)


def test_photo_errors_and_fixed_crop_splits(tmp_path, photos):
    with pytest.raises(FileNotFoundError, match="no .npz photo file"):
        load_photos(tmp_path / "missing.npz")
    np.savez(tmp_path / "none.npz", train=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no arrays named photo_train_<name>"):
        load_photos(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="min_side=32"):
        RandomCropStream([np.zeros((20, 40, 3), np.uint8)], 16)
    assert len(load_image_dataset(photos, "test64")) == 4  # extra image arrays are splits of their own
    with pytest.raises(ValueError, match="not found"):
        load_image_dataset(photos, "photo_train_a")  # whole photos are not
    fixed = photo_crop_dataset(list(load_photos(photos).values()), 16, num_crops=5, seed=1)
    assert len(fixed) == 5 and fixed[0]["image"].size == (16, 16)


# ---------------------------------------------------------------------------------------- codebook init
def test_init_from_samples_takes_each_tokens_own_outputs():
    quantizer = PerTokenQuantizer(num_tokens=3, codebook_size=4, codeword_dim=2)
    z = torch.arange(10 * 3 * 2, dtype=torch.float32).reshape(10, 3, 2)
    quantizer.init_from_samples(z, torch.Generator().manual_seed(0))
    for c in range(3):
        rows = {tuple(r) for r in z[:, c].tolist()}
        chosen = [tuple(r) for r in quantizer.codebook[c].tolist()]
        assert set(chosen) <= rows and len(set(chosen)) == 4  # K distinct samples of token c itself
    few = torch.randn(2, 3, 2)  # fewer samples than codewords: repeated with noise, still distinct
    quantizer.init_from_samples(few, torch.Generator().manual_seed(0))
    assert (quantizer.codebook - few[:1].transpose(0, 1)).abs().min() < 1e-3
    assert torch.cdist(quantizer.codebook, quantizer.codebook).add(torch.eye(4) * 9).min() > 0
    with pytest.raises(ValueError, match=r"z must have shape \[N, 3, 2\]"):
        quantizer.init_from_samples(torch.zeros(4, 2, 2))


def test_data_codebook_init_run_uses_every_codeword(tmp_path, photos):
    model = train.main(crop_argv(tmp_path / "data", photos, "codebook_init=data", "max_steps=1"))
    reset_accelerate_state()
    uniform = train.main(crop_argv(tmp_path / "uniform", photos, "max_steps=1"))
    # data-initialised codewords lie among the encoder's outputs; uniform ones in U(-0.5, 0.5) do not
    data_usage = json.loads((tmp_path / "data" / "results.json").read_text())["train_set_usage"]["usage_mean"]
    uniform_usage = json.loads((tmp_path / "uniform" / "results.json").read_text())["train_set_usage"]["usage_mean"]
    assert data_usage > uniform_usage
    assert not torch.allclose(model.quantizer.codebook, uniform.quantizer.codebook)


# ------------------------------------------------------------------------------------ EMA and the schedule
def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path, photos):
    common = ["max_steps=6", "ema_decay=0.5", "codebook_init=data"]
    straight = train.main(crop_argv(tmp_path / "straight", photos, *common))
    reset_accelerate_state()
    train.main(crop_argv(tmp_path / "split", photos, *common, "max_steps=3"))
    reset_accelerate_state()
    resumed = train.main(crop_argv(tmp_path / "split", photos, *common, "--resume", "latest"))
    for name, param in straight.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(name), param, rtol=1e-5, atol=1e-6, msg=name)

    saved = AutoModel.from_pretrained(tmp_path / "straight")
    for name, param in saved.named_parameters():  # the saved weights are the returned (EMA) model's
        torch.testing.assert_close(param, straight.get_parameter(name), msg=name)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    final = results["history"][-1]
    assert "live_psnr" in final and final["live_psnr"] != pytest.approx(final["psnr"], abs=1e-6)
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        train.main(crop_argv(tmp_path / "bad", photos, "ema_decay=1.0"))


def test_learning_rate_schedule_on_the_time_clock(tmp_path, photos):
    train.main(
        crop_argv(
            tmp_path, photos, "max_steps=1000", "max_train_time=3", "lr_schedule_clock=time", "lr_scheduler=linear",
            "lr_warmup_ratio=0.5", "learning_rate=1e-3", "eval_every=1000", "checkpoint_every=1000",
        )
    )  # fmt: skip
    log = read_log(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    lrs = [entry["lr"] for entry in log]
    peak = int(np.argmax(lrs))
    assert 0 < peak < len(lrs) - 1 and max(lrs) > 5e-4  # warm-up over the first half of the time, then decay
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert results["train_time"] >= 3 and lrs[-1] < 0.3 * max(lrs)
    with pytest.raises(ConfigError, match="lr_schedule_clock 'time' needs max_train_time"):
        train.main(crop_argv(tmp_path / "bad", photos, "lr_schedule_clock=time"))


def test_validation_images_hold_out_the_end_of_a_fixed_training_split(photos):
    full = load_image_dataset("embedded-mnist", "train")
    pixels = lambda split, i: np.asarray(split[i]["image"])  # noqa: E731
    train_split, validation = load_splits(DataConfig(eval_split="validation", validation_images=100), 1)
    assert (len(train_split), len(validation)) == (len(full) - 100, 100)
    assert np.array_equal(pixels(validation, 0), pixels(full, len(full) - 100))
    assert np.array_equal(pixels(validation, 99), pixels(full, len(full) - 1))
    assert np.array_equal(pixels(train_split, len(full) - 101), pixels(full, len(full) - 101))
    held_out = {pixels(validation, i).tobytes() for i in range(100)}
    assert not held_out & {pixels(train_split, i).tobytes() for i in range(len(full) - 200, len(full) - 100)}
    train_split, test = load_splits(DataConfig(validation_images=100), 1)  # the test split is untouched
    assert (len(train_split), len(test)) == (len(full) - 100, len(load_image_dataset("embedded-mnist", "test")))
    with pytest.raises(ConfigError, match=rf"data.validation_images must be in \[0, {len(full)}\), got {len(full)}"):
        load_splits(DataConfig(eval_split="validation", validation_images=len(full)), 1)
    with pytest.raises(ConfigError, match="data.validation_images needs a fixed training split"):
        load_splits(DataConfig(source=str(photos), random_crops=True, validation_images=4), 1, 16)


def test_validation_split_holds_out_training_photos(tmp_path, photos):
    train.main(
        crop_argv(
            tmp_path, photos, "max_steps=2", "data.validation_photos=1", "data.eval_split=validation",
            "data.num_validation_crops=6",
        )
    )  # fmt: skip
    assert json.loads((tmp_path / "results.json").read_text())["eval"]["num_images"] == 6
    with pytest.raises(ConfigError, match=r"data.validation_photos must be in \[0, 3\)"):
        train.main(crop_argv(tmp_path / "bad", photos, "data.validation_photos=3"))
    with pytest.raises(ConfigError, match="data.random_crops needs a .npz source"):
        train.main(crop_argv(tmp_path / "bad", "embedded-mnist"))
