"""Configuration of the patch VQ-VAE: the equal-bytes baseline of QG-VAE (an h x w grid of local tokens)."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from .configuration_qgvae import TokenBudgetConfigMixin, check_int_fields, check_non_negative_fields

PATCH_VQVAE_PRESETS: dict[str, dict] = {
    # 28x28 grey digits, 4x4 = 16 tokens x 9 bits = 18 bytes, as QG-VAE "mnist-cpu". 840,673 trainable parameters
    # (QG-VAE: 875,973, -4.0%; its 16 codebooks hold 524k of them, this one codebook 33k, so the convs get the rest)
    # and 0.107 GFLOP per image forward (QG-VAE: 0.105)
    "mnist-cpu": dict(
        image_size=28, num_channels=1, grid_size=4, codebook_size=512, codeword_dim=64,
        block_out_channels=[16, 32, 64, 96], num_res_blocks=1, reset_interval=100,
    ),
    # 32x32 colour patches, 8x8 = 64 tokens x 9 bits = 72 bytes, as QG-VAE "photos32-cpu". 3,208,387 trainable
    # parameters (QG-VAE: 3,253,611, -1.4%), most in the 256-wide grid level, which keeps the compute down:
    # 0.64 GFLOP per image forward (QG-VAE: 0.46)
    "photos32-cpu": dict(
        image_size=32, num_channels=3, grid_size=8, codebook_size=512, codeword_dim=64,
        block_out_channels=[32, 64, 256], num_res_blocks=1, reset_interval=100,
    ),
}


class PatchVQVAEConfig(TokenBudgetConfigMixin, PretrainedConfig):
    r"""Configuration of a [`PatchVQVAEModel`], the patch-token VQ-VAE that QG-VAE is compared against.

    An image `[B, num_channels, image_size, image_size]` in [0, 1] becomes a `grid_size` x `grid_size` grid of tokens
    (C = grid_size**2, raster order), each an index into ONE shared codebook of `codebook_size` (K) codewords of
    dimension `codeword_dim` (D), or, with `per_token_codebooks`, into its grid cell's own codebook (as QG-VAE). The
    image is zero-padded (centred) to `padded_size = grid_size * 2**L`, the smallest such size >= image_size, so that
    L stride-2 convolutions reach the grid exactly (28 -> 32 -> 16 -> 8 -> 4 for MNIST with a 4x4 grid; 32 -> 16 -> 8
    without padding for an 8x8 grid); the decoder crops the padding off again.

    Args:
        image_size: side of the square input images.
        num_channels: 1 (grey) or 3 (RGB).
        grid_size: tokens per side (h = w); C = grid_size**2 tokens per image.
        codebook_size: K, codewords of the shared codebook; each token costs log2(K) bits.
        codeword_dim: D, dimension of a codeword (= channels of the token grid).
        block_out_channels: widths of the L + 1 resolution levels, from the padded image down to the token grid
            (the decoder mirrors them); exactly `num_downsamples + 1` entries.
        num_res_blocks: residual blocks per resolution level of the encoder and of the decoder.
        codebook_loss_weight: weight of `mean((sg(z) - e)^2)` (0.25, as QG-VAE).
        commitment_loss_weight: weight of `mean((z - sg(e))^2)` (1.0, as QG-VAE).
        reset_interval: training steps between two Voronoi resets of the codebook (as QG-VAE).
        token_dropout_prob: fraction of training samples whose raster-order token suffix is zeroed (QG-VAE's
            ordering regulariser); 0, a plain VQ-VAE, in the presets.
        per_token_codebooks: give every grid cell its own codebook (C x K codewords, QG-VAE's quantiser) instead of
            one shared by all cells: a diagnostic that separates QG-VAE's per-token codebooks from its global tokens.
    """

    model_type = "patch_vqvae"
    presets = PATCH_VQVAE_PRESETS

    def __init__(
        self,
        image_size: int = 28,
        num_channels: int = 1,
        grid_size: int = 4,
        codebook_size: int = 512,
        codeword_dim: int = 64,
        block_out_channels: list[int] | tuple[int, ...] = (16, 32, 64, 96),
        num_res_blocks: int = 1,
        codebook_loss_weight: float = 0.25,
        commitment_loss_weight: float = 1.0,
        reset_interval: int = 100,
        token_dropout_prob: float = 0.0,
        per_token_codebooks: bool = False,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_size = image_size
        self.num_channels = num_channels
        self.grid_size = grid_size
        self.codebook_size = codebook_size
        self.codeword_dim = codeword_dim
        self.block_out_channels = list(block_out_channels)
        self.num_res_blocks = num_res_blocks
        self.codebook_loss_weight = codebook_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.reset_interval = reset_interval
        self.token_dropout_prob = token_dropout_prob
        self.per_token_codebooks = per_token_codebooks
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_patch_vqvae()

    def validate_patch_vqvae(self) -> None:
        """Raise `TypeError`/`ValueError` naming the field of an invalid value or combination."""
        check_int_fields(
            self,
            ("image_size", "num_channels", "grid_size", "codebook_size", "codeword_dim", "num_res_blocks",
             "reset_interval"),
        )  # fmt: skip
        if self.num_channels not in (1, 3):
            raise ValueError(f"PatchVQVAEConfig.num_channels must be 1 or 3, got {self.num_channels}")
        if self.codebook_size < 2:
            raise ValueError(f"PatchVQVAEConfig.codebook_size (K) must be >= 2, got {self.codebook_size}")
        if self.grid_size > self.image_size:
            raise ValueError(
                f"PatchVQVAEConfig.grid_size ({self.grid_size}) must be <= image_size ({self.image_size})"
            )
        widths = self.block_out_channels
        if len(widths) != self.num_downsamples + 1 or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths
        ):
            raise ValueError(
                f"PatchVQVAEConfig.block_out_channels must be {self.num_downsamples + 1} positive ints (one per level "
                f"from {self.padded_size} px down to the {self.grid_size}x{self.grid_size} grid), got {widths}"
            )
        check_non_negative_fields(self, ("codebook_loss_weight", "commitment_loss_weight"))
        if not 0.0 <= float(self.token_dropout_prob) <= 1.0:
            raise ValueError(f"PatchVQVAEConfig.token_dropout_prob must be in [0, 1], got {self.token_dropout_prob}")
        if not isinstance(self.per_token_codebooks, bool):
            raise TypeError(f"PatchVQVAEConfig.per_token_codebooks must be a bool, got {self.per_token_codebooks!r}")

    @property
    def num_tokens(self) -> int:
        """C = grid_size**2 tokens per image, in raster order."""
        return self.grid_size**2

    @property
    def num_downsamples(self) -> int:
        """L, the stride-2 levels between the padded image and the grid: ceil(log2(image_size / grid_size))."""
        return math.ceil(math.log2(self.image_size / self.grid_size) - 1e-9)

    @property
    def padded_size(self) -> int:
        """grid_size * 2**L >= image_size: the side the encoder sees after centred zero padding."""
        return self.grid_size * 2**self.num_downsamples


__all__ = ["PATCH_VQVAE_PRESETS", "PatchVQVAEConfig"]
