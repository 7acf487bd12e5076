"""QG-VAE: hourglass encoder -> C global token maps -> per-head affine map -> per-token VQ -> mirrored decoder.

Read top to bottom: the outputs, the building blocks (position encoding, conditioned residual blocks, the hourglass,
the per-head token projection), the encoder and decoder, then `QGVAEModel` with the whole public contract (`encode`,
`decode`, `forward`, codebook upkeep, `compress`/`decompress`). The patch VQ-VAE baseline subclasses `QGVAEModel`
and only builds other modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .codec import CodecError, fingerprint, read_header, resolve_prefix_length
from .configuration_qgvae import QGVAEConfig
from .entropy_coding import PriorCoder, read_token_ids, write_streams
from .quantizer_qgvae import PerTokenQuantizer


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
        hidden_states: with `output_hidden_states`, the encoder output `z` `[B, C, D]` before quantisation and the
            decoder's input latents `[B, C, D]` (codewords + global offset, dropped tokens zeroed).
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    token_ids: torch.LongTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    token_mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def _is_tracing() -> bool:
    """True under `torch.compile` or `torch.export`, where value checks would be data-dependent branches."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


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
        if shrink_mode == "area" and x.shape[-1] % size == 0:  # the same average, by the faster pooling kernel
            return F.avg_pool2d(x, x.shape[-1] // size)
        return F.interpolate(x, size=(size, size), mode=shrink_mode)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def preferred_layout(x: torch.Tensor) -> torch.Tensor:
    """`x [B, C, h, w]` in the layout the hourglasses compute in: channels_last on CPU, where the oneDNN convolutions
    and the bilinear and pooling kernels run several times faster in NHWC than in NCHW (see
    `benchmarks/bench_model.py`); unchanged elsewhere (not measured there; CUDA's GroupNorm has no NHWC kernel).

    `contiguous(memory_format=...)` keeps the strides of a single-channel NCHW tensor (it is contiguous in both
    layouts), but oneDNN takes the layout of its outputs from the strides: such a tensor is copied into NHWC strides.
    """
    if x.device.type != "cpu":
        return x
    if x.stride(1) != 1:
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    return x.contiguous(memory_format=torch.channels_last)


def pooled_conv_weight(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """`[o, i, 3, 3]` -> `[o, i, factor + 2, factor + 2]`: the kernel `k` with `conv2d(x, k, stride=factor, padding=1)
    == avg_pool2d(conv2d(x, weight, padding=1), factor)` (the 3x3 kernel averaged over the factor x factor window),
    which computes only the pixels the pooling keeps."""
    return F.avg_pool2d(F.pad(weight, (factor - 1,) * 4), factor, stride=1)


class ConditioningPyramid:
    """The hourglass conditioning `concat(x, position grid)` at every resolution, its two parts kept apart.

    `pyramid(size)` gives `(inputs [B, n, size, size], position [1, P, size, size] or None)`: the input resized
    (once per call and size) and the input-independent position channels, which `position_levels(size)` computes once
    per model (see [`QGVAEHourglass.position_levels`]). The blocks project the two parts separately (see
    [`QGVAEResidualBlock`]), so the `[B, n + P, size, size]` concatenation is never built.
    """

    def __init__(self, x: torch.Tensor, position_levels: Callable[[int], torch.Tensor] | None = None):
        self.x, self.position_levels = x, position_levels
        self.levels: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if size not in self.levels:
            position = None if self.position_levels is None else self.position_levels(size)
            self.levels[size] = (resize(self.x, size, shrink_mode="nearest"), position)
        return self.levels[size]


class QGVAEResidualBlock(GradientCheckpointingLayer):
    """Imagen-style residual block with the conditioning injected: `conv(SiLU(GN(conv(SiLU(GN(x + W c)))))) + W' x`.

    The conditioning `c = concat(inputs, position)` comes in its two parts; `W c` is computed as
    `W[:, :n] inputs + W[:, n:] position` (a 1x1 convolution of a concatenation is the sum of the convolutions of its
    parts), the position part at batch 1. `cond_proj` keeps the reference's single `[in, n + P, 1, 1]` weight.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, cond_channels: int):
        super().__init__()
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.cond_proj = nn.Conv2d(cond_channels, in_channels, 1, bias=False)
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.norm2 = group_norm(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, inputs: torch.Tensor, position: torch.Tensor | None = None, downsample: bool = False
    ) -> torch.Tensor:
        """`x [B, in, h, w]`, `inputs [B, n, h, w]`, `position [1, P, h, w]` (or None when P = 0) -> `[B, out, h, w]`,
        or `avg_pool2d(., 2)` of it, `[B, out, h/2, w/2]`, with `downsample`."""
        weight, n = self.cond_proj.weight.flatten(1), inputs.shape[1]  # (in, n + P)
        # W c as matmuls over the pixels of the channels-last layout, (B, h, w, n) @ (n, in), with x and the batch-1
        # position part added in place there: its backward then sums a contiguous gradient over the batch (summing a
        # channels-last [B, in, h, w] over B is many times slower)
        h = F.linear(inputs.permute(0, 2, 3, 1), weight[:, :n]).add_(x.permute(0, 2, 3, 1))  # (B, h, w, in)
        if position is not None:
            h = h.add_(F.linear(position.permute(0, 2, 3, 1), weight[:, n:]))  # += (1, h, w, in)
        h = F.silu(self.norm1(h.permute(0, 3, 1, 2)))
        h = F.silu(self.norm2(self.conv1(h)))
        if downsample:
            # the 2x2 average folded into the convolutions (it commutes with the 1x1 skip)
            kernel = pooled_conv_weight(self.conv2.weight, 2)
            return F.conv2d(h, kernel, self.conv2.bias, stride=2, padding=1).add_(self.skip(F.avg_pool2d(x, 2)))
        return self.conv2(h).add_(self.skip(x))


class QGVAEResidualStack(nn.Module):
    """`num_blocks` residual blocks: in -> mid -> ... -> out channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, cond_channels: int, num_blocks: int):
        super().__init__()
        widths = [in_channels] + [mid_channels] * (num_blocks - 1) + [out_channels]
        self.blocks = nn.ModuleList(
            QGVAEResidualBlock(widths[i], mid_channels, widths[i + 1], cond_channels) for i in range(num_blocks)
        )

    def forward(
        self, x: torch.Tensor, inputs: torch.Tensor, position: torch.Tensor | None = None, downsample: bool = False
    ) -> torch.Tensor:
        """See [`QGVAEResidualBlock.forward`]; with `downsample` the last block also halves the resolution."""
        for i, block in enumerate(self.blocks):
            x = block(x, inputs, position, downsample and i == len(self.blocks) - 1)
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
        # the x0.5 average pooling (= bilinear x0.5 on even sizes) happens inside the last block of in_res
        x = self.in_res(self.in_conv(x), *cond(x.shape[-1]), downsample=self.inner is not None and self.downsample)
        if self.inner is not None:
            x = self.inner(x, cond)
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False) if self.upsample else x
        return self.out_conv(self.out_res(x, *cond(x.shape[-1])))


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
            if key in self._position_cache:
                return self._position_cache[key]
            grid = grid_position_encoding(base, self.num_octaves, device, dtype)
            grid = preferred_layout(resize(grid, size, shrink_mode="nearest"))
            if not torch.compiler.is_compiling():  # a traced graph computes the grid; it must not cache a traced tensor
                self._position_cache[key] = grid
            return grid

        return level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in, s, s]` -> `[B, out, s', s']`, computed (and returned) in the [`preferred_layout`]."""
        x = preferred_layout(x)
        position = self.position_levels(x.shape[-1], x.device, x.dtype) if self.num_octaves else None
        cond = ConditioningPyramid(x, position)
        out = self.levels(x, cond)
        if out.shape[-1] < x.shape[-1]:  # the encoder's area shrink by 2^f folded into the outer residual convolution
            factor = x.shape[-1] // out.shape[-1]
            residual = F.conv2d(x, pooled_conv_weight(self.outer_residual.weight, factor), stride=factor, padding=1)
        else:
            residual = resize(self.outer_residual(x), out.shape[-1])
        return self.out_proj(out + residual)


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
        out = out.reshape(self.num_heads, batch, tokens // self.num_heads, -1)  # (NH, B, C/NH, out)
        return out.transpose(0, 1).reshape(batch, tokens, -1)


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
        pixel_values = preferred_layout(pixel_values)
        # the 1x1 residual commutes with the (area) resize: pooling the ch input channels is cheaper than C maps
        maps = self.hourglass(pixel_values) + self.residual(resize(pixel_values, self.token_map_size))
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
        maps = preferred_layout(maps)
        return (self.hourglass(maps) + resize(self.residual(maps), self.image_size)).contiguous()


class QGVAEPreTrainedModel(PreTrainedModel):
    config_class = QGVAEConfig
    config: QGVAEConfig
    base_model_prefix = "qgvae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["QGVAEResidualBlock", "PerTokenQuantizer"]
    _keep_in_fp32_modules = ["quantizer"]
    _keep_in_fp32_modules_strict = ["quantizer"]  # bf16 loads too: the codebook fingerprint stays the fp32 one

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


class QGVAEModel(QGVAEPreTrainedModel):
    """The Quantised Global Autoencoder: an image in [0, 1] <-> C global token ids.

    `encode` gives token ids, `decode` rebuilds the image from all or the first k tokens, `forward` does both and
    returns the training loss. `compress`/`decompress` turn images into `bytes_per_image`-byte payloads and back.
    The contract needs three modules: `encoder` (`[B, ch, H, W]` -> `[B, C, D]`), `quantizer` (a
    [`PerTokenQuantizer`] with C codebooks, one per token, or one codebook shared by all C tokens) and `decoder`
    (`[B, C, D]` -> `[B, ch, H, W]`); a subclass (the patch VQ-VAE) builds others and keeps all of it.
    """

    def __init__(self, config: QGVAEConfig):
        super().__init__(config)
        self.encoder = QGVAEEncoder(config)
        self.quantizer = PerTokenQuantizer(config.num_tokens, config.codebook_size, config.codeword_dim)
        self.decoder = QGVAEDecoder(config)
        self.post_init()

    # --------------------------------------------------------------------------------------------------- validation
    def _check_pixel_values(self, pixel_values: torch.Tensor, check_values: bool = True) -> None:
        """Type, dtype and shape; with `check_values` also finite values in [0, 1] (a host sync: the public entry
        points `encode`/`compress` check values, `forward` in the training hot path and compiled or exported graphs
        do not)."""
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
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (shape[0] == 0): give at least one image")
        if not check_values or _is_tracing():
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
        if token_ids.shape[0] == 0:
            raise ValueError("token_ids is an empty batch (shape[0] == 0): give at least one image's tokens")
        if _is_tracing():
            return
        low, high = token_ids.long().aminmax()  # in int64: uint8 ids with K = 256 would wrap in their own dtype
        if low < 0 or high >= cfg.codebook_size:
            raise ValueError(
                f"token_ids must be in [0, {cfg.codebook_size}), got values in [{low.item()}, {high.item()}]"
            )

    def _token_mask(
        self, prefix_length: int | torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        """`[B, C]` float mask keeping the first `prefix_length` tokens (int, or `[B]` per image), or None for all."""
        if prefix_length is None:
            return None
        c = self.config.num_tokens
        counts = torch.as_tensor(prefix_length, device=device)
        wrong_dtype = counts.is_floating_point() or counts.dtype == torch.bool  # True is not a length of 1
        if wrong_dtype or counts.ndim > 1 or (counts.ndim == 1 and counts.shape[0] != batch):
            raise ValueError(f"prefix_length must be an int or a [batch] integer tensor, got {prefix_length!r}")
        if not _is_tracing() and (counts.min() < 1 or counts.max() > c):
            raise ValueError(f"prefix_length must be in [1, {c}], got {prefix_length!r}")
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
        """`[B, ch, H, W]` in [0, 1] -> token ids `[B, C]` (+ quantized latents `[B, C, D]` and VQ losses).

        Any float dtype is accepted: the pixels are cast to the encoder's parameter dtype (a bf16/fp16 model encodes
        the processor's float32 output, a float32 model encodes float64 pixels); the quantizer computes in float32.

        Like the encoders of transformers and diffusers, `encode` follows the caller's grad mode: with grad enabled
        it records the graph through the encoder (`quantized` carries the straight-through gradient), which for a
        large batch costs several times the memory of the pass alone. The token ids are not differentiable: to
        tokenise, call it under `torch.inference_mode()` (or `torch.no_grad()`), as `compress` and
        `qg_tokenizer.tokenize.encode_images` do.
        """
        self._check_pixel_values(pixel_values)
        output = self._encode(pixel_values)
        return output if return_dict else output.to_tuple()

    def _encode(self, pixel_values: torch.Tensor) -> QGVAEEncoderOutput:
        """`encode` without the value checks (no host sync)."""
        return self._quantize(self.encoder(self._encoder_input(pixel_values)))

    def _encoder_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pixels in the encoder's parameter dtype (a no-op under autocast, where the parameters stay float32)."""
        return pixel_values.to(next(self.encoder.parameters()).dtype)

    def _quantize(self, z: torch.Tensor) -> QGVAEEncoderOutput:
        """Encoder output `[B, C, D]` -> the nearest codewords, their ids and the VQ losses."""
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
        """`[B, C, D]` codewords (+ global offset added here; dropped tokens zeroed after it) -> `[B, ch, H, W]` in
        the decoder's parameter dtype."""
        return self.decoder(self._decoder_latents(quantized, token_mask))

    def _decoder_latents(self, quantized: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """`[B, C, D]` codewords -> the decoder's input: + global offset, dropped tokens zeroed, decoder dtype."""
        latents = quantized + self.quantizer.global_offset.to(quantized.dtype)
        if token_mask is not None:
            latents = latents * token_mask.to(latents.dtype).unsqueeze(-1)
        return latents.to(next(self.decoder.parameters()).dtype)

    def decode(
        self,
        token_ids: torch.Tensor,
        prefix_length: int | torch.Tensor | None = None,
        return_dict: bool = True,
        num_tokens: int | torch.Tensor | None = None,
    ) -> QGVAEDecoderOutput | tuple:
        """Token ids `[B, C]` -> image `[B, ch, H, W]` in the decoder's parameter dtype (whatever the quantizer's);
        `prefix_length=k` (an int or `[B]`) decodes from the first k tokens only. `num_tokens` is the deprecated name
        of `prefix_length`."""
        prefix_length = resolve_prefix_length(prefix_length, num_tokens)
        self._check_token_ids(token_ids)
        mask = self._token_mask(prefix_length, token_ids.shape[0], token_ids.device)
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
        self,
        pixel_values: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> QGVAEModelOutput | tuple:
        """Encode, quantise and decode `[B, ch, H, W]` in [0, 1]; returns the reconstruction and training loss.

        In training mode the ordering regulariser drops token suffixes (`token_dropout_prob`) unless `token_mask`
        `[B, C]` is given. `output_hidden_states` adds the encoder output and the decoder's input latents.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        self._check_pixel_values(pixel_values, check_values=False)
        z = self.encoder(self._encoder_input(pixel_values))  # (B, C, D)
        encoded = self._quantize(z)
        if token_mask is None and self.training and self.config.token_dropout_prob > 0:
            token_mask = self.token_dropout_mask(pixel_values.shape[0], pixel_values.device)
        latents = self._decoder_latents(encoded.quantized, token_mask)
        reconstruction = self.decoder(latents)
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
            hidden_states=(z, latents) if output_hidden_states else None,
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
    def compress(
        self,
        pixel_values: torch.Tensor,
        prefix_length: int | None = None,
        num_tokens: int | None = None,
        *,
        prior: PreTrainedModel | None = None,
        max_bytes: int | None = None,
        target_psnr: float | None = None,
    ) -> list[bytes]:
        """`[B, ch, H, W]` in [0, 1] -> one byte stream per image (see `codec.py` for the format).

        Args:
            prefix_length: k, keep the first k tokens, all C by default (`num_tokens` is its deprecated name); the
                most that `max_bytes` and `target_psnr` keep.
            prior: a `QGPriorForCausalLM` trained on this model's tokens: the ids are entropy-coded with it (format
                version 3, see `entropy_coding.py`), an image the coder cannot code exactly or shorter at fixed width
                (format version 2). `decompress` then needs the same prior.
            max_bytes: per image, the longest prefix whose whole stream (header included) fits this many bytes.
            target_psnr: per image, the shortest prefix whose decoded image reaches this PSNR (dB, against
                `pixel_values`); an image that does not reach it keeps the whole prefix.

        Raises:
            RuntimeError: the encoder gave NaN or Inf latents (non-finite weights), whose token ids mean nothing.
            CodecError: `max_bytes` is below the smallest stream an image can have (one token).
        """
        prefix_length = resolve_prefix_length(prefix_length, num_tokens)
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if target_psnr is not None and not (isinstance(target_psnr, (int, float)) and math.isfinite(target_psnr)):
            raise ValueError(f"target_psnr must be a finite number of dB, got {target_psnr!r}")
        cfg = self.config
        limit = cfg.num_tokens if prefix_length is None else prefix_length
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"prefix_length must be an int, got {type(limit).__name__}")
        if not 1 <= limit <= cfg.num_tokens:
            raise CodecError(f"prefix_length must be in [1, {cfg.num_tokens}], got {prefix_length!r}")
        coder = None if prior is None else PriorCoder(prior, cfg.num_tokens, cfg.codebook_size)
        encoded = self.encode(pixel_values)
        self._check_finite(encoded.quantized, "the encoded latents")
        lengths = torch.full((len(pixel_values),), limit, dtype=torch.long)
        if target_psnr is not None:
            lengths = self._shortest_prefix_reaching(pixel_values, encoded.token_ids, float(target_psnr), limit)
        return write_streams(
            encoded.token_ids.cpu().numpy(), lengths.numpy(), cfg.codebook_size, self.codebook_fingerprint(), coder,
            max_bytes,
        )  # fmt: skip

    def _shortest_prefix_reaching(
        self, pixel_values: torch.Tensor, token_ids: torch.Tensor, target_psnr: float, limit: int
    ) -> torch.Tensor:
        """`[B]` the shortest prefix length (<= limit) whose decoded image reaches `target_psnr` dB, else `limit`:
        each length is decoded for the images not yet there."""
        lengths = torch.full((len(token_ids),), limit, dtype=torch.long)
        todo = torch.arange(len(token_ids))
        target = pixel_values.float().clamp(0, 1)
        for kept in range(1, limit):
            if not len(todo):
                break
            decoded = self.decode(token_ids[todo], prefix_length=kept).pixel_values.float().clamp(0, 1)
            mse = (decoded - target[todo]).pow(2).flatten(1).mean(1).cpu()
            reached = 10 * torch.log10(1 / mse.clamp(min=1e-12)) >= target_psnr
            lengths[todo[reached]] = kept
            todo = todo[~reached]
        return lengths

    @torch.no_grad()
    def decompress(
        self, streams: Iterable[bytes], prior: PreTrainedModel | None = None, prefix_length: int | None = None
    ) -> torch.Tensor:
        """Byte streams from `compress` (possibly truncated to a prefix) -> images `[B, ch, H, W]` (not clamped), in
        the decoder's parameter dtype. Entropy-coded streams need `prior`, the one they were coded with;
        `prefix_length` decodes at most the first k tokens of each stream (a coarser image).

        Raises:
            TypeError: `streams` is one stream (`bytes`) rather than a list of them, or holds something else.
            ValueError: `streams` is empty (as `encode`/`decode` reject an empty batch), or a stream is invalid, was
                made by another model, or is entropy-coded and `prior` is missing or another prior (a `CodecError`,
                checked for every stream before any is decoded).
            RuntimeError: the decoder gave NaN or Inf pixels (non-finite weights), rather than returning them.
        """
        if isinstance(streams, (bytes, bytearray, memoryview, str)):
            raise TypeError(
                f"streams must be a list of byte streams, got {type(streams).__name__} (wrap one stream in a list)"
            )
        streams = list(streams)
        if not streams:
            raise ValueError("streams is an empty list: give at least one byte stream")
        cfg = self.config
        if prefix_length is not None and (isinstance(prefix_length, bool) or not isinstance(prefix_length, int)
                                          or prefix_length < 1):  # fmt: skip
            raise ValueError(f"prefix_length must be a positive int, got {prefix_length!r}")
        model_fingerprint = self.codebook_fingerprint()
        headers = [read_header(s, cfg.num_tokens, cfg.codebook_size, model_fingerprint) for s in streams]
        coded = any(header.prior_fingerprint is not None for header in headers)
        coder = PriorCoder(prior, cfg.num_tokens, cfg.codebook_size) if coded and prior is not None else None
        token_ids, lengths = read_token_ids(headers, cfg.num_tokens, coder, prefix_length)
        device = self.quantizer.codebook.device
        kept = torch.tensor(lengths, device=device)
        pixel_values = self.decode(torch.from_numpy(token_ids).to(device), prefix_length=kept).pixel_values
        self._check_finite(pixel_values, "the decoder's output")
        return pixel_values

    def non_finite_parameters(self) -> list[str]:
        """Names of the parameters that hold NaN or Inf (a corrupt checkpoint); empty for a sound model."""
        return [name for name, parameter in self.named_parameters() if not torch.isfinite(parameter).all()]

    def _check_finite(self, values: torch.Tensor, what: str) -> None:
        """Raise if `values` has NaN or Inf, naming the model's first non-finite parameters (a host sync: for the
        eager entry points `compress`/`decompress` only, not `forward` or traced graphs)."""
        if _is_tracing() or torch.isfinite(values).all():
            return
        bad = self.non_finite_parameters()
        if bad:
            more = ", ..." if len(bad) > 3 else ""
            raise RuntimeError(
                f"NaN or Inf in {what}: the model has non-finite (corrupt) parameters {', '.join(bad[:3])}{more}"
            )
        raise RuntimeError(
            f"NaN or Inf in {what}, though the parameters are finite: an activation overflowed in {values.dtype} "
            "(try float32)"
        )


__all__ = [
    "QGVAEDecoderOutput",
    "QGVAEEncoderOutput",
    "QGVAEModel",
    "QGVAEModelOutput",
    "QGVAEPreTrainedModel",
]
