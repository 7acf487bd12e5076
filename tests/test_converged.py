"""`benchmarks/converged.py`: its generated configs (equal bytes, one recipe for both models, resumable), the
ablation plan (validation photos, never the test photos), target verdicts and the README block it renders."""

import json
import sys
from pathlib import Path

import pytest

from qg_tokenizer import PatchVQVAEConfig, QGVAEConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "training"))

import converged  # noqa: E402
import train  # noqa: E402
from common import build_model_config, load_config  # noqa: E402


@pytest.mark.parametrize("name", list(converged.BENCHMARKS))
def test_pair_configs_share_recipe_bytes_and_time(name, tmp_path):
    bench = converged.BENCHMARKS[name]
    configs = {m: converged.train_config(bench, m, tmp_path) for m in ("qgvae", "patch_vqvae")}  # before selection
    models = {m: build_model_config(c["model"]) for m, c in configs.items()}
    assert isinstance(models["qgvae"], QGVAEConfig) and isinstance(models["patch_vqvae"], PatchVQVAEConfig)
    budget = {"photo_set": 72, "mnist": 18}[name]
    assert models["qgvae"].bytes_per_image == models["patch_vqvae"].bytes_per_image == budget
    recipe = {k: v for k, v in configs["qgvae"].items() if k not in ("model", "output_dir")}
    assert recipe == {k: v for k, v in configs["patch_vqvae"].items() if k not in ("model", "output_dir")}
    assert recipe["max_train_time"] == {"photo_set": 3600, "mnist": 1800}[name]
    assert recipe["lr_schedule_clock"] == "time" and recipe["ema_decay"] and recipe["codebook_init"] == "data"
    for m in ("qgvae", "patch_vqvae"):
        assert models[m].commitment_loss_weight == 0.1 and models[m].reset_interval == 50
        path = tmp_path / f"{m}.json"
        path.write_text(json.dumps(configs[m]))  # JSON is YAML: the config loads as train.py reads it
        cfg = load_config(train.TrainConfig, path)
        assert cfg.data.eval_split == "test" and cfg.output_dir.endswith(f"{name}-{m}")
    if name == "photo_set":
        assert recipe["data"]["random_crops"] and recipe["data"]["source"].endswith("photo_set.npz")


@pytest.mark.parametrize("model_type", ["qgvae", "patch_vqvae"])
@pytest.mark.parametrize("bench", list(converged.BENCHMARKS))
def test_ablations_use_held_out_training_data_and_change_one_thing(bench, model_type, tmp_path):
    configs = converged.ablation_configs(tmp_path, 60, model_type, converged.BENCHMARKS[bench])
    full = configs["full"]
    assert full["model"]["model_type"] == model_type and full["data"]["eval_split"] == "validation"
    if bench == "photo_set":
        assert full["data"]["validation_photos"] == 3
    else:
        assert full["data"]["validation_images"] == 1000 and full["data"]["source"] == "embedded-mnist"
    assert full["max_train_time"] == 60
    changed = {name: {k for k in c if c[k] != full[k] and k != "output_dir"} for name, c in configs.items()}
    assert changed["full"] == set()
    assert changed["no_codebook_init"] == {"codebook_init"}
    assert changed["no_schedule"] == {"lr_scheduler", "lr_warmup_ratio", "lr_scheduler_kwargs"}
    assert changed["reset_every_200"] == {"model"} and configs["reset_every_200"]["model"]["reset_interval"] == 200
    assert configs["reset_every_200"]["model"] == full["model"] | {"reset_interval": 200}
    assert changed["lr_2x"] == {"learning_rate", "codebook_learning_rate"}
    if bench == "photo_set":  # the yardstick, measured once
        assert configs["reference"]["model"]["commitment_loss_weight"] == 1.0
        assert configs["reference"]["learning_rate"] == 2e-4 and configs["reference"]["ema_decay"] is None
    diagnostics = {"ordering_off", "heads_per_token"} if (bench, model_type) == ("mnist", "qgvae") else set()
    yardstick = ["reference"] if bench == "photo_set" else []
    assert set(configs) == {"full", *converged.SELECTABLE, *yardstick} | diagnostics
    if diagnostics:
        assert configs["ordering_off"]["model"] == full["model"] | {"token_dropout_prob": 0.0}
        assert configs["heads_per_token"]["model"] == full["model"] | {"num_heads": 16}
    assert len({c["output_dir"] for c in configs.values()}) == len(configs)
    assert all(Path(c["output_dir"]).name.startswith(f"{bench}-{model_type}-") for c in configs.values())


def test_selection_keeps_an_addition_only_if_the_ablation_shows_it_helps(tmp_path):
    def rows(**psnr):
        return {name: {"validation_psnr": value} for name, value in psnr.items()}

    nothing_helps_to_remove = rows(full=20.0, ema=20.5, no_codebook_init=19.0, no_schedule=19.5, reset_every_200=19.9,
                                   lr_2x=18.0, reference=25.0)  # the reference is a yardstick, never selected
    assert converged.select_changes(nothing_helps_to_remove) == {"model": {}}
    chosen = converged.select_changes(rows(full=20.0, ema=9.0, no_codebook_init=20.1, no_schedule=21.0,
                                           reset_every_200=20.2, lr_2x=20.0))  # fmt: skip
    assert chosen == {"model": {"reset_interval": 200}, "codebook_init": "uniform", "lr_scheduler": "constant",
                      "lr_warmup_ratio": 0.0, "lr_scheduler_kwargs": {}, "ema_decay": None}  # fmt: skip
    config = converged.train_config(converged.BENCHMARKS["mnist"], "qgvae", tmp_path, chosen)
    assert config["model"]["reset_interval"] == 200 and config["model"]["num_tokens"] == 16
    assert config["ema_decay"] is None and config["learning_rate"] == converged.RECIPE["learning_rate"]


def test_training_refuses_to_run_before_the_ablations(tmp_path, monkeypatch):
    monkeypatch.setattr(converged, "RESULTS", tmp_path / "converged.json")
    with pytest.raises(SystemExit, match="no finished qgvae ablations on mnist.*`converged.py ablate --only mnist`"):
        converged.selected_changes("mnist", "qgvae")
    ablations = {"photo_set": {"qgvae": {"runs": {"full": {}, "ema": {}}}}, "mnist": {"qgvae": {"runs": {"full": {}}}}}
    (tmp_path / "converged.json").write_text(json.dumps({"ablations": ablations}))
    with pytest.raises(SystemExit, match="no finished qgvae ablations on mnist"):  # another benchmark's do not count
        converged.selected_changes("mnist", "qgvae")


def entry(qg_psnr: float, patch_psnr: float, codec_psnr: float, usage_min: float = 0.95) -> dict:
    run = {"usage_min": usage_min, "usage_mean": 0.99}
    return {
        "qgvae": run | {"psnr": qg_psnr}, "patch_vqvae": run | {"psnr": patch_psnr},
        "codecs_at_budget": [
            {"name": "jpeg payload resized", "fraction_fit": 1.0, "psnr": codec_psnr},
            {"name": "webp file resized", "fraction_fit": 1.0, "psnr": codec_psnr - 3},
            {"name": "jpeg file direct", "fraction_fit": 0.5, "psnr": codec_psnr + 5},
        ],
        "qgvae_minus_patch_per_image": {"mean": qg_psnr - patch_psnr, "ci95": [qg_psnr - patch_psnr - 0.1,
                                                                             qg_psnr - patch_psnr + 0.1]},
    }  # fmt: skip


def test_target_verdicts():
    bench = converged.BENCHMARKS["photo_set"]
    met = {row["target"]: row["met"] for row in converged.targets(bench, entry(26.0, 24.0, 25.6))}
    assert list(met.values()) == [True, True, True, True, True, True]
    missed = converged.targets(bench, entry(23.0, 24.0, 25.6, usage_min=0.5))
    assert [row["met"] for row in missed] == [False, True, False, False, False, False]
    assert "webp file resized 22.60 dB" in missed[1]["measured"]  # the best whole file that fits every image
    assert "23.00 vs 24.00 dB" in missed[3]["measured"]


def test_readme_block_is_generated_from_the_json():
    path = ROOT / "benchmarks" / "results" / "converged.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `python benchmarks/converged.py analyse --update-readme`")
    results = json.loads(path.read_text())
    assert converged.render_block(results) in (ROOT / "README.md").read_text(), (
        "README.md's converged block differs from benchmarks/results/converged.json: "
        "run `python benchmarks/converged.py analyse --update-readme`"
    )
    for link in results["figures"].values():
        assert (ROOT / link).is_file(), link


def test_photo_set_yaml_is_the_benchmarks_qgvae_recipe(tmp_path):
    """`training/configs/photo-set.yaml` trains exactly what the benchmark quotes (bar its output and logging)."""
    shipped = load_config(train.TrainConfig, ROOT / "training" / "configs" / "photo-set.yaml")
    selected = converged.selected_changes("photo_set", "qgvae")  # from the committed converged.json
    benchmark = converged.train_config(converged.BENCHMARKS["photo_set"], "qgvae", tmp_path, selected)
    assert shipped.model == benchmark["model"]
    for key, value in benchmark.items():
        if key not in ("output_dir", "model", "data", "mixed_precision", "report_to"):
            assert getattr(shipped, key) == value, key
    assert shipped.data.random_crops and shipped.data.eval_split == "test"


def test_mnist_demo_yaml_is_the_mnist_benchmarks_qgvae_recipe(tmp_path):
    """`make demo` trains the MNIST benchmark's QG-VAE with its recipe (selected on held-out training digits) for a
    shorter time, evaluating and logging more often."""
    shipped = load_config(train.TrainConfig, ROOT / "training" / "configs" / "mnist-demo.yaml")
    selected = converged.selected_changes("mnist", "qgvae")  # from the committed converged.json
    benchmark = converged.train_config(converged.BENCHMARKS["mnist"], "qgvae", tmp_path, selected)
    assert shipped.model == benchmark["model"]
    budget_keys = ("max_steps", "max_train_time", "eval_every", "max_eval_samples", "eval_batch_size",
                   "checkpoint_every", "checkpoints_total_limit", "log_every", "final_usage_samples")  # fmt: skip
    for key, value in benchmark.items():
        if key not in ("output_dir", "model", "data", "mixed_precision", "report_to", *budget_keys):
            assert getattr(shipped, key) == value, key
    assert shipped.data.source == "embedded-mnist" and shipped.data.eval_split == "test"
    assert shipped.max_train_time < benchmark["max_train_time"]


def write_run(folder: Path, final: dict, step: int, train_time: float, usage_min: float) -> None:
    """A finished run's `results.json` in `folder`, with `final` as its last evaluation."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {"history": [final], "step": step, "train_time": train_time, "train_set_usage": {"usage_min": usage_min}}
    (folder / "results.json").write_text(json.dumps(results))


def fake_train_pairs(monkeypatch, final: dict) -> list[dict]:
    """Replace `converged.train_pairs` by one that writes each run's results (`final` as its last evaluation) at
    once; returns the list of the configs it is given, in order."""
    seen = []

    def train_pairs(configs: list[dict], workdir: Path) -> None:
        for config in configs:
            seen.append(config)
            write_run(Path(config["output_dir"]), final, step=1, train_time=1.0, usage_min=1.0)

    monkeypatch.setattr(converged, "train_pairs", train_pairs)
    return seen


@pytest.mark.parametrize("model_type", ["qgvae", "patch_vqvae"])
@pytest.mark.parametrize("name", list(converged.BENCHMARKS))
def test_ablation_rows_score_raw_weights_and_report_the_ema(name, model_type, tmp_path):
    bench = converged.BENCHMARKS[name]
    configs = converged.ablation_configs(tmp_path, 60, model_type, bench)
    for variant, psnr in (("full", 20.0), ("no_schedule", 19.0)):
        final = {"psnr": 9.0, "live_psnr": psnr} if variant == "full" else {"psnr": psnr}
        final |= {"psnr_k4": psnr - 3, "psnr_k8": psnr - 2, "psnr_k32": psnr - 1}  # C/2: MNIST 8, photo 32
        write_run(Path(configs[variant]["output_dir"]), final, step=10, train_time=60.0, usage_min=0.5)
    rows = converged.ablation_rows(configs, bench)
    assert rows["seconds"] == 60 and set(rows["runs"]) == {"full", "no_schedule", "ema"}  # unfinished runs left out
    assert [rows["runs"][n]["validation_psnr"] for n in ("full", "no_schedule", "ema")] == [20.0, 19.0, 9.0]
    halves = [rows["runs"][n].get("half_prefix_psnr") for n in ("full", "no_schedule")]
    # the first C/2 tokens where the QG-VAE diagnostics run; a patch model has no prefixes
    assert halves == ([18.0, 17.0] if (name, model_type) == ("mnist", "qgvae") else [None, None])
    table = "\n".join(converged.ablation_table(name, model_type, rows))
    assert ("first C/2 tokens" in table) == ((name, model_type) == ("mnist", "qgvae"))


def test_ablate_runs_each_benchmark_for_its_own_time_in_pairs(tmp_path, monkeypatch):
    monkeypatch.setattr(converged, "RESULTS", tmp_path / "converged.json")
    seen = fake_train_pairs(monkeypatch, {"psnr": 20.0, "psnr_k8": 18.0, "psnr_k32": 18.0})
    results = converged.sweep("ablations", tmp_path, ["photo_set", "mnist"])
    names = [Path(c["output_dir"]).name for c in seen]
    assert {c["max_train_time"] for c in seen if "photo_set" in c["output_dir"]} == {300}
    assert {c["max_train_time"] for c in seen if "mnist" in c["output_dir"]} == {480}
    assert names[:2] == ["photo_set-qgvae-full", "photo_set-patch_vqvae-full"]  # the pairs interleave the models
    assert names[-2:] == ["mnist-qgvae-ordering_off", "mnist-qgvae-heads_per_token"]  # diagnostics after the sweep
    assert set(results["ablations"]) == {"photo_set", "mnist"} and json.loads(converged.RESULTS.read_text()) == results
    seen.clear()
    converged.sweep("ablations", tmp_path / "other", ["mnist"], seconds=60)
    assert {c["max_train_time"] for c in seen} == {60}


def test_refinements_build_on_the_round_one_selection_and_win_only_on_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(converged, "RESULTS", tmp_path / "converged.json")
    round_one = {"full": {"validation_psnr": 20.0}, "ema": {"validation_psnr": 19.0},
                 "lr_2x": {"validation_psnr": 21.0}, "no_schedule": {"validation_psnr": 19.5}}  # fmt: skip
    results = {"ablations": {"photo_set": {"qgvae": {"runs": round_one}}}}
    converged.RESULTS.write_text(json.dumps(results))
    bench = converged.BENCHMARKS["photo_set"]
    configs = converged.refinement_configs(tmp_path, 60, "qgvae", bench)
    base = configs["selected"]
    assert base["learning_rate"] == 2e-3 and base["codebook_learning_rate"] == 2e-2  # round 1 chose lr_2x
    assert base["ema_decay"] is None and base["lr_scheduler"] == converged.RECIPE["lr_scheduler"]
    assert base["data"]["eval_split"] == "validation" and base["max_train_time"] == 60
    changed = {name: {k for k in c if c[k] != base[k] and k != "output_dir"} for name, c in configs.items()}
    assert changed == {"selected": set(), "codebook_lr_1x": {"codebook_learning_rate"}, "codeword_dim_16": {"model"},
                       "reset_every_25": {"model"}}
    assert configs["reset_every_25"]["model"] == base["model"] | {"reset_interval": 25}
    assert configs["codebook_lr_1x"]["codebook_learning_rate"] is None  # train.py: the model's learning rate
    assert configs["codeword_dim_16"]["model"] == base["model"] | {"codeword_dim": 16}
    assert len({Path(c["output_dir"]).parent.name for c in configs.values()}) == 1
    assert len({c["output_dir"] for c in configs.values()}) == len(converged.REFINEMENTS)

    for variant, psnr in (("selected", 21.0), ("codebook_lr_1x", 21.4), ("codeword_dim_16", 20.9)):
        write_run(Path(configs[variant]["output_dir"]), {"psnr": psnr}, step=5, train_time=60.0, usage_min=0.5)
    rows = converged.ablation_rows(configs, bench)
    assert converged.select_refinements(rows["runs"]) == {"model": {}, "codebook_learning_rate": None}
    assert converged.selected_changes("photo_set", "qgvae", rounds=2) == converged.select_changes(round_one)
    results["refinements"] = {"photo_set": {"qgvae": rows}}
    converged.RESULTS.write_text(json.dumps(results))
    chosen = converged.selected_changes("photo_set", "qgvae")
    assert chosen["codebook_learning_rate"] is None and chosen["learning_rate"] == 2e-3  # both rounds
    assert converged.selected_changes("photo_set", "qgvae", rounds=1)["codebook_learning_rate"] == 2e-2
    assert converged.refinement_configs(tmp_path, 60, "qgvae", bench)["selected"] == base  # round 1 only
    table = "\n".join(converged.refinement_table("photo_set", "qgvae", rows))
    assert "| codebooks at the model's learning rate (no 10x boost) | 21.40 | +0.40 | 5 | 50.0% |" in table
    assert '`{"model": {}, "codebook_learning_rate": null}`' in table


def test_refine_trains_the_pairs_and_records_their_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(converged, "RESULTS", tmp_path / "converged.json")
    runs = {"full": {"validation_psnr": 20.0}, "ema": {"validation_psnr": 19.0}}
    converged.RESULTS.write_text(json.dumps({"ablations": {"photo_set": {m: {"runs": runs} for m in
                                                                          converged.MODEL_NAMES}}}))  # fmt: skip
    configs = fake_train_pairs(monkeypatch, {"psnr": 20.0})
    results = converged.sweep("refinements", tmp_path, ["photo_set"], seconds=30)
    seen = [Path(c["output_dir"]).name for c in configs]
    assert seen[:2] == ["photo_set-qgvae-selected", "photo_set-patch_vqvae-selected"]  # paired, same change
    assert len(seen) == 2 * len(converged.REFINEMENTS)
    rows = results["refinements"]["photo_set"]
    assert set(rows) == set(converged.MODEL_NAMES) and rows["qgvae"]["seconds"] == 30
    assert set(rows["qgvae"]["runs"]) == set(converged.REFINEMENTS)
    assert json.loads(converged.RESULTS.read_text()) == results


def test_long_trials_build_on_rounds_one_and_two_and_take_the_best_run(tmp_path, monkeypatch):
    monkeypatch.setattr(converged, "RESULTS", tmp_path / "converged.json")
    round_one = {"full": {"validation_psnr": 20.0}, "ema": {"validation_psnr": 19.0},
                 "no_schedule": {"validation_psnr": 21.0}}  # fmt: skip
    round_two = {"selected": {"validation_psnr": 21.0}, "reset_every_25": {"validation_psnr": 21.5}}
    results = {"ablations": {"photo_set": {m: {"runs": round_one} for m in converged.MODEL_NAMES}},
               "refinements": {"photo_set": {"patch_vqvae": {"runs": round_two}}}}  # fmt: skip
    converged.RESULTS.write_text(json.dumps(results))
    bench = converged.BENCHMARKS["photo_set"]
    qg = converged.long_trial_configs(tmp_path, 90, "qgvae", bench)
    patch = converged.long_trial_configs(tmp_path, 90, "patch_vqvae", bench)
    assert set(qg) == {"selected", "decay", "decay_codebook_lr_1x"}  # round 2 took nothing: no round_1_decay
    assert set(patch) == set(converged.LONG_TRIALS)
    base = patch["selected"]
    assert base["model"]["reset_interval"] == 25 and base["lr_scheduler"] == "constant"  # rounds 1 and 2
    assert base["data"]["eval_split"] == "validation" and base["max_train_time"] == 90
    assert patch["round_1_decay"]["model"]["reset_interval"] == 50
    changed = {name: {k for k in c if c[k] != base[k] and k != "output_dir"} for name, c in patch.items()}
    decay = {"lr_scheduler", "lr_scheduler_kwargs", "lr_warmup_ratio"}
    assert changed == {"selected": set(), "decay": decay, "decay_codebook_lr_1x": decay | {"codebook_learning_rate"},
                       "round_1_decay": decay | {"model"}}  # fmt: skip
    assert patch["decay"]["lr_scheduler"] == "cosine_with_min_lr" and patch["decay_codebook_lr_1x"][
        "codebook_learning_rate"] is None  # fmt: skip
    assert len({c["output_dir"] for c in [*qg.values(), *patch.values()]}) == 7

    assert converged.select_long_trial({}) is None
    for model_type, winner in (("qgvae", "decay"), ("patch_vqvae", "round_1_decay")):
        runs = {name: {"validation_psnr": 22.0 if name == winner else 21.0, "steps": 900, "usage_min": 0.95}
                for name in converged.LONG_TRIALS}  # fmt: skip
        assert converged.select_long_trial(runs) == winner
        results.setdefault("long_trials", {}).setdefault("photo_set", {})[model_type] = {"runs": runs}
    converged.RESULTS.write_text(json.dumps(results))
    assert converged.selected_changes("photo_set", "qgvae")["lr_scheduler"] == "cosine_with_min_lr"
    assert converged.selected_changes("photo_set", "qgvae", rounds=2)["lr_scheduler"] == "constant"
    undone = converged.selected_changes("photo_set", "patch_vqvae")
    assert undone["model"] == {} and undone["lr_scheduler"] == "cosine_with_min_lr"  # round 2's reset dropped
    assert converged.selected_changes("photo_set", "patch_vqvae", rounds=2)["model"] == {"reset_interval": 25}
    table = "\n".join(converged.long_trial_table("photo_set", "patch_vqvae", results["long_trials"]["photo_set"][
        "patch_vqvae"] | {"seconds": 720, "validation": "v"}))  # fmt: skip
    assert "Round 3 (patch VQ-VAE, photo_set, 12 min each" in table and "the best run, `round_1_decay`" in table
    assert "| decay on round 1's selection (round 2 undone) | 22.00 | +1.00 | 900 | 95.0% |" in table


def test_long_trials_pair_the_shared_changes_and_run_one_models_own_after(tmp_path, monkeypatch):
    monkeypatch.setattr(converged, "RESULTS", tmp_path / "converged.json")
    runs = {"full": {"validation_psnr": 20.0}, "ema": {"validation_psnr": 19.0},
            "no_schedule": {"validation_psnr": 21.0}}  # fmt: skip
    refined = {"selected": {"validation_psnr": 20.0}, "codeword_dim_16": {"validation_psnr": 21.0}}
    converged.RESULTS.write_text(json.dumps({
        "ablations": {"photo_set": {m: {"runs": runs} for m in converged.MODEL_NAMES}},
        "refinements": {"photo_set": {"patch_vqvae": {"runs": refined}}}}))  # fmt: skip
    configs = fake_train_pairs(monkeypatch, {"psnr": 20.0})
    converged.main(["long", "--only", "photo_set", "--workdir", str(tmp_path)])
    seen = [Path(c["output_dir"]).name for c in configs]
    pairs = [f"photo_set-{m}-{v}" for v in ("selected", "decay", "decay_codebook_lr_1x") for m in converged.MODEL_NAMES]
    assert seen == pairs + ["photo_set-patch_vqvae-round_1_decay"]
    rows = json.loads(converged.RESULTS.read_text())["long_trials"]["photo_set"]
    assert rows["qgvae"]["seconds"] == converged.LONG_TRIAL_SECONDS == 720
    assert set(rows["patch_vqvae"]["runs"]) == set(converged.LONG_TRIALS)
