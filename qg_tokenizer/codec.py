"""Byte format for images compressed by a QG-VAE: a fixed header, then the token ids packed at log2(K) bits each.

An image is C token ids, token c an index in [0, K) into the c-th codebook. A stream keeps the first k of them
(1 <= k <= C; tokens trained with token dropout are ordered coarse-to-fine, so a prefix is a coarser image).

Layout (all integers big-endian, `HEADER_NUM_BYTES` = 20):

    | offset | bytes | field        | type     | meaning                                                  |
    |--------|-------|--------------|----------|----------------------------------------------------------|
    | 0      | 3     | magic        | b"QGT"   | identifies a QG-VAE token stream                         |
    | 3      | 1     | version      | uint8    | `FORMAT_VERSION` (= 2)                                   |
    | 4      | 2     | num_tokens   | uint16   | C, tokens per image of the model                         |
    | 6      | 4     | codebook_size| uint32   | K, codewords per codebook (2 <= K < 2**32)               |
    | 10     | 2     | prefix_length| uint16   | k, tokens stored in the payload (1 <= k <= C)            |
    | 12     | 4     | fingerprint  | 4 bytes  | `fingerprint(codebook, offset)` of the model             |
    | 16     | 4     | checksum     | uint32   | CRC-32 (zlib) of bytes 0-15 followed by the payload      |
    | 20     | P     | payload      | bytes    | P = `payload_num_bytes(k, K)` = ceil(k * log2(K) / 8)    |

Version 3 streams are entropy-coded with an autoregressive prior (`entropy_coding.py`), under a shorter header
(`PRIOR_HEADER_NUM_BYTES` = 18): magic, version (3), prefix_length (uint16, offset 4), the model's fingerprint (offset
6), the prior's 4-byte fingerprint (offset 10) and the CRC-32 (offset 14) of bytes 0-13 and the payload. C and K are
not repeated: the model's fingerprint covers its codebooks' shape, and the decoder takes them from the model. The
payload is the range coder's bytes, at most as long as the fixed-width payload; an image whose coded stream would be
no shorter than its fixed-width one, or would not decode exactly, is written as version 2 instead (the version byte is
the fallback flag).

The payload is the integer sum_i ids[i] * K**(k - 1 - i) (base K, token 0 the most significant digit) written
big-endian into exactly P = ceil(bit_length(K**k - 1) / 8) bytes, so any K costs k*log2(K) bits plus < 8 bits of
padding per image. For K a power of two this is plain bit packing, which has a vectorised path giving the same bytes.
Because token 0 is the most significant digit, a k-token prefix is not a byte prefix: use `truncate`.
The checksum makes any change of up to 32 bits in a row (any flipped bit, any changed byte) an error instead of other
tokens; version 1 (an 8-byte fingerprint and no checksum) is no longer read.

Only the standard library and numpy are imported, so this file can sit next to the hub modeling files.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FINGERPRINT_NUM_BYTES",
    "FORMAT_VERSION",
    "HEADER_NUM_BYTES",
    "MAGIC",
    "PRIOR_FORMAT_VERSION",
    "PRIOR_HEADER_NUM_BYTES",
    "CodecError",
    "StreamHeader",
    "QGTokenStream",
    "checksum",
    "decode_batch",
    "decode_tokens",
    "encode_batch",
    "encode_prior_coded",
    "encode_tokens",
    "fingerprint",
    "payload_num_bytes",
    "read_header",
    "truncate",
]

MAGIC = b"QGT"
FORMAT_VERSION = 2
_HEADER = struct.Struct(">3sBHIH4sI")  # magic, version, C, K, k, fingerprint, checksum
HEADER_NUM_BYTES = _HEADER.size  # 20
PRIOR_FORMAT_VERSION = 3
_PRIOR_HEADER = struct.Struct(">3sBH4s4sI")  # magic, version, k, fingerprint, prior fingerprint, checksum
PRIOR_HEADER_NUM_BYTES = _PRIOR_HEADER.size  # 18
FINGERPRINT_NUM_BYTES = 4
_MAX_NUM_TOKENS = 2**16 - 1
_MAX_CODEBOOK_SIZE = 2**32 - 1


class CodecError(ValueError):
    """A token stream or the arguments to encode one are invalid."""


@dataclass(frozen=True)
class QGTokenStream:
    """A decoded token stream.

    Attributes:
        token_ids: int64 `[prefix_length]`, values in [0, codebook_size); read-only.
        num_tokens: C, tokens per image of the model that made the stream.
        codebook_size: K, codewords per codebook.
        prefix_length: k, how many leading tokens the stream holds (1 <= k <= C).
        fingerprint: the 4-byte `fingerprint` of the model's codebooks.
    """

    token_ids: np.ndarray
    num_tokens: int
    codebook_size: int
    prefix_length: int
    fingerprint: bytes

    @property
    def num_kept(self) -> int:
        """Deprecated name of `prefix_length`."""
        warnings.warn("QGTokenStream.num_kept is deprecated, use prefix_length", FutureWarning, stacklevel=2)
        return self.prefix_length


def resolve_prefix_length(prefix_length: int | None, num_tokens: int | None) -> int | None:
    """`prefix_length`, or the value of its deprecated alias `num_tokens=` (with a `FutureWarning`)."""
    if num_tokens is None:
        return prefix_length
    if prefix_length is not None:
        raise TypeError("got both prefix_length and its deprecated alias num_tokens; pass prefix_length only")
    warnings.warn(
        "num_tokens= as a prefix length is deprecated and will be removed in the next release: use prefix_length= "
        "(num_tokens is the config's C, the model's token count)",
        FutureWarning,
        stacklevel=3,
    )
    return num_tokens


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise CodecError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_fingerprint(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"fingerprint must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != FINGERPRINT_NUM_BYTES:
        raise CodecError(f"fingerprint must be {FINGERPRINT_NUM_BYTES} bytes, got {len(value)}")
    return value


def fingerprint(*arrays: np.ndarray) -> bytes:
    """4 bytes identifying a model's codebooks: sha256 over each array's shape and float32 little-endian values.

    Each array contributes `ndim` (uint32 big-endian), its shape (uint64 big-endian each) and its values cast to
    `<f4` in C order. The model passes its codebook `[C, K, D]` and offset `[C, D]`.
    """
    if not arrays:
        raise TypeError("fingerprint needs at least one array, got none")
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array, dtype="<f4")
        digest.update(struct.pack(f">I{array.ndim}Q", array.ndim, *array.shape))
        digest.update(array.tobytes())
    return digest.digest()[:FINGERPRINT_NUM_BYTES]


@functools.lru_cache(maxsize=64)
def _radix_power(codebook_size: int, prefix_length: int) -> int:
    return codebook_size**prefix_length


def _bits_per_token(codebook_size: int) -> int | None:
    """log2(K) when K is a power of two (the bit-packing path applies), else None."""
    return codebook_size.bit_length() - 1 if codebook_size & (codebook_size - 1) == 0 else None


def payload_num_bytes(num_tokens: int, codebook_size: int) -> int:
    """Bytes holding `num_tokens` ids in [0, codebook_size): ceil(bit_length(K**k - 1) / 8), 0 for k = 0."""
    num_tokens = _check_int("num_tokens", num_tokens, 0, _MAX_NUM_TOKENS)
    codebook_size = _check_int("codebook_size", codebook_size, 2, _MAX_CODEBOOK_SIZE)
    bits = _bits_per_token(codebook_size)
    num_bits = num_tokens * bits if bits is not None else (_radix_power(codebook_size, num_tokens) - 1).bit_length()
    return (num_bits + 7) // 8


# below this many quotient bits the built-in (schoolbook) divmod is used, as by CPython's own `_pylong` (3.12+)
_DIVMOD_CUTOFF_BITS = 4000


def _divmod_2n_by_n(a: int, b: int, n: int) -> tuple[int, int]:
    """`divmod(a, b)` for `b` of exactly `n` bits and `0 <= a < 2**n * b`, by Burnikel-Ziegler recursive division
    (two half-size divisions and multiplications), sub-quadratic where CPython's own `divmod` is quadratic."""
    if a.bit_length() - n <= _DIVMOD_CUTOFF_BITS:
        return divmod(a, b)
    pad = n & 1
    if pad:
        a, b, n = a << 1, b << 1, n + 1
    half = n >> 1
    mask = (1 << half) - 1
    b1, b2 = b >> half, b & mask
    q1, r = _divmod_3h_by_2h(a >> n, (a >> half) & mask, b, b1, b2, half)
    q2, r = _divmod_3h_by_2h(r, a & mask, b, b1, b2, half)
    return q1 << half | q2, r >> pad


def _divmod_3h_by_2h(a12: int, a3: int, b: int, b1: int, b2: int, half: int) -> tuple[int, int]:
    """One step of `_divmod_2n_by_n`: `divmod(a12 * 2**half + a3, b)`, `b = b1 * 2**half + b2`, `a12 < 2**half * b`."""
    if a12 >> half == b1:
        q, r = (1 << half) - 1, a12 - (b1 << half) + b1
    else:
        q, r = _divmod_2n_by_n(a12, b1, half)
    r = (r << half | a3) - q * b2
    while r < 0:  # q overestimates by at most 2
        q -= 1
        r += b
    return q, r


@functools.lru_cache(maxsize=64)
def _digits_per_chunk(codebook_size: int) -> int:
    """g: the most base-K digits that a uint64 holds (K**g <= 2**64), the digits per leaf of the radix conversion."""
    digits = 1
    while codebook_size ** (digits + 1) <= 2**64:
        digits += 1
    return digits


@functools.lru_cache(maxsize=256)
def _chunk_power(codebook_size: int, level: int) -> int:
    """K**(g * 2**level): the radix that splits `2**level` leaf chunks off the low end of an integer."""
    if level == 0:
        return codebook_size ** _digits_per_chunk(codebook_size)
    return _chunk_power(codebook_size, level - 1) ** 2


def _split_level(num_chunks: int) -> int:
    """The level of the split of `num_chunks` >= 2 chunks: the low part is the largest power of two below it."""
    return (num_chunks - 1).bit_length() - 1


def _pack_radix(token_ids: np.ndarray, codebook_size: int, num_bytes: int) -> bytes:
    """General path: the base-K integer, token 0 the most significant digit.

    Horner's rule on one Python integer is quadratic in k (k multiply-adds on an integer of up to k log2(K) bits).
    Instead the ids are grouped into uint64 chunks of g digits (Horner's rule vectorised over the chunks), and the
    chunks are joined pairwise, `high * K**(g * 2**j) + low`, so the big-integer work is a tree of (Karatsuba)
    multiplications by cached powers.
    """
    per_chunk = _digits_per_chunk(codebook_size)
    num_chunks = -(-token_ids.size // per_chunk)
    digits = np.zeros(num_chunks * per_chunk, dtype=np.uint64)  # leading zero digits pad the first chunk
    digits[digits.size - token_ids.size :] = token_ids
    chunks = np.zeros(num_chunks, dtype=np.uint64)
    for column in digits.reshape(num_chunks, per_chunk).T:
        chunks = chunks * np.uint64(codebook_size) + column  # < K**g <= 2**64: no wrap-around
    leaves = chunks.tolist()

    def join(start: int, count: int) -> int:
        if count == 1:
            return leaves[start]
        level = _split_level(count)
        low = 1 << level
        return join(start, count - low) * _chunk_power(codebook_size, level) + join(start + count - low, low)

    return join(0, num_chunks).to_bytes(num_bytes, "big")


def _unpack_radix(payload: bytes, codebook_size: int, prefix_length: int) -> np.ndarray:
    """Inverse of `_pack_radix`: the integer is split top-down, `divmod(value, K**(g * 2**j))`, into uint64 chunks
    of g digits (the divisions sub-quadratic, see `_divmod_2n_by_n`), whose digits are taken apart vectorised."""
    value = int.from_bytes(payload, "big")
    if value >= _radix_power(codebook_size, prefix_length):
        _raise_corrupt(value // _radix_power(codebook_size, prefix_length - 1), codebook_size)
    per_chunk = _digits_per_chunk(codebook_size)
    num_chunks = -(-prefix_length // per_chunk)
    leaves = [0] * num_chunks

    def split(value: int, start: int, count: int) -> None:
        # value < K**(g * count) <= power**2, as `_divmod_2n_by_n` needs
        if count == 1:
            leaves[start] = value
            return
        level = _split_level(count)
        low = 1 << level
        power = _chunk_power(codebook_size, level)
        high, value = _divmod_2n_by_n(value, power, power.bit_length())
        split(high, start, count - low)
        split(value, start + count - low, low)

    split(value, 0, num_chunks)
    chunks = np.array(leaves, dtype=np.uint64)
    digits = np.empty((per_chunk, num_chunks), dtype=np.uint64)
    for position in range(per_chunk - 1, -1, -1):
        chunks, digits[position] = np.divmod(chunks, np.uint64(codebook_size))
    return digits.T.ravel()[digits.size - prefix_length :].astype(np.int64)


def _pack_bits(token_ids: np.ndarray, bits: int, num_bytes: int) -> bytes:
    """Power-of-two K: the same bytes as `_pack_radix`, each id as `bits` bits MSB-first, zero bits in front."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    id_bits = ((token_ids[:, None] >> shifts) & 1).astype(np.uint8).ravel()  # (k * bits,)
    padded = np.zeros(num_bytes * 8, dtype=np.uint8)
    padded[padded.size - id_bits.size :] = id_bits
    return np.packbits(padded).tobytes()


def _unpack_bits(payload: bytes, bits: int, prefix_length: int) -> np.ndarray:
    all_bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    pad = all_bits.size - prefix_length * bits
    if all_bits[:pad].any():  # the integer is >= K**k: token 0 would need more than `bits` bits
        _raise_corrupt(int("".join(map(str, all_bits[: pad + bits].tolist())), 2), 2**bits)
    weights = np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return all_bits[pad:].reshape(prefix_length, bits).astype(np.int64) @ weights


def _raise_corrupt(first_digit: int, codebook_size: int) -> None:
    raise CodecError(
        f"corrupt payload: token 0 decodes to {first_digit}, which is not below codebook_size {codebook_size}"
    )


def _pack(token_ids: np.ndarray, codebook_size: int) -> bytes:
    num_bytes = payload_num_bytes(token_ids.size, codebook_size)
    bits = _bits_per_token(codebook_size)
    if bits is None:
        return _pack_radix(token_ids, codebook_size, num_bytes)
    return _pack_bits(token_ids, bits, num_bytes)


def _unpack(payload: bytes, codebook_size: int, prefix_length: int) -> np.ndarray:
    bits = _bits_per_token(codebook_size)
    if bits is None:
        return _unpack_radix(payload, codebook_size, prefix_length)
    return _unpack_bits(payload, bits, prefix_length)


def _header_num_bytes(data: bytes) -> int:
    return PRIOR_HEADER_NUM_BYTES if data[3] == PRIOR_FORMAT_VERSION else HEADER_NUM_BYTES


def checksum(data: bytes) -> int:
    """The CRC-32 a stream stores in its header's last 4 bytes: of the header bytes before it followed by the payload
    (bytes 0-15 and 20 on for version 2, 0-13 and 18 on for version 3)."""
    end = _header_num_bytes(data)
    return zlib.crc32(data[end:], zlib.crc32(data[: end - 4]))


def _sealed(data: bytes) -> bytes:
    """`data` (header with a zero checksum, then the payload) with its checksum filled in."""
    end = _header_num_bytes(data)
    return data[: end - 4] + checksum(data).to_bytes(4, "big") + data[end:]


def _write(token_ids: np.ndarray, num_tokens: int, codebook_size: int, fingerprint: bytes) -> bytes:
    data = _HEADER.pack(MAGIC, FORMAT_VERSION, num_tokens, codebook_size, token_ids.size, fingerprint, 0)
    return _sealed(data + _pack(token_ids, codebook_size))


def encode_prior_coded(
    payload: bytes,
    num_tokens: int,
    codebook_size: int,
    prefix_length: int,
    fingerprint: bytes,
    prior_fingerprint: bytes,
) -> bytes:
    """A version-3 stream around the range coder's `payload` of the first `prefix_length` of `num_tokens` tokens
    (at most `payload_num_bytes(prefix_length, codebook_size)` bytes: else write the fixed width)."""
    num_tokens = _check_int("num_tokens", num_tokens, 1, _MAX_NUM_TOKENS)
    codebook_size = _check_int("codebook_size", codebook_size, 2, _MAX_CODEBOOK_SIZE)
    prefix_length = _check_int("prefix_length", prefix_length, 1, num_tokens)
    limit = payload_num_bytes(prefix_length, codebook_size)
    if len(payload) > limit:
        raise CodecError(f"a prior-coded payload of {len(payload)} bytes is longer than the fixed width, {limit}")
    fingerprints = _check_fingerprint(fingerprint), _check_fingerprint(prior_fingerprint)
    header = _PRIOR_HEADER.pack(MAGIC, PRIOR_FORMAT_VERSION, prefix_length, *fingerprints, 0)
    return _sealed(header + bytes(payload))


def encode_tokens(
    token_ids: Sequence[int] | np.ndarray,
    codebook_size: int,
    fingerprint: bytes,
    prefix_length: int | None = None,
    *,
    num_tokens: int | None = None,
) -> bytes:
    """Serialise one image's tokens.

    Args:
        token_ids: integer `[C]`, values in [0, codebook_size).
        codebook_size: K, 2 <= K < 2**32.
        fingerprint: 4 bytes from `fingerprint(codebook, offset)`.
        prefix_length: k, keep only the first k tokens (1 <= k <= C); default all C. `num_tokens` is its
            deprecated alias.

    Returns:
        `HEADER_NUM_BYTES + payload_num_bytes(k, K)` bytes.
    """
    codebook_size = _check_int("codebook_size", codebook_size, 2, _MAX_CODEBOOK_SIZE)
    fingerprint = _check_fingerprint(fingerprint)
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1:
        raise CodecError(f"token_ids must be 1-D [num_tokens], got shape {tuple(token_ids.shape)}")
    total = _check_int("len(token_ids)", token_ids.size, 1, _MAX_NUM_TOKENS)
    if token_ids.dtype.kind not in "iu":
        raise TypeError(f"token_ids must have an integer dtype, got {token_ids.dtype}")
    bad = np.flatnonzero((token_ids < 0) | (token_ids >= codebook_size))
    if bad.size:
        position = int(bad[0])
        raise CodecError(f"token_ids must be in [0, {codebook_size}), got {token_ids[position]} at position {position}")
    prefix_length = resolve_prefix_length(prefix_length, num_tokens)
    kept = total if prefix_length is None else _check_int("prefix_length", prefix_length, 1, total)
    return _write(token_ids[:kept].astype(np.int64), total, codebook_size, fingerprint)


@dataclass(frozen=True)
class StreamHeader:
    """A stream whose header, length, checksum and model are checked; its payload is not decoded yet.

    Attributes:
        payload: the bytes after the header.
        num_tokens: C; codebook_size: K (None for a version-3 stream read without the model's C and K).
        prefix_length: k, tokens the payload holds; fingerprint: the model's.
        prior_fingerprint: the 4-byte `entropy_coding.prior_fingerprint` of the prior that coded the payload
            (version 3), or None for a fixed-width payload (version 2).
    """

    payload: bytes
    num_tokens: int | None
    codebook_size: int | None
    prefix_length: int
    fingerprint: bytes
    prior_fingerprint: bytes | None

    def decode(self) -> QGTokenStream:
        """The token ids of a fixed-width stream; a `CodecError` for an entropy-coded one (it needs its prior)."""
        if self.prior_fingerprint is not None:
            raise CodecError(
                f"the stream is entropy-coded with a prior (fingerprint {self.prior_fingerprint.hex()}): decode it "
                "with that prior, model.decompress(streams, prior=prior)"
            )
        token_ids = _unpack(self.payload, self.codebook_size, self.prefix_length)
        token_ids.setflags(write=False)
        return QGTokenStream(token_ids, self.num_tokens, self.codebook_size, self.prefix_length, self.fingerprint)


def read_header(
    data: bytes, num_tokens: int | None = None, codebook_size: int | None = None, fingerprint: bytes | None = None
) -> StreamHeader:
    """Everything `decode_tokens` checks before it decodes the payload, in linear time: header fields, payload
    length, checksum, then the expected model (the keyword arguments, when given; a version-3 stream's C and K are
    those given, and its length bound is checked only when they are)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 4:
        raise CodecError(f"data is too short to hold a header: {len(data)} bytes")
    if data[:3] != MAGIC:
        raise CodecError(f"not a QG-VAE token stream: magic is {data[:3]!r}, expected {MAGIC!r}")
    version = data[3]
    if version not in (FORMAT_VERSION, PRIOR_FORMAT_VERSION):
        raise CodecError(
            f"unsupported format version {version}, this codec reads versions {FORMAT_VERSION} (fixed width) and "
            f"{PRIOR_FORMAT_VERSION} (entropy-coded)"
        )
    header_bytes = _header_num_bytes(data)
    if len(data) < header_bytes:
        raise CodecError(f"data is too short to hold a header: {len(data)} bytes < {header_bytes}")
    if version == PRIOR_FORMAT_VERSION:
        _, _, kept, stream_fingerprint, prior, stored_checksum = _PRIOR_HEADER.unpack_from(data)
        total, size = num_tokens, codebook_size
    else:
        _, _, total, size, kept, stream_fingerprint, stored_checksum = _HEADER.unpack_from(data)
        prior = None
        if size < 2:
            raise CodecError(f"invalid header: codebook_size is {size}, must be at least 2")
    if kept == 0 or (total is not None and kept > total):
        raise CodecError(f"invalid header: prefix_length is {kept}, must be in [1, num_tokens={total}]")
    payload = data[header_bytes:]
    expected_bytes = None if size is None else payload_num_bytes(kept, size)
    if prior is None and len(payload) < expected_bytes:
        raise CodecError(f"truncated payload: {len(payload)} bytes, the header implies {expected_bytes}")
    if expected_bytes is not None and len(payload) > expected_bytes:
        what = "the header implies" if prior is None else "an entropy-coded payload is at most"
        raise CodecError(f"trailing bytes: payload is {len(payload)} bytes, {what} {expected_bytes}")
    computed = checksum(data)
    if computed != stored_checksum:
        raise CodecError(
            f"corrupt stream: checksum {computed:08x} does not match the stored {stored_checksum:08x} (the bytes "
            "changed after encoding, or were cut short)"
        )
    for name, found, expected in (
        ("num_tokens", total, num_tokens),
        ("codebook_size", size, codebook_size),
        ("fingerprint", stream_fingerprint, fingerprint),
    ):
        if expected is not None and found != expected:
            found, expected = (bytes(v).hex() if name == "fingerprint" else v for v in (found, expected))
            raise CodecError(
                f"the stream was made for another model: {name} is {found} in the stream, expected {expected}"
            )
    return StreamHeader(payload, total, size, kept, stream_fingerprint, prior)


def decode_tokens(
    data: bytes,
    *,
    codebook_size: int | None = None,
    num_tokens: int | None = None,
    fingerprint: bytes | None = None,
) -> QGTokenStream:
    """Parse a stream from `encode_tokens`; the keyword arguments, when given, must match the stream's model.

    The header, the payload length, the checksum and then the expected model are checked before the payload is
    decoded, so a stream of another model is rejected without decoding it. The checks take linear time in the
    stream's length and decoding sub-quadratic time (for a K that is not a power of two).

    Raises:
        CodecError: the bytes are not a valid stream (wrong length, a header field out of range, a checksum that does
            not match: the bytes changed after encoding), or it was made for a model with another C, K or fingerprint,
            or it is entropy-coded (version 3: decode it with its prior, `QGVAEModel.decompress(streams, prior=...)`).
    """
    return read_header(data, num_tokens, codebook_size, fingerprint).decode()


def truncate(data: bytes, prefix_length: int | None = None, *, num_tokens: int | None = None) -> bytes:
    """Re-encode a stream keeping only its first `prefix_length` tokens (1 <= k <= the stream's prefix_length;
    `num_tokens` is its deprecated alias)."""
    stream = decode_tokens(data)
    prefix_length = resolve_prefix_length(prefix_length, num_tokens)
    kept = _check_int("prefix_length", prefix_length, 1, stream.prefix_length)
    return _write(stream.token_ids[:kept], stream.num_tokens, stream.codebook_size, stream.fingerprint)


def encode_batch(
    token_ids: Sequence[Sequence[int]] | np.ndarray,
    codebook_size: int,
    fingerprint: bytes,
    prefix_length: int | None = None,
    *,
    num_tokens: int | None = None,
) -> list[bytes]:
    """`encode_tokens` on each row of an integer `[B, C]` array; one stream per image."""
    prefix_length = resolve_prefix_length(prefix_length, num_tokens)
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2:
        raise CodecError(f"token_ids must be 2-D [batch, num_tokens], got shape {tuple(token_ids.shape)}")
    return [encode_tokens(row, codebook_size, fingerprint, prefix_length) for row in token_ids]


def decode_batch(
    data: Iterable[bytes],
    *,
    codebook_size: int | None = None,
    num_tokens: int | None = None,
    fingerprint: bytes | None = None,
) -> list[QGTokenStream]:
    """`decode_tokens` on each stream, checking each against the same expected model.

    Every stream is checked (header, length, checksum, expected model) before any payload is decoded: one bad or
    foreign stream anywhere in the batch raises before the work of decoding the others is spent.
    """
    checked = [read_header(stream, num_tokens, codebook_size, fingerprint) for stream in data]
    return [stream.decode() for stream in checked]
