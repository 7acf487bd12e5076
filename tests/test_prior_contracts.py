"""The shared transformers contracts of the prior (issue 13), written as transformers' own test suites check them.

The project cannot import transformers' `tests/` folder, so each section restates what its mixin asserts for every
model of the library: `ConfigTester` (tests/test_configuration_common.py), `ModelTesterMixin`
(tests/test_modeling_common.py: save/load, `inputs_embeds`, `logits_to_keep`, loss keyword arguments) and
`GenerationTesterMixin` (tests/generation/test_utils.py: greedy, sampling and beam search, from `input_ids` and from
`inputs_embeds`), on a tiny prior in both vocabulary layouts.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset
from transformers import GenerationConfig, Trainer, TrainingArguments

from qg_tokenizer import QGPriorConfig, QGPriorForCausalLM

C, K, NUM_CLASSES = 4, 8, 3
LAYOUTS = ["offset", "shared"]
TINY = dict(
    num_image_tokens=C, codebook_size=K, num_classes=NUM_CLASSES, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5,
)  # fmt: skip
# what `save_pretrained` of the code before `class_names` wrote (`to_diff_dict`), the class names in `id2label`
LEGACY_CONFIG = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 11, "class_dropout_prob": 0.1,
    "codebook_size": 8, "eos_token_id": None, "head_dim": 8, "hidden_act": "silu", "hidden_size": 16,
    "id2label": {"0": "cat", "1": "dog", "2": "bird"}, "initializer_range": 0.02, "intermediate_size": 32,
    "label2id": None, "max_position_embeddings": 5, "mlp_bias": False, "model_type": "qgprior",
    "num_attention_heads": 2, "num_classes": 3, "num_hidden_layers": 1, "num_image_tokens": 4,
    "num_key_value_heads": 2, "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "transformers_version": "5.24.0", "use_cache": True, "vocab_layout": "shared", "vocab_size": 12,
}  # fmt: skip


def tiny_prior(**overrides) -> QGPriorForCausalLM:
    torch.manual_seed(0)
    return QGPriorForCausalLM(QGPriorConfig(**{**TINY, **overrides})).eval()


def prompts(model: QGPriorForCausalLM, length: int = 1) -> torch.LongTensor:
    """`[3, length]` prompts: a class token (classes 0, 2, 1), then `length - 1` image tokens."""
    token_ids = torch.tensor([[1, 5, 2], [7, 0, 3], [4, 4, 6]])[:, : length - 1]
    return model.prepare_input_ids(token_ids, [0, 2, 1])


def sequences(model: QGPriorForCausalLM, seed: int = 0) -> torch.LongTensor:
    """`[4, 1 + C]` full sequences of random codes."""
    token_ids = torch.randint(0, K, (4, C), generator=torch.Generator().manual_seed(seed))
    return model.prepare_input_ids(token_ids, [0, 1, 2, 0])


def without_name_or_path(config: QGPriorConfig) -> dict:
    return {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}


@pytest.fixture
def transformers_logs(caplog):
    """`caplog` that also sees transformers' log records (its library logger does not propagate by default)."""
    transformers.logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        yield caplog
    transformers.logging.disable_propagation()


# --------------------------------------------------------------------------------------------------- ConfigTester
def test_config_common_properties():
    config = QGPriorConfig(**TINY)
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        assert isinstance(getattr(config, name), int), name
    config.hidden_size, config.num_hidden_layers = 32, 3
    assert (config.hidden_size, config.num_hidden_layers) == (32, 3)
    assert QGPriorConfig().vocab_size == 16 * 512 + 10 + 1  # can be built without arguments


def test_config_to_json_string_file_and_dict_round_trip(tmp_path):
    config = QGPriorConfig(**TINY, vocab_layout="shared", class_names=["cat", "dog", "bird"])
    saved = json.loads(config.to_json_string())
    for key, value in {**TINY, "vocab_layout": "shared", "class_names": ["cat", "dog", "bird"]}.items():
        assert saved[key] == value, key
    config.to_json_file(tmp_path / "config.json")
    assert QGPriorConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()
    assert QGPriorConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path / "saved")
    assert without_name_or_path(QGPriorConfig.from_pretrained(tmp_path / "saved")) == without_name_or_path(config)


def test_config_with_num_labels_and_id2label_as_any_config():
    config = QGPriorConfig(**TINY, num_labels=5)
    assert len(config.id2label) == len(config.label2id) == config.num_labels == 5
    config.num_labels = 3
    assert len(config.id2label) == len(config.label2id) == 3
    config = QGPriorConfig(**TINY, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    assert config.num_labels == 2 and config.id2label == {0: "neg", 1: "pos"}
    # the standard fields do not touch the prior's classes, nor its vocabulary
    assert config.class_names == ["0", "1", "2"] and config.vocab_size == C * K + NUM_CLASSES + 1


def test_config_common_kwargs_and_unknown_kwargs_are_kept(tmp_path):
    common = {
        "return_dict": False, "output_hidden_states": True, "chunk_size_feed_forward": 5, "is_encoder_decoder": False,
        "architectures": ["QGPriorForCausalLM"], "id2label": {0: "label"}, "label2id": {"label": 0},
        "problem_type": "regression", "pad_token_id": 7, "eos_token_id": 8, "tie_word_embeddings": True,
    }  # fmt: skip
    unknown = {"finetuning_task": "translation", "tokenizer_class": "QGTokenizer", "prefix": "prefix", "foo_bar": 3}
    config = QGPriorConfig(**TINY, **common, **unknown, dtype="float16")
    config.save_pretrained(tmp_path)
    for loaded in (config, QGPriorConfig.from_pretrained(tmp_path)):
        for key, value in {**common, **unknown}.items():
            assert getattr(loaded, key) == value, key
        assert loaded.dtype == torch.float16 and loaded.num_labels == 1


def test_config_saved_before_class_names_loads(tmp_path):
    config = QGPriorConfig.from_dict(LEGACY_CONFIG)
    assert config.class_names == ["cat", "dog", "bird"]
    assert (config.vocab_size, config.max_position_embeddings, config.bos_token_id) == (12, 5, 11)
    assert config.num_labels == 3  # id2label stays what it is: a standard field
    # a checkpoint folder of that code: its config.json and weights load, and the classes keep their names
    model = QGPriorForCausalLM(config)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LEGACY_CONFIG))
    loaded = QGPriorForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.class_names == ["cat", "dog", "bird"]
    input_ids = sequences(model)
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_derived_fields_follow_the_layout(tmp_path, layout):
    config = QGPriorConfig(**TINY, vocab_layout=layout)
    config.num_image_tokens = 6
    image_vocab = 6 * K if layout == "offset" else K
    assert (config.max_position_embeddings, config.vocab_size) == (7, image_vocab + NUM_CLASSES + 1)
    assert config.bos_token_id == config.null_token_id == image_vocab + NUM_CLASSES
    config.save_pretrained(tmp_path / "edited")
    assert without_name_or_path(QGPriorConfig.from_pretrained(tmp_path / "edited")) == without_name_or_path(config)
    # from_pretrained(..., key=value) sets the key after construction: the derived fields follow too
    QGPriorConfig(**TINY, vocab_layout=layout).save_pretrained(tmp_path / "plain")
    overridden = QGPriorConfig.from_pretrained(tmp_path / "plain", num_image_tokens=6, num_classes=5)
    assert (overridden.max_position_embeddings, overridden.class_names) == (7, ["0", "1", "2", "3", "4"])
    overridden.save_pretrained(tmp_path / "overridden")
    assert QGPriorConfig.from_pretrained(tmp_path / "overridden").vocab_size == overridden.vocab_size
    with pytest.raises(ValueError, match=r"vocab_size is derived .*expected \d+, got 99"):
        config.vocab_size = 99
    with pytest.raises(ValueError, match=r"max_position_embeddings is derived .*expected 7, got 64"):
        QGPriorConfig(**{**TINY, "num_image_tokens": 6}, vocab_layout=layout, max_position_embeddings=64)


# ----------------------------------------------------------------------------------------------- ModelTesterMixin
@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load(tmp_path, layout):
    config = QGPriorConfig(**TINY, vocab_layout=layout)
    config.num_image_tokens = C + 2  # a config edited after construction saves and loads as well
    torch.manual_seed(0)
    model = QGPriorForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    loaded = QGPriorForCausalLM.from_pretrained(tmp_path).eval()
    assert without_name_or_path(loaded.config) == without_name_or_path(model.config)
    input_ids = model.prepare_input_ids(torch.randint(0, K, (2, C + 2), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inputs_embeds_matches_input_ids(layout):
    model = tiny_prior(vocab_layout=layout)
    input_ids = sequences(model)
    embeds = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids).logits)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_to_keep(layout):
    model = tiny_prior(vocab_layout=layout)
    input_ids = sequences(model)
    full = model(input_ids).logits  # (4, 1 + C, V)
    assert model._supports_logits_to_keep()  # so that `generate` asks for the last position only
    for keep in (1, 2, C + 1):
        kept = model(input_ids, logits_to_keep=keep).logits
        assert kept.shape == (4, keep, model.config.vocab_size)
        torch.testing.assert_close(kept, full[:, -keep:])
    positions = torch.tensor([0, 2])
    torch.testing.assert_close(model(input_ids, logits_to_keep=positions).logits, full[:, positions])
    # the loss is over the kept positions: the last one predicts nothing, the one before it the last image token
    token_nll = model.token_nll(full, input_ids)  # (4, C)
    torch.testing.assert_close(model(input_ids, labels=input_ids, logits_to_keep=2).loss, token_nll[:, -1].mean())


def test_generate_prefill_computes_the_last_positions_logits_only():
    model = tiny_prior()
    lengths = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: lengths.append(args[0].shape[1]))
    model.generate(prompts(model, 3), do_sample=False)
    hook.remove()
    assert lengths == [1] * (C - 2)  # without logits_to_keep the prefill step computes all 3 prompt positions


# --------------------------------------------------------------------------------------- loss keyword arguments
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_is_summed_and_divided_by_num_items_in_batch(layout):
    model = tiny_prior(vocab_layout=layout)
    input_ids = sequences(model)
    labels = input_ids.clone()
    labels[0, 1:3] = -100
    token_nll = model.token_nll(model(input_ids).logits, labels)  # (4, C), 0 at ignored positions
    for num_items in (7, torch.tensor(40)):
        loss = model(input_ids, labels=labels, num_items_in_batch=num_items).loss
        torch.testing.assert_close(loss, token_nll.sum() / num_items)
    torch.testing.assert_close(model(input_ids, labels=labels).loss, token_nll.sum() / (4 * C - 2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shift_labels_give_the_loss_of_labels(layout):
    model = tiny_prior(vocab_layout=layout)
    input_ids = sequences(model)
    labels = input_ids.clone()
    labels[1, 2] = -100
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    for extra in ({}, {"num_items_in_batch": 9}):
        expected = model(input_ids, labels=labels, **extra).loss
        torch.testing.assert_close(model(input_ids, shift_labels=shift_labels, **extra).loss, expected)
    shift_labels[:, C] = input_ids[:, 1]  # the last position predicts no image token
    with pytest.raises(ValueError, match=r"shift_labels must be -100 from position C on"):
        model(input_ids, shift_labels=shift_labels)


def test_trainer_gradient_accumulation_matches_one_large_batch(tmp_path):
    """Trainer with gradient accumulation N passes `num_items_in_batch` and does not divide by N itself: the
    accumulated step must equal one step on the whole batch (N times too large if the model ignored it)."""
    input_ids = sequences(tiny_prior())
    labels = input_ids.clone()
    labels[0, 1:4] = -100  # unequal token counts per micro-batch: a mean of means would differ too
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})

    def train(batch_size: int, accumulation: int) -> QGPriorForCausalLM:
        model = tiny_prior(class_dropout_prob=0.0).train()
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=batch_size, max_steps=1, optim="sgd",
            gradient_accumulation_steps=accumulation, learning_rate=1.0, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no", logging_strategy="no",
            use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data).train()
        return model

    whole, accumulated = train(4, 1), train(2, 2)
    initial = tiny_prior()
    assert not torch.allclose(whole.lm_head.weight, initial.lm_head.weight)  # the step did move the weights
    for (name, expected), actual in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ GenerationTesterMixin
GENERATION_MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "temperature": 1.5},
    "beam_search": {"do_sample": False, "num_beams": 3},
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", GENERATION_MODES)
@pytest.mark.parametrize("length", [1, 2])
def test_generate_from_inputs_embeds(layout, mode, length):
    model = tiny_prior(vocab_layout=layout)
    input_ids = prompts(model, length)
    embeds = model.get_input_embeddings()(input_ids)
    kwargs = GENERATION_MODES[mode]
    results = []
    for inputs in ({"inputs": input_ids}, {"inputs_embeds": embeds}, {"inputs": input_ids, "inputs_embeds": embeds}):
        torch.manual_seed(3)
        results.append(model.generate(**inputs, **kwargs))
    from_ids, from_embeds, from_both = results
    assert from_ids.shape == (3, 1 + C) and torch.equal(from_ids[:, :length], input_ids)
    # as for any transformers model, a prompt given as embeddings alone is not part of the output
    assert torch.equal(from_embeds, from_ids[:, length:])
    assert torch.equal(from_both, from_ids)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_from_inputs_embeds_keeps_the_codebook_mask(layout):
    model = tiny_prior(vocab_layout=layout)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # logits all 0: uniform over the whole vocabulary before the mask
    input_ids = model.prepare_input_ids(torch.zeros(30, 1, dtype=torch.long), [0, 1, 2] * 10)  # (30, 2)
    torch.manual_seed(0)
    generated = model.generate(inputs_embeds=model.get_input_embeddings()(input_ids))  # (30, C - 1): tokens 1..C-1
    assert generated.shape == (30, C - 1)
    for step in range(1, C):
        low = step * K if layout == "offset" else 0
        codes = generated[:, step - 1] - low
        assert ((codes >= 0) & (codes < K)).all(), step
        assert len(codes.unique()) > 1  # sampled, not a constant
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, L, dim\] prompts with 1 <= L <= 4"):
        model.generate(inputs_embeds=torch.zeros(1, C + 1, model.config.hidden_size))


def test_guidance_from_inputs_embeds():
    model = tiny_prior()
    input_ids = prompts(model, 2)
    embeds = model.get_input_embeddings()(input_ids)
    negative = input_ids.clone()
    negative[:, 0] = model.config.null_token_id
    guided = model.generate(input_ids, guidance_scale=3.0, do_sample=False)
    from_embeds = model.generate(
        inputs_embeds=embeds, negative_prompt_ids=negative, guidance_scale=3.0, do_sample=False
    )
    assert torch.equal(from_embeds, guided[:, 2:])
    assert not torch.equal(guided, model.generate(input_ids, do_sample=False))
    with pytest.raises(ValueError, match="needs negative_prompt_ids"):
        model.generate(inputs_embeds=embeds, guidance_scale=3.0)


@pytest.mark.parametrize("length", [1, 3])
def test_generate_with_max_new_tokens_does_not_warn(transformers_logs, length):
    model = tiny_prior()
    input_ids = prompts(model, length)
    embeds = model.get_input_embeddings()(input_ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = {
            "default": model.generate(input_ids),
            "max_new_tokens": model.generate(input_ids, max_new_tokens=1),
            "generation_config": model.generate(input_ids, generation_config=GenerationConfig(max_new_tokens=1)),
            "inputs_embeds": model.generate(inputs_embeds=embeds, max_new_tokens=1),
            "image_tokens": model.generate_image_tokens([0, 1], num_tokens=2, generator=torch.Generator()),
        }
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in transformers_logs.records]
    assert not [m for m in messages if "max_length" in m or "max_new_tokens" in m], messages
    assert outputs["default"].shape == (3, 1 + C)
    assert outputs["max_new_tokens"].shape == outputs["generation_config"].shape == (3, length + 1)
    assert outputs["inputs_embeds"].shape == (3, 1) and outputs["image_tokens"].shape == (2, 2)
    # setting both lengths still gets transformers' warning: the capture above would have seen it
    transformers_logs.clear()
    assert model.generate(input_ids, max_new_tokens=1, max_length=C).shape == (3, length + 1)
    assert any("Both `max_new_tokens`" in record.getMessage() for record in transformers_logs.records)


def test_generate_image_tokens_with_one_generator_per_image():
    model = tiny_prior()
    seeds = [5, 6, 7]
    codes = model.generate_image_tokens([0, 1, 2], generator=[torch.Generator().manual_seed(s) for s in seeds])
    for row, label, seed in zip(codes, [0, 1, 2], seeds):
        assert torch.equal(
            row[None], model.generate_image_tokens([label], generator=torch.Generator().manual_seed(seed))
        )
    with pytest.raises(ValueError, match="one torch.Generator per image, 3 here, got 2"):
        model.generate_image_tokens([0, 1, 2], generator=[torch.Generator(), torch.Generator()])
