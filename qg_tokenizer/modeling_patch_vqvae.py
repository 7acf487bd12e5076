"""Patch VQ-VAE: the equal-bytes baseline of QG-VAE, with exactly its public contract.

Conv encoder (strided convolutions and residual blocks) down to an h x w grid -> one shared codebook (the QG-VAE
quantiser with a single codebook, the same straight-through losses and Voronoi reset) -> conv decoder. Each token is
the codeword of one grid cell, so it describes a local patch; tokens are numbered in raster order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_patch_vqvae import PatchVQVAEConfig
from .modeling_qgvae import QGVAEModel, QGVAEPreTrainedModel, group_norm
from .quantizer_qgvae import PerTokenQuantizer


class PatchVQVAEResidualBlock(GradientCheckpointingLayer):
    """Pre-activation residual block at constant width: `x + conv(SiLU(GN(conv(SiLU(GN(x))))))`."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


def residual_stack(channels: int, num_blocks: int) -> nn.Sequential:
    """`num_blocks` residual blocks at `channels`."""
    return nn.Sequential(*(PatchVQVAEResidualBlock(channels) for _ in range(num_blocks)))


class PatchVQVAEEncoder(nn.Module):
    """`[B, ch, S, S]` -> `[B, h*w, D]`: centred zero padding to `padded_size`, then per level residual blocks and a
    4x4 stride-2 conv, residual blocks at the grid, GN-SiLU-1x1 conv to D; flattened in raster order."""

    def __init__(self, config: PatchVQVAEConfig):
        super().__init__()
        channels = config.block_out_channels
        pad = config.padded_size - config.image_size
        self.padding = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)  # left, right, top, bottom
        self.conv_in = nn.Conv2d(config.num_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(residual_stack(c_in, config.num_res_blocks), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.mid = residual_stack(channels[-1], config.num_res_blocks)
        self.norm_out = group_norm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.codeword_dim, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(F.pad(pixel_values, self.padding))  # (B, c0, P, P)
        for level in self.levels:
            x = level(x)  # halves the side
        z = self.conv_out(F.silu(self.norm_out(self.mid(x))))  # (B, D, h, w)
        return z.flatten(2).transpose(1, 2)  # (B, h*w, D), raster order


class PatchVQVAEDecoder(nn.Module):
    """`[B, h*w, D]` -> `[B, ch, S, S]`: 3x3 conv, residual blocks, per level nearest x2 upsampling + 3x3 conv and
    residual blocks, GN-SiLU-3x3 conv to the image channels, crop of the encoder's padding. Linear output."""

    def __init__(self, config: PatchVQVAEConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        self.grid_size, self.image_size = config.grid_size, config.image_size
        self.crop = (config.padded_size - config.image_size) // 2
        self.conv_in = nn.Conv2d(config.codeword_dim, channels[0], 3, padding=1)
        self.mid = residual_stack(channels[0], config.num_res_blocks)
        self.levels = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                residual_stack(c_out, config.num_res_blocks),
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.norm_out = group_norm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.num_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch, _, dim = latents.shape
        grid = latents.transpose(1, 2).reshape(batch, dim, self.grid_size, self.grid_size)  # (B, D, h, w)
        x = self.mid(self.conv_in(grid))
        for level in self.levels:
            x = level(x)  # doubles the side
        x = self.conv_out(F.silu(self.norm_out(x)))  # (B, ch, P, P)
        return x[..., self.crop : self.crop + self.image_size, self.crop : self.crop + self.image_size]


class PatchVQVAEPreTrainedModel(PreTrainedModel):
    config_class = PatchVQVAEConfig
    config: PatchVQVAEConfig
    base_model_prefix = "patch_vqvae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["PatchVQVAEResidualBlock", "PerTokenQuantizer"]
    _keep_in_fp32_modules = ["quantizer"]
    _keep_in_fp32_modules_strict = ["quantizer"]  # bf16 loads too: the codebook fingerprint stays the fp32 one

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The QG-VAE's initialisation (PyTorch-default convs, U(-0.5, 0.5) codebook) with a zero global offset."""
        QGVAEPreTrainedModel._init_weights(self, module)
        if isinstance(module, PerTokenQuantizer):
            init.zeros_(module.global_offset)


class PatchVQVAEModel(PatchVQVAEPreTrainedModel, QGVAEModel):
    """Patch VQ-VAE with the public contract of [`QGVAEModel`]: an image in [0, 1] <-> C = h*w local token ids.

    `encode`, `decode`, `forward`, the codebook upkeep and `compress`/`decompress` are [`QGVAEModel`]'s (its
    subclass, like a transformers modular model: the config class, weight init and the three modules are this file's).
    The quantiser is a [`PerTokenQuantizer`] with a single codebook (`codebook [1, K, D]`,
    `reset_statistic` and `usage_counts` `[1, K]`): the grid is quantised as `B * h * w` one-token rows, so the losses,
    the fp32 nearest search and the Voronoi reset are the QG-VAE's own. Its global offset is then one D-vector added
    to every codeword; it starts at zero (a plain VQ-VAE) and is trained like any decoder bias.
    `config.per_token_codebooks` gives each grid cell its own codebook (`[C, K, D]`), quantised like QG-VAE's tokens.
    `decode(ids, prefix_length=k)` keeps the first k tokens in raster order and feeds zero vectors for the rest, as
    QG-VAE does with its suffix; `token_dropout_prob` (0 in the presets) would train for that.
    """

    def __init__(self, config: PatchVQVAEConfig):
        super(QGVAEModel, self).__init__(config)  # PreTrainedModel's init: QGVAEModel's would build QG-VAE modules
        self.encoder = PatchVQVAEEncoder(config)
        num_codebooks = config.num_tokens if config.per_token_codebooks else 1
        self.quantizer = PerTokenQuantizer(num_codebooks, config.codebook_size, config.codeword_dim)
        self.decoder = PatchVQVAEDecoder(config)
        self.post_init()


__all__ = ["PatchVQVAEModel", "PatchVQVAEPreTrainedModel"]
