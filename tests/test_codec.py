"""Tests of the QG-VAE token stream format (qg_tokenizer/codec.py)."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest

from qg_tokenizer import codec
from qg_tokenizer.codec import (
    FINGERPRINT_NUM_BYTES,
    FORMAT_VERSION,
    HEADER_NUM_BYTES,
    MAGIC,
    CodecError,
    checksum,
    decode_batch,
    decode_tokens,
    encode_batch,
    encode_tokens,
    fingerprint,
    payload_num_bytes,
    truncate,
)

FP = bytes(range(4))
CODEBOOK_SIZES = [2, 256, 300, 512, 1000, 4096]
NUM_TOKENS = [1, 16, 64, 256]


def random_ids(num_tokens: int, codebook_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, codebook_size, num_tokens)


def stream(num_tokens: int = 16, codebook_size: int = 300, seed: int = 0, **kwargs) -> bytes:
    return encode_tokens(random_ids(num_tokens, codebook_size, seed), codebook_size, FP, **kwargs)


def crafted(
    payload: bytes, magic=MAGIC, version=FORMAT_VERSION, num_tokens=4, codebook_size=300, prefix_length=4
) -> bytes:
    """A stream with these header fields and payload, and the checksum they imply (zlib CRC-32, computed here)."""
    fields = struct.pack(">3sBHIH4s", magic, version, num_tokens, codebook_size, prefix_length, FP)
    return fields + struct.pack(">I", zlib.crc32(fields + payload)) + payload


@pytest.mark.parametrize("codebook_size", CODEBOOK_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_round_trip_is_exact(num_tokens, codebook_size):
    ids = random_ids(num_tokens, codebook_size, seed=num_tokens * codebook_size)
    data = encode_tokens(ids, codebook_size, FP)
    decoded = decode_tokens(data, codebook_size=codebook_size, num_tokens=num_tokens, fingerprint=FP)
    assert decoded.token_ids.dtype == np.int64
    np.testing.assert_array_equal(decoded.token_ids, ids)
    assert (decoded.num_tokens, decoded.codebook_size, decoded.prefix_length, decoded.fingerprint) == (
        num_tokens,
        codebook_size,
        num_tokens,
        FP,
    )
    assert len(data) == HEADER_NUM_BYTES + payload_num_bytes(num_tokens, codebook_size)


@pytest.mark.parametrize("codebook_size", CODEBOOK_SIZES)
def test_extreme_ids_round_trip(codebook_size):
    for ids in (np.zeros(64, np.int64), np.full(64, codebook_size - 1)):
        np.testing.assert_array_equal(decode_tokens(encode_tokens(ids, codebook_size, FP)).token_ids, ids)


@pytest.mark.parametrize("codebook_size", CODEBOOK_SIZES + [3, 2**31, 2**32 - 1])
@pytest.mark.parametrize("num_tokens", [0] + NUM_TOKENS + [1000])
def test_payload_num_bytes_is_ceil_of_information_content(num_tokens, codebook_size):
    exact = ((codebook_size**num_tokens - 1).bit_length() + 7) // 8
    assert payload_num_bytes(num_tokens, codebook_size) == exact
    bits = num_tokens * math.log2(codebook_size)
    if abs(bits / 8 - round(bits / 8)) > 1e-6:  # float ceil is unambiguous away from byte boundaries
        assert exact == math.ceil(bits / 8)


def test_payload_num_bytes_known_values():
    assert payload_num_bytes(256, 512) == 288  # 2304 bits
    assert payload_num_bytes(64, 300) == 66  # 64 * 8.2288 = 526.6 bits
    assert payload_num_bytes(3, 300) == 4  # 24.7 bits: 3 bytes would not do, 300**3 > 2**24
    assert payload_num_bytes(0, 300) == 0


def test_header_layout_matches_documented_table():
    ids = random_ids(16, 300)
    data = encode_tokens(ids, 300, FP, prefix_length=10)
    assert HEADER_NUM_BYTES == 20
    assert data[0:3] == b"QGT"
    assert data[3] == 2
    assert int.from_bytes(data[4:6], "big") == 16
    assert int.from_bytes(data[6:10], "big") == 300
    assert int.from_bytes(data[10:12], "big") == 10
    assert data[12:16] == FP
    assert int.from_bytes(data[16:20], "big") == zlib.crc32(data[:16] + data[20:]) == checksum(data)
    assert len(data) - HEADER_NUM_BYTES == payload_num_bytes(10, 300)
    assert "| 20     | P     | payload" in codec.__doc__


@pytest.mark.parametrize("codebook_size", [300, 512])
def test_payload_is_base_k_integer_with_token_zero_most_significant(codebook_size):
    ids = [5, 0, 7]
    payload = encode_tokens(ids, codebook_size, FP)[HEADER_NUM_BYTES:]
    assert int.from_bytes(payload, "big") == 5 * codebook_size**2 + 7


@pytest.mark.parametrize("codebook_size", [2, 256, 512, 4096, 2**31])
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 257])
def test_fast_and_general_paths_agree(num_tokens, codebook_size):
    ids = random_ids(num_tokens, codebook_size, seed=num_tokens)
    bits = codebook_size.bit_length() - 1
    num_bytes = payload_num_bytes(num_tokens, codebook_size)
    general = codec._pack_radix(ids, codebook_size, num_bytes)
    assert codec._pack_bits(ids, bits, num_bytes) == general
    np.testing.assert_array_equal(codec._unpack_bits(general, bits, num_tokens), ids)
    np.testing.assert_array_equal(codec._unpack_radix(general, codebook_size, num_tokens), ids)


def horner_bytes(ids: np.ndarray, codebook_size: int) -> bytes:
    """The format's definition, computed the slow (quadratic) way: Horner's rule on one Python integer."""
    value = 0
    for digit in ids.tolist():
        value = value * codebook_size + digit
    return value.to_bytes(payload_num_bytes(ids.size, codebook_size), "big")


@pytest.mark.parametrize("codebook_size", [3, 7, 300, 1000, 65537, 2**32 - 1])
@pytest.mark.parametrize("num_tokens", [39, 40, 41, 1023, 1025, 3001])
def test_radix_path_matches_the_definition(num_tokens, codebook_size):
    # sizes around the uint64 chunk of g digits (g = 40 for K = 3) and around powers of two chunks; 3001 tokens of
    # K >= 300 make integers of over 8000 bits, where the divisions take the recursive (Burnikel-Ziegler) path
    rng = np.random.default_rng(num_tokens)
    for ids in (rng.integers(0, codebook_size, num_tokens), np.full(num_tokens, codebook_size - 1)):
        reference = horner_bytes(ids, codebook_size)
        assert codec._pack_radix(ids, codebook_size, len(reference)) == reference
        np.testing.assert_array_equal(codec._unpack_radix(reference, codebook_size, num_tokens), ids)


def test_divmod_2n_by_n_matches_divmod():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 63, 4000, 4001, 9001, 30000):
        for _ in range(20):
            divisor = int.from_bytes(rng.bytes(bits // 8 + 1), "big") % (1 << bits) | (1 << (bits - 1))  # n bits
            limit = (1 << bits) * divisor  # the function's domain: 0 <= a < 2**n * b
            for dividend in (0, limit - 1, int.from_bytes(rng.bytes(2 * bits // 8 + 2), "big") % limit):
                assert codec._divmod_2n_by_n(dividend, divisor, bits) == divmod(dividend, divisor)


@pytest.mark.parametrize(("codebook_size", "payload_bytes"), [(3, 12984), (300, 67410)])
def test_the_largest_streams_round_trip(codebook_size, payload_bytes):
    # C = 65535 tokens: quadratic base-K conversion took seconds here (and 37 s at K = 2**32 - 1)
    ids = random_ids(65535, codebook_size)
    data = encode_tokens(ids, codebook_size, FP)
    assert len(data) == HEADER_NUM_BYTES + payload_bytes == HEADER_NUM_BYTES + payload_num_bytes(65535, codebook_size)
    decoded = decode_tokens(data, codebook_size=codebook_size, num_tokens=65535, fingerprint=FP)
    np.testing.assert_array_equal(decoded.token_ids, ids)
    np.testing.assert_array_equal(decode_tokens(truncate(data, 4000)).token_ids, ids[:4000])
    assert truncate(data, 4000)[HEADER_NUM_BYTES:] == horner_bytes(ids[:4000], codebook_size)


def test_fast_and_general_paths_reject_the_same_corruption():
    payload = b"\xff" * payload_num_bytes(3, 8)  # 9 bits of ids in 2 bytes: 7 padding bits set
    with pytest.raises(CodecError, match="corrupt") as fast:
        codec._unpack_bits(payload, 3, 3)
    with pytest.raises(CodecError, match="corrupt") as general:
        codec._unpack_radix(payload, 8, 3)
    assert str(fast.value) == str(general.value)
    assert "decodes to 1023" in str(fast.value)  # 0b11_1111_1111: 7 padding bits + token 0's 3 bits


@pytest.mark.parametrize("codebook_size", [300, 512])
def test_prefix_length_keeps_a_prefix(codebook_size):
    ids = random_ids(32, codebook_size)
    decoded = decode_tokens(encode_tokens(ids, codebook_size, FP, prefix_length=5))
    np.testing.assert_array_equal(decoded.token_ids, ids[:5])
    assert (decoded.num_tokens, decoded.prefix_length) == (32, 5)


@pytest.mark.parametrize("codebook_size", [2, 300, 512, 1000])
def test_truncate_decodes_to_the_first_k_ids(codebook_size):
    ids = random_ids(64, codebook_size)
    data = encode_tokens(ids, codebook_size, FP)
    for k in (1, 7, 33, 64):
        short = truncate(data, k)
        assert short == encode_tokens(ids, codebook_size, FP, prefix_length=k)
        decoded = decode_tokens(short, codebook_size=codebook_size, num_tokens=64, fingerprint=FP)
        np.testing.assert_array_equal(decoded.token_ids, ids[:k])
        assert decoded.prefix_length == k
    np.testing.assert_array_equal(decode_tokens(truncate(truncate(data, 33), 7)).token_ids, ids[:7])
    with pytest.raises(CodecError, match="prefix_length"):
        truncate(truncate(data, 7), 8)


def test_batch_helpers_round_trip_and_check_the_model():
    ids = np.random.default_rng(1).integers(0, 300, (5, 16))
    streams = encode_batch(ids, 300, FP, prefix_length=12)
    assert streams == [encode_tokens(row, 300, FP, prefix_length=12) for row in ids]
    decoded = decode_batch(streams, codebook_size=300, num_tokens=16, fingerprint=FP)
    np.testing.assert_array_equal(np.stack([d.token_ids for d in decoded]), ids[:, :12])
    with pytest.raises(CodecError, match="another model"):
        decode_batch(streams, codebook_size=512)
    with pytest.raises(CodecError, match="2-D"):
        encode_batch(ids[0], 300, FP)


def test_decoded_ids_are_read_only():
    decoded = decode_tokens(stream())
    with pytest.raises(ValueError):
        decoded.token_ids[0] = 1


@pytest.mark.parametrize("codebook_size", [300, 512])
def test_every_flipped_bit_is_an_error(codebook_size):
    data = stream(codebook_size=codebook_size)
    for position in range(len(data)):
        for bit in range(8):
            corrupt = bytearray(data)
            corrupt[position] ^= 1 << bit
            with pytest.raises(CodecError):
                decode_tokens(bytes(corrupt))
    # a payload flip that keeps every id in range (K = 512: any bits are ids) is caught by the checksum alone
    corrupt = bytearray(data)
    corrupt[-1] ^= 1
    with pytest.raises(CodecError, match=r"corrupt stream: checksum [0-9a-f]{8} does not match the stored"):
        decode_tokens(bytes(corrupt))


# --- encode-side validation ---------------------------------------------------------------------------------------


def test_encode_names_first_out_of_range_id():
    with pytest.raises(CodecError, match=r"got 300 at position 2"):
        encode_tokens([1, 2, 300, 400], 300, FP)
    with pytest.raises(CodecError, match=r"got -1 at position 1"):
        encode_tokens([0, -1, 5], 300, FP)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"token_ids": [[1, 2]]}, CodecError, "1-D"),
        ({"token_ids": [1.0, 2.0]}, TypeError, "integer dtype"),
        ({"token_ids": []}, CodecError, "len"),
        ({"prefix_length": 0}, CodecError, "prefix_length"),
        ({"prefix_length": 4}, CodecError, "prefix_length"),
        ({"fingerprint": b"short"}, CodecError, "fingerprint"),
        ({"fingerprint": "01234567"}, TypeError, "fingerprint"),
        ({"codebook_size": 1}, CodecError, "codebook_size"),
        ({"codebook_size": 2**32}, CodecError, "codebook_size"),
        ({"codebook_size": 300.0}, TypeError, "codebook_size"),
    ],
)
def test_encode_rejects_invalid_arguments(kwargs, error, match):
    args = {"token_ids": [1, 2, 3], "codebook_size": 300, "fingerprint": FP} | kwargs
    with pytest.raises(error, match=match):
        encode_tokens(**args)


def test_encode_rejects_too_many_tokens():
    with pytest.raises(CodecError, match="len"):
        encode_tokens(np.zeros(2**16, np.int64), 2, FP)


# --- decode-side validation ---------------------------------------------------------------------------------------


def test_decode_rejects_short_data():
    with pytest.raises(CodecError, match="too short"):
        decode_tokens(stream()[: HEADER_NUM_BYTES - 1])


def test_decode_rejects_wrong_magic():
    with pytest.raises(CodecError, match="not a QG-VAE token stream"):
        decode_tokens(b"PNG" + stream()[3:])


def test_decode_rejects_unknown_version():
    with pytest.raises(CodecError, match="unsupported format version 1, this codec reads versions 2 .* and 3"):
        decode_tokens(crafted(b"\x00" * payload_num_bytes(4, 300), version=1))


def test_decode_rejects_truncated_payload():
    with pytest.raises(CodecError, match="truncated payload"):
        decode_tokens(stream()[:-1])


def test_decode_rejects_trailing_bytes():
    with pytest.raises(CodecError, match="trailing bytes"):
        decode_tokens(stream() + b"\x00")


@pytest.mark.parametrize(("num_tokens", "prefix_length"), [(4, 5), (4, 0)])
def test_decode_rejects_bad_num_kept(num_tokens, prefix_length):
    data = crafted(b"\x00" * payload_num_bytes(prefix_length, 300), num_tokens=num_tokens, prefix_length=prefix_length)
    with pytest.raises(CodecError, match="prefix_length is"):
        decode_tokens(data)


def test_decode_rejects_digit_out_of_range():
    data = crafted(b"\xff\xff", num_tokens=1, prefix_length=1)  # 65535 >= 300, with a valid checksum
    with pytest.raises(CodecError, match="corrupt payload: token 0 decodes to 65535"):
        decode_tokens(data)


@pytest.mark.parametrize(
    ("expected", "match"),
    [
        ({"num_tokens": 32}, "num_tokens is 16 in the stream, expected 32"),
        ({"codebook_size": 512}, "codebook_size is 300 in the stream, expected 512"),
        ({"fingerprint": b"\xff" * 4}, "fingerprint is 00010203 in the stream, expected ffffffff"),
    ],
)
def test_decode_rejects_stream_of_another_model(expected, match):
    with pytest.raises(CodecError, match="another model: " + match):
        decode_tokens(stream(), **expected)


def test_another_model_is_rejected_before_the_payload_is_decoded(monkeypatch):
    def unpack(*args):
        raise AssertionError("the payload was decoded")

    good, foreign = stream(), stream(codebook_size=512)
    monkeypatch.setattr(codec, "_unpack", unpack)
    with pytest.raises(CodecError, match="another model: codebook_size is 512 in the stream, expected 300"):
        decode_tokens(foreign, codebook_size=300)
    # a batch checks every stream before it decodes any: the valid first stream is not decoded either
    with pytest.raises(CodecError, match="another model: codebook_size is 512 in the stream, expected 300"):
        decode_batch([good, foreign], codebook_size=300)
    with pytest.raises(CodecError, match="trailing bytes"):
        decode_batch([good, good + b"\x00"])


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)


# --- fingerprint --------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((4, 8, 3)).astype(np.float32)
    offset = rng.standard_normal((4, 3)).astype(np.float32)
    reference = fingerprint(codebook, offset)
    assert isinstance(reference, bytes) and len(reference) == FINGERPRINT_NUM_BYTES == 4
    assert fingerprint(codebook.copy(), offset.copy()) == reference
    assert fingerprint(codebook.astype(np.float64), offset) == reference  # values, not dtype, identify the model
    for array_index, array in enumerate((codebook, offset)):
        for flat_index in range(array.size):
            changed = [codebook.copy(), offset.copy()]
            changed[array_index].flat[flat_index] += 1e-3
            assert fingerprint(*changed) != reference
    assert fingerprint(codebook.reshape(4, 3, 8), offset) != reference  # same values, another shape
    assert fingerprint(offset, codebook) != reference
