"""Tests of the patch VQ-VAE baseline (qg_tokenizer/modeling_patch_vqvae.py): same bytes, same contract as QG-VAE."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from qg_tokenizer import PatchVQVAEConfig, PatchVQVAEModel, QGVAEConfig, QGVAEModel
from qg_tokenizer.codec import HEADER_NUM_BYTES
from qg_tokenizer.modeling_qgvae import QGVAEDecoderOutput, QGVAEEncoderOutput, QGVAEModelOutput
from qg_tokenizer.quantizer_qgvae import RESET_NOISE

PRESETS = ["mnist-cpu", "photos32-cpu"]
# trainable parameters of the presets (QG-VAE: 875,973 and 3,253,611)
PARAMETERS = {"mnist-cpu": 840_673, "photos32-cpu": 3_208_387}


def make_model(preset: str, seed: int = 0, **overrides) -> PatchVQVAEModel:
    torch.manual_seed(seed)
    return PatchVQVAEModel(PatchVQVAEConfig.from_preset(preset, **overrides)).eval()


def images(config, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.num_channels, config.image_size, config.image_size, generator=generator)


@pytest.fixture(scope="module")
def mnist_model() -> PatchVQVAEModel:
    return make_model("mnist-cpu")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_matches_qgvae_budget_and_parameters(preset):
    config, reference = PatchVQVAEConfig.from_preset(preset), QGVAEConfig.from_preset(preset)
    assert config.num_tokens == config.grid_size**2 == reference.num_tokens
    assert config.bytes_per_image == reference.bytes_per_image == {"mnist-cpu": 18, "photos32-cpu": 72}[preset]
    assert config.bits_per_image == reference.bits_per_image
    with torch.device("meta"):
        ours, theirs = PatchVQVAEModel(config), QGVAEModel(reference)
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == PARAMETERS[preset]
    assert abs(count / sum(p.numel() for p in theirs.parameters()) - 1) < 0.15


@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_and_contract(preset):
    model = make_model(preset)
    config = model.config
    x = images(config, 3)
    encoded = model.encode(x)
    assert isinstance(encoded, QGVAEEncoderOutput)
    assert encoded.token_ids.shape == (3, config.grid_size**2) and encoded.token_ids.dtype == torch.long
    assert encoded.quantized.shape == (3, config.grid_size**2, 64)
    assert 0 <= encoded.token_ids.min() and encoded.token_ids.max() < 512
    decoded = model.decode(encoded.token_ids)
    assert isinstance(decoded, QGVAEDecoderOutput) and decoded.pixel_values.shape == x.shape
    out = model(x)
    assert isinstance(out, QGVAEModelOutput) and out.token_mask is None
    torch.testing.assert_close(out.reconstruction, decoded.pixel_values)
    torch.testing.assert_close(out.reconstruction_loss, (decoded.pixel_values - x).square().mean())
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.25 * out.codebook_loss + out.commitment_loss)
    assert model.quantizer.codebook.shape == (1, 512, 64)
    assert model.quantizer.reset_statistic.shape == model.quantizer.usage_counts.shape == (1, 512)
    assert model(x, return_dict=False)[1].shape == x.shape


def test_padding_reaches_the_grid_exactly():
    config = PatchVQVAEConfig.from_preset("mnist-cpu")
    assert (config.num_downsamples, config.padded_size) == (3, 32)  # 28 -> pad 32 -> 16 -> 8 -> 4
    config = PatchVQVAEConfig.from_preset("photos32-cpu")
    assert (config.num_downsamples, config.padded_size) == (2, 32)  # 32 -> 16 -> 8, no padding
    config = PatchVQVAEConfig(image_size=28, grid_size=7, block_out_channels=[8, 16, 16])
    assert (config.num_downsamples, config.padded_size) == (2, 28)


def test_token_ids_are_nearest_codeword_of_shared_codebook(mnist_model):
    x = images(mnist_model.config, 4)
    z = mnist_model.encoder(x)  # (B, C, D)
    codebook = mnist_model.quantizer.codebook[0]  # (K, D)
    brute = ((z[:, :, None, :] - codebook) ** 2).sum(-1).argmin(-1)
    encoded = mnist_model.encode(x)
    assert torch.equal(encoded.token_ids, brute)
    torch.testing.assert_close(encoded.quantized, codebook[brute])
    torch.testing.assert_close(encoded.codebook_loss, (z - codebook[brute]).square().mean())


def test_per_token_codebooks_quantise_each_cell_against_its_own_codebook(tmp_path):
    model = make_model("mnist-cpu", per_token_codebooks=True, block_out_channels=[16, 24, 40, 56])
    c, k, d = model.config.num_tokens, model.config.codebook_size, model.config.codeword_dim
    assert model.quantizer.codebook.shape == (c, k, d) and model.quantizer.usage_counts.shape == (c, k)
    x = images(model.config, 4)
    z = model.encoder(x)  # (B, C, D)
    codebooks = model.quantizer.codebook  # (C, K, D)
    brute = ((z[:, :, None, :] - codebooks[None]) ** 2).sum(-1).argmin(-1)  # (B, C), cell c against codebook c
    shared = ((z[:, :, None, :] - codebooks[0]) ** 2).sum(-1).argmin(-1)
    encoded = model.encode(x)
    assert torch.equal(encoded.token_ids, brute) and not torch.equal(brute, shared)
    torch.testing.assert_close(encoded.quantized, codebooks[torch.arange(c), brute])
    torch.testing.assert_close(model.decode(brute).pixel_values, model(x).reconstruction)
    model.train()(x).loss.backward()
    assert model.quantizer.usage_counts.sum(1).tolist() == [4] * c  # one count per image in each cell's codebook
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.per_token_codebooks is True
    assert torch.equal(loaded.encode(x).token_ids, brute)


def test_training_step_counts_usage_and_voronoi_reset_splits_live_cells():
    model = make_model("mnist-cpu").train()
    model(images(model.config, 16)).loss.backward()
    model.accumulate_reset_statistic()
    statistic = model.quantizer.reset_statistic[0].clone()
    used = model.quantizer.usage_counts[0] > 0
    live, dead = statistic > 1e-6, statistic == 0
    assert torch.equal(live, used) and 0 < live.sum() < 512  # only selected codewords get a codebook gradient
    assert int(model.quantizer.usage_counts.sum()) == 16 * 16
    assert model.codebook_usage()["dead"].tolist() == [int(dead.sum())]
    before = model.quantizer.codebook[0].detach().clone()

    resets = model.voronoi_reset(torch.Generator().manual_seed(0))

    after = model.quantizer.codebook[0].detach()
    num_resets = min(int(dead.sum()), int(live.sum()))
    assert resets.tolist() == [num_resets]
    assert torch.equal(after[live], before[live])  # live codewords stay
    changed = (after != before).any(-1)
    assert int(changed.sum()) == num_resets and not changed[live].any()
    # each reset codeword is a copy (up to the noise) of a distinct live codeword, the busiest ones first
    busiest = statistic.argsort(descending=True)[:num_resets]
    distance = (after[changed][:, None] - before[busiest][None]).abs().amax(-1)  # (resets, busiest)
    assert (distance.min(1).values <= RESET_NOISE).all()
    assert len(set(distance.argmin(1).tolist())) == num_resets
    assert model.quantizer.reset_statistic.abs().sum() == 0


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = make_model("mnist-cpu").train()
    model(images(model.config, 8)).loss.backward()  # fills the usage counts
    model.accumulate_reset_statistic()
    model.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "patch_vqvae"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PatchVQVAEConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is PatchVQVAEModel
    expected = model.state_dict()
    assert expected.keys() == loaded.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert loaded.quantizer.usage_counts.sum() == 8 * 16
    x = images(model.config, 2, seed=1)
    assert torch.equal(loaded.encode(x).token_ids, model.encode(x).token_ids)
    torch.testing.assert_close(loaded(x).reconstruction, model(x).reconstruction)


def test_prefix_decode_equals_zeroing_later_tokens(mnist_model):
    token_ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    latents = mnist_model.quantizer.codebook[0][token_ids] + mnist_model.quantizer.global_offset
    for k in (1, 5, 16):
        expected = mnist_model.decoder(torch.cat((latents[:, :k], torch.zeros_like(latents[:, k:])), 1))
        torch.testing.assert_close(mnist_model.decode(token_ids, prefix_length=k).pixel_values, expected)
    per_image = mnist_model.decode(token_ids, prefix_length=torch.tensor([1, 5, 16])).pixel_values
    torch.testing.assert_close(per_image[1], mnist_model.decode(token_ids[1:2], prefix_length=5).pixel_values[0])
    assert not torch.allclose(per_image[0], mnist_model.decode(token_ids[:1]).pixel_values[0])


def test_compress_decompress_round_trip(mnist_model):
    x = images(mnist_model.config, 3)
    streams = mnist_model.compress(x)
    assert [len(s) for s in streams] == [HEADER_NUM_BYTES + 18] * 3
    token_ids = mnist_model.encode(x).token_ids
    torch.testing.assert_close(mnist_model.decompress(streams), mnist_model.decode(token_ids).pixel_values)
    prefix = mnist_model.compress(x, prefix_length=4)
    torch.testing.assert_close(
        mnist_model.decompress(prefix), mnist_model.decode(token_ids, prefix_length=4).pixel_values
    )


def influenced_fraction(model, token_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """`[len(tokens)]` fraction of pixels whose change exceeds 10% of the largest change when one token is redrawn."""
    variants = token_ids.repeat(len(tokens), 1)
    variants[torch.arange(len(tokens)), tokens] = (token_ids[0, tokens] + 256) % 512
    with torch.no_grad():
        change = (model.decode(variants).pixel_values - model.decode(token_ids).pixel_values).abs().amax(1)
    change = change.flatten(1)
    return (change > 0.1 * change.amax(1, keepdim=True)).float().mean(1)


def test_one_patch_token_changes_less_of_the_image_than_one_global_token():
    # untrained models: only what the architectures impose. A patch token's decoder path is local (with some spread
    # through the receptive field and GroupNorm), a QG-VAE token's map covers the whole image.
    patch = make_model("photos32-cpu")
    torch.manual_seed(0)
    qgvae = QGVAEModel(QGVAEConfig.from_preset("photos32-cpu")).eval()
    token_ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    tokens = [0, 9, 18, 27, 36, 45, 54, 63]  # the diagonal of the 8x8 grid
    patch_fraction = influenced_fraction(patch, token_ids, tokens)
    global_fraction = influenced_fraction(qgvae, token_ids, tokens)
    assert global_fraction.mean() > 0.8
    assert patch_fraction.mean() < global_fraction.mean() - 0.25
    # the patch token's own 4x4-pixel cell changes more than the image on average
    variants = token_ids.repeat(len(tokens), 1)
    variants[torch.arange(len(tokens)), tokens] = (token_ids[0, tokens] + 256) % 512
    with torch.no_grad():
        change = (patch.decode(variants).pixel_values - patch.decode(token_ids).pixel_values).abs().mean(1)
    cells = torch.stack([change[i, 4 * (t // 8) : 4 * (t // 8) + 4, 4 * (t % 8) : 4 * (t % 8) + 4].mean() for i, t in
                         enumerate(tokens)])  # fmt: skip
    assert (cells > 1.5 * change.flatten(1).mean(1)).all()


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(grid_size=2.0), TypeError, "grid_size must be an int"),
        (dict(grid_size=0), ValueError, "grid_size must be >= 1"),
        (dict(grid_size=29), ValueError, "grid_size"),
        (dict(num_channels=2), ValueError, "num_channels must be 1 or 3"),
        (dict(codebook_size=1), ValueError, "codebook_size"),
        (dict(block_out_channels=[16, 32, 64]), ValueError, "block_out_channels must be 4 positive ints"),
        (dict(block_out_channels=[16, 32, 0, 64]), ValueError, "block_out_channels"),
        (dict(commitment_loss_weight=-1.0), ValueError, "commitment_loss_weight must be >= 0"),
        (dict(token_dropout_prob=1.5), ValueError, "token_dropout_prob"),
        (dict(per_token_codebooks="yes"), TypeError, "per_token_codebooks must be a bool"),
    ],
)
def test_bad_config(overrides, error, match):
    with pytest.raises(error, match=match):
        PatchVQVAEConfig.from_preset("mnist-cpu", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown PatchVQVAEConfig preset 'cifar'"):
        PatchVQVAEConfig.from_preset("cifar")


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.rand(2, 1, 32, 32), ValueError, r"shape \[batch, 1, 28, 28\]"),
        (torch.rand(2, 3, 28, 28), ValueError, "shape"),
        ((torch.rand(2, 1, 28, 28) * 255).to(torch.uint8), TypeError, "float tensor"),
        (torch.rand(2, 1, 28, 28) * 2, ValueError, r"\[0, 1\]"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_pixel_values(mnist_model, x, error, match):
    with pytest.raises(error, match=match):
        mnist_model.encode(x)


@pytest.mark.parametrize(
    "ids, kwargs, error, match",
    [
        (torch.zeros(2, 15, dtype=torch.long), {}, ValueError, r"shape \[batch, 16\]"),
        (torch.full((2, 16), 512), {}, ValueError, r"in \[0, 512\)"),
        (torch.zeros(2, 16), {}, TypeError, "integer tensor"),
        (torch.zeros(2, 16, dtype=torch.long), dict(prefix_length=0), ValueError, r"must be in \[1, 16\]"),
        (torch.zeros(2, 16, dtype=torch.long), dict(prefix_length=17), ValueError, "prefix_length"),
    ],
)
def test_bad_token_ids(mnist_model, ids, kwargs, error, match):
    with pytest.raises(error, match=match):
        mnist_model.decode(ids, **kwargs)
