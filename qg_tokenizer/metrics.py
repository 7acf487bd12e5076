"""Image-quality and codebook metrics (PSNR, SSIM, codebook usage), computed off the training hot path."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from .quantizer_qgvae import usage_statistics


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[B]` per-image PSNR in dB (peak 1) of `[B, ch, H, W]` images; the reconstruction is clamped to [0, 1]."""
    mse = (reconstruction.float().clamp(0, 1) - target.float()).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[B]` per-image SSIM (Gaussian window 11, sigma 1.5, data range 1) of `[B, ch, H, W]` images in [0, 1]."""
    return structural_similarity_index_measure(
        reconstruction.float().clamp(0, 1), target.float(), data_range=1.0, reduction="none"
    )


def usage_summary(counts: torch.Tensor) -> dict[str, float]:
    """Summary of per-token codeword counts `[C, K]`: mean/min used fraction, mean perplexity, total dead codewords."""
    stats = usage_statistics(counts)
    return {
        "usage_mean": stats["used_fraction"].mean().item(),
        "usage_min": stats["used_fraction"].min().item(),
        "perplexity_mean": stats["perplexity"].mean().item(),
        "dead_codewords": int(stats["dead"].sum().item()),
    }


__all__ = ["psnr", "ssim", "usage_summary"]
