"""What every image tokenizer of this package shares: token budget, input checks, the public contract, compression.

The QG-VAE and the patch VQ-VAE baseline expose the same contract (`encode`, `decode`, `forward`, codebook upkeep,
`compress`/`decompress`). `ImageTokenizerMixin` implements all of it against three modules, `encoder`, `quantizer`
([`PerTokenQuantizer`]) and `decoder`, so a model only builds those. A flat sibling of the modeling files (relative
imports only), so it travels with them to the hub.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .codec import decode_batch, encode_batch, fingerprint


@dataclass
class QGVAEEncoderOutput(ModelOutput):
    """Output of [`QGVAEModel.encode`].

    Attributes:
        token_ids: `[B, C]` int64 in [0, K): token c indexes codebook c (or the single shared codebook).
        quantized: `[B, C, D]` codewords (straight-through gradient to the encoder), before the global offset.
        codebook_loss: scalar `mean((sg(z) - e)^2)`.
        commitment_loss: scalar `mean((z - sg(e))^2)`.
    """

    token_ids: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None


@dataclass
class QGVAEDecoderOutput(ModelOutput):
    """Output of [`QGVAEModel.decode`].

    Attributes:
        pixel_values: `[B, num_channels, H, W]` reconstruction, nominally in [0, 1] (not clamped).
    """

    pixel_values: torch.FloatTensor | None = None


@dataclass
class QGVAEModelOutput(ModelOutput):
    """Output of [`QGVAEModel.forward`].

    Attributes:
        loss: `reconstruction_loss + w_cb * codebook_loss + w_commit * commitment_loss`.
        reconstruction: `[B, num_channels, H, W]` decoded image (not clamped).
        token_ids: `[B, C]` int64 token ids.
        reconstruction_loss: mean squared error against the input.
        codebook_loss: scalar, see [`QGVAEEncoderOutput`].
        commitment_loss: scalar, see [`QGVAEEncoderOutput`].
        token_mask: `[B, C]` 1 for tokens the decoder saw, 0 for tokens dropped by the ordering regulariser.
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    token_ids: torch.LongTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    token_mask: torch.FloatTensor | None = None


def check_int_fields(config: object, names: Iterable[str], minimum: int = 1) -> None:
    """Raise `TypeError` unless each named field of `config` is an int, `ValueError` unless it is >= `minimum`."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{type(config).__name__}.{name} must be an int, got {type(value).__name__} ({value!r})")
        if value < minimum:
            raise ValueError(f"{type(config).__name__}.{name} must be >= {minimum}, got {value}")


def check_non_negative_fields(config: object, names: Iterable[str]) -> None:
    """Raise `ValueError` unless each named field of `config` is a number >= 0 (NaN fails)."""
    for name in names:
        if not float(getattr(config, name)) >= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be >= 0, got {getattr(config, name)}")


class TokenBudgetConfigMixin:
    """Bits and bytes per image and named presets, for a config with `num_tokens` (C) and `codebook_size` (K)."""

    presets: ClassVar[dict[str, dict]] = {}

    @property
    def bits_per_image(self) -> float:
        """C * log2(K)."""
        return self.num_tokens * math.log2(self.codebook_size)

    @property
    def bytes_per_image(self) -> int:
        """ceil(C * log2(K) / 8): the packed payload of one image."""
        return math.ceil(self.bits_per_image / 8 - 1e-9)

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """A named configuration from `cls.presets`; keyword arguments override preset fields."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; available: {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})


class ImageTokenizerMixin:
    """The public contract of an image tokenizer: `encode`, `decode`, `forward`, codebook upkeep, `compress`.

    The model provides three modules: `encoder` (`[B, ch, H, W]` -> `[B, C, D]`), `quantizer` (a
    [`PerTokenQuantizer`] with either C codebooks, one per token, or a single codebook shared by all C tokens) and
    `decoder` (`[B, C, D]` -> `[B, ch, H, W]`), and a config with `image_size`, `num_channels`, `num_tokens`,
    `codebook_size`, the two loss weights and `token_dropout_prob`.
    """

    # --------------------------------------------------------------------------------------------------- validation
    def _check_pixel_values(self, pixel_values: torch.Tensor, check_values: bool = True) -> None:
        """Type, dtype and shape; with `check_values` also finite values in [0, 1] (a host sync: the public entry
        points `encode`/`compress` check values, `forward` in the training hot path does not)."""
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a float tensor in [0, 1], got dtype {pixel_values.dtype} "
                "(use QGVAEImageProcessor to convert uint8 images)"
            )
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [batch, {', '.join(map(str, expected))}] (channels, height, width), "
                f"got {list(pixel_values.shape)}"
            )
        if not check_values:
            return
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or Inf")
        low, high = pixel_values.aminmax()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                "pixel_values must be in [0, 1] (no normalisation), got values in "
                f"[{low.item():.3g}, {high.item():.3g}]"
            )

    def _check_token_ids(self, token_ids: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(token_ids, torch.Tensor):
            raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
        if token_ids.ndim != 2 or token_ids.shape[1] != cfg.num_tokens:
            raise ValueError(f"token_ids must have shape [batch, {cfg.num_tokens}], got {list(token_ids.shape)}")
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= cfg.codebook_size):
            raise ValueError(
                f"token_ids must be in [0, {cfg.codebook_size}), got values in "
                f"[{token_ids.min().item()}, {token_ids.max().item()}]"
            )

    def _token_mask(
        self, num_tokens: int | torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        """`[B, C]` float mask keeping the first `num_tokens` tokens (int, or `[B]` per image), or None for all."""
        if num_tokens is None:
            return None
        c = self.config.num_tokens
        counts = torch.as_tensor(num_tokens, device=device)
        if counts.is_floating_point() or counts.ndim > 1 or (counts.ndim == 1 and counts.shape[0] != batch):
            raise ValueError(f"num_tokens must be an int or a [batch] integer tensor, got {num_tokens!r}")
        if counts.numel() and (counts.min() < 1 or counts.max() > c):
            raise ValueError(f"num_tokens must be in [1, {c}], got {num_tokens!r}")
        return (torch.arange(c, device=device) < counts.reshape(-1, 1)).float().expand(batch, c)

    # ------------------------------------------------------------------------------------------------ token budget
    @property
    def bits_per_image(self) -> float:
        """C * log2(K) bits per image."""
        return self.config.bits_per_image

    @property
    def bytes_per_image(self) -> int:
        """ceil(C * log2(K) / 8) payload bytes per image."""
        return self.config.bytes_per_image

    # ------------------------------------------------------------------------------------------------ public API
    def encode(self, pixel_values: torch.Tensor, return_dict: bool = True) -> QGVAEEncoderOutput | tuple:
        """`[B, ch, H, W]` in [0, 1] -> token ids `[B, C]` (+ quantized latents `[B, C, D]` and VQ losses)."""
        self._check_pixel_values(pixel_values)
        output = self._encode(pixel_values)
        return output if return_dict else output.to_tuple()

    def _encode(self, pixel_values: torch.Tensor) -> QGVAEEncoderOutput:
        """`encode` without the value checks (no host sync)."""
        z = self.encoder(pixel_values)  # (B, C, D)
        # (B, C, D) -> (B', C', D) with C' the quantizer's codebook count: C per-token codebooks, or 1 shared
        quantizer_output = self.quantizer(z.reshape(-1, self.quantizer.num_tokens, z.shape[-1]))
        output = QGVAEEncoderOutput(
            token_ids=quantizer_output.token_ids.reshape(z.shape[:2]),
            quantized=quantizer_output.quantized.reshape(z.shape),
            codebook_loss=quantizer_output.codebook_loss,
            commitment_loss=quantizer_output.commitment_loss,
        )
        return output

    def decode_latents(self, quantized: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, C, D]` codewords (+ global offset added here; dropped tokens zeroed after it) -> `[B, ch, H, W]`."""
        latents = quantized + self.quantizer.global_offset.to(quantized.dtype)
        if token_mask is not None:
            latents = latents * token_mask.to(latents.dtype).unsqueeze(-1)
        return self.decoder(latents.to(next(self.decoder.parameters()).dtype))

    def decode(
        self, token_ids: torch.Tensor, num_tokens: int | torch.Tensor | None = None, return_dict: bool = True
    ) -> QGVAEDecoderOutput | tuple:
        """Token ids `[B, C]` -> image `[B, ch, H, W]`; `num_tokens=k` decodes from the first k tokens only."""
        self._check_token_ids(token_ids)
        mask = self._token_mask(num_tokens, token_ids.shape[0], token_ids.device)
        # a single shared codebook broadcasts over all C tokens
        pixel_values = self.decode_latents(self.quantizer.lookup(token_ids.long()), mask)
        output = QGVAEDecoderOutput(pixel_values=pixel_values)
        return output if return_dict else output.to_tuple()

    def token_dropout_mask(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`[B, C]` ordering mask: with prob `token_dropout_prob` a sample keeps only a prefix of n ~ U{1..C-1}."""
        c, p = self.config.num_tokens, self.config.token_dropout_prob
        drop = torch.rand(batch_size, generator=generator, device=device) < p
        keep = torch.randint(1, max(c, 2), (batch_size,), generator=generator, device=device)
        keep = torch.where(drop & (c > 1), keep, torch.full_like(keep, c))
        return (torch.arange(c, device=device) < keep[:, None]).float()

    def forward(
        self, pixel_values: torch.Tensor, token_mask: torch.Tensor | None = None, return_dict: bool | None = None
    ) -> QGVAEModelOutput | tuple:
        """Encode, quantise and decode `[B, ch, H, W]` in [0, 1]; returns the reconstruction and training loss.

        In training mode the ordering regulariser drops token suffixes (`token_dropout_prob`) unless `token_mask`
        `[B, C]` is given.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        self._check_pixel_values(pixel_values, check_values=False)
        encoded = self._encode(pixel_values)
        if token_mask is None and self.training and self.config.token_dropout_prob > 0:
            token_mask = self.token_dropout_mask(pixel_values.shape[0], pixel_values.device)
        reconstruction = self.decode_latents(encoded.quantized, token_mask)
        reconstruction_loss = F.mse_loss(reconstruction.float(), pixel_values.float())
        loss = (
            reconstruction_loss
            + self.config.codebook_loss_weight * encoded.codebook_loss
            + self.config.commitment_loss_weight * encoded.commitment_loss
        )
        output = QGVAEModelOutput(
            loss=loss,
            reconstruction=reconstruction,
            token_ids=encoded.token_ids,
            reconstruction_loss=reconstruction_loss,
            codebook_loss=encoded.codebook_loss,
            commitment_loss=encoded.commitment_loss,
            token_mask=token_mask,
        )
        return output if return_dict else output.to_tuple()

    # -------------------------------------------------------------------------------------- codebook maintenance
    def accumulate_reset_statistic(self) -> None:
        """Add this step's mean |dL/dE| to the reset statistic; call after each (unscaled) autoencoder backward."""
        self.quantizer.accumulate_reset_statistic()

    def voronoi_reset(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the Voronoi codebook reset on the (already reduced) statistic; returns resets per codebook."""
        return self.quantizer.voronoi_reset(generator)

    def codebook_usage(self) -> dict[str, torch.Tensor]:
        """Per-codebook `used_fraction`, `perplexity` and `dead` count from the training usage counts."""
        return self.quantizer.codebook_usage()

    # ---------------------------------------------------------------------------------------------- compression
    def codebook_fingerprint(self) -> bytes:
        """4 bytes identifying this model's codebooks and offsets (written into every compressed stream)."""
        return fingerprint(
            self.quantizer.codebook.detach().float().cpu().numpy(),
            self.quantizer.global_offset.detach().float().cpu().numpy(),
        )

    @torch.no_grad()
    def compress(self, pixel_values: torch.Tensor, num_tokens: int | None = None) -> list[bytes]:
        """`[B, ch, H, W]` in [0, 1] -> one byte stream per image (header + ceil(k log2 K / 8) payload bytes)."""
        token_ids = self.encode(pixel_values).token_ids.cpu().numpy()
        return encode_batch(token_ids, self.config.codebook_size, self.codebook_fingerprint(), num_tokens)

    @torch.no_grad()
    def decompress(self, streams: list[bytes]) -> torch.Tensor:
        """Byte streams from `compress` (possibly truncated to a prefix) -> images `[B, ch, H, W]` (not clamped)."""
        decoded = decode_batch(
            streams,
            codebook_size=self.config.codebook_size,
            num_tokens=self.config.num_tokens,
            fingerprint=self.codebook_fingerprint(),
        )
        token_ids = np.zeros((len(decoded), self.config.num_tokens), dtype=np.int64)
        for row, stream in enumerate(decoded):
            token_ids[row, : stream.num_kept] = stream.token_ids
        device = self.quantizer.codebook.device
        kept = torch.tensor([stream.num_kept for stream in decoded], device=device)
        token_ids = torch.from_numpy(token_ids).to(device)
        return self.decode(token_ids, num_tokens=kept).pixel_values


__all__ = [
    "ImageTokenizerMixin",
    "QGVAEDecoderOutput",
    "QGVAEEncoderOutput",
    "QGVAEModelOutput", "TokenBudgetConfigMixin", "check_int_fields",
    "check_non_negative_fields",
]
