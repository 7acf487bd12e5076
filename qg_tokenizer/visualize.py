"""Image grids for reconstructions, progressive (prefix) decoding and per-token influence maps (paper Figure 1).

A grid is a PIL image whose cells are the images themselves, each image pixel an s x s block (nearest neighbour, so
a cell taken every s-th pixel is the image exactly), with row labels in a left margin and captions above the cells
where given. Its layout travels in `image.info` as text, which `save_grid(image, path)` writes to a PNG as text
chunks (and `PIL.Image.open` reads back into `info`):

    row_labels   JSON list: one label per row, top to bottom (only when the rows are labelled)
    cell_labels  JSON list of rows of cell captions, "" for none (only when the cells are captioned)
    layout       JSON {"rows", "columns", "scale": s, "cell_size": [w, h], "origin": [x, y], "step": [dx, dy]}:
                 cell (r, c) covers x in [x + c dx, x + c dx + w) and y in [y + r dy, y + r dy + h), in pixels
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .codec import payload_num_bytes

READABLE_WIDTH = 640  # px: the least width of the cells of the grids this package draws for people to read
FONT_SIZE = 16  # px, at scale 1


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (with FreeType: scalable)
    except TypeError:
        return ImageFont.load_default()


def _text_width(font, texts) -> int:
    return max((font.getbbox(text)[2] for text in texts if text), default=0)


def _check_labels(name: str, labels, expected: int) -> None:
    if isinstance(labels, str) or len(labels) != expected or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{name} must be a list of {expected} strings, got {labels!r}")


def image_grid(
    rows: list[torch.Tensor],
    padding: int = 1,
    *,
    row_labels: list[str] | None = None,
    cell_labels: list[list[str]] | None = None,
    scale: int = 1,
    min_width: int = 0,
) -> Image.Image:
    """A PIL grid with one row per `[B, ch, H, W]` tensor (values clamped to [0, 1]); all rows share B, ch, H, W.

    Args:
        rows: the images of each row; one channel gives an "L" image, three an "RGB" one.
        padding: white image pixels around every cell (upscaled with the images).
        row_labels: one text per row, drawn in a margin to its left.
        cell_labels: one caption per cell (`len(rows)` lists of B texts, "" for none), drawn above the cell.
        scale: enlarge the whole picture this many times: cells, padding and text (16 px at scale 1).
        min_width: at scale 1 the images are upscaled by the least integer that makes the cells (the picture
            without its label margin) at least this many pixels wide; the upscale then grows until every caption
            fits over its cell. With 0 and no captions the images keep their size (one pixel per image pixel).

    Returns the grid, with its layout in `info` (see the module docstring), saved with it as PNG text chunks.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    batch, channels, height, width = rows[0].shape
    for r, row in enumerate(rows):
        if tuple(row.shape) != (batch, channels, height, width):
            raise ValueError(f"row {r} has shape {list(row.shape)}, expected {[batch, channels, height, width]}")
    if row_labels is not None:
        _check_labels("row_labels", row_labels, len(rows))
    if cell_labels is not None:
        if isinstance(cell_labels, str) or len(cell_labels) != len(rows):
            raise ValueError(f"cell_labels must be {len(rows)} lists of {batch} strings, got {cell_labels!r}")
        for r, captions in enumerate(cell_labels):
            _check_labels(f"cell_labels[{r}]", captions, batch)
    captions = [text for row in cell_labels or [] for text in row]

    # the upscale s: `scale` times the least that makes the cells min_width wide, then raised until captions fit
    s = scale * max(1, math.ceil(min_width / (batch * (width + padding) + padding)))
    font, gap = _font(FONT_SIZE * scale), FONT_SIZE * scale // 2  # gap: px between text and cells
    if captions:
        s = max(s, math.ceil((_text_width(font, captions) + gap) / width))
    margin = _text_width(font, row_labels) + 2 * gap if row_labels else 0  # px left of the cells
    caption_height = font.getbbox("Ag")[3] + gap // 2 if cell_labels else 0
    pad, cell_w, cell_h = padding * s, width * s, height * s
    step_x, step_y = cell_w + pad, caption_height + cell_h + pad
    origin_x, origin_y = margin + pad, pad + caption_height

    canvas = np.full((pad + len(rows) * step_y, origin_x + batch * step_x, channels), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        images = (row.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images = images.repeat(s, axis=1).repeat(s, axis=2)  # (B, H s, W s, ch): nearest neighbour
        for b in range(batch):
            y, x = origin_y + r * step_y, origin_x + b * step_x
            canvas[y : y + cell_h, x : x + cell_w] = images[b]
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas, mode="L" if channels == 1 else "RGB")

    draw, ink = ImageDraw.Draw(image), 0 if channels == 1 else (0, 0, 0)
    for r, label in enumerate(row_labels or []):
        top, bottom = font.getbbox(label)[1::2]
        draw.text((gap, origin_y + r * step_y + (cell_h - top - bottom) // 2), label, fill=ink, font=font)
    for r, row_captions in enumerate(cell_labels or []):
        for b, caption in enumerate(row_captions):
            left, _, right, bottom = font.getbbox(caption)
            x = origin_x + b * step_x + (cell_w - left - right) // 2
            draw.text((x, origin_y + r * step_y - gap // 2 - bottom), caption, fill=ink, font=font)

    layout = {
        "rows": len(rows), "columns": batch, "scale": s, "cell_size": [cell_w, cell_h],
        "origin": [origin_x, origin_y], "step": [step_x, step_y],
    }  # fmt: skip
    text = {"layout": layout}
    if row_labels is not None:
        text["row_labels"] = list(row_labels)
    if cell_labels is not None:
        text["cell_labels"] = [list(captions) for captions in cell_labels]
    for key, value in text.items():
        image.info[key] = json.dumps(value)
    return image


def save_grid(image: Image.Image, path, **save_kwargs) -> None:
    """Save a grid of this module; as PNG with its labels and layout (`image.info`) as text chunks."""
    format_ = save_kwargs.pop("format", None) or Image.registered_extensions().get(Path(path).suffix.lower())
    if format_ == "PNG":
        pnginfo = PngInfo()
        for key in ("layout", "row_labels", "cell_labels"):
            if key in image.info:
                pnginfo.add_text(key, image.info[key])
        save_kwargs["pnginfo"] = pnginfo
    image.save(path, format=format_, **save_kwargs)


def prefix_lengths(num_tokens: int) -> list[int]:
    """1, 2, 4, ... up to and including `num_tokens`."""
    lengths = [2**i for i in range(num_tokens.bit_length()) if 2**i < num_tokens]
    return lengths + [num_tokens]


def prefix_label(prefix_length: int, num_tokens: int, codebook_size: int) -> str:
    """The label of decoding from the first k of C tokens: "first k tokens (B bytes)", or "all C tokens (B bytes)"
    when k = C, B the packed payload of k tokens (`codec.payload_num_bytes`)."""
    num_bytes = payload_num_bytes(prefix_length, codebook_size)
    if prefix_length == num_tokens:
        count = f"all {num_tokens} token{'s' if num_tokens != 1 else ''}"
    else:
        count = f"first {prefix_length} token{'s' if prefix_length != 1 else ''}"
    return f"{count} ({num_bytes} byte{'s' if num_bytes != 1 else ''})"


@torch.no_grad()
def progressive_grid(
    model, pixel_values: torch.Tensor, lengths: list[int] | None = None, *, scale: int = 1,
    min_width: int = READABLE_WIDTH,
) -> Image.Image:  # fmt: skip
    """Rows: input, then the reconstruction from the first k tokens for each k in `lengths` (default 1, 2, 4, ...),
    labelled "input", "first k tokens (B bytes)" / "all C tokens (B bytes)"; `scale`, `min_width` as `image_grid`.

    `pixel_values`: `[B, ch, H, W]` in [0, 1], one column each.
    """
    token_ids = model.encode(pixel_values).token_ids
    num_tokens, codebook_size = model.config.num_tokens, model.config.codebook_size
    lengths = lengths or prefix_lengths(num_tokens)
    rows = [pixel_values] + [model.decode(token_ids, prefix_length=k).pixel_values for k in lengths]
    labels = ["input"] + [prefix_label(k, num_tokens, codebook_size) for k in lengths]
    return image_grid(rows, row_labels=labels, scale=scale, min_width=min_width)


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
    *,
    scale: int = 1,
    min_width: int = READABLE_WIDTH,
) -> Image.Image:
    """Influence map of one image `[1, ch, H, W]` (or `[ch, H, W]`) in [0, 1], coloured per token as in Figure 1.

    Panels, left to right and top to bottom, each captioned: "input"; "all tokens" (each pixel in the colour of the
    token that changes it most, brightness by that change relative to the largest change of any token); then
    "token c" for each token c in its colour, brightness by its change relative to its own largest change. Unused
    panels are white and uncaptioned. `columns` panels a row (default ceil(sqrt(C + 2))); `scale`, `min_width` as
    `image_grid`.
    """
    pixel_values = pixel_values[None] if pixel_values.ndim == 3 else pixel_values
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"pixel_values must be one image [1, ch, H, W], got shape {list(pixel_values.shape)}")
    influence = token_influence(model, model.encode(pixel_values).token_ids, num_samples, generator, batch_size)[0]
    num_tokens = influence.shape[0]
    colors = token_colors(num_tokens).to(influence.device)[:, :, None, None]  # (C, 3, 1, 1)
    per_token = colors * (influence / influence.flatten(1).amax(1).clamp_min(1e-12)[:, None, None])[:, None]
    strongest, dominant = influence.max(0)  # (H, W) each
    overview = colors[dominant, :, 0, 0].permute(2, 0, 1) * (strongest / strongest.max().clamp_min(1e-12))
    panels = torch.cat((pixel_values.clamp(0, 1).expand(-1, 3, -1, -1), overview[None], per_token))  # (C+2, 3, H, W)
    columns = columns or math.ceil(math.sqrt(panels.shape[0]))
    blank = torch.ones((-len(panels)) % columns, *panels.shape[1:], device=panels.device)
    captions = ["input", "all tokens"] + [f"token {c}" for c in range(num_tokens)] + [""] * len(blank)
    return image_grid(
        list(torch.cat((panels, blank)).split(columns)),
        cell_labels=[captions[i : i + columns] for i in range(0, len(captions), columns)],
        scale=scale,
        min_width=min_width,
    )


__all__ = [
    "FONT_SIZE",
    "READABLE_WIDTH",
    "image_grid",
    "influence_coverage",
    "influence_grid",
    "prefix_label",
    "prefix_lengths",
    "progressive_grid",
    "token_colors",
    "token_influence",
]
