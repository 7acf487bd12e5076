"""The shared transformers contracts of the tokenizers, written the way ModelTesterMixin checks them (the project
cannot import transformers' test folder): hidden states, `torch.export` and `torch.compile(fullgraph=True)` of
`encode`/`decode`, the prefix-length keyword and its deprecated alias, and a self-contained file layout."""

import ast
import warnings
from pathlib import Path

import pytest
import torch

from qg_tokenizer import PatchVQVAEConfig, PatchVQVAEModel, QGVAEConfig, QGVAEModel
from qg_tokenizer.codec import decode_tokens, encode_tokens, truncate

PACKAGE = Path(__file__).resolve().parents[1] / "qg_tokenizer"
TINY = dict(image_size=16, num_channels=1, num_tokens=8, codeword_dim=8, codebook_size=32, downsample_factor=1,
            num_heads=2, num_res_blocks=1, min_channels=8, max_channels=16, token_dropout_prob=0.0)  # fmt: skip


def tiny_models() -> list:
    torch.manual_seed(0)
    patch = PatchVQVAEConfig(image_size=16, num_channels=1, grid_size=4, codeword_dim=8, codebook_size=32,
                             block_out_channels=[8, 16, 16], num_res_blocks=1)  # fmt: skip
    return [QGVAEModel(QGVAEConfig(**TINY)).eval(), PatchVQVAEModel(patch).eval()]


@pytest.fixture(params=["qgvae", "patch_vqvae"])
def model(request):
    return dict(zip(("qgvae", "patch_vqvae"), tiny_models()))[request.param]


def test_hidden_states_are_the_encoder_output_and_the_decoder_input(model):
    x = torch.rand(3, 1, 16, 16)
    c, d = model.config.num_tokens, model.config.codeword_dim
    assert model(x).hidden_states is None  # off by default, as config.output_hidden_states
    out = model(x, output_hidden_states=True)
    z, latents = out.hidden_states
    assert z.shape == latents.shape == (3, c, d)
    torch.testing.assert_close(z, model.encoder(x))
    torch.testing.assert_close(model.decoder(latents), out.reconstruction)
    mask = torch.ones(3, c)
    mask[:, 2:] = 0
    masked = model(x, token_mask=mask, output_hidden_states=True).hidden_states[1]
    assert masked[:, 2:].abs().max() == 0 and torch.equal(masked[:, :2], latents[:, :2])
    model.config.output_hidden_states = True  # the config default is honoured, and the tuple form carries them
    as_tuple = model(x, return_dict=False)
    assert len(as_tuple[-1]) == 2 and torch.equal(as_tuple[-1][0], z)


def test_encode_and_decode_export_with_a_dynamic_batch(model):
    class Encode(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model.encode(pixel_values).token_ids

    class Decode(Encode):
        def forward(self, token_ids):
            return self.model.decode(token_ids, prefix_length=3).pixel_values

    x = torch.rand(4, 1, 16, 16)
    ids = model.encode(x).token_ids
    batch = torch.export.Dim("batch", min=2, max=64)
    encode = torch.export.export(Encode(model), (x[:2],), dynamic_shapes={"pixel_values": {0: batch}})
    decode = torch.export.export(Decode(model), (ids[:2],), dynamic_shapes={"token_ids": {0: batch}})
    assert torch.equal(encode.module()(x), ids)
    torch.testing.assert_close(decode.module()(ids), model.decode(ids, prefix_length=3).pixel_values)


def test_encode_and_decode_compile_without_graph_breaks(model):
    torch._dynamo.reset()
    encode = torch.compile(lambda x: model.encode(x).token_ids, fullgraph=True, backend="aot_eager")
    decode = torch.compile(lambda ids: model.decode(ids, prefix_length=2).pixel_values, fullgraph=True,
                           backend="aot_eager")  # fmt: skip
    x = torch.rand(2, 1, 16, 16)
    ids = model.encode(x).token_ids
    assert torch.equal(encode(x), ids)  # fullgraph=True raises on any graph break (data-dependent branch)
    torch.testing.assert_close(decode(ids), model.decode(ids, prefix_length=2).pixel_values)


def test_value_checks_stay_at_the_eager_entry_points(model):
    with pytest.raises(ValueError, match=r"pixel_values must be in \[0, 1\]"):
        model.encode(torch.full((1, 1, 16, 16), 2.0))
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 32\)"):
        model.decode(torch.full((1, model.config.num_tokens), 32))
    with pytest.raises(ValueError, match="empty batch"):
        model.encode(torch.rand(0, 1, 16, 16))
    with pytest.raises(ValueError, match="empty batch"):
        model.decode(torch.zeros(0, model.config.num_tokens, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_length must be an int"):
        model.decode(torch.zeros(1, model.config.num_tokens, dtype=torch.long), prefix_length=True)


def test_token_ids_are_range_checked_in_int64():
    config = QGVAEConfig(**(TINY | {"codebook_size": 256}))
    model = QGVAEModel(config).eval()
    ids = torch.full((2, 8), 255, dtype=torch.uint8)  # valid; 255 + 1 would wrap to 0 in uint8
    torch.testing.assert_close(model.decode(ids).pixel_values, model.decode(ids.long()).pixel_values)


def test_prefix_length_is_one_name_and_num_tokens_a_deprecated_alias(model):
    x = torch.rand(2, 1, 16, 16)
    ids = model.encode(x).token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns nowhere
        new = model.decode(ids, prefix_length=3).pixel_values
        streams = model.compress(x, prefix_length=3)
        assert decode_tokens(streams[0]).prefix_length == 3
        assert truncate(streams[0], 2) == truncate(streams[0], prefix_length=2)
    with pytest.warns(FutureWarning, match="use prefix_length="):
        torch.testing.assert_close(model.decode(ids, num_tokens=3).pixel_values, new)
    with pytest.warns(FutureWarning, match="use prefix_length="):
        assert model.compress(x, num_tokens=3) == streams
    with pytest.warns(FutureWarning, match="num_kept is deprecated"):
        assert decode_tokens(streams[0]).num_kept == 3
    with pytest.warns(FutureWarning):
        assert encode_tokens(ids[0].numpy(), 32, b"abcd", num_tokens=2) == encode_tokens(ids[0].numpy(), 32, b"abcd", 2)
    with pytest.raises(TypeError, match="both prefix_length and its deprecated alias"):
        model.decode(ids, prefix_length=2, num_tokens=2)


def test_patch_vqvae_reuses_the_qgvae_contract():
    assert issubclass(PatchVQVAEModel, QGVAEModel)
    for name in ("encode", "decode", "forward", "compress", "decompress", "voronoi_reset"):
        assert getattr(PatchVQVAEModel, name) is getattr(QGVAEModel, name), name
    assert PatchVQVAEModel.config_class is PatchVQVAEConfig and QGVAEModel.config_class is QGVAEConfig


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or "").split(".")[0])
    return names


def test_layout_configs_need_no_torch_and_the_package_stands_alone():
    assert not (PACKAGE / "tokenizer_utils.py").exists()
    for config_file in ("configuration_qgvae.py", "configuration_patch_vqvae.py", "configuration_qgprior.py"):
        imports = imported_modules(PACKAGE / config_file)
        assert imports <= {"__future__", "math", "collections", "typing", "transformers", ".configuration_qgvae",
                           "warnings", "dataclasses", "huggingface_hub"}, (config_file, imports)  # fmt: skip
    for module in PACKAGE.glob("*.py"):
        text = module.read_text()
        assert "training" not in imported_modules(module) and "benchmarks" not in imported_modules(module), module
        assert '"training"' not in text and "'training'" not in text, f"{module.name} reaches into training/"


@pytest.mark.parametrize("config_class", [QGVAEConfig, PatchVQVAEConfig])
def test_configs_keep_the_shared_config_contract(config_class, tmp_path):
    """ConfigTester's checks: to_dict/from_dict, to_json_string, save/load round trips, the standard fields
    (num_labels <-> id2label) and unknown keyword arguments kept as attributes."""
    config = config_class(my_field=3, num_labels=3)
    assert config.my_field == 3 and len(config.id2label) == 3 and config.num_labels == 3
    config.num_labels = 5
    assert sorted(config.id2label) == list(range(5))
    for loaded in (
        config_class.from_dict(config.to_dict()),
        config_class.from_json_file(config.to_json_file(tmp_path / "c.json") or tmp_path / "c.json"),
    ):
        assert loaded.to_dict() == config.to_dict() and loaded.my_field == 3
    config.save_pretrained(tmp_path / "saved")
    assert config_class.from_pretrained(tmp_path / "saved").to_dict() == config.to_dict()
    overridden, unused = config_class.from_pretrained(tmp_path / "saved", reset_interval=7, unknown=1,
                                                      return_unused_kwargs=True)  # fmt: skip
    assert overridden.reset_interval == 7 and unused == {"unknown": 1} and overridden.my_field == 3
