"""JPEG and WebP (Pillow) at a fixed byte budget per image: the non-learned baselines of the equal-bytes comparison.

    python benchmarks/image_codecs.py [--quick] [--photos PATH] [--output benchmarks/results/image_codecs.json]

Runs on the MNIST test digits (the last 1,000 of the packaged 10k, budget 18 bytes = QG-VAE "mnist-cpu") and the
photo_patches32 test split (budget 72 bytes = QG-VAE "photos32-cpu"); `--quick` takes the first 100 images of each.

Per image and codec, every setting (JPEG: Huffman `optimize` off/on x chroma subsampling 4:4:4/4:2:0 for colour;
WebP: lossy, `method=6`) is tried at every scale in `SCALES` (shrink with Lanczos, encode, decode, upscale with
bicubic; scale 1 encodes the image as it is). For each (setting, scale) the largest quality whose output fits the
budget is found by binary search (size is taken to be non-decreasing in quality); the image then keeps the candidate
with the best PSNR. "direct" allows scale 1 only, "resized" any scale. PSNR/SSIM (`qg_tokenizer.metrics`) are averaged
over the images for which some candidate fits, and `fraction_fit` says how many those are.

Two byte accountings, reported separately:
- "file": the whole file Pillow writes, as a user would store it.
- "payload": header-stripped, clearly a lower bound that favours the codecs; it counts only what a decoder that knows
  the image size and the fixed header layout could not rebuild, plus `SIDE_INFO_BYTES` for quality, subsampling and
  scale. JPEG: the entropy-coded scan (between the SOS header and EOI), standard Huffman tables only (`optimize` off;
  everything else in the file follows from quality, subsampling, size and mode). WebP: the file minus the RIFF/VP8
  chunk headers and the keyframe start code and dimensions (`WEBP_REBUILT_BYTES`). Every chosen payload is rebuilt
  into the exact original file from those settings alone (`rebuild_file`), so the accounting is checked per image.
  Our models' byte counts are payloads too (their 20-byte stream header is not counted).

Importable as `image_codecs` (a file named `codecs.py` would be shadowed by the standard library's `codecs`).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from qg_tokenizer import QGVAEConfig
from qg_tokenizer.data import MNIST_NUM_TRAIN, MNIST_PATH
from qg_tokenizer.metrics import psnr, ssim

SCALES = (1.0, 7 / 8, 3 / 4, 5 / 8, 1 / 2, 3 / 8, 1 / 4)
QUALITY_RANGE = {"jpeg": (1, 100), "webp": (0, 100)}
SIDE_INFO_BYTES = 2  # payload accounting: quality (7 bits), subsampling and scale index, rounded up to bytes
WEBP_REBUILT_BYTES = 27  # "RIFF" size "WEBP" "VP8 " size (20) + keyframe start code (3) + width and height (4)
ACCOUNTINGS = ("file", "payload")
DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photo_patches32.npz"
RESULTS = Path(__file__).resolve().parent / "results" / "image_codecs.json"


@dataclass(frozen=True)
class Candidate:
    """One encoding of one image: its score, its cost under the accounting and how it was made."""

    psnr: float
    cost: int
    quality: int
    scale: float
    setting: tuple[tuple[str, object], ...]
    reconstruction: np.ndarray  # uint8, the input's shape


def settings(codec: str, accounting: str, mode: str) -> list[dict]:
    """Encoder keyword arguments tried for `codec` ("jpeg"/"webp") under `accounting` for PIL `mode` ("L"/"RGB")."""
    if codec == "webp":
        return [dict(method=6)]
    optimize = [False] if accounting == "payload" else [False, True]  # custom Huffman tables live in the header
    subsampling = [0, 2] if mode == "RGB" else [0]  # 4:4:4, 4:2:0 (ignored for grey)
    return [dict(optimize=o, subsampling=s) for o in optimize for s in subsampling]


def encode(image: PIL.Image.Image, codec: str, quality: int, setting: dict) -> bytes:
    """The file Pillow writes for `image` (WebP has no grey mode: grey images are stored as RGB)."""
    buffer = io.BytesIO()
    if codec == "jpeg":
        image.save(buffer, "JPEG", quality=quality, **setting)
    else:
        image.convert("RGB").save(buffer, "WEBP", quality=quality, **setting)
    return buffer.getvalue()


def jpeg_scan_start(data: bytes) -> int:
    """Offset of the entropy-coded data of a baseline JPEG: just past the (single) SOS marker segment."""
    sos = data.find(b"\xff\xda")
    if sos < 0 or data.find(b"\xff\xda", sos + 2) >= 0:  # progressive files have several scans
        raise ValueError("expected a baseline JPEG with exactly one SOS segment")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def cost(data: bytes, codec: str, accounting: str) -> int:
    """Bytes charged for one encoded image (see the module docstring)."""
    if accounting == "file":
        return len(data)
    if codec == "jpeg":
        return len(data) - jpeg_scan_start(data) - 2 + SIDE_INFO_BYTES  # - 2: the EOI marker
    return len(data) - WEBP_REBUILT_BYTES + SIDE_INFO_BYTES


def payload(data: bytes, codec: str) -> bytes:
    """The bytes the payload accounting charges for (without the side information)."""
    if codec == "jpeg":
        return data[jpeg_scan_start(data) : -2]
    return data[20:23] + data[30:]  # the 3-byte frame tag stays; start code and size (bytes 23-29) are rebuilt


@functools.lru_cache(maxsize=4096)
def _jpeg_header(size: tuple[int, int], mode: str, quality: int, subsampling: int) -> bytes:
    """Everything before the scan: a function of size, mode, quality and subsampling (standard Huffman tables)."""
    data = encode(PIL.Image.new(mode, size), "jpeg", quality, dict(optimize=False, subsampling=subsampling))
    return data[: jpeg_scan_start(data)]


def rebuild_file(codec: str, body: bytes, size: tuple[int, int], mode: str, quality: int, setting: dict) -> bytes:
    """The complete file from a `payload` and the side information alone."""
    if codec == "jpeg":
        return _jpeg_header(size, mode, quality, setting["subsampling"]) + body + b"\xff\xd9"
    vp8 = body[:3] + b"\x9d\x01\x2a" + size[0].to_bytes(2, "little") + size[1].to_bytes(2, "little") + body[3:]
    pad = b"\x00" * (len(vp8) % 2)  # RIFF chunks are padded to even length
    chunk = b"VP8 " + len(vp8).to_bytes(4, "little") + vp8 + pad
    return b"RIFF" + (4 + len(chunk)).to_bytes(4, "little") + b"WEBP" + chunk


def largest_fitting_quality(fits, low: int, high: int) -> int | None:
    """Largest q in [low, high] with `fits(q)`, assuming `fits` is monotone (True up to some q); None if none fits."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W]` or `[N, H, W, ch]` -> float `[N, ch, H, W]` in [0, 1]."""
    images = images[..., None] if images.ndim == 3 else images
    return torch.tensor(images).permute(0, 3, 1, 2).float() / 255


def search_setting(
    image: PIL.Image.Image, codec: str, accounting: str, setting: dict, budget: int
) -> tuple[int | None, bytes | None, int]:
    """Largest fitting quality of one (image, setting) and its file (None, None if none fits), and the lowest cost."""
    low, high = QUALITY_RANGE[codec]
    files = {}

    def fits(quality: int) -> bool:
        files[quality] = encode(image, codec, quality, setting)
        return cost(files[quality], codec, accounting) <= budget

    quality = largest_fitting_quality(fits, low, high)
    return quality, files.get(quality), cost(files[low], codec, accounting)


def best_candidates(image: np.ndarray, codec: str, accounting: str, budget: int) -> tuple[dict, int]:
    """Per scale, the fitting candidate with the best PSNR (or None), and the smallest cost seen at any setting."""
    mode = "L" if image.ndim == 2 else "RGB"
    original = PIL.Image.fromarray(image, mode)
    target = to_tensor(image[None])
    best, smallest = {}, sys.maxsize
    for scale in SCALES:
        side = max(1, round(image.shape[0] * scale))
        shrunk = original if side == image.shape[0] else original.resize((side, side), PIL.Image.Resampling.LANCZOS)
        best[scale] = None
        for setting in settings(codec, accounting, mode):
            quality, data, lowest = search_setting(shrunk, codec, accounting, setting, budget)
            smallest = min(smallest, lowest)
            if quality is None:
                continue
            if accounting == "payload":
                rebuilt = rebuild_file(codec, payload(data, codec), shrunk.size, mode, quality, setting)
                if rebuilt != data:
                    raise AssertionError(f"{codec} payload accounting cannot rebuild the file (quality {quality})")
            decoded = PIL.Image.open(io.BytesIO(data)).convert(mode)
            if decoded.size != original.size:
                decoded = decoded.resize(original.size, PIL.Image.Resampling.BICUBIC)
            reconstruction = np.asarray(decoded)
            score = psnr(to_tensor(reconstruction[None]), target).item()
            if best[scale] is None or score > best[scale].psnr:
                charged = cost(data, codec, accounting)
                best[scale] = Candidate(score, charged, quality, scale, tuple(setting.items()), reconstruction)
    return best, smallest


def summarize(chosen: list[Candidate | None], images: np.ndarray) -> dict:
    """Means over the images that fit (PSNR, SSIM, cost, quality), the fraction that fit, the scales used and the
    per-image PSNR (None where nothing fits), for comparisons paired with a model on the same images."""
    fit = [i for i, c in enumerate(chosen) if c is not None]
    summary = {
        "fraction_fit": len(fit) / len(chosen),
        "num_fit": len(fit),
        "psnr_per_image": [None if c is None else c.psnr for c in chosen],
    }
    if not fit:
        return summary | {"psnr": None, "ssim": None, "mean_bytes": None, "mean_quality": None, "scales": {}}
    reconstructions = to_tensor(np.stack([chosen[i].reconstruction for i in fit]))
    targets = to_tensor(images[fit])
    scales = [chosen[i].scale for i in fit]
    return summary | {
        "psnr": psnr(reconstructions, targets).mean().item(),
        "ssim": ssim(reconstructions, targets).mean().item(),
        "mean_bytes": statistics.mean(chosen[i].cost for i in fit),
        "mean_quality": statistics.mean(chosen[i].quality for i in fit),
        "scales": {f"{s:.3f}": scales.count(s) for s in sorted(set(scales), reverse=True)},
    }


def jpeg_webp_at_budget(images: np.ndarray, budget_bytes: int) -> dict:
    """JPEG and WebP at the largest quality that fits `budget_bytes` per image, directly and shrunk-then-upscaled.

    Args:
        images: uint8 `[N, H, W]`, `[N, H, W, 1]` (grey) or `[N, H, W, 3]` (RGB), square.
        budget_bytes: bytes allowed per image.

    Returns:
        `{"budget_bytes", "num_images", "jpeg": {...}, "webp": {...}}`; per codec and accounting ("file",
        "payload"): "direct" and "resized" summaries (`fraction_fit`, `num_fit`, `psnr_per_image`, `psnr`, `ssim`,
        `mean_bytes`, `mean_quality`, `scales`) and `smallest_bytes` (min and median over images of the cheapest
        encoding at any setting and scale: how far the budget is from feasible).
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be uint8 [N, H, W(, ch)] with H == W, got {images.dtype} {images.shape}")
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[-1]}")
    images = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
    result = {"budget_bytes": budget_bytes, "num_images": len(images)}
    for codec in ("jpeg", "webp"):
        result[codec] = {}
        for accounting in ACCOUNTINGS:
            searched = [best_candidates(image, codec, accounting, budget_bytes) for image in images]
            direct = [best[1.0] for best, _ in searched]
            resized = [max((c for c in best.values() if c), key=lambda c: c.psnr, default=None) for best, _ in searched]
            smallest = [s for _, s in searched]
            result[codec][accounting] = {
                "direct": summarize(direct, images),
                "resized": summarize(resized, images),
                "smallest_bytes": {"min": min(smallest), "median": statistics.median(smallest)},
            }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="first 100 test images of each data set")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="photo_patches32.npz")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    limit = 100 if args.quick else None
    with np.load(MNIST_PATH) as npz:
        mnist = npz["images"][MNIST_NUM_TRAIN:][:limit]
    with np.load(args.photos) as npz:
        photos = npz["test"][:limit]
    datasets = {"mnist-test": (mnist, "mnist-cpu"), "photo_patches32-test": (photos, "photos32-cpu")}
    results = {"command": "python benchmarks/image_codecs.py" + (" --quick" if args.quick else ""), "datasets": {}}
    for name, (images, preset) in datasets.items():
        start = time.perf_counter()
        budget = QGVAEConfig.from_preset(preset).bytes_per_image
        result = jpeg_webp_at_budget(images, budget)
        for codec in ("jpeg", "webp"):
            for accounting in ACCOUNTINGS:
                for variant in ("direct", "resized"):
                    del result[codec][accounting][variant]["psnr_per_image"]  # keeps the JSON to the summaries
        results["datasets"][name] = {"preset": preset, **result, "seconds": time.perf_counter() - start}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    for name, result in results["datasets"].items():
        for codec in ("jpeg", "webp"):
            for accounting in ACCOUNTINGS:
                for variant in ("direct", "resized"):
                    s = result[codec][accounting][variant]
                    score = f"PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f}" if s["psnr"] is not None else "-"
                    print(f"{name} {result['budget_bytes']} B {codec} {accounting:7s} {variant:7s}: "
                          f"fit {s['fraction_fit']:.3f}  {score}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
