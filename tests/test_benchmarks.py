"""The equal-bytes benchmark's bookkeeping: its generated training configs, interpolation, claim verdicts, and the
README results block, which must be exactly what the committed results JSON renders to; and how the benchmarks rerun
their trainings (`common.reusable_run`)."""

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

from qg_tokenizer import PatchVQVAEConfig, QGVAEConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "training"))

import converged  # noqa: E402
import rate_distortion as rd  # noqa: E402
from common import RunError, build_model_config, list_checkpoints, reusable_run, run_folder  # noqa: E402


@pytest.mark.parametrize("dataset", list(rd.DATASETS))
def test_generated_configs_are_equal_budget_and_load(dataset, tmp_path):
    configs = {}
    for model_type in rd.PRESETS:
        run = rd.Run("r", dataset, model_type, 0, 1e-3, 32, 10, 5, 100)
        train = run.train_config(tmp_path)
        configs[model_type] = build_model_config(train["model"])
        assert train["codebook_learning_rate"] == pytest.approx(1e-2)
        assert configs[model_type].commitment_loss_weight == 0.1 and configs[model_type].reset_interval == 50
    qg, patch = configs["qgvae"], configs["patch_vqvae"]
    assert isinstance(qg, QGVAEConfig) and isinstance(patch, PatchVQVAEConfig)
    assert qg.bytes_per_image == patch.bytes_per_image and qg.num_tokens == patch.num_tokens
    assert qg.token_dropout_prob > 0 and patch.token_dropout_prob == 0


def test_ablation_runs_differ_only_in_reset_or_dropout(tmp_path):
    settings = {m: rd.DEFAULT_SETTING for m in rd.PRESETS}
    headline, (no_reset, no_dropout), (*long, capacity, per_token) = rd.plan(rd.MODES["full"], settings)
    base = next(r for r in headline if r.dataset == "mnist" and r.model_type == "qgvae")
    base_model = base.train_config(tmp_path)["model"]
    assert no_reset.train_config(tmp_path)["model"] == base_model | {"reset_interval": rd.NO_RESET}
    assert no_dropout.train_config(tmp_path)["model"] == base_model | {"token_dropout_prob": 0.0}
    # the training-length diagnostic: the seed-0 MNIST pair, at long_factor times the steps
    factor = rd.MODES["full"].long_factor
    assert sorted(r.model_type for r in long) == sorted(rd.PRESETS)
    for run in long:
        short = next(r for r in headline if (r.dataset, r.model_type, r.seed) == (run.dataset, run.model_type, 0))
        assert run.dataset == "mnist" and run.max_steps == factor * short.max_steps
        assert run.train_config(tmp_path)["model"] == short.train_config(tmp_path)["model"]
    assert rd.plan(rd.MODES["quick"], settings)[2] == []
    # the capacity diagnostic: parameters moved from the codebooks to the convolutions, the same total (within 1%)
    models = [rd.AutoModel.from_config(build_model_config(r.train_config(tmp_path)["model"])) for r in (base, capacity)]
    counts = [sum(p.numel() for p in m.parameters()) for m in models]
    assert abs(counts[1] / counts[0] - 1) < 0.01
    assert models[1].config.codeword_dim < models[0].config.codeword_dim
    # the per-token diagnostic: the seed-0 patch run with a codebook per cell, within 5% of QG-VAE's parameters
    patch = next(r for r in headline if (r.dataset, r.model_type, r.seed) == ("mnist", "patch_vqvae", 0))
    assert replace(per_token, name=patch.name, model_overrides=()) == patch
    model = rd.AutoModel.from_config(build_model_config(per_token.train_config(tmp_path)["model"]))
    assert model.quantizer.codebook.shape[0] == model.config.num_tokens == models[0].config.num_tokens
    assert abs(sum(p.numel() for p in model.parameters()) / counts[0] - 1) < 0.05
    # the pairs compared in the headline share every training setting but the model
    pairs = {(r.dataset, r.seed): [] for r in headline}
    for run in headline:
        pairs[(run.dataset, run.seed)].append(run)
    for qg, patch in pairs.values():
        assert (qg.max_steps, qg.seed, qg.eval_every) == (patch.max_steps, patch.seed, patch.eval_every)


def test_psnr_at_time_interpolates_and_clamps():
    history = [{"train_time": 10.0, "psnr": 12.0}, {"train_time": 30.0, "psnr": 16.0}]
    assert rd.psnr_at_time(history, 20.0) == pytest.approx(14.0)
    assert rd.psnr_at_time(history, 5.0) == 12.0 and rd.psnr_at_time(history, 99.0) == 16.0


def test_paired_difference():
    result = rd.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert result["mean"] == pytest.approx(3.0)
    low, high = result["ci95"]
    assert low < 3.0 < high and high - low == pytest.approx(2 * 1.96 * 1.0 / 3**0.5)


def test_best_fitting_ignores_partial_fits():
    rows = [
        {"name": "a", "fraction_fit": 0.4, "psnr": 40.0},
        {"name": "b", "fraction_fit": 1.0, "psnr": 20.0},
        {"name": "c", "fraction_fit": 1.0, "psnr": 25.0},
        {"name": "d", "fraction_fit": 0.0, "psnr": None},
    ]
    assert rd.best_fitting(rows)["name"] == "c"
    assert rd.best_fitting(rows[:1]) is None


RESULTS = ROOT / "benchmarks" / "results" / "rate_distortion.json"


@pytest.fixture(scope="module")
def results() -> dict:
    if not RESULTS.is_file():
        pytest.fail(f"{RESULTS} is missing: run `python benchmarks/rate_distortion.py --update-readme`")
    return json.loads(RESULTS.read_text())


def test_readme_results_block_is_generated_from_the_json(results):
    assert rd.render_claims(results) in (ROOT / "README.md").read_text(), (
        "README.md's results block differs from benchmarks/results/rate_distortion.json: "
        "run `python benchmarks/rate_distortion.py --update-readme`"
    )


def test_claim_verdicts_follow_the_numbers(results):
    """Re-deriving the claims from the stored measurements gives the stored verdicts; flipping the comparison of
    QG-VAE and the patch VQ-VAE flips the first verdict."""
    assert rd.evaluate_claims(results) == results["claims"]
    swapped = copy.deepcopy(results)
    for data in swapped["datasets"].values():
        for seed in data["seeds"]:
            seed["qgvae"]["psnr"], seed["patch_vqvae"]["psnr"] = seed["patch_vqvae"]["psnr"], seed["qgvae"]["psnr"]
    def verdicts(claims: list[dict]) -> dict:
        return {c["dataset"]: c["holds"] for c in claims if c["claim"].startswith("QG-VAE beats the patch")}

    first, flipped = verdicts(results["claims"]), verdicts(rd.evaluate_claims(swapped))
    for dataset, holds in first.items():
        diffs = [s["qgvae"]["psnr"] - s["patch_vqvae"]["psnr"] for s in results["datasets"][dataset]["seeds"]]
        if all(d != 0 for d in diffs) and len(set(d > 0 for d in diffs)) == 1:
            assert flipped[dataset] == (not holds)


def test_figures_linked_from_readme_exist(results):
    for path in results["figures"].values():
        assert (ROOT / path).is_file(), path


def test_readme_generation_block_is_generated_from_the_json():
    import prior

    path = ROOT / "benchmarks" / "results" / "prior.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `python benchmarks/prior.py ... --update-readme`")
    results = json.loads(path.read_text())
    assert prior.evaluate_claims(results) == results["claims"]
    assert results["chosen_layout"] == prior.choose_layout(results["bits_per_image"])
    assert prior.render_prior(results) in (ROOT / "README.md").read_text()


def test_prior_layout_choice_and_claims_follow_the_numbers():
    import prior

    bits = {
        "qgvae/offset": {"bits_per_image": 60.0}, "qgvae/shared": {"bits_per_image": 58.0},
        "patch/offset": {"bits_per_image": 70.0}, "patch/shared": {"bits_per_image": 57.0},
    }  # fmt: skip
    assert prior.choose_layout(bits) == "shared"  # decided on QG-VAE tokens only
    results = {
        "layouts": ["offset", "shared"], "bits_per_image": bits,
        "samples": {"qgvae": {"guidance_1": {"accuracy": 0.9}, "guidance_3": {"accuracy": 0.85}}},
    }  # fmt: skip
    holds = [c["holds"] for c in prior.evaluate_claims(results)]
    # offset: 60 < 70 holds; shared: 58 > 57 does not; best layouts: 58 (QG) > 57 (patch) does not; guided 85% >= 80%
    assert holds == [True, False, False, True]
    results["samples"]["qgvae"]["guidance_3"]["accuracy"] = 0.75  # only the unguided samples reach 80%
    assert [c["holds"] for c in prior.evaluate_claims(results)][-1] is False


def test_influence_area_is_the_evenly_changed_fraction():
    import torch

    influence = torch.zeros(1, 3, 10, 10)
    influence[0, 0] = 0.2  # everywhere
    influence[0, 1, :5, :2] = 3.0  # 10 of 100 pixels
    influence[0, 2, 0, 0] = 1.0  # one pixel
    torch.testing.assert_close(rd.influence_area(influence), torch.tensor([[1.0, 0.1, 0.01]]))


def test_replace_block_rewrites_only_the_marked_block(tmp_path):
    from readme_blocks import replace_block

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- x:start -->\nold\n<!-- x:end -->\noutro\n")
    replace_block("<!-- x:start -->\nnew\n<!-- x:end -->", "<!-- x:start -->", "<!-- x:end -->", readme)
    assert readme.read_text() == "intro\n<!-- x:start -->\nnew\n<!-- x:end -->\noutro\n"
    with pytest.raises(ValueError, match="has no <!-- y:start --> ... <!-- y:end --> block"):
        replace_block("<!-- y:start --><!-- y:end -->", "<!-- y:start -->", "<!-- y:end -->", readme)
    assert readme.read_text() == "intro\n<!-- x:start -->\nnew\n<!-- x:end -->\noutro\n"  # left untouched


# ------------------------------------------------------------------------------------------------------ reruns
def fake_run(output_dir: Path, step: int | None = None, finished: bool = False) -> None:
    """A folder as train.py leaves it, without training: a checkpoint in its run folder, `results.json` once done."""
    output_dir.mkdir(parents=True)
    if step is not None:
        (run_folder(output_dir) / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    if finished:
        (output_dir / "results.json").write_text(json.dumps({"step": 9}))


def checkpoint_names(output_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_folder(output_dir))]


def test_reruns_reuse_a_finished_run_resume_an_interrupted_one_and_clear_another_configs(tmp_path, capsys):
    out, record = tmp_path / "run", tmp_path / "configs" / "run.yaml"
    config, other = {"seed": 0, "model": {"num_tokens": 16}}, {"seed": 1, "model": {"num_tokens": 16}}
    assert reusable_run(out, record, config) is None and yaml.safe_load(record.read_text()) == config
    fake_run(out, step=5)  # interrupted: kept for --resume latest
    assert reusable_run(out, record, config) is None and checkpoint_names(out) == ["checkpoint-5"]
    (out / "results.json").write_text(json.dumps({"step": 9}))
    assert reusable_run(out, record, config) == {"step": 9}  # finished: reused
    assert capsys.readouterr().out == ""

    # another config: the output and run folders go, with a note, and the record holds the new config
    assert reusable_run(out, record, other) is None
    assert not out.exists() and not run_folder(out).exists() and yaml.safe_load(record.read_text()) == other
    assert capsys.readouterr().out == (
        f"note: deleting {out} and {run_folder(out)}: they hold a run of another config than {record}\n"
    )
    # so do a run whose config was not recorded, and an interrupted run in the layout of older versions
    fake_run(out, step=5, finished=True)
    record.unlink()
    assert reusable_run(out, record, other) is None and not out.exists() and not run_folder(out).exists()
    assert f"they hold a run of a config not recorded in {record}" in capsys.readouterr().out
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    assert reusable_run(out, record, other) is None and not out.exists()
    assert "they hold checkpoints in the layout of an older version" in capsys.readouterr().out

    # never the folders of a run still going
    fake_run(out, step=5)
    with FileLock(run_folder(out) / "train.lock", timeout=0):
        with pytest.raises(RunError, match=r"holds a run of another config than .*, and that run is still going"):
            reusable_run(out, record, config)
    assert checkpoint_names(out) == ["checkpoint-5"] and yaml.safe_load(record.read_text()) == other


def converged_run(workdir: Path, seed: int) -> tuple[Path, dict]:
    config = converged.train_config(converged.BENCHMARKS["mnist"], "qgvae", workdir) | {"seed": seed}
    return Path(config["output_dir"]), converged.train_run(config, workdir)


def rate_distortion_run(workdir: Path, seed: int) -> tuple[Path, dict]:
    run = rd.Run("mnist-qgvae", "mnist", "qgvae", seed, 1e-3, 32, 10, 5, 100)
    return workdir / run.name, rd.train_all([run], workdir, jobs=1)[run.name]


@pytest.mark.parametrize("train", [converged_run, rate_distortion_run])
def test_benchmarks_resume_their_own_runs_and_clear_another_configs(train, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_training(output_dir, overrides, config, num_threads, log_file):
        """Records what train.py would have been asked and found, and finishes at once."""
        seed = yaml.safe_load(Path(config).read_text())["seed"]
        calls.append((overrides, seed, checkpoint_names(output_dir)))
        output_dir.mkdir(exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps({"step": 9, "eval": {"psnr": 20.0}}))
        return {"step": 9, "eval": {"psnr": 20.0}}

    module = converged if train is converged_run else rd
    monkeypatch.setattr(module, "run_training", fake_training)
    folder, results = train(tmp_path, seed=0)
    assert calls == [(["--resume", "latest"], 0, [])] and results["step"] == 9
    assert train(tmp_path, seed=0)[1]["process_seconds"] >= 0 and len(calls) == 1  # finished: reused
    (folder / "results.json").unlink()
    (run_folder(folder) / "checkpoints" / "checkpoint-4").mkdir(parents=True)  # interrupted: resumed
    train(tmp_path, seed=0)
    assert calls[-1] == (["--resume", "latest"], 0, ["checkpoint-4"])
    (folder / "results.json").unlink()
    train(tmp_path, seed=1)  # another config: cleared first, then trained afresh
    assert calls[-1] == (["--resume", "latest"], 1, []) and "note: deleting" in capsys.readouterr().out


def test_readme_entropy_coding_block_is_generated_from_the_json():
    import entropy_coding

    path = entropy_coding.RESULTS
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `python benchmarks/entropy_coding.py measure --update-readme`")
    results = json.loads(path.read_text())
    assert entropy_coding.evaluate_targets(results) == results["claims"]
    assert entropy_coding.render(results) in (ROOT / "README.md").read_text()
    assert (ROOT / results["figure"]).is_file()


def test_entropy_coding_prior_data_jitters_every_digit():
    import entropy_coding

    from qg_tokenizer.data import load_embedded_mnist

    digits = load_embedded_mnist()["train"].select(range(5))
    data = entropy_coding.augmented_digits(digits, copies=2)
    originals = [np.asarray(e["image"]) for e in digits]
    images = [np.asarray(e["image"]) for e in data]
    assert len(images) == 15 and all(np.array_equal(a, b) for a, b in zip(images[:5], originals))
    assert all(not np.array_equal(j, originals[i % 5]) for i, j in enumerate(images[5:]))  # jittered, not copied
    assert images[5].shape == originals[0].shape


def test_entropy_coding_tokens_follow_the_tokenizer(tmp_path, monkeypatch):
    """The cached token splits are keyed by the tokenizer's weights: a retrained tokenizer is tokenised again."""
    import datasets
    import entropy_coding
    import PIL.Image
    import torch

    from qg_tokenizer import QGVAEImageProcessor, QGVAEModel

    from .conftest import tiny_config

    images = [PIL.Image.fromarray(np.full((16, 16), 40 * i, np.uint8)) for i in range(3)]
    monkeypatch.setattr(entropy_coding, "image_splits", lambda name: datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())))  # fmt: skip
    tokenizer = tmp_path / "tokenizer"

    def save_tokenizer(seed: int) -> None:
        torch.manual_seed(seed)
        model = QGVAEModel(tiny_config()).eval()
        model.save_pretrained(tokenizer)
        QGVAEImageProcessor.from_model_config(model.config).save_pretrained(tokenizer)

    bench = replace(entropy_coding.BENCHMARKS["mnist"], tokenizer=tokenizer)
    save_tokenizer(0)
    first = entropy_coding.token_splits(bench, tmp_path)
    assert entropy_coding.token_splits(bench, tmp_path) == first  # the same weights: reused
    save_tokenizer(1)
    second = entropy_coding.token_splits(bench, tmp_path)
    assert second != first and first.is_dir() and second.is_dir()
    assert datasets.load_from_disk(second)["train"]["token_ids"] != datasets.load_from_disk(first)["train"]["token_ids"]


@pytest.mark.parametrize("finished", [(), ("mnist",)])
def test_entropy_coding_priors_split_the_cores_between_the_runs_left(tmp_path, monkeypatch, finished):
    """`priors` trains only the priors that have not finished, side by side, with the cores split between them: a
    lone one gets them all."""
    import entropy_coding

    runs = {name: (tmp_path / name, [f"tokens={name}"], {"eval": {"bits_per_image": 1.0}} if name in finished else None)
            for name in entropy_coding.BENCHMARKS}  # fmt: skip
    trained = {}

    def fake_training(run, overrides, config, num_threads, **kwargs):
        trained[run.name] = (overrides, num_threads)
        return {"eval": {"bits_per_image": 2.0}}

    monkeypatch.setattr(entropy_coding, "prior_runs", lambda workdir, names: {name: runs[name] for name in names})
    monkeypatch.setattr(entropy_coding, "run_training", fake_training)
    monkeypatch.setattr(entropy_coding.os, "cpu_count", lambda: 4)
    entropy_coding.priors(tmp_path, list(entropy_coding.BENCHMARKS))
    pending = [name for name in entropy_coding.BENCHMARKS if name not in finished]
    assert trained == {name: ([f"tokens={name}", "--resume", "latest"], 4 // len(pending)) for name in pending}
    trained.clear()
    entropy_coding.priors(tmp_path, ["photo_set"])  # `--only photo_set`: the other benchmark's run is left alone
    assert trained == {"photo_set": (["tokens=photo_set", "--resume", "latest"], 4)}
