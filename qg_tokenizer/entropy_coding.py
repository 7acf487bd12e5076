"""Entropy coding of token ids with the autoregressive prior: a range coder (`constriction`) driven by the prior's
next-token distributions, each restricted to its position's codebook and quantised to integer frequencies.

Decoding must reproduce the ids exactly, so encoder and decoder must derive the very same frequencies, though the
decoder recomputes the prior one token at a time (KV cache) in whatever batch it is given and the encoder runs it on
whole sequences; floating-point results differ with batch size, thread count and kernel choice in their last bits.
The design:

1. The prior runs in float64 (a CPU copy made by `PriorCoder`), where those differences are around 1e-14 nats.
2. Each logit is rounded to a grid of `LOGIT_STEP` = 1/64 nat; codeword j's frequency is an integer table entry of its
   rounded gap below the position's largest logit, `round(2**40 * exp(-gap))` and at least 1 (so every id stays
   codable), the table computed once in exact decimal arithmetic. Integers up to 2**49 in float64 are exact, and
   `constriction` rescales them to its fixed-point probabilities deterministically.
3. Only a logit within `GUARD_NATS` of a rounding boundary could round differently elsewhere: the encoder writes an
   image with such a logit in the fixed-width format instead, and it decodes every stream it makes, with the decoder's
   own code, before returning it; a stream that would not decode exactly is written at fixed width too.

The payload is the range coder's words (big-endian), cut to the shortest byte string that still decodes: the decoder
pads it with zero bytes.
"""

from __future__ import annotations

import copy
import decimal
import functools
import json
from collections.abc import Sequence

import numpy as np
import torch

from .codec import (
    HEADER_NUM_BYTES,
    PRIOR_HEADER_NUM_BYTES,
    CodecError,
    StreamHeader,
    encode_prior_coded,
    encode_tokens,
    fingerprint,
    payload_num_bytes,
)

LOGIT_STEP = 1 / 64  # nats: logits are rounded to this grid before they become frequencies
MAX_GAP_STEPS = 40 * 64  # gaps of 40 nats and more below the largest logit all get the smallest frequency, 1
WEIGHT_BITS = 40
# a logit this close to a rounding boundary makes its image fall back to the fixed width: 1,000 times the largest
# float64 difference measured between the encoder's and the decoder's logits (batches 64, 7 and 1: about 1e-14)
GUARD_NATS = 1e-11
ENCODE_BATCH_SIZE = 64  # images per prior forward when the encoder computes the frequencies


def _constriction():
    try:
        import constriction
    except ImportError as error:  # a declared dependency; hub copies of this file may run without it
        raise ImportError("entropy coding with a prior needs `constriction`: pip install constriction") from error
    return constriction


@functools.cache
def _frequency_table() -> np.ndarray:
    """`[MAX_GAP_STEPS + 1]` float64 integers: round(2**40 * exp(-d * LOGIT_STEP)), at least 1 (exact decimals, the
    same on every platform)."""
    context = decimal.Context(prec=40)
    scale, step = decimal.Decimal(2**WEIGHT_BITS), decimal.Decimal(1) / 64
    table = [
        int((context.exp(-d * step) * scale).to_integral_value(decimal.ROUND_HALF_EVEN))
        for d in range(MAX_GAP_STEPS + 1)
    ]
    return np.maximum(np.array(table, dtype=np.float64), 1.0)


def frequencies(logits: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[..., K]` float64 logits -> (`[..., K]` integer frequencies as float64, `[...]` bool: a logit that matters lies
    within `GUARD_NATS` of a rounding boundary, so another computation of the prior might round it differently)."""
    logits = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    if logits.dtype != np.float64:
        raise TypeError(f"frequencies need float64 logits (the coder's determinism), got {logits.dtype}")
    scaled = logits / LOGIT_STEP  # exact: a power of two
    steps = np.floor(scaled + 0.5)
    gaps = steps.max(axis=-1, keepdims=True) - steps
    matters = gaps < MAX_GAP_STEPS + 1  # beyond, any rounding gives the floor frequency
    near = np.abs(np.abs(scaled - steps) - 0.5) < GUARD_NATS / LOGIT_STEP
    return _frequency_table()[np.minimum(gaps, MAX_GAP_STEPS).astype(np.int64)], (near & matters).any(axis=-1)


def prior_fingerprint(prior: torch.nn.Module) -> bytes:
    """4 bytes naming a prior: sha256 over its layout fields and its weights (float32, by parameter name)."""
    cfg = prior.config
    fields = ("num_image_tokens", "codebook_size", "vocab_layout", "num_classes", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act")  # fmt: skip
    described = json.dumps({name: getattr(cfg, name, None) for name in fields}, sort_keys=True)
    state = prior.state_dict()
    arrays = [np.frombuffer(described.encode(), dtype=np.uint8)]
    arrays += [state[name].detach().float().cpu().numpy() for name in sorted(state)]
    return fingerprint(*arrays)


def code_lengths(token_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`[k]` ids and their `[k, K]` frequencies -> `[k]` ideal code length in bits of each prefix (cumulative)."""
    chosen = table[np.arange(len(token_ids)), token_ids]
    return np.cumsum(np.log2(table.sum(-1)) - np.log2(chosen))


def _words(payload: bytes) -> np.ndarray:
    """The range decoder's input: `payload` padded with zero bytes to whole big-endian uint32 words (at least one)."""
    size = max(4, -(-len(payload) // 4) * 4)
    return np.frombuffer(payload.ljust(size, b"\0"), dtype=">u4").astype(np.uint32)


class PriorCoder:
    """A prior ready to range-code the token ids of one tokenizer (C tokens, K codewords each).

    Holds a float64 CPU copy of the prior (in eval mode) and its fingerprint; conditions on the null token (an image
    is coded without its class). `tables` gives the frequencies of whole sequences, `encode_one` an image's payload,
    `decode` reads payloads back with the KV cache.
    """

    def __init__(self, prior: torch.nn.Module, num_tokens: int, codebook_size: int):
        cfg = getattr(prior, "config", None)
        if not all(hasattr(cfg, name) for name in ("num_image_tokens", "codebook_size", "null_token_id")):
            raise TypeError(f"prior must be a QGPriorForCausalLM, got {type(prior).__name__}")
        if (cfg.num_image_tokens, cfg.codebook_size) != (num_tokens, codebook_size):
            raise ValueError(
                f"the prior models C={cfg.num_image_tokens} tokens of K={cfg.codebook_size} codewords, the tokenizer "
                f"makes C={num_tokens} of K={codebook_size}: use the prior trained on this tokenizer's tokens"
            )
        if not cfg.has_null_token:
            raise ValueError(
                "the prior has no null token (class-conditional, trained without class dropout): the coder conditions "
                "on the null token, since an image is coded without its class"
            )
        self.fingerprint = prior_fingerprint(prior)
        self.prior = copy.deepcopy(prior).to("cpu", torch.float64).eval()
        self.family = _constriction().stream.model.Categorical(perfect=False)

    @torch.no_grad()
    def tables(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`[B, k]` ids -> (`[B, k, K]` frequencies of each position given the ones before, `[B, k]` bool: unsafe,
        see `frequencies`), from whole sequences in batches of `ENCODE_BATCH_SIZE`."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        freqs, unsafe = [], []
        for chunk in ids.split(ENCODE_BATCH_SIZE):
            inputs = self.prior.prepare_input_ids(chunk)[:, :-1]  # position t predicts token t
            logits = self.prior.codebook_logits(inputs, torch.arange(chunk.shape[1]))
            freq, near = frequencies(logits)
            freqs.append(freq)
            unsafe.append(near)
        return np.concatenate(freqs), np.concatenate(unsafe)

    def encode_one(self, token_ids: np.ndarray, table: np.ndarray) -> bytes:
        """`[k]` ids and their `[k, K]` frequencies -> the shortest payload that decodes to them."""
        constriction = _constriction()
        symbols, table = token_ids.astype(np.int32), np.ascontiguousarray(table)
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(symbols, self.family, table)
        full = encoder.get_compressed().astype(">u4").tobytes()
        bits = code_lengths(symbols, table)[-1]
        for size in range(max(0, int(bits // 8) - 1), len(full)):
            head = full[:size]
            rounded_up = int.from_bytes(head, "big") + 1
            candidates = [head] + ([rounded_up.to_bytes(size, "big")] if 0 < size and rounded_up < 256**size else [])
            for candidate in candidates:
                decoder = constriction.stream.queue.RangeDecoder(_words(candidate))
                try:
                    if np.array_equal(decoder.decode(self.family, table), symbols):
                        return candidate
                except AssertionError:  # constriction: "compressed data that is invalid for the entropy model"
                    continue
        return full

    @torch.no_grad()
    def decode(self, payloads: Sequence[bytes], prefix_lengths: Sequence[int]) -> list[np.ndarray]:
        """Payloads and their token counts -> each image's `[k]` int64 ids: one prior step (KV cache) per position for
        the whole batch, then one range-decoder step per image still going."""
        from transformers import DynamicCache

        decoders = [_constriction().stream.queue.RangeDecoder(_words(bytes(p))) for p in payloads]
        steps = max(prefix_lengths)
        ids = np.zeros((len(payloads), steps), dtype=np.int64)
        cache = DynamicCache(config=self.prior.config)
        inputs = self.prior.conditioning_ids(None, len(payloads), "cpu")
        offsets = self.prior.prepare_input_ids(torch.zeros(1, steps, dtype=torch.long))[0, 1:]
        for t in range(steps):
            logits = self.prior.codebook_logits(inputs, torch.tensor([t]), cache)[:, 0]
            table, _ = frequencies(logits)
            for row, (decoder, length) in enumerate(zip(decoders, prefix_lengths)):
                if t < length:
                    try:
                        ids[row, t] = decoder.decode(self.family, table[row : row + 1])[0]
                    except AssertionError as error:  # constriction: data no encoder wrote for these frequencies
                        raise CodecError(f"corrupt entropy-coded payload in stream {row}: {error}") from error
            inputs = torch.from_numpy(ids[:, t : t + 1]) + offsets[t]
        return [ids[row, :length] for row, length in enumerate(prefix_lengths)]


def read_token_ids(
    headers: Sequence[StreamHeader], num_tokens: int, coder: PriorCoder | None, prefix_length: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """Checked streams (`codec.read_header`) -> (`[B, C]` int64 ids, zero after each prefix; each stream's prefix
    length, at most `prefix_length`): fixed-width payloads unpacked, entropy-coded ones decoded in one batch with
    `coder`, which must be their prior (a `CodecError` if it is missing or another)."""
    lengths = [min(h.prefix_length, prefix_length or num_tokens) for h in headers]
    token_ids = np.zeros((len(headers), num_tokens), dtype=np.int64)
    coded = [row for row, header in enumerate(headers) if header.prior_fingerprint is not None]
    for row, header in enumerate(headers):
        if header.prior_fingerprint is None:
            token_ids[row, : lengths[row]] = header.decode().token_ids[: lengths[row]]
    if not coded:
        return token_ids, lengths
    if coder is None:
        raise CodecError(
            f"stream {coded[0]} is entropy-coded with a prior (fingerprint {headers[coded[0]].prior_fingerprint.hex()})"
            ": pass that prior, decompress(streams, prior=prior)"
        )
    for row in coded:
        if headers[row].prior_fingerprint != coder.fingerprint:
            raise CodecError(
                f"stream {row} was entropy-coded with another prior: fingerprint "
                f"{headers[row].prior_fingerprint.hex()} in the stream, {coder.fingerprint.hex()} given"
            )
    for row, ids in zip(coded, coder.decode([headers[r].payload for r in coded], [lengths[r] for r in coded])):
        token_ids[row, : len(ids)] = ids
    return token_ids, lengths


def _fixed_width_fit(max_bytes: int, codebook_size: int, limit: int) -> int:
    """The longest prefix (<= limit) whose fixed-width stream fits `max_bytes`, 0 if none."""
    kept = limit
    while kept and HEADER_NUM_BYTES + payload_num_bytes(kept, codebook_size) > max_bytes:
        kept -= 1
    return kept


def write_streams(
    token_ids: np.ndarray,
    prefix_lengths: np.ndarray,
    codebook_size: int,
    model_fingerprint: bytes,
    coder: PriorCoder | None = None,
    max_bytes: int | None = None,
) -> list[bytes]:
    """One stream per image of `[B, C]` ids, keeping `prefix_lengths[b]` tokens of image b: entropy-coded with
    `coder` (fixed width where that is shorter, where a logit sat on a rounding boundary, or where the stream did not
    decode back exactly) or fixed width without one. `max_bytes` shortens each prefix to the longest whose stream
    fits; a `CodecError` if not even one token fits."""
    num_images, num_tokens = token_ids.shape
    lengths = np.asarray(prefix_lengths, dtype=np.int64).copy()
    if max_bytes is not None:
        smallest = HEADER_NUM_BYTES + payload_num_bytes(1, codebook_size)
        if coder is None and max_bytes < smallest:
            raise CodecError(f"max_bytes={max_bytes} is below the smallest stream, {smallest} bytes (one token)")
        fixed_fit = _fixed_width_fit(max_bytes, codebook_size, num_tokens)
    if coder is None:
        if max_bytes is not None:
            lengths = np.minimum(lengths, fixed_fit)
        return [encode_tokens(row, codebook_size, model_fingerprint, int(k)) for row, k in zip(token_ids, lengths)]

    tables, unsafe = coder.tables(token_ids[:, : int(lengths.max())])
    payloads: list[bytes | None] = []
    for b in range(num_images):
        payload, kept = None, int(lengths[b])
        if max_bytes is not None:
            payload, kept = _longest_coded_fit(coder, token_ids[b], tables[b], kept, max_bytes, fixed_fit)
        elif not unsafe[b, :kept].any():
            payload = coder.encode_one(token_ids[b, :kept], tables[b, :kept])
        # a coded stream whose payload is no longer than the fixed width's is shorter (an 18- against a 20-byte header)
        if payload is not None and (unsafe[b, :kept].any() or len(payload) > payload_num_bytes(kept, codebook_size)):
            payload = None
        if payload is None and max_bytes is not None:
            kept = min(int(lengths[b]), fixed_fit)
            if kept == 0:
                raise CodecError(f"max_bytes={max_bytes} is below the smallest stream of image {b}")
        lengths[b] = kept
        payloads.append(payload)

    coded = [b for b, payload in enumerate(payloads) if payload is not None]
    if coded:  # verify: decode every coded stream as a decoder will
        decoded = coder.decode([payloads[b] for b in coded], [int(lengths[b]) for b in coded])
        for b, ids in zip(coded, decoded):
            if not np.array_equal(ids, token_ids[b, : lengths[b]]):
                payloads[b] = None
                if max_bytes is not None:
                    lengths[b] = min(int(lengths[b]), fixed_fit)
    return [
        encode_tokens(token_ids[b], codebook_size, model_fingerprint, int(lengths[b]))
        if payload is None
        else encode_prior_coded(
            payload, num_tokens, codebook_size, int(lengths[b]), model_fingerprint, coder.fingerprint
        )
        for b, payload in enumerate(payloads)
    ]


def _longest_coded_fit(
    coder: PriorCoder, token_ids: np.ndarray, table: np.ndarray, limit: int, max_bytes: int, fixed_fit: int
) -> tuple[bytes | None, int]:
    """(payload, k): the longest prefix k <= limit whose coded stream fits `max_bytes`, searched down from the
    prefix the ideal code length says fits, down to the fixed width's k (where the shorter stream wins later); (None,
    fixed width's k) when no coded prefix that long fits."""
    fixed_fit = min(limit, fixed_fit)
    ideal_bytes = code_lengths(token_ids[:limit], table[:limit]) / 8
    kept = min(limit, int(np.searchsorted(ideal_bytes, max_bytes - PRIOR_HEADER_NUM_BYTES, side="right")) + 1)
    while kept >= max(fixed_fit, 1):
        payload = coder.encode_one(token_ids[:kept], table[:kept])
        if PRIOR_HEADER_NUM_BYTES + len(payload) <= max_bytes:
            return payload, kept
        kept -= 1
    return None, fixed_fit


__all__ = [
    "GUARD_NATS", "LOGIT_STEP", "PriorCoder", "frequencies", "prior_fingerprint", "read_token_ids", "write_streams",
]  # fmt: skip
