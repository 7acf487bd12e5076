"""`training/train.py` runs that go wrong: another run's checkpoints in the folder, a kill while a checkpoint is
written, crafted or damaged checkpoints, two runs on one folder; and what a run leaves for the hub."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import accelerate.accelerator
import pytest
import torch
from accelerate import Accelerator
from filelock import FileLock

from qg_tokenizer import QGVAEConfig

from . import test_training
from .hub_utils import FakeHub
from .test_training import read_log, reset_accelerate_state, tiny_argv, train

# the fixtures of test_training: the digits data set and a fresh accelerate state per run (autouse)
digits, isolated_run = test_training.digits, test_training.isolated_run

from common import DataConfig, RunError, TrainerState, list_checkpoints, run_folder, save_checkpoint  # noqa: E402


def checkpoint_names(output_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(output_dir.with_name(output_dir.name + "-training"))]


def run(output_dir: Path, data: Path, *extra: str) -> dict:
    """One tiny training run (a fresh accelerate state), its `results.json`."""
    reset_accelerate_state()
    train.main(tiny_argv(output_dir, data, *extra))
    return json.loads((output_dir / "results.json").read_text())


class Payload:
    """Pickles to a call that creates `marker`: the stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest match the files as they are now (a crafted checkpoint would)."""
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(checkpoint.iterdir())
        if p.name != "checkpoint.json"
    }
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- another run's checkpoints, resume
def test_fresh_run_refuses_an_earlier_runs_checkpoints_and_resume_checks_the_run(tmp_path, digits):
    out = tmp_path / "out"
    run(out, digits, "max_steps=4")  # logs steps 1-4, checkpoint at step 3
    log_before = (out / "train_log.jsonl").read_text()
    with pytest.raises(RunError, match=r"out-training/checkpoints holds checkpoints of an earlier run \(the newest: "
                       r"checkpoint-3\): continue that run with --resume latest, or start the new one with another "
                       "output_dir"):  # fmt: skip
        run(out, digits, "seed=1")
    assert checkpoint_names(out) == ["checkpoint-3"] and (out / "train_log.jsonl").read_text() == log_before
    with pytest.raises(RunError, match=r"was written by a different run \(seed: 0 -> 1\); only .*max_steps"):
        run(out, digits, "seed=1", "--resume", "latest")
    with pytest.raises(RunError, match=r"\(batch_size: 8 -> 4; learning_rate: 0.0002 -> 0.001\)"):
        run(out, digits, "batch_size=4", "learning_rate=1e-3", "--resume", "latest")

    # the same run goes on (a longer max_steps may change); steps 4 on are logged once, not twice
    results = run(out, digits, "max_steps=6", "--resume", "latest")
    assert results["step"] == 6 and [e["step"] for e in read_log(out)] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in results["history"]] == [3, 6]


def test_rotation_keeps_the_checkpoint_just_written(tmp_path):
    """By step number, never the new one: a checkpoint-9 left in the folder (another run's) once made rotation
    delete every checkpoint as soon as it was written."""
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (9, 2, 4):
        save_checkpoint(accelerator, tmp_path, step, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-9"]


def test_resume_may_change_the_bounds_of_a_run_unless_they_set_its_schedule():
    constant = train.TrainConfig()
    assert {"max_steps", "max_train_time", "eval_every"} <= train.resumable_changes(constant)
    assert {"seed", "batch_size", "learning_rate", "model.num_tokens"}.isdisjoint(train.resumable_changes(constant))
    cosine = train.TrainConfig(lr_scheduler="cosine", max_train_time=60.0)
    assert "max_steps" not in train.resumable_changes(cosine) and "max_train_time" in train.resumable_changes(cosine)
    timed = train.TrainConfig(lr_scheduler="cosine", max_train_time=60.0, lr_schedule_clock="time")
    assert "max_train_time" not in train.resumable_changes(timed) and "max_steps" in train.resumable_changes(timed)
    warmup = train.TrainConfig(lr_warmup_ratio=0.1)  # a warm-up over a fraction of the schedule
    assert "max_steps" not in train.resumable_changes(warmup)


def test_resuming_an_older_checkpoint_refuses_newer_ones_in_the_folder(tmp_path, digits):
    out = tmp_path / "out"
    run(out, digits, "checkpoints_total_limit=null")  # checkpoints at steps 3 and 6
    with pytest.raises(RunError, match=r"also holds checkpoint-6, which --resume latest would take for this run's"):
        run(out, digits, "--resume", str(tmp_path / "out-training" / "checkpoints" / "checkpoint-3"))


# --------------------------------------------------------------------------------- a kill while checkpointing
class Killed(Exception):
    """Stands for the SIGKILL of a run (a real KeyboardInterrupt would stop pytest too)."""


def test_kill_while_checkpointing_resumes_from_the_previous_complete_checkpoint(tmp_path, digits, monkeypatch):
    out = tmp_path / "out"
    write_state = accelerate.accelerator.save_accelerator_state

    def killed_at_step_6(output_dir, *args, **kwargs):
        written = write_state(output_dir, *args, **kwargs)  # weights, optimizer, random states ...
        if Path(output_dir).name.startswith("checkpoint-6"):
            raise Killed  # ... and the run dies before the checkpoint is complete
        return written

    monkeypatch.setattr(accelerate.accelerator, "save_accelerator_state", killed_at_step_6)
    with pytest.raises(Killed):
        run(out, digits, "ema_decay=0.9")
    monkeypatch.undo()
    assert checkpoint_names(out) == ["checkpoint-3"]  # the unfinished one is not a checkpoint-6

    results = run(out, digits, "ema_decay=0.9", "--resume", "latest")
    assert results["step"] == 6 and checkpoint_names(out) == ["checkpoint-3", "checkpoint-6"]
    assert not list((tmp_path / "out-training" / "checkpoints").glob("*.tmp"))  # the leftover was removed
    assert [e["step"] for e in read_log(out)] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- crafted and damaged checkpoints
@pytest.fixture
def checkpoint(tmp_path, digits) -> Path:
    """A copy of the step-3 checkpoint of a tiny run (with an EMA), for tampering."""
    run(tmp_path / "source", digits, "max_steps=3", "ema_decay=0.9")
    source = tmp_path / "source-training" / "checkpoints" / "checkpoint-3"
    assert not list(source.glob("custom_checkpoint_*"))  # nothing accelerate would unpickle
    manifest = json.loads((source / "checkpoint.json").read_text())
    assert manifest["trainer_state"]["step"] == 3 and manifest["train_config"]["seed"] == 0  # JSON, not a pickle
    assert {"ema.safetensors", "model.safetensors", "random_states_0.pkl"} <= set(manifest["files"])
    return Path(shutil.copytree(source, tmp_path / "copy" / "checkpoint-3"))


def test_crafted_pickles_in_a_checkpoint_never_run(tmp_path, digits, checkpoint):
    marker = tmp_path / "code-ran"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"state": Payload(marker)}, protocol=2))
    rewrite_manifest(checkpoint)
    with pytest.raises(RunError, match=r"holds pickled objects \(custom_checkpoint_0.pkl\), which are never loaded"):
        run(tmp_path / "a", digits, "max_steps=6", "ema_decay=0.9", "--resume", str(checkpoint))
    assert not marker.exists()

    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps({"random_state": Payload(marker)}, protocol=2))
    rewrite_manifest(checkpoint)
    with pytest.raises(RunError, match=r"cannot restore the random states of checkpoint .* from random_states_0.pkl"):
        run(tmp_path / "b", digits, "max_steps=6", "ema_decay=0.9", "--resume", str(checkpoint))
    assert not marker.exists()


def test_damaged_checkpoint_fails_naming_the_file(tmp_path, digits, checkpoint):
    rng = checkpoint / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:100])  # truncated: resumed silently with other randomness before
    with pytest.raises(RunError, match=r"checkpoint-3 is damaged: random_states_0.pkl has 100 bytes .* it was written"):
        run(tmp_path / "a", digits, "max_steps=6", "ema_decay=0.9", "--resume", str(checkpoint))
    (checkpoint / "ema.safetensors").unlink()
    with pytest.raises(RunError, match=r"checkpoint-3 is damaged: ema.safetensors is missing"):
        run(tmp_path / "b", digits, "max_steps=6", "ema_decay=0.9", "--resume", str(checkpoint))


# --------------------------------------------------------------------------------------------- two runs at once
def test_a_second_run_on_a_folder_in_use_stops_at_once(tmp_path, digits):
    lock = tmp_path / "out-training" / "train.lock"
    lock.parent.mkdir()
    with FileLock(lock, timeout=0):  # the first run holds the folder
        with pytest.raises(RunError, match=rf"out-training is in use by another run \(it holds the lock {lock}\)"):
            run(tmp_path / "out", digits)
    assert not (tmp_path / "out").exists()
    assert run(tmp_path / "out", digits, "max_steps=3")["step"] == 3  # free again


# ----------------------------------------------------------------------------------------- progress bar, hub
def test_progress_bar_follows_the_bound_of_the_run():
    assert train.progress_bar_options(6, None) == {"total": 6, "unit": "step", "desc": "train"}
    timed = train.progress_bar_options(10_000_000, 90.0)  # a time-bound run: the bar counts seconds of its budget
    assert timed["total"] == 90.0 and timed["unit"] == "s" and "s [{elapsed}<{remaining}" in timed["bar_format"]
    state = TrainerState(step=40, train_time=95.5)
    assert train.progress_position(state, None) == 40 and train.progress_position(state, 90.0) == 90.0


def test_model_card_title_and_metadata_name_the_model_and_data():
    cifar = train.TrainConfig(data=DataConfig(source="uoft-cs/cifar10", eval_split="test"))
    config = QGVAEConfig(image_size=32, num_channels=3, num_tokens=64, codebook_size=512)
    assert train.model_card_title(config, cifar.data) == "QG-VAE (64 tokens x 9 bits) trained on uoft-cs/cifar10"
    card_data = train.model_card_data(cifar, config, {"psnr": 25.123456, "ssim": 0.81234})
    assert card_data["datasets"] == ["uoft-cs/cifar10"]
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in card_data["eval_results"]] == [
        ("uoft-cs/cifar10", "psnr", 25.1235), ("uoft-cs/cifar10", "ssim", 0.8123)
    ]  # fmt: skip
    mnist = train.TrainConfig()
    assert train.model_card_title(config, mnist.data).endswith("trained on MNIST")
    assert train.model_card_data(mnist, config, {"psnr": 1.0, "ssim": 0.5})["datasets"] is None


def test_push_uploads_the_output_folder_only(tmp_path, digits):
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # as an older version laid a folder out
    (out / "checkpoints" / "checkpoint-1" / "optimizer.bin").write_bytes(b"0")
    with pytest.raises(RunError, match="checkpoints in the layout of an older version, which this one does not"):
        run(out, digits, "max_steps=3")
    shutil.rmtree(out / "checkpoints")
    run(out, digits, "max_steps=3")
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # what push_output_dir must leave out
    (out / "checkpoints" / "checkpoint-1" / "optimizer.bin").write_bytes(b"0")
    (out / "logs").mkdir()
    (out / "logs" / "events").write_bytes(b"0")
    (out / "stray.pkl").write_bytes(b"0")
    (out / "train.lock").write_bytes(b"")
    hub = FakeHub()
    code = (
        f"import sys; sys.path.insert(0, {str(test_training.TRAINING)!r}); from common import push_output_dir; "
        f"push_output_dir({str(out)!r}, 'org/qgvae-tiny', 'Train')"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "dummy", "HF_HUB_DISABLE_XET": "1"}
    env["HF_HUB_OFFLINE"] = "0"
    with hub.running():
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (files,) = hub.commits
    assert sorted(name for name in files if not name.endswith(".py")) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "results.json",
        "samples/step-0000003.png", "train_config.json", "train_log.jsonl",
    ]  # fmt: skip
    assert "modeling_qgvae.py" in files and b"# QG-VAE (8 tokens x 5 bits) trained on digits.npz" in files["README.md"]


def test_the_demo_replaces_its_previous_run_and_refuses_other_folders(tmp_path, capsys):
    from demo import clear_previous_run

    out = tmp_path / "demo"
    (out / "samples").mkdir(parents=True)
    (out / "train_config.json").write_text("{}")
    (run_folder(out) / "checkpoints" / "checkpoint-1000").mkdir(parents=True)
    clear_previous_run(out)
    assert not out.exists() and not run_folder(out).exists()
    assert "replacing the previous run" in capsys.readouterr().out
    clear_previous_run(out)  # nothing there: nothing to say
    assert capsys.readouterr().out == ""
    other = tmp_path / "photos"
    other.mkdir()
    (other / "mine.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="is not a training run's folder"):
        clear_previous_run(other)
    assert (other / "mine.png").is_file()
