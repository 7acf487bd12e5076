"""Image grids for reconstructions, progressive (prefix) decoding and per-token influence maps (paper Figure 1)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def image_grid(rows: list[torch.Tensor], padding: int = 1) -> Image.Image:
    """A PIL grid with one row per `[B, ch, H, W]` tensor (values clamped to [0, 1]); all rows share B, ch, H, W."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    batch, channels, height, width = rows[0].shape
    canvas = np.ones((len(rows) * (height + padding) + padding, batch * (width + padding) + padding, channels))
    for r, row in enumerate(rows):
        if tuple(row.shape) != (batch, channels, height, width):
            raise ValueError(f"row {r} has shape {list(row.shape)}, expected {[batch, channels, height, width]}")
        images = row.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        for b in range(batch):
            y, x = padding + r * (height + padding), padding + b * (width + padding)
            canvas[y : y + height, x : x + width] = images[b]
    array = (canvas * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode="L" if channels == 1 else "RGB")


def prefix_lengths(num_tokens: int) -> list[int]:
    """1, 2, 4, ... up to and including `num_tokens`."""
    lengths = [2**i for i in range(num_tokens.bit_length()) if 2**i < num_tokens]
    return lengths + [num_tokens]


@torch.no_grad()
def progressive_grid(model, pixel_values: torch.Tensor, lengths: list[int] | None = None) -> Image.Image:
    """Rows: input, then the reconstruction from the first k tokens for each k in `lengths` (default 1, 2, 4, ...)."""
    token_ids = model.encode(pixel_values).token_ids
    lengths = lengths or prefix_lengths(model.config.num_tokens)
    rows = [pixel_values] + [model.decode(token_ids, prefix_length=k).pixel_values for k in lengths]
    return image_grid(rows)



@torch.no_grad()
def token_influence(
    model,
    token_ids: torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """How much each pixel changes when one token's codeword changes: `[B, C, H, W]`, >= 0.

    For each image and token c, token c is replaced by a codeword drawn uniformly from the K - 1 others (the
    rest kept), and the mean over channels and `num_samples` draws of `|decode(perturbed) - decode(token_ids)|`
    is taken. All B * num_samples * C perturbed token sets are decoded as one batch (in chunks of `batch_size`).

    Args:
        model: a QG-VAE (or any tokenizer with `decode(token_ids).pixel_values` and `config.codebook_size`).
        token_ids: `[B, C]` token ids in [0, K).
        num_samples: replacement codewords averaged per token.
        generator: seeds the replacement draws (CPU generator).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    batch, num_tokens = token_ids.shape
    codebook_size = model.config.codebook_size
    base = model.decode(token_ids).pixel_values  # (B, ch, H, W)
    shift = torch.randint(1, codebook_size, (batch, num_samples, num_tokens), generator=generator)
    replaced = (token_ids[:, None, :] + shift.to(token_ids.device)) % codebook_size  # (B, S, C), never the original
    diagonal = torch.eye(num_tokens, dtype=torch.bool, device=token_ids.device)
    # perturbed[b, s, c] is token_ids[b] with token c replaced: (B, S, C, C)
    perturbed = torch.where(diagonal, replaced[:, :, None, :], token_ids[:, None, None, :])
    decoded = torch.cat([model.decode(chunk).pixel_values for chunk in perturbed.flatten(0, 2).split(batch_size)])
    decoded = decoded.unflatten(0, (batch, num_samples, num_tokens))  # (B, S, C, ch, H, W)
    return (decoded - base[:, None, None]).abs().mean(dim=(1, 3))


def influence_coverage(influence: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """`[B, C]` fraction of pixels whose change in `token_influence` output `[B, C, H, W]` exceeds `threshold`.

    Close to 1 for global tokens (QG-VAE); about 1 / (number of patches) for a patch tokenizer.
    """
    return (influence > threshold).flatten(2).float().mean(-1)


def token_colors(num_tokens: int) -> torch.Tensor:
    """`[C, 3]` RGB in [0, 1]: fully saturated hues evenly spaced around the colour wheel, one per token."""
    hue = torch.arange(num_tokens, dtype=torch.float32)[:, None] / num_tokens
    offsets = torch.tensor([0.0, 4.0, 2.0])  # red, green, blue sectors of the HSV hexcone
    return ((6 * hue + offsets) % 6 - 3).abs().sub(1).clamp(0, 1)


@torch.no_grad()
def influence_grid(
    model,
    pixel_values: torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    columns: int | None = None,
    batch_size: int = 64,
) -> Image.Image:
    """Influence map of one image `[1, ch, H, W]` (or `[ch, H, W]`) in [0, 1], coloured per token as in Figure 1.

    Panels, left to right and top to bottom: the input, all tokens at once (each pixel in the colour of the token
    that changes it most, brightness by that change relative to the largest change of any token), then one panel per
    token c in its colour, brightness by its change relative to its own largest change. Unused panels are white.
    """
    pixel_values = pixel_values[None] if pixel_values.ndim == 3 else pixel_values
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"pixel_values must be one image [1, ch, H, W], got shape {list(pixel_values.shape)}")
    influence = token_influence(model, model.encode(pixel_values).token_ids, num_samples, generator, batch_size)[0]
    colors = token_colors(influence.shape[0]).to(influence.device)[:, :, None, None]  # (C, 3, 1, 1)
    per_token = colors * (influence / influence.flatten(1).amax(1).clamp_min(1e-12)[:, None, None])[:, None]
    strongest, dominant = influence.max(0)  # (H, W) each
    overview = colors[dominant, :, 0, 0].permute(2, 0, 1) * (strongest / strongest.max().clamp_min(1e-12))
    panels = torch.cat((pixel_values.clamp(0, 1).expand(-1, 3, -1, -1), overview[None], per_token))  # (C+2, 3, H, W)
    columns = columns or math.ceil(math.sqrt(panels.shape[0]))
    blank = torch.ones((-len(panels)) % columns, *panels.shape[1:], device=panels.device)
    return image_grid(list(torch.cat((panels, blank)).split(columns)))


__all__ = [
    "image_grid",
    "influence_coverage",
    "influence_grid",
    "prefix_lengths",
    "progressive_grid",
    "token_colors",
    "token_influence",
]
