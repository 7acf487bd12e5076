"""Entropy coding of token ids with the prior (issue 12): frequencies, round trips, batch-size invariance, the
fallback path, wrong or missing priors, rate control and fuzzing."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qg_tokenizer import QGPriorConfig, QGPriorForCausalLM, QGVAEModel
from qg_tokenizer import entropy_coding as ec
from qg_tokenizer.codec import (
    FORMAT_VERSION,
    HEADER_NUM_BYTES,
    PRIOR_FORMAT_VERSION,
    PRIOR_HEADER_NUM_BYTES,
    CodecError,
    checksum,
    decode_tokens,
    encode_prior_coded,
    payload_num_bytes,
    read_header,
    truncate,
)

from .conftest import tiny_config

C, K = 8, 32


def sharp_prior(seed: int = 0, sharpness: float = 30.0) -> QGPriorForCausalLM:
    """An unconditional prior whose next-token distributions are peaked (a scaled output projection)."""
    torch.manual_seed(seed)
    config = QGPriorConfig(
        num_image_tokens=C, codebook_size=K, num_classes=0, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4,
    )  # fmt: skip
    prior = QGPriorForCausalLM(config).eval()
    with torch.no_grad():
        prior.lm_head.weight.mul_(sharpness)
    return prior


@pytest.fixture(scope="module")
def prior() -> QGPriorForCausalLM:
    return sharp_prior()


@pytest.fixture(scope="module")
def sampled(prior) -> np.ndarray:
    """1,024 images' ids `[1024, C]` drawn from the prior itself (typical under it)."""
    ids = prior.generate_image_tokens(batch_size=1024, generator=torch.Generator().manual_seed(0))
    return ids.numpy()


@pytest.fixture(scope="module")
def coder(prior) -> ec.PriorCoder:
    return ec.PriorCoder(prior, C, K)


def ideal_bits(prior: QGPriorForCausalLM, ids: np.ndarray) -> np.ndarray:
    return prior.bits_per_image(torch.from_numpy(ids)).double().numpy()


# ------------------------------------------------------------------------------------------------ frequencies
def test_frequency_table_is_exact_and_positive():
    table = ec._frequency_table()
    assert table[0] == 2**ec.WEIGHT_BITS and table.min() >= 1 and np.all(np.diff(table) <= 0)
    gaps = np.array([1, 64, 640])
    np.testing.assert_allclose(table[gaps], np.round(2**40 * np.exp(-gaps / 64)), rtol=1e-12)
    assert np.array_equal(table, np.round(table))  # integers


def test_frequencies_ignore_a_constant_shift_and_keep_every_id():
    logits = torch.randn(5, K, dtype=torch.float64) * 10
    freq, _ = ec.frequencies(logits)
    shifted, _ = ec.frequencies(logits + 3.0)  # a multiple of the grid: the same rounded gaps
    assert np.array_equal(freq, shifted)
    assert freq.min() >= 1 and freq.shape == (5, K)
    assert np.all(freq.argmax(-1) == logits.argmax(-1).numpy())


def test_frequencies_flag_a_logit_on_a_rounding_boundary():
    logits = torch.zeros(2, K, dtype=torch.float64)
    logits[1, 3] = 0.5 * ec.LOGIT_STEP  # exactly half-way between two grid points
    _, unsafe = ec.frequencies(logits)
    assert unsafe.tolist() == [False, True]
    logits[1, 3] = -1000 + 0.5 * ec.LOGIT_STEP  # so far below the top that any rounding gives the floor frequency
    assert not ec.frequencies(logits)[1].any()


def test_frequencies_need_float64():
    with pytest.raises(TypeError, match="float64"):
        ec.frequencies(torch.zeros(2, K))


# --------------------------------------------------------------------------------------------- the coder
def test_payloads_are_close_to_the_ideal_code_length(coder, prior, sampled):
    ids = sampled[:256]
    tables, unsafe = coder.tables(ids)
    payloads = [coder.encode_one(row, table) for row, table in zip(ids, tables)]
    mean_bytes = np.mean([len(p) for p in payloads])
    bits = ideal_bits(prior, ids).mean()
    assert bits < C * math.log2(K) * 0.8  # the prior is sharp: a real saving to find
    assert mean_bytes <= bits / 8 * 1.01 + 2, (mean_bytes, bits / 8)
    assert mean_bytes >= bits / 8 - 0.5  # no free lunch: a bug that dropped symbols would be shorter
    decoded = coder.decode(payloads, [C] * len(payloads))
    assert all(np.array_equal(d, row) for d, row in zip(decoded, ids))


def test_decoding_is_invariant_to_batch_size_and_threads(coder, sampled):
    """1,024 images encoded in batches of 64, decoded one at a time, in batches of 7 and with one thread: zero
    mismatches."""
    payloads, lengths = [], []
    for start in range(0, len(sampled), 64):
        chunk = sampled[start : start + 64]
        tables, unsafe = coder.tables(chunk)
        assert not unsafe.any()
        payloads += [coder.encode_one(row, table) for row, table in zip(chunk, tables)]
    lengths = [C] * len(payloads)
    one = [coder.decode([p], [C])[0] for p in payloads]
    sevens = [ids for s in range(0, len(payloads), 7) for ids in coder.decode(payloads[s : s + 7], lengths[s : s + 7])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_thread = coder.decode(payloads, lengths)
    finally:
        torch.set_num_threads(threads)
    for decoded in (one, sevens, single_thread):
        assert np.array_equal(np.stack(decoded), sampled)


def test_prefixes_of_different_lengths_decode_in_one_batch(coder, sampled):
    lengths = [1, 3, C, 5]
    ids = sampled[:4]
    tables, _ = coder.tables(ids)
    payloads = [coder.encode_one(row[:k], table[:k]) for row, table, k in zip(ids, tables, lengths)]
    decoded = coder.decode(payloads, lengths)
    assert [d.tolist() for d in decoded] == [row[:k].tolist() for row, k in zip(ids, lengths)]


def test_coder_checks_the_prior_matches_the_tokenizer(prior):
    with pytest.raises(ValueError, match="C=8 tokens of K=32 .* C=16 of K=32"):
        ec.PriorCoder(prior, 16, K)
    with pytest.raises(TypeError, match="QGPriorForCausalLM"):
        ec.PriorCoder(torch.nn.Linear(2, 2), C, K)
    conditional = QGPriorForCausalLM(
        QGPriorConfig(num_image_tokens=C, codebook_size=K, num_classes=3, class_dropout_prob=0.0, hidden_size=16,
                      intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    )
    with pytest.raises(ValueError, match="no null token"):
        ec.PriorCoder(conditional, C, K)


def test_prior_fingerprint_survives_save_and_load_and_names_the_weights(prior, tmp_path):
    prior.save_pretrained(tmp_path)
    loaded = QGPriorForCausalLM.from_pretrained(tmp_path)
    assert ec.prior_fingerprint(loaded) == ec.prior_fingerprint(prior)
    with torch.no_grad():
        loaded.lm_head.weight[0, 0] += 1e-3
    assert ec.prior_fingerprint(loaded) != ec.prior_fingerprint(prior)


# ------------------------------------------------------------------------------------ through the model
@pytest.fixture(scope="module")
def model_and_prior() -> tuple[QGVAEModel, QGPriorForCausalLM, torch.Tensor]:
    """A tiny QG-VAE, images, and a prior fitted to those images' tokens (so coding saves bytes)."""
    torch.manual_seed(0)
    model = QGVAEModel(tiny_config()).eval()
    images = torch.rand(96, 1, 16, 16) * torch.linspace(0.2, 1, 96)[:, None, None, None]
    ids = model.encode(images).token_ids
    prior = sharp_prior(sharpness=1.0).train()
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    inputs = prior.prepare_input_ids(ids)
    for _ in range(150):
        loss = prior(inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, prior.eval(), images


def test_compress_with_prior_round_trips_and_saves_bytes(model_and_prior):
    model, prior, images = model_and_prior
    coded = model.compress(images, prior=prior)
    fixed = model.compress(images)
    assert sum(s[3] == PRIOR_FORMAT_VERSION for s in coded) >= 0.9 * len(coded)
    payload = np.mean([len(read_header(s).payload) for s in coded])
    assert payload < payload_num_bytes(C, K) * 0.8
    assert torch.equal(model.decompress(coded, prior=prior), model.decompress(fixed))
    bits = prior.bits_per_image(model.encode(images).token_ids).mean().item()
    assert payload <= bits / 8 * 1.01 + 2


def test_decompress_needs_the_same_prior(model_and_prior):
    model, prior, images = model_and_prior
    coded = [s for s in model.compress(images[:8], prior=prior) if s[3] == PRIOR_FORMAT_VERSION]
    with pytest.raises(CodecError, match="entropy-coded with a prior .*pass that prior"):
        model.decompress(coded)
    with pytest.raises(CodecError, match="another prior: fingerprint"):
        model.decompress(coded, prior=sharp_prior(seed=1))
    with pytest.raises(CodecError, match="entropy-coded with a prior"):
        decode_tokens(coded[0])
    with pytest.raises(CodecError, match="entropy-coded"):
        truncate(coded[0], 2)


def test_unsafe_rounding_falls_back_to_fixed_width(model_and_prior, monkeypatch):
    model, prior, images = model_and_prior
    monkeypatch.setattr(ec, "GUARD_NATS", ec.LOGIT_STEP)  # every logit counts as on a boundary
    streams = model.compress(images[:6], prior=prior)
    assert all(s[3] == FORMAT_VERSION for s in streams)
    assert torch.equal(model.decompress(streams), model.decompress(model.compress(images[:6])))


def test_a_stream_that_would_not_decode_exactly_falls_back(model_and_prior, monkeypatch):
    model, prior, images = model_and_prior
    real_decode = ec.PriorCoder.decode

    def wrong_first_image(self, payloads, lengths):
        decoded = real_decode(self, payloads, lengths)
        decoded[0] = (decoded[0] + 1) % K
        return decoded

    monkeypatch.setattr(ec.PriorCoder, "decode", wrong_first_image)
    streams = model.compress(images[:4], prior=prior)
    assert streams[0][3] == FORMAT_VERSION and all(s[3] == PRIOR_FORMAT_VERSION for s in streams[1:])
    monkeypatch.undo()
    assert torch.equal(model.decompress(streams, prior=prior), model.decompress(model.compress(images[:4])))


# --------------------------------------------------------------------------------------------- rate control
@pytest.mark.parametrize("with_prior", [False, True])
def test_max_bytes_keeps_the_longest_prefix_that_fits(model_and_prior, with_prior):
    model, prior, images = model_and_prior
    prior = prior if with_prior else None
    for max_bytes in (HEADER_NUM_BYTES + 1, HEADER_NUM_BYTES + 2, 26):
        streams = model.compress(images[:16], prior=prior, max_bytes=max_bytes)
        assert max(map(len, streams)) <= max_bytes
        for image, stream in zip(images[:16], streams):
            kept = read_header(stream).prefix_length
            if kept < C:  # one more token would not fit
                longer = model.compress(image[None], kept + 1, prior=prior)[0]
                assert len(longer) > max_bytes
    with pytest.raises(CodecError, match="max_bytes=17 is below the smallest stream"):
        model.compress(images[:2], prior=prior, max_bytes=PRIOR_HEADER_NUM_BYTES - 1)


@pytest.mark.parametrize("with_prior", [False, True])
def test_target_psnr_keeps_the_shortest_prefix_that_reaches_it(model_and_prior, with_prior):
    model, prior, images = model_and_prior
    prior = prior if with_prior else None
    images = images[:12]

    @torch.no_grad()
    def psnr(kept: int) -> torch.Tensor:
        decoded = model.decode(model.encode(images).token_ids, prefix_length=kept).pixel_values.clamp(0, 1)
        return 10 * torch.log10(1 / (decoded - images).pow(2).flatten(1).mean(1))

    curves = torch.stack([psnr(k) for k in range(1, C + 1)], 1)  # [B, C]
    target = float(curves.median())  # some images reach it early, some late, some never
    kept = torch.tensor([read_header(s).prefix_length for s in model.compress(images, prior=prior,
                                                                             target_psnr=target)])  # fmt: skip
    for row in range(len(images)):
        reaching = (curves[row] >= target).nonzero()
        expected = int(reaching[0]) + 1 if len(reaching) else C
        assert kept[row] == expected
    assert len(set(kept.tolist())) > 1  # per image


def test_rate_control_arguments_are_checked(model_and_prior):
    model, _, images = model_and_prior
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        model.compress(images[:1], max_bytes=0)
    with pytest.raises(ValueError, match="target_psnr must be a finite number"):
        model.compress(images[:1], target_psnr=float("nan"))
    with pytest.raises(TypeError, match="prefix_length must be an int, got float"):
        model.compress(images[:1], 3.0)
    with pytest.raises(CodecError, match=r"prefix_length must be in \[1, 8\], got 9"):
        model.compress(images[:1], 9, max_bytes=30)
    with pytest.raises(ValueError, match="prefix_length must be a positive int"):
        model.decompress(model.compress(images[:1]), prefix_length=0)


def test_saved_models_carry_the_coder_for_remote_code(model_and_prior, tmp_path):
    model, _, _ = model_and_prior
    model.save_pretrained(tmp_path)
    assert (tmp_path / "entropy_coding.py").read_text() == Path(ec.__file__).read_text()


# --------------------------------------------------------------------------------------------------- fuzzing
def test_fuzzed_prior_streams_never_crash(model_and_prior):
    """Random and corrupted version-3 streams (checksums made valid) decode to images or raise CodecError."""
    model, prior, images = model_and_prior
    good = [s for s in model.compress(images[:8], prior=prior) if s[3] == PRIOR_FORMAT_VERSION]
    fp, prior_fp = model.codebook_fingerprint(), ec.prior_fingerprint(prior)
    rng = np.random.default_rng(0)
    for trial in range(60):
        kept = int(rng.integers(1, C + 1))
        size = int(rng.integers(0, payload_num_bytes(kept, K) + 1))
        payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        if trial % 2:  # a real stream with flipped payload bytes, resealed
            header = read_header(good[trial % len(good)])
            payload, kept = bytearray(header.payload), header.prefix_length
            if payload:
                payload[int(rng.integers(len(payload)))] ^= int(rng.integers(1, 256))
            payload = bytes(payload)
        stream = encode_prior_coded(payload, C, K, kept, fp, prior_fp)
        try:
            out = model.decompress([stream], prior=prior)
            assert out.shape == (1, 1, 16, 16)
        except CodecError:
            pass
    bad = bytearray(good[0])
    bad[-1] ^= 1
    with pytest.raises(CodecError, match="checksum"):
        model.decompress([bytes(bad)], prior=prior)
    with pytest.raises(CodecError, match="checksum|too short"):
        model.decompress([good[0][:-1]], prior=prior)
    with pytest.raises(CodecError, match="longer than the fixed width"):
        encode_prior_coded(bytes(payload_num_bytes(C, K) + 1), C, K, C, fp, prior_fp)
    long = bytearray(encode_prior_coded(b"", C, K, 1, fp, prior_fp)) + bytes(payload_num_bytes(1, K) + 1)
    long[PRIOR_HEADER_NUM_BYTES - 4 : PRIOR_HEADER_NUM_BYTES] = checksum(bytes(long)).to_bytes(4, "big")
    with pytest.raises(CodecError, match="trailing bytes"):
        read_header(bytes(long), C, K)
    assert read_header(bytes(long)).codebook_size is None  # C and K come from the model


def test_guard_band_is_far_above_the_float64_path_difference(coder, sampled):
    """The encoder's whole-sequence logits and the decoder's one-step ones (batches 1 and 7) differ by far less than
    `GUARD_NATS`, the margin the design relies on."""
    from transformers import DynamicCache

    prior, ids = coder.prior, torch.from_numpy(sampled[:14])
    with torch.no_grad():
        full = prior.codebook_logits(prior.prepare_input_ids(ids)[:, :-1], torch.arange(C))
        offsets = prior.prepare_input_ids(torch.zeros(1, C, dtype=torch.long))[0, 1:]
        worst = 0.0
        for batch in (1, 7):
            for start in range(0, len(ids), batch):
                chunk, cache = ids[start : start + batch], DynamicCache(config=prior.config)
                inputs = prior.conditioning_ids(None, len(chunk), "cpu")
                for t in range(C):
                    step = prior.codebook_logits(inputs, torch.tensor([t]), cache)[:, 0]
                    worst = max(worst, float((step - full[start : start + batch, t]).abs().max()))
                    inputs = chunk[:, t : t + 1] + offsets[t]
    assert full.dtype == torch.float64 and worst < ec.GUARD_NATS / 100
