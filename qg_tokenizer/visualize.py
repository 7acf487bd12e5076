"""Image grids for reconstructions and progressive (prefix) decoding."""

from __future__ import annotations

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
    rows = [pixel_values] + [model.decode(token_ids, num_tokens=k).pixel_values for k in lengths]
    return image_grid(rows)


__all__ = ["image_grid", "prefix_lengths", "progressive_grid"]
