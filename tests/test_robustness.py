"""Robustness of the model's public entry points (issue 14): input dtypes, grad mode, empty and corrupt input."""

from __future__ import annotations

import copy

import pytest
import torch

from qg_tokenizer import QGVAEModel


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))


# --- dtypes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "min_agreement"), [(torch.bfloat16, 0.95), (torch.float16, 0.99)])
def test_half_precision_model_encodes_float32_pixels(tiny_model, pixel_values, dtype, min_agreement):
    expected = tiny_model.encode(pixel_values).token_ids
    half = copy.deepcopy(tiny_model).to(dtype)
    encoded = half.encode(pixel_values)  # the processor's float32 output
    agreement = (encoded.token_ids == expected).float().mean().item()
    assert agreement >= min_agreement
    assert encoded.quantized.dtype == torch.float32  # the quantizer computes in float32
    assert half.decode(encoded.token_ids).pixel_values.dtype == dtype
    assert half(pixel_values).reconstruction.dtype == dtype
    first = pixel_values[:3]
    expected_images = half.decode(half.encode(first).token_ids).pixel_values
    torch.testing.assert_close(half.decompress(half.compress(first)), expected_images)


def test_float64_pixels_encode_as_their_float32_values(tiny_model, pixel_values):
    expected = tiny_model.encode(pixel_values)
    encoded = tiny_model.encode(pixel_values.double())
    assert torch.equal(encoded.token_ids, expected.token_ids)
    torch.testing.assert_close(encoded.quantized, expected.quantized, rtol=0, atol=0)
    out = tiny_model(pixel_values.double())
    assert out.reconstruction.dtype == torch.float32
    assert torch.equal(out.token_ids, expected.token_ids)
    assert tiny_model.compress(pixel_values.double()) == tiny_model.compress(pixel_values)


def test_bfloat16_pixels_into_a_float32_model(tiny_model, pixel_values):
    bf16 = pixel_values.bfloat16()
    assert torch.equal(tiny_model.encode(bf16).token_ids, tiny_model.encode(bf16.float()).token_ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading_keeps_the_quantizer_in_float32(tiny_model, pixel_values, tmp_path, dtype):
    tiny_model.save_pretrained(tmp_path)
    loaded = QGVAEModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert loaded.quantizer.codebook.dtype == torch.float32 and loaded.encoder.residual.weight.dtype == dtype
    assert loaded.codebook_fingerprint() == tiny_model.codebook_fingerprint()  # float32 streams stay readable
    streams = tiny_model.compress(pixel_values[:4])
    decoded = loaded.decompress(streams)
    assert decoded.dtype == dtype
    torch.testing.assert_close(decoded.float(), tiny_model.decompress(streams), atol=5e-2, rtol=0)
    agreement = (loaded.encode(pixel_values).token_ids == tiny_model.encode(pixel_values).token_ids).float().mean()
    assert agreement >= 0.95


# --- grad mode ----------------------------------------------------------------------------------------------------


def test_encode_follows_the_grad_mode_and_compress_records_no_graph(tiny_model, pixel_values, monkeypatch):
    encoded = tiny_model.encode(pixel_values[:2])
    assert encoded.quantized.requires_grad and encoded.quantized.grad_fn is not None  # differentiable contract
    assert not encoded.token_ids.requires_grad
    with torch.inference_mode():
        assert not tiny_model.encode(pixel_values[:2]).quantized.requires_grad
    grad_modes = []
    encode = tiny_model.encode
    monkeypatch.setattr(tiny_model, "encode", lambda x: grad_modes.append(torch.is_grad_enabled()) or encode(x))
    tiny_model.compress(pixel_values[:2])
    assert grad_modes == [False]


# --- empty and malformed input ------------------------------------------------------------------------------------


def test_decompress_rejects_an_empty_list_and_a_bare_stream(tiny_model, pixel_values):
    with pytest.raises(ValueError, match="streams is an empty list: give at least one byte stream"):
        tiny_model.decompress([])
    stream = tiny_model.compress(pixel_values[:1])[0]
    with pytest.raises(TypeError, match=r"streams must be a list of byte streams, got bytes \(wrap one stream"):
        tiny_model.decompress(stream)
    expected = tiny_model.decompress([stream])
    assert expected.shape == (1, 1, 16, 16)
    torch.testing.assert_close(tiny_model.decompress(iter([stream])), expected)  # any iterable of streams
    with pytest.raises(ValueError, match="empty batch"):
        tiny_model.compress(pixel_values[:0])


# --- non-finite weights -------------------------------------------------------------------------------------------


def test_decompress_rejects_nan_from_corrupt_decoder_weights(tiny_model, pixel_values):
    streams = tiny_model.compress(pixel_values[:2])
    with torch.no_grad():
        tiny_model.decoder.residual.weight[0, 0] = float("nan")
    match = r"NaN or Inf in the decoder's output: the model has non-finite \(corrupt\) parameters "
    with pytest.raises(RuntimeError, match=match + r"decoder\.residual\.weight$"):
        tiny_model.decompress(streams)
    # decode and forward (the training hot path, traced graphs) do not sync on a check
    assert torch.isnan(tiny_model.decode(torch.zeros(1, 8, dtype=torch.long)).pixel_values).any()
    assert torch.isnan(tiny_model(pixel_values[:2]).reconstruction).any()


def test_decompress_names_an_overflow_when_the_weights_are_finite(tiny_model, pixel_values):
    half = copy.deepcopy(tiny_model).to(torch.float16)
    streams = half.compress(pixel_values[:2])
    with torch.no_grad():
        half.decoder.residual.weight.fill_(60000.0)  # finite in float16, but the sums overflow to Inf
    with pytest.raises(RuntimeError, match=r"parameters are finite: an activation overflowed in torch.float16"):
        half.decompress(streams)


def test_compress_rejects_nan_from_corrupt_codebooks(tiny_model, pixel_values):
    with torch.no_grad():
        tiny_model.quantizer.codebook[3] = float("nan")
    with pytest.raises(RuntimeError, match=r"NaN or Inf in the encoded latents: .* parameters quantizer\.codebook$"):
        tiny_model.compress(pixel_values[:2])
