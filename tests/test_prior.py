"""Tests of the autoregressive prior (qg_tokenizer/configuration_qgprior.py, modeling_qgprior.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaForCausalLM

from qg_tokenizer import QGPriorCodebookLogitsProcessor, QGPriorConfig, QGPriorForCausalLM, QGVAEModel, QGVAEPipeline

from .conftest import tiny_config

C, K, NUM_CLASSES = 4, 8, 3
LAYOUTS = ["offset", "shared"]
TINY = dict(
    num_image_tokens=C, codebook_size=K, num_classes=NUM_CLASSES, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2,
)  # fmt: skip


def tiny_prior(**overrides) -> QGPriorForCausalLM:
    torch.manual_seed(0)
    return QGPriorForCausalLM(QGPriorConfig(**{**TINY, **overrides})).eval()


def uniform_prior(**overrides) -> QGPriorForCausalLM:
    """A prior whose logits are all 0 (zero final norm): uniform over the whole vocabulary before masking."""
    model = tiny_prior(**overrides)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


def valid_range(config: QGPriorConfig, step: int) -> range:
    low = step * K if config.vocab_layout == "offset" else 0
    return range(low, low + K)


# ------------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("layout", "image_vocab"), [("offset", C * K), ("shared", K)])
def test_config_derives_vocabulary_and_special_ids(layout, image_vocab):
    config = QGPriorConfig(**TINY, vocab_layout=layout)
    assert config.image_vocab_size == image_vocab
    assert config.vocab_size == image_vocab + NUM_CLASSES + 1
    assert config.null_token_id == config.bos_token_id == image_vocab + NUM_CLASSES
    assert config.max_position_embeddings == C + 1
    assert config.eos_token_id is None
    assert config.class_names == ["0", "1", "2"]


def test_config_round_trip_and_auto_classes(tmp_path):
    config = QGPriorConfig(**TINY, vocab_layout="shared", class_names=["cat", "dog", "bird"])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is QGPriorConfig
    assert (loaded.vocab_size, loaded.vocab_layout, loaded.class_names[1]) == (K + 4, "shared", "dog")
    model = AutoModelForCausalLM.from_config(loaded)
    assert type(model) is QGPriorForCausalLM and isinstance(model, LlamaForCausalLM) and model.can_generate()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"vocab_layout": "flat"}, ValueError, "vocab_layout"),
        ({"vocab_size": 99}, ValueError, r"vocab_size .*expected 36, got 99"),
        ({"max_position_embeddings": 64}, ValueError, "max_position_embeddings"),
        ({"class_dropout_prob": 1.0}, ValueError, "class_dropout_prob"),
        ({"codebook_size": 1}, ValueError, "codebook_size"),
        ({"num_image_tokens": 4.0}, TypeError, "num_image_tokens must be an int"),
        ({"class_names": ["a"]}, ValueError, "class_names must name the 3 classes, got 1 names"),
        ({"class_names": "abc"}, TypeError, "class_names must be a list of str"),
    ],
)
def test_config_rejects_bad_values(overrides, error, match):
    with pytest.raises(error, match=match):
        QGPriorConfig(**{**TINY, **overrides})


# ----------------------------------------------------------------------------------------------- sequence layout
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepare_input_ids_round_trips_through_image_token_ids(layout):
    model = tiny_prior(vocab_layout=layout)
    token_ids = torch.tensor([[0, 7, 3, 1], [5, 5, 5, 5]])
    input_ids = model.prepare_input_ids(token_ids, [2, 0])
    first_image_id = C * K if layout == "offset" else K
    assert input_ids[:, 0].tolist() == [first_image_id + 2, first_image_id]
    expected_row = [0, K + 7, 2 * K + 3, 3 * K + 1] if layout == "offset" else [0, 7, 3, 1]
    assert input_ids[0, 1:].tolist() == expected_row
    assert torch.equal(model.image_token_ids(input_ids), token_ids)


def test_bad_class_labels_and_token_ids_raise():
    model = tiny_prior()
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\).*got values in \[0, 3\]"):
        model.conditioning_ids([0, 3])
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\)"):
        model.conditioning_ids(-1)
    with pytest.raises(TypeError, match="class_labels must be an int"):
        model.conditioning_ids([0.5])
    with pytest.raises(ValueError, match="class_labels must have batch_size=2 entries, got 3"):
        model.prepare_input_ids(torch.zeros(2, C, dtype=torch.long), [0, 1, 2])
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 8\)"):
        model.prepare_input_ids(torch.full((1, C), K), [0])
    with pytest.raises(ValueError, match=r"k <= num_image_tokens=4"):
        model.prepare_input_ids(torch.zeros(1, C + 1, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="this prior is unconditional"):
        tiny_prior(num_classes=0).conditioning_ids([0])


# ------------------------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("layout", LAYOUTS)
def test_uniform_prior_costs_exactly_log2_k_bits_per_token(layout):
    model = uniform_prior(vocab_layout=layout)
    token_ids = torch.randint(0, K, (5, C), generator=torch.Generator().manual_seed(0))
    bits = model.bits_per_image(token_ids, [0, 1, 2, 0, 1])
    torch.testing.assert_close(bits, torch.full((5,), C * math.log2(K)))
    input_ids = model.prepare_input_ids(token_ids, [0, 1, 2, 0, 1])
    torch.testing.assert_close(model(input_ids, labels=input_ids).loss, torch.tensor(math.log(K)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_is_cross_entropy_within_each_codebook(layout):
    model = tiny_prior(vocab_layout=layout, initializer_range=0.5)
    token_ids = torch.randint(0, K, (3, C), generator=torch.Generator().manual_seed(1))
    input_ids = model.prepare_input_ids(token_ids, [0, 1, 2])
    labels = input_ids.clone()
    labels[0, 2] = -100  # ignored position
    output = model(input_ids, labels=labels)
    nll = []
    for b in range(3):
        for c in range(C):
            if b == 0 and c == 1:
                continue
            ids = valid_range(model.config, c)
            logp = output.logits[b, c, ids.start : ids.stop].log_softmax(-1)
            nll.append(-logp[token_ids[b, c]])
    torch.testing.assert_close(output.loss, torch.stack(nll).mean())
    torch.testing.assert_close(
        model.bits_per_image(token_ids[1:], [1, 2]), torch.stack(nll[C - 1 :]).reshape(2, C).sum(1) / math.log(2)
    )
    wrong = input_ids.clone()
    wrong[0, 2] = valid_range(model.config, 1).stop if layout == "offset" else K  # not an id of codebook 1
    with pytest.raises(ValueError, match=r"labels\[:, 1 \+ c\] must be an id of codebook c"):
        model(wrong, labels=wrong)


def test_class_dropout_replaces_class_tokens_in_training_only():
    model = tiny_prior(class_dropout_prob=0.3)
    input_ids = model.prepare_input_ids(torch.zeros(4000, C, dtype=torch.long), 1)
    torch.manual_seed(0)
    dropped = model.drop_class_tokens(input_ids)
    is_null = dropped[:, 0] == model.config.null_token_id
    assert abs(is_null.float().mean().item() - 0.3) < 0.03
    assert torch.equal(dropped[~is_null], input_ids[~is_null]) and torch.equal(dropped[:, 1:], input_ids[:, 1:])

    model = tiny_prior(class_dropout_prob=0.999, initializer_range=0.5)
    token_ids = torch.randint(0, K, (4, C), generator=torch.Generator().manual_seed(0))
    conditional = model.prepare_input_ids(token_ids, [0, 1, 2, 0])
    unconditional = model.prepare_input_ids(token_ids, None)
    eval_loss = model(conditional, labels=conditional).loss
    null_loss = model(unconditional, labels=unconditional).loss
    assert not torch.allclose(eval_loss, null_loss)
    torch.manual_seed(0)
    train_loss = model.train()(conditional, labels=conditional).loss  # every class token dropped to the null token
    torch.testing.assert_close(train_loss, null_loss)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_matches_full_forward(layout):
    model = tiny_prior(vocab_layout=layout, initializer_range=0.5)
    input_ids = model.prepare_input_ids(torch.tensor([[1, 2, 3, 4], [7, 6, 5, 4]]), [0, 2])
    full = model(input_ids).logits
    first = model(input_ids[:, :2], use_cache=True)
    rest = model(input_ids[:, 2:], cache=first.past_key_values)
    torch.testing.assert_close(rest.logits, full[:, 2:])
    greedy_cached = model.generate(input_ids[:, :1], do_sample=False, use_cache=True)
    assert torch.equal(greedy_cached, model.generate(input_ids[:, :1], do_sample=False, use_cache=False))


# ------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_only_emits_ids_of_each_positions_codebook(layout):
    model = uniform_prior(vocab_layout=layout)
    prompts = model.conditioning_ids([0, 1, 2] * 10)
    torch.manual_seed(0)
    unmasked = GenerationMixin.generate(model, prompts, max_length=C + 1)  # transformers' generate, no mask
    in_range = [(unmasked[:, 1 + c] >= r.start) & (unmasked[:, 1 + c] < r.stop) for c, r in
                ((c, valid_range(model.config, c)) for c in range(C))]  # fmt: skip
    assert not torch.stack(in_range).all()  # the check below would catch a missing mask
    for kwargs in ({}, {"top_k": 3}, {"top_p": 0.5, "temperature": 0.7}, {"do_sample": False}):
        torch.manual_seed(0)
        sequences = model.generate(prompts, **kwargs)
        assert sequences.shape == (30, C + 1)
        assert torch.equal(sequences[:, :1], prompts)
        for c in range(C):
            ids = valid_range(model.config, c)
            assert ((sequences[:, 1 + c] >= ids.start) & (sequences[:, 1 + c] < ids.stop)).all(), (kwargs, c)
    codes = model.generate_image_tokens([0, 1, 2] * 10, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (30, C) and codes.min() >= 0 and codes.max() < K
    assert len(codes.unique()) == K  # uniform within the codebook: every code shows up in 120 draws


def test_codebook_processor_masks_and_rejects_steps_beyond_c():
    config = QGPriorConfig(**TINY)
    processor = QGPriorCodebookLogitsProcessor(config)
    scores = torch.randn(2, config.vocab_size)
    scores[:, :K] += 100  # codebook 0 is what an unmasked model prefers, but this is step 2
    processed = processor(torch.zeros(2, 3, dtype=torch.long), scores)
    assert torch.equal(processed[:, 2 * K : 3 * K], scores[:, 2 * K : 3 * K])
    assert torch.isinf(processed).sum() == 2 * (config.vocab_size - K)
    with pytest.raises(ValueError, match=r"asked for token 4 .*max_length <= 5"):
        processor(torch.zeros(2, C + 1, dtype=torch.long), scores)
    model = tiny_prior()
    with pytest.raises(ValueError, match="asked for token 4"):
        model.generate(model.conditioning_ids([0]), max_new_tokens=C + 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_image_tokens_is_seeded_and_prefix_consistent(layout):
    model = tiny_prior(vocab_layout=layout, initializer_range=0.5)
    labels = [0, 1, 2, 2, 1, 0]
    first = model.generate_image_tokens(labels, generator=torch.Generator().manual_seed(3), temperature=1.5)
    torch.manual_seed(123)
    again = model.generate_image_tokens(labels, generator=torch.Generator().manual_seed(3), temperature=1.5)
    # the global RNG is left as it was
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert first.shape == (6, C) and torch.equal(first, again)
    other = model.generate_image_tokens(labels, generator=torch.Generator().manual_seed(4), temperature=1.5)
    assert not torch.equal(first, other)
    generator = torch.Generator().manual_seed(3)
    assert not torch.equal(*(model.generate_image_tokens(labels, generator=generator) for _ in range(2)))
    prefix = model.generate_image_tokens(
        labels, prefix_length=2, generator=torch.Generator().manual_seed(3), temperature=1.5
    )
    assert torch.equal(prefix, first[:, :2])


def test_unconditional_generation():
    model = tiny_prior(num_classes=0, class_dropout_prob=0.0)
    assert model.config.null_token_id == model.config.bos_token_id == C * K
    torch.manual_seed(0)
    default = model.generate()  # no prompt: one null token
    assert default.shape == (1, C + 1) and default[0, 0] == C * K
    codes = model.generate_image_tokens(batch_size=5, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (5, C) and codes.min() >= 0 and codes.max() < K
    # a class-conditional prior samples unconditionally only if it was trained with class dropout
    conditional = tiny_prior(class_dropout_prob=0.1)
    assert torch.equal(conditional.generate(conditional.conditioning_ids(None, 2))[:, 0], torch.full((2,), C * K + 3))
    with pytest.raises(ValueError, match=r"class_labels is required.*class_dropout_prob=0.0"):
        tiny_prior(class_dropout_prob=0.0).generate_image_tokens(batch_size=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_guidance_mixes_conditional_and_null_branch_log_probs(layout):
    model = tiny_prior(vocab_layout=layout, initializer_range=0.5)
    prompts = model.conditioning_ids([0, 2])
    scale = 3.0
    out = model.generate(
        prompts, guidance_scale=scale, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    conditional = model(out.sequences).logits[:, :-1].float()
    null = out.sequences.clone()
    null[:, 0] = model.config.null_token_id
    unconditional = model(null).logits[:, :-1].float()
    for c in range(C):
        ids = valid_range(model.config, c)
        cond, uncond = conditional[:, c].log_softmax(-1), unconditional[:, c].log_softmax(-1)
        expected = (scale * (cond - uncond) + uncond)[:, ids.start : ids.stop]
        torch.testing.assert_close(out.scores[c][:, ids.start : ids.stop], expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(out.sequences[:, 1 + c], expected.argmax(-1) + ids.start)
    assert not torch.equal(out.sequences, model.generate(prompts, do_sample=False))  # guidance changed the argmax


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"class_dropout_prob": 0.0}, "num_classes=3, class_dropout_prob=0.0"), ({"num_classes": 0}, "num_classes=0")],
)
def test_guidance_without_a_trained_null_token_raises(overrides, match):
    model = tiny_prior(**overrides)
    with pytest.raises(ValueError, match=rf"guidance_scale=2.0 needs .*{match}"):
        model.generate(model.conditioning_ids([0] if model.config.num_classes else None), guidance_scale=2.0)


def test_generate_rejects_bad_prompts_and_prefix_lengths():
    model = tiny_prior()
    with pytest.raises(ValueError, match=r"inputs\[:, 0\] must be conditioning tokens"):
        model.generate(torch.tensor([[0, K]]))
    with pytest.raises(ValueError, match=r"1 <= L <= 4"):
        model.generate(torch.zeros(1, C + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"holds the null token, but this prior was trained without it"):
        tiny_prior(class_dropout_prob=0.0).generate(torch.tensor([[C * K + NUM_CLASSES]]))
    for bad in (0, C + 1):
        with pytest.raises(ValueError, match=r"prefix_length must be in \[1, 4\]"):
            model.generate_image_tokens([0], prefix_length=bad)


def test_training_learns_class_conditional_sequences_and_round_trips(tmp_path):
    # each class has one token sequence; after a few steps sampling a class gives its sequence
    model = tiny_prior(vocab_layout="offset", hidden_size=32, intermediate_size=64, class_dropout_prob=0.2).train()
    targets = torch.tensor([[1, 2, 3, 4], [7, 0, 7, 0], [5, 5, 6, 6]])
    labels = torch.arange(3).repeat(8)
    input_ids = model.prepare_input_ids(targets[labels], labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    torch.manual_seed(0)
    for _ in range(20):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model.bits_per_image(targets, [0, 1, 2]).max() < 0.1  # from C * log2(K) = 12 bits
    # the null branch learnt the mixture of the three sequences: about log2(3) bits
    assert 1.0 < model.bits_per_image(targets, None).mean() < 2.2
    samples = model.generate_image_tokens([2, 0, 1], generator=torch.Generator().manual_seed(0), guidance_scale=2.0)
    assert torch.equal(samples, targets[[2, 0, 1]])

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is QGPriorForCausalLM
    assert loaded.generation_config.do_sample and loaded.generation_config.top_k == 0
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


# ------------------------------------------------------------------------------------- training/train_prior.py
def load_train_prior():
    path = Path(__file__).resolve().parents[1] / "training" / "train_prior.py"
    spec = importlib.util.spec_from_file_location("train_prior", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_train_prior_script_on_tokens_and_on_the_fly(tmp_path, monkeypatch):
    train_prior = load_train_prior()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    token_ids = (labels[:, None] * 2 + np.arange(C)) % K  # each class one sequence: learnable in a few steps
    features = Features({"token_ids": List(Value("int16"), length=C), "label": ClassLabel(names=["a", "b", "c"])})
    data = Dataset.from_dict({"token_ids": token_ids, "label": labels}, features=features)
    DatasetDict(train=data.select(range(100)), test=data.select(range(100, 120))).save_to_disk(tmp_path / "tokens")
    common = [
        "max_steps=30", "eval_every=10", "checkpoint_every=20", "batch_size=16", "learning_rate=0.02",
        "lr_warmup_steps=0", "report_to=none", "model.hidden_size=16", "model.intermediate_size=32",
        "model.num_hidden_layers=1", "model.num_attention_heads=2",
    ]  # fmt: skip
    out = tmp_path / "run"
    tokens = [f"tokens={tmp_path / 'tokens'}", f"model.codebook_size={K}"]
    prior = train_prior.main([*tokens, f"output_dir={out}", *common])
    results = json.loads((out / "results.json").read_text())
    assert results["uniform_bits_per_image"] == C * math.log2(K) == 12
    assert results["eval"]["num_images"] == 20 and results["eval"]["bits_per_image"] < 3
    assert results["eval"]["bits_per_image_null"] > results["eval"]["bits_per_image"]  # the class token helps
    assert [h["step"] for h in results["history"]] == [10, 20, 30]
    assert prior.config.class_names == ["a", "b", "c"] and prior.config.num_image_tokens == C
    loaded = QGPriorForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.generate_image_tokens([1], generator=torch.Generator().manual_seed(0), top_k=1)[0],
                       torch.as_tensor(token_ids[labels == 1][0]))  # fmt: skip
    # the run's checkpoints are beside the output folder, the trainer state and config as JSON, nothing pickled
    checkpoint = tmp_path / "run-training" / "checkpoints" / "checkpoint-20"
    assert list(checkpoint.parent.iterdir()) == [checkpoint] and not (out / "checkpoints").exists()
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    assert manifest["trainer_state"]["step"] == 20 and manifest["train_config"]["max_steps"] == 30
    assert [h["step"] for h in manifest["trainer_state"]["history"]] == [10, 20]
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    # as train.py: a fresh run refuses the folder, a resume with another config is refused
    from common import RunError  # on sys.path since the script was loaded

    with pytest.raises(RunError, match="run-training/checkpoints holds checkpoints of an earlier run"):
        train_prior.main([*tokens, f"output_dir={out}", *common])
    with pytest.raises(RunError, match=r"written by a different run \(learning_rate: 0.02 -> 0.01\)"):
        train_prior.main([*tokens, f"output_dir={out}", *common, "learning_rate=0.01", "--resume", "latest"])
    # resuming from the step-20 checkpoint ends with the same weights as the uninterrupted run
    resumed = train_prior.main([*tokens, f"output_dir={tmp_path / 'resumed'}", *common, "--resume", str(checkpoint)])
    torch.testing.assert_close(resumed.state_dict(), prior.state_dict())
    history = json.loads((tmp_path / "resumed" / "results.json").read_text())["history"]
    assert len(history) == 3 and history[:2] == results["history"][:2]  # steps 10 and 20 came from the checkpoint
    assert history[2] | {"train_time": 0} == results["history"][2] | {"train_time": 0}

    # on the fly: tokenise a small labelled image set with a tokenizer checkpoint; samples and a pipeline come out
    torch.manual_seed(0)
    QGVAEModel(tiny_config()).save_pretrained(tmp_path / "tokenizer")
    images = rng.integers(0, 255, (12, 16, 16), dtype=np.uint8)
    image_data = Dataset.from_dict(
        {"image": [PIL.Image.fromarray(im) for im in images], "label": [0, 1] * 6},
        features=Features({"image": Image(), "label": ClassLabel(names=["x", "y"])}),
    )
    splits = DatasetDict(train=image_data.select(range(8)), test=image_data.select(range(8, 12)))
    splits.save_to_disk(tmp_path / "images")
    out = tmp_path / "fly"
    train_prior.main(
        [f"tokenizer={tmp_path / 'tokenizer'}", f"data.source={tmp_path / 'images'}", f"output_dir={out}",
         "max_steps=2", "eval_every=1", "batch_size=4", "samples_per_class=3", "report_to=none", "model.hidden_size=16",
         "model.intermediate_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2"]
    )  # fmt: skip
    grid = PIL.Image.open(out / "samples" / "step-0000002.png")
    layout, labels = json.loads(grid.text["layout"]), json.loads(grid.text["row_labels"])
    assert grid.width >= 640 and (layout["rows"], layout["columns"]) == (2, 3)
    assert len(labels) == 2 and all(label.startswith("class ") for label in labels)
    pipe = QGVAEPipeline.from_pretrained(out / "pipeline")
    assert pipe.prior.config.codebook_size == 32 and len(pipe(pipe.get_label_ids(["x", "y"])).images) == 2
    with pytest.raises(train_prior.ConfigError, match=r"batch_size \(64 per process, 1 processes\) is larger"):
        train_prior.main(
            [f"tokenizer={tmp_path / 'tokenizer'}", f"data.source={tmp_path / 'images'}", f"output_dir={out}"]
        )
    with pytest.raises(train_prior.ConfigError, match="model.codebook_size must be set"):
        train_prior.main([f"tokens={tmp_path / 'tokens'}", f"output_dir={tmp_path / 'x'}", "report_to=none"])
