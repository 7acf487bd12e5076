"""QGGAN (SPEC section 4): the per-pixel hinge discriminator, its losses and the adaptive GAN weight."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_qgvae import QGVAEConfig
from .modeling_qgvae import (
    ConditioningPyramid,
    QGVAEHourglassLevel,
    QGVAEModelOutput,
    QGVAEResidualBlock,
    preferred_layout,
)

GAN_WEIGHT_EPSILON = 1e-6  # added elementwise to the adversarial gradient before its norm (as the reference)


class QGGANDiscriminator(nn.Module):
    """Residual block -> hourglass -> residual block, every block conditioned on the input image itself.

    `[B, ch, H, W]` images in [0, 1] -> `[B, 1, H, W]` per-pixel real/fake logits (no sigmoid). Widths start at
    `channels` and double per level up to `max_channels`; the hourglass recurses down to `config.min_resolution` with
    `config.num_res_blocks` blocks per stage, as the autoencoder. With the CIFAR demo config (32x32x3, 16 -> 128
    channels, one block per stage) it has 416,944 parameters: the reference's 422,432 less its unused 1x1
    `full_residual` convolutions.
    """

    def __init__(self, config: QGVAEConfig, channels: int = 16, max_channels: int = 128):
        super().__init__()
        if not 1 <= channels <= max_channels:
            raise ValueError(f"channels must be in [1, max_channels={max_channels}], got {channels}")
        hourglass_config = copy.copy(config)
        hourglass_config.max_channels = max_channels
        cond_channels = config.num_channels
        self.in_block = QGVAEResidualBlock(config.num_channels, channels, channels, cond_channels)
        self.hourglass = QGVAEHourglassLevel(hourglass_config, channels, channels, config.image_size, cond_channels)
        self.out_block = QGVAEResidualBlock(self.hourglass.out_channels, channels, 1, cond_channels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, ch, H, W]` -> `[B, 1, H, W]` logits; positive means "real"."""
        pixel_values = preferred_layout(pixel_values)
        cond = ConditioningPyramid(pixel_values)  # conditioned on the image alone: no position channels
        hidden = self.in_block(pixel_values, pixel_values)
        return self.out_block(self.hourglass(hidden, cond), pixel_values)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """`0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))`."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(
    reference_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, factor: float = 0.75
) -> torch.Tensor:
    """lambda = `factor * ||d reference / d w|| / ||d gan / d w + 1e-6||`, detached (no clamp, as the reference).

    `w` is the decoder's last 3x3 convolution weight; `reference_loss` is the perceptual loss (or the L1 loss when
    training without LPIPS). Both graphs are kept for the following backward.
    """
    reference_grad = torch.autograd.grad(reference_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (factor * reference_grad.norm() / (gan_grad + GAN_WEIGHT_EPSILON).norm()).detach()


def qggan_autoencoder_loss(
    pixel_values: torch.Tensor,
    output: QGVAEModelOutput,
    fake_logits: torch.Tensor,
    last_layer: torch.Tensor,
    perceptual_loss: nn.Module | None = None,
    factor: float = 0.75,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoencoder loss of the GAN phase: `[LPIPS] + L1 + VQ terms + lambda * (-mean D(x_hat))`.

    `output` is the autoencoder's forward output on `pixel_values` (its `loss - reconstruction_loss` are the weighted
    VQ terms, so the MSE is dropped) and `fake_logits = D(output.reconstruction)`. Without `perceptual_loss` the
    adaptive weight balances the adversarial gradient against the L1 gradient. Returns the loss and the logged terms
    `l1`, `perceptual`, `gan` and `gan_weight`.
    """
    reconstruction = output.reconstruction.float()
    l1 = (reconstruction - pixel_values.float()).abs().mean()
    gan = -fake_logits.float().mean()
    terms = {"l1": l1.detach(), "gan": gan.detach()}
    reference = l1
    if perceptual_loss is not None:
        reference = perceptual_loss(reconstruction, pixel_values.float()).mean()
        terms["perceptual"] = reference.detach()
    terms["gan_weight"] = weight = adaptive_gan_weight(reference, gan, last_layer, factor)
    loss = l1 + (output.loss - output.reconstruction_loss) + weight * gan
    return (loss + reference if perceptual_loss is not None else loss), terms


def decoder_last_layer(model: nn.Module) -> torch.Tensor:
    """The weight the adaptive GAN weight is measured on: the last 3x3 convolution of the decoder hourglass's top
    level (the reference's `decoder.unet_blocks.out_conv`)."""
    return model.decoder.hourglass.levels.out_conv.weight


def load_lpips(net: str = "vgg") -> nn.Module:
    """A frozen LPIPS network (the `lpips` package), fed [0, 1] images as the reference does.

    Raises `ImportError` when the package is missing and `RuntimeError` when its backbone weights cannot be
    downloaded (offline machines); both say how to train without the perceptual term.
    """
    hint = "install it with `pip install qg-tokenizer[lpips]`, or set gan.perceptual_loss=none to train without it"
    try:
        import lpips
    except ImportError as err:
        raise ImportError(f"the LPIPS perceptual loss needs the `lpips` package: {hint}") from err
    try:
        model = lpips.LPIPS(net=net, verbose=False)
    except Exception as err:  # torchvision fails to fetch the backbone weights without a network
        raise RuntimeError(f"could not load the LPIPS-{net} weights ({type(err).__name__}: {err}); {hint}") from err
    return model.eval().requires_grad_(False)


__all__ = [
    "QGGANDiscriminator",
    "adaptive_gan_weight",
    "decoder_last_layer",
    "hinge_discriminator_loss",
    "load_lpips",
    "qggan_autoencoder_loss",
]
