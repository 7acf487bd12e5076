import math

import pytest
import torch

from qg_tokenizer import QGVAEConfig, QGVAEModel

from .conftest import tiny_config


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(num_channels=3),
        dict(downsample_factor=0),
        dict(num_channels=3, downsample_factor=2, num_res_blocks=2),
    ],
)
def test_shapes_and_dtypes(overrides):
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    model = QGVAEModel(config).eval()
    x = torch.rand(3, config.num_channels, 16, 16)
    encoded = model.encode(x)
    assert encoded.token_ids.shape == (3, 8) and encoded.token_ids.dtype == torch.long
    assert encoded.quantized.shape == (3, 8, 8) and encoded.quantized.dtype == torch.float32
    assert 0 <= encoded.token_ids.min() and encoded.token_ids.max() < 32
    decoded = model.decode(encoded.token_ids).pixel_values
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    out = model(x)
    assert out.reconstruction.shape == x.shape
    torch.testing.assert_close(out.reconstruction, decoded)
    expected = out.reconstruction_loss + 0.25 * out.codebook_loss + 1.0 * out.commitment_loss
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.reconstruction_loss, (decoded - x).square().mean())
    assert out.token_mask is None  # eval mode: no token dropout


def test_token_ids_are_nearest_codeword_of_own_codebook(tiny_model):
    x = torch.rand(5, 1, 16, 16)
    z = tiny_model.encoder(x)  # (B, C, D)
    codebook = tiny_model.quantizer.codebook  # (C, K, D)
    brute = ((z[:, :, None, :] - codebook[None]) ** 2).sum(-1).argmin(-1)
    ids = tiny_model.encode(x).token_ids
    assert torch.equal(ids, brute)
    # with a codebook that differs per token, sharing codebooks would give other ids
    shared = ((z[:, :, None, :] - codebook[0][None, None]) ** 2).sum(-1).argmin(-1)
    assert not torch.equal(ids, shared)
    quantized = tiny_model.encode(x).quantized
    torch.testing.assert_close(quantized, codebook[torch.arange(8), ids])


def test_gradients_straight_through_and_codebook_only_from_codebook_term(tiny_model):
    x = torch.rand(4, 1, 16, 16)
    tiny_model.train()
    out = tiny_model(x, token_mask=torch.ones(4, 8))
    tiny_model.zero_grad()
    out.reconstruction_loss.backward(retain_graph=True)
    assert tiny_model.quantizer.codebook.grad is None or tiny_model.quantizer.codebook.grad.abs().sum() == 0
    encoder_grad = tiny_model.encoder.projection.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0  # straight-through reaches the encoder
    tiny_model.zero_grad()
    out.codebook_loss.backward(retain_graph=True)
    grad = tiny_model.quantizer.codebook.grad
    assert grad.abs().sum() > 0
    projection_grad = tiny_model.encoder.projection.weight.grad
    assert projection_grad is None or projection_grad.abs().sum() == 0
    # only the selected codeword of each token receives a gradient
    touched = grad.abs().sum(-1) > 0  # (C, K)
    selected = torch.zeros_like(touched)
    selected[torch.arange(8).expand(4, 8), out.token_ids] = True
    assert torch.equal(touched, selected)
    tiny_model.zero_grad()
    out.commitment_loss.backward()
    assert tiny_model.quantizer.codebook.grad is None or tiny_model.quantizer.codebook.grad.abs().sum() == 0


def test_decode_prefix_equals_zeroing_tokens_after_offset(tiny_model):
    ids = torch.randint(0, 32, (3, 8))
    for k in (1, 3, 8):
        latents = tiny_model.quantizer.lookup(ids) + tiny_model.quantizer.global_offset
        latents[:, k:] = 0
        expected = tiny_model.decoder(latents)
        torch.testing.assert_close(tiny_model.decode(ids, prefix_length=k).pixel_values, expected)
    per_image = tiny_model.decode(ids, prefix_length=torch.tensor([1, 3, 8])).pixel_values
    for row, k in enumerate((1, 3, 8)):
        expected = tiny_model.decode(ids[row : row + 1], prefix_length=k).pixel_values[0]
        torch.testing.assert_close(per_image[row], expected)
    full = tiny_model.decode(ids).pixel_values
    assert not torch.allclose(tiny_model.decode(ids, prefix_length=1).pixel_values, full)


def test_token_dropout_follows_probability():
    model = QGVAEModel(tiny_config(token_dropout_prob=1 / 3))
    generator = torch.Generator().manual_seed(0)
    mask = model.token_dropout_mask(6000, generator=generator)
    kept = mask.sum(-1)
    dropped = kept < 8
    assert abs(dropped.float().mean().item() - 1 / 3) < 0.03
    assert torch.equal(mask, (torch.arange(8) < kept[:, None]).float())  # always a prefix
    assert kept.min() == 1 and set(kept[dropped].long().tolist()) == set(range(1, 8))
    model.train()
    out = model(torch.rand(64, 1, 16, 16))
    assert out.token_mask is not None and out.token_mask.shape == (64, 8)
    assert QGVAEModel(tiny_config()).token_dropout_mask(100).sum() == 800  # probability 0 keeps everything


def test_usage_counts_only_in_training(tiny_model):
    x = torch.rand(4, 1, 16, 16)
    tiny_model(x)
    assert tiny_model.quantizer.usage_counts.sum() == 0
    tiny_model.train()
    out = tiny_model(x)
    counts = tiny_model.quantizer.usage_counts
    assert counts.sum() == 4 * 8 and torch.equal(counts.sum(-1), torch.full((8,), 4.0))
    for c in range(8):
        assert counts[c, out.token_ids[:, c]].sum() >= 1
    usage = tiny_model.codebook_usage()
    assert torch.equal(usage["dead"], (counts == 0).sum(-1))


def test_bits_and_bytes_per_image():
    model = QGVAEModel(tiny_config(codebook_size=300))
    assert model.bits_per_image == pytest.approx(8 * math.log2(300))
    assert model.bytes_per_image == math.ceil(8 * math.log2(300) / 8)
    assert QGVAEConfig.from_preset("mnist-cpu").bytes_per_image == 18
    assert QGVAEConfig.from_preset("photos32-cpu").bytes_per_image == 72
    assert QGVAEConfig.from_preset("imagenet128").bytes_per_image == 288


@pytest.mark.parametrize("preset,reference", [("cifar10-demo", 6_228_750), ("imagenet128", 26_470_942)])
def test_preset_parameter_counts_match_reference(preset, reference):
    with torch.device("meta"):
        model = QGVAEModel(QGVAEConfig.from_preset(preset))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(count / reference - 1) < 0.02, count


def test_compress_decompress_round_trip(tiny_model):
    x = torch.rand(3, 1, 16, 16)
    streams = tiny_model.compress(x)
    assert all(len(s) == 20 + tiny_model.bytes_per_image for s in streams)
    torch.testing.assert_close(tiny_model.decompress(streams), tiny_model(x).reconstruction)
    prefix = tiny_model.compress(x, prefix_length=3)
    ids = tiny_model.encode(x).token_ids
    torch.testing.assert_close(tiny_model.decompress(prefix), tiny_model.decode(ids, prefix_length=3).pixel_values)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.rand(2, 3, 16, 16), ValueError, r"shape \[batch, 1, 16, 16\]"),
        (torch.rand(2, 1, 8, 8), ValueError, "shape"),
        (torch.rand(1, 16, 16), ValueError, "got \\[1, 16, 16\\]"),
        (torch.randint(0, 255, (2, 1, 16, 16)), TypeError, "float tensor"),
        (torch.full((2, 1, 16, 16), float("nan")), ValueError, "NaN or Inf"),
        (torch.full((2, 1, 16, 16), float("inf")), ValueError, "NaN or Inf"),
        (torch.rand(2, 1, 16, 16) * 2 - 1, ValueError, r"\[0, 1\]"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_pixel_values(tiny_model, x, error, match):
    with pytest.raises(error, match=match):
        tiny_model.encode(x)


@pytest.mark.parametrize(
    "ids,kwargs,error,match",
    [
        (torch.full((2, 8), 32), {}, ValueError, r"in \[0, 32\)"),
        (torch.full((2, 8), -1), {}, ValueError, r"in \[0, 32\)"),
        (torch.zeros(2, 7, dtype=torch.long), {}, ValueError, r"shape \[batch, 8\]"),
        (torch.zeros(8, dtype=torch.long), {}, ValueError, "shape"),
        (torch.zeros(2, 8), {}, TypeError, "integer tensor"),
        (torch.zeros(2, 8, dtype=torch.long), {"prefix_length": 9}, ValueError, r"prefix_length must be in \[1, 8\]"),
        (torch.zeros(2, 8, dtype=torch.long), {"prefix_length": 0}, ValueError, "prefix_length"),
        (torch.zeros(2, 8, dtype=torch.long), {"prefix_length": torch.tensor([1, 2, 3])}, ValueError, "prefix_length"),
    ],
)
def test_bad_token_ids(tiny_model, ids, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_model.decode(ids, **kwargs)


def test_uint8_token_ids_accepted(tiny_model):
    ids = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(
        tiny_model.decode(ids.to(torch.int16)).pixel_values, tiny_model.decode(ids).pixel_values
    )


def test_bf16_autocast_keeps_quantizer_fp32(tiny_model):
    x = torch.rand(2, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(x)
    assert out.codebook_loss.dtype == torch.float32 and tiny_model.quantizer.codebook.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert torch.equal(out.token_ids, tiny_model.encode(x).token_ids)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    torch.manual_seed(0)
    model = QGVAEModel(tiny_config()).train()
    x, mask = torch.rand(2, 1, 16, 16), torch.ones(2, 8)
    model(x, token_mask=mask).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model(x, token_mask=mask).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_forward_exports_with_a_dynamic_batch(tiny_model):
    class Reconstruct(torch.nn.Module):
        def __init__(self, model: QGVAEModel):
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values).reconstruction

    wrapper = Reconstruct(tiny_model)
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(wrapper, (torch.rand(2, 1, 16, 16),), dynamic_shapes={"pixel_values": {0: batch}})
    x = torch.rand(5, 1, 16, 16)
    torch.testing.assert_close(exported.module()(x), wrapper(x))
