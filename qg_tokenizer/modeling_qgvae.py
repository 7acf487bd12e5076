"""QG-VAE: hourglass encoder -> C global token maps -> per-head affine map -> per-token VQ -> mirrored decoder."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_qgvae import QGVAEConfig
from .quantizer_qgvae import PerTokenQuantizer
from .tokenizer_utils import ImageTokenizerMixin, QGVAEDecoderOutput, QGVAEEncoderOutput, QGVAEModelOutput


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest divisor of `channels` that is <= 16 as group count (as the reference)."""
    groups = max(g for g in range(1, 17) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def grid_position_encoding(size: int, num_octaves: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[1, 4 * num_octaves, size, size]`: sin/cos(2^i * p) of both pixel coordinates p = index / size."""
    coords = torch.arange(size, device=device, dtype=torch.float32) / size
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="ij"))  # (2, size, size)
    scales = 2.0 ** torch.arange(num_octaves, device=device, dtype=torch.float32)
    phases = scales[:, None, None, None] * grid  # (octaves, 2, size, size)
    encoding = torch.stack((phases.sin(), phases.cos()), dim=1)  # (octaves, sin/cos, 2, size, size)
    return encoding.reshape(1, 4 * num_octaves, size, size).to(dtype)


def resize(x: torch.Tensor, size: int, shrink_mode: str = "area") -> torch.Tensor:
    """Resize `[B, C, h, h]` to `size` (bilinear when growing, `shrink_mode` when shrinking)."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode=shrink_mode)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class ConditioningPyramid:
    """The hourglass conditioning `concat(x, position grid)` at every resolution, each computed once per call.

    The position channels do not depend on the input: `position_levels(size)` gives them at every size, computed once
    per model (see [`QGVAEHourglass.position_levels`]); only the input channels are resized on each call. Without
    `position_levels` the conditioning is `x` alone (the QGGAN discriminator).
    """

    def __init__(self, x: torch.Tensor, position_levels: Callable[[int], torch.Tensor] | None = None):
        self.x, self.position_levels, self.levels = x, position_levels, {}

    def __call__(self, size: int) -> torch.Tensor:
        if size not in self.levels:
            x = resize(self.x, size, shrink_mode="nearest")
            if self.position_levels is not None:
                x = torch.cat((x, self.position_levels(size).expand(x.shape[0], -1, -1, -1)), dim=1)
            self.levels[size] = x
        return self.levels[size]


class QGVAEResidualBlock(GradientCheckpointingLayer):
    """Imagen-style residual block with the conditioning injected: `conv(SiLU(GN(conv(SiLU(GN(x + W c)))))) + W' x`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, cond_channels: int):
        super().__init__()
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.cond_proj = nn.Conv2d(cond_channels, in_channels, 1, bias=False)
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.norm2 = group_norm(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x + self.cond_proj(cond)))
        h = F.silu(self.norm2(self.conv1(h)))
        return self.conv2(h) + self.skip(x)


class QGVAEResidualStack(nn.Module):
    """`num_blocks` residual blocks: in -> mid -> ... -> out channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, cond_channels: int, num_blocks: int):
        super().__init__()
        widths = [in_channels] + [mid_channels] * (num_blocks - 1) + [out_channels]
        self.blocks = nn.ModuleList(
            QGVAEResidualBlock(widths[i], mid_channels, widths[i + 1], cond_channels) for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cond)
        return x


class QGVAEHourglassLevel(nn.Module):
    """One level of the hourglass: conv, residual stack, (down, next level, up), residual stack, conv.

    There are no encoder-to-decoder skip concatenations (as in the reference). Levels below `skip_up` do not
    upsample (encoder with f > 0) and levels below `skip_down` do not downsample (decoder with f > 0).
    """

    def __init__(
        self,
        config: QGVAEConfig,
        in_channels: int,
        channels: int,
        size: int,
        cond_channels: int,
        level: int = 0,
        skip_up: int = 0,
        skip_down: int = 0,
        out_channels: int | None = None,
    ):
        super().__init__()
        next_channels = min(2 * channels, config.max_channels)
        self.in_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.in_res = QGVAEResidualStack(channels, channels, next_channels, cond_channels, config.num_res_blocks)
        self.inner = None
        inner_channels = next_channels
        if size > config.min_resolution or skip_up > level or skip_down > level:
            self.inner = QGVAEHourglassLevel(
                config, next_channels, next_channels, size // 2, cond_channels, level + 1, skip_up, skip_down
            )
            inner_channels = self.inner.out_channels
        self.downsample, self.upsample = level >= skip_down, level >= skip_up
        if level < skip_down:  # decoder levels that keep the token-map resolution shrink their width instead
            width = min(config.min_channels * 2**level, inner_channels)
            dim_out = out_channels if level == 0 and out_channels else width
            mid = inner_channels
        else:
            dim_out = inner_channels if skip_up > level else channels
            dim_out = out_channels if level == 0 and out_channels else dim_out
            mid = max(channels, dim_out)
        self.out_res = QGVAEResidualStack(inner_channels, mid, dim_out, cond_channels, config.num_res_blocks)
        self.out_conv = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.out_channels = dim_out

    def forward(self, x: torch.Tensor, cond: ConditioningPyramid) -> torch.Tensor:
        x = self.in_res(self.in_conv(x), cond(x.shape[-1]))
        if self.inner is not None:
            x = F.avg_pool2d(x, 2) if self.downsample else x  # = bilinear x0.5 on even sizes
            x = self.inner(x, cond)
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False) if self.upsample else x
        return self.out_conv(self.out_res(x, cond(x.shape[-1])))


class QGVAEHourglass(nn.Module):
    """`out_proj(levels(x) + conv(x))`, conditioned in every block on `concat(x, position grid)`."""

    def __init__(
        self, config: QGVAEConfig, in_channels: int, channels: int, out_channels: int, size: int,
        skip_up: int = 0, skip_down: int = 0,
    ):  # fmt: skip
        super().__init__()
        self.num_octaves = config.num_octaves
        self._position_cache: dict[tuple, torch.Tensor] = {}
        cond_channels = in_channels + 4 * config.num_octaves
        self.levels = QGVAEHourglassLevel(
            config, in_channels, channels, size, cond_channels, skip_up=skip_up, skip_down=skip_down,
            out_channels=out_channels,
        )  # fmt: skip
        self.outer_residual = nn.Conv2d(in_channels, self.levels.out_channels, 3, padding=1, bias=False)
        self.out_proj = nn.Conv2d(self.levels.out_channels, out_channels, 3, padding=1, bias=False)

    def position_levels(self, base: int, device: torch.device, dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
        """`size -> [1, 4 * num_octaves, size, size]`: the position grid of a `base`-pixel input resized to `size`
        (as the input channels are), cached on the module (it depends on sizes, device and dtype only)."""

        def level(size: int) -> torch.Tensor:
            key = (base, size, device, dtype)
            if key not in self._position_cache:
                grid = grid_position_encoding(base, self.num_octaves, device, dtype)
                self._position_cache[key] = resize(grid, size, shrink_mode="nearest")
            return self._position_cache[key]

        return level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cond = ConditioningPyramid(x, self.position_levels(x.shape[-1], x.device, x.dtype))
        out = self.levels(x, cond)
        return self.out_proj(out + resize(self.outer_residual(x), out.shape[-1]))


class QGVAETokenProjection(nn.Module):
    """Per-head affine map applied to every token of the head's contiguous group: `[B, C, in] -> [B, C, out]`.

    Head h owns `weight[h] [in, out]` and `bias[h] [out]` (a shared `Conv1d(in, out, 1)` in the reference); all heads
    run as one batched matmul with batch and tokens folded into the rows.
    """

    def __init__(self, num_heads: int, in_features: int, out_features: int):
        super().__init__()
        self.num_heads, self.in_features = num_heads, in_features
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_heads, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        # one matmul per head with batch and tokens folded into the rows: (NH, B * C/NH, in) @ (NH, in, out)
        rows = x.reshape(batch, self.num_heads, tokens // self.num_heads, self.in_features).transpose(0, 1)
        out = torch.baddbmm(self.bias, rows.reshape(self.num_heads, -1, self.in_features), self.weight)
        return out.reshape(self.num_heads, batch, tokens // self.num_heads, -1).transpose(0, 1).reshape(batch, tokens, -1)


class QGVAEEncoder(nn.Module):
    """`[B, ch, H, W]` -> `[B, C, D]`: hourglass to C maps of N pixels (+ pooled 1x1 residual), transpose, heads."""

    def __init__(self, config: QGVAEConfig):
        super().__init__()
        self.token_map_size = config.token_map_size
        self.hourglass = QGVAEHourglass(
            config, config.num_channels, config.min_channels, config.num_tokens, config.image_size,
            skip_up=config.downsample_factor,
        )  # fmt: skip
        self.residual = nn.Conv2d(config.num_channels, config.num_tokens, 1)
        self.projection = QGVAETokenProjection(config.num_heads, config.token_map_size**2, config.codeword_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.hourglass(pixel_values) + resize(self.residual(pixel_values), self.token_map_size)
        return self.projection(maps.flatten(2))  # (B, C, N) -> (B, C, D)


class QGVAEDecoder(nn.Module):
    """`[B, C, D]` -> `[B, ch, H, W]`: heads back to C maps, transpose, hourglass upsampling f times (+ residual)."""

    def __init__(self, config: QGVAEConfig):
        super().__init__()
        self.token_map_size, self.image_size = config.token_map_size, config.image_size
        self.projection = QGVAETokenProjection(config.num_heads, config.codeword_dim, config.token_map_size**2)
        self.hourglass = QGVAEHourglass(
            config, config.num_tokens, config.max_channels, config.num_channels, config.token_map_size,
            skip_down=config.downsample_factor,
        )  # fmt: skip
        self.residual = nn.Conv2d(config.num_tokens, config.num_channels, 1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = latents.shape
        maps = self.projection(latents).reshape(batch, tokens, self.token_map_size, self.token_map_size)
        return self.hourglass(maps) + resize(self.residual(maps), self.image_size)


class QGVAEPreTrainedModel(PreTrainedModel):
    config_class = QGVAEConfig
    config: QGVAEConfig
    base_model_prefix = "qgvae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["QGVAEResidualBlock", "PerTokenQuantizer"]
    _keep_in_fp32_modules = ["quantizer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch-default U(+-1/sqrt(fan_in)) for convs and head maps (as the reference); U(-0.5, 0.5) codebooks."""
        if isinstance(module, (nn.Conv2d, QGVAETokenProjection)):
            fan_in = module.weight[0].numel() if isinstance(module, nn.Conv2d) else module.in_features
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PerTokenQuantizer):
            init.uniform_(module.codebook, -0.5, 0.5)
            init.uniform_(module.global_offset, -0.5, 0.5)
            init.zeros_(module.reset_statistic)
            init.zeros_(module.usage_counts)


class QGVAEModel(ImageTokenizerMixin, QGVAEPreTrainedModel):
    """The Quantised Global Autoencoder: an image in [0, 1] <-> C global token ids.

    `encode` gives token ids, `decode` rebuilds the image from all or the first k tokens, `forward` does both and
    returns the training loss. `compress`/`decompress` turn images into `bytes_per_image`-byte payloads and back.
    """

    def __init__(self, config: QGVAEConfig):
        super().__init__(config)
        self.encoder = QGVAEEncoder(config)
        self.quantizer = PerTokenQuantizer(config.num_tokens, config.codebook_size, config.codeword_dim)
        self.decoder = QGVAEDecoder(config)
        self.post_init()


__all__ = [
    "QGVAEDecoderOutput",
    "QGVAEEncoderOutput",
    "QGVAEModel",
    "QGVAEModelOutput",
    "QGVAEPreTrainedModel",
]
