"""Configuration of the Quantised Global Autoencoder (QG-VAE, arXiv 2407.11913)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

from transformers import PretrainedConfig


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


QGVAE_PRESETS: dict[str, dict] = {
    # the reference demo notebook's CIFAR-10 model (6,228,750 trainable parameters there)
    "cifar10-demo": dict(
        image_size=32, num_channels=3, num_tokens=64, codeword_dim=64, codebook_size=512, downsample_factor=0,
        num_heads=8, num_res_blocks=1, min_channels=16, max_channels=128, reset_interval=100,
    ),
    # the QGGAN notebook's ImageNet-128 default (26,470,942 trainable parameters there)
    "imagenet128": dict(
        image_size=128, num_channels=3, num_tokens=256, codeword_dim=64, codebook_size=512, downsample_factor=3,
        num_heads=128, num_res_blocks=2, min_channels=16, max_channels=128, reset_interval=1000,
    ),
    # CPU-sized: 28x28 grey digits, 16 tokens x 9 bits = 18 bytes
    "mnist-cpu": dict(
        image_size=28, num_channels=1, num_tokens=16, codeword_dim=64, codebook_size=512, downsample_factor=1,
        num_heads=4, num_res_blocks=1, min_channels=16, max_channels=32, reset_interval=100, token_dropout_prob=1 / 3,
    ),
    # CPU-sized: 32x32 colour patches, 64 tokens x 9 bits = 72 bytes (the paper's CIFAR budget)
    "photos32-cpu": dict(
        image_size=32, num_channels=3, num_tokens=64, codeword_dim=64, codebook_size=512, downsample_factor=1,
        num_heads=8, num_res_blocks=1, min_channels=16, max_channels=64, reset_interval=100, token_dropout_prob=1 / 3,
    ),
}


class QGVAEConfig(TokenBudgetConfigMixin, PretrainedConfig):
    r"""Configuration of a [`QGVAEModel`].

    An image `[B, num_channels, image_size, image_size]` in [0, 1] becomes `num_tokens` (C) global tokens, each an
    index into its own codebook of `codebook_size` (K) codewords of dimension `codeword_dim` (D).

    Args:
        image_size: side of the square input images the model is trained on.
        num_channels: 1 (grey) or 3 (RGB).
        num_tokens: C, the number of global tokens (= encoder output channels).
        codebook_size: K, codewords per token; each token costs log2(K) bits.
        codeword_dim: D, dimension of a codeword.
        num_heads: the C token maps are split into this many contiguous groups; each group shares one affine map
            between the flattened token map (N values) and R^D. Must divide `num_tokens`.
        downsample_factor: f; token maps are `image_size / 2**f` pixels square, so N = (image_size / 2**f)**2.
        min_channels: channels of the encoder's first hourglass level (doubles per level up to `max_channels`).
        max_channels: channel cap of the encoder and width of the decoder hourglass.
        num_res_blocks: residual blocks per hourglass stage.
        num_octaves: octaves of the sinusoidal 2-D position encoding fed to every residual block (4 * octaves channels).
        min_resolution: the hourglass recurses while the feature map is larger than this.
        codebook_loss_weight: weight of `mean((sg(z) - e)^2)` (0.25 in the reference code).
        commitment_loss_weight: weight of `mean((z - sg(e))^2)` (1.0 in the reference code).
        reset_interval: training steps between two Voronoi resets (100 in the demo notebook, 1000 in QGGAN).
        token_dropout_prob: fraction of training samples whose token suffix (from a start uniform in 1..C-1) is
            zeroed, which orders the tokens coarse-to-fine (1/3 in the reference code when enabled; 0 disables).
    """

    model_type = "qgvae"
    presets = QGVAE_PRESETS

    def __init__(
        self,
        image_size: int = 28,
        num_channels: int = 1,
        num_tokens: int = 16,
        codebook_size: int = 512,
        codeword_dim: int = 64,
        num_heads: int = 4,
        downsample_factor: int = 1,
        min_channels: int = 16,
        max_channels: int = 32,
        num_res_blocks: int = 1,
        num_octaves: int = 16,
        min_resolution: int = 8,
        codebook_loss_weight: float = 0.25,
        commitment_loss_weight: float = 1.0,
        reset_interval: int = 100,
        token_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_size = image_size
        self.num_channels = num_channels
        self.num_tokens = num_tokens
        self.codebook_size = codebook_size
        self.codeword_dim = codeword_dim
        self.num_heads = num_heads
        self.downsample_factor = downsample_factor
        self.min_channels = min_channels
        self.max_channels = max_channels
        self.num_res_blocks = num_res_blocks
        self.num_octaves = num_octaves
        self.min_resolution = min_resolution
        self.codebook_loss_weight = codebook_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.reset_interval = reset_interval
        self.token_dropout_prob = token_dropout_prob
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_qgvae()

    def validate_qgvae(self) -> None:
        """Raise `ValueError` naming the field of an invalid combination."""
        check_int_fields(
            self,
            ("image_size", "num_channels", "num_tokens", "codebook_size", "codeword_dim", "num_heads", "min_channels",
             "max_channels", "num_res_blocks", "min_resolution", "reset_interval"),
        )  # fmt: skip
        check_int_fields(self, ("downsample_factor", "num_octaves"), minimum=0)
        if self.num_channels not in (1, 3):
            raise ValueError(f"QGVAEConfig.num_channels must be 1 or 3, got {self.num_channels}")
        if self.codebook_size < 2:
            raise ValueError(f"QGVAEConfig.codebook_size (K) must be >= 2, got {self.codebook_size}")
        if self.num_tokens % self.num_heads:
            raise ValueError(
                f"QGVAEConfig.num_tokens ({self.num_tokens}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.image_size % (2**self.downsample_factor):
            raise ValueError(
                f"QGVAEConfig.image_size ({self.image_size}) must be divisible by 2**downsample_factor "
                f"({2**self.downsample_factor})"
            )
        # the encoder hourglass halves the map at every level; the size must stay an even integer there
        size = self.image_size
        for level in range(len(self.encoder_level_sizes()) - 1):
            if size % 2:
                raise ValueError(
                    f"QGVAEConfig.image_size ({self.image_size}) is incompatible with the hourglass: level {level} "
                    f"has an odd size {size} but must be halved (min_resolution={self.min_resolution}, "
                    f"downsample_factor={self.downsample_factor})"
                )
            size //= 2
        if self.min_channels > self.max_channels:
            raise ValueError(
                f"QGVAEConfig.min_channels ({self.min_channels}) must be <= max_channels ({self.max_channels})"
            )
        check_non_negative_fields(self, ("codebook_loss_weight", "commitment_loss_weight"))
        if not 0.0 <= float(self.token_dropout_prob) <= 1.0:
            raise ValueError(f"QGVAEConfig.token_dropout_prob must be in [0, 1], got {self.token_dropout_prob}")

    def encoder_level_sizes(self) -> list[int]:
        """Input sizes of the encoder hourglass levels (it recurses while size > min_resolution or f needs it)."""
        sizes, size, level = [], self.image_size, 0
        while True:
            sizes.append(size)
            if not (size > self.min_resolution or self.downsample_factor > level):
                return sizes
            size, level = size // 2, level + 1

    @property
    def token_map_size(self) -> int:
        """Side of one token map, `image_size / 2**f`."""
        return self.image_size // 2**self.downsample_factor


__all__ = ["QGVAEConfig", "QGVAE_PRESETS"]
