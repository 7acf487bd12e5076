"""`QGVAEPipeline`: class-conditional image generation with a QG-VAE and its autoregressive prior, as a diffusers
pipeline (prior samples C global tokens -> QG-VAE decodes them -> images).

Importing this module imports diffusers; `import qg_tokenizer` does not (the package exposes the pipeline lazily).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput

from .codec import resolve_prefix_length
from .image_processing_qgvae import QGVAEImageProcessor
from .modeling_patch_vqvae import PatchVQVAEModel
from .modeling_qgprior import QGPriorForCausalLM
from .modeling_qgvae import QGVAEModel

OUTPUT_TYPES = ("pil", "np", "pt")


def _is_number(value: object) -> bool:
    """Whether `value` is an int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class QGVAEPipeline(DiffusionPipeline):
    r"""Generate images by sampling global tokens from a [`QGPriorForCausalLM`] and decoding them with a
    [`QGVAEModel`].

    Components are saved in the subfolders `vqvae/` and `prior/` by `save_pretrained`; load with
    `QGVAEPipeline.from_pretrained(path)` after `import qg_tokenizer` (diffusers resolves the component classes from
    imported modules only).

    Args:
        vqvae: the tokenizer whose tokens the prior was trained on (same `num_tokens` C and `codebook_size` K): a
            [`QGVAEModel`], or the patch VQ-VAE baseline, which has the same `decode(token_ids, prefix_length)`.
        prior: the autoregressive prior over those tokens.
    """

    model_cpu_offload_seq = "prior->vqvae"

    def __init__(self, vqvae: QGVAEModel | PatchVQVAEModel, prior: QGPriorForCausalLM):
        super().__init__()
        tokens = (vqvae.config.num_tokens, vqvae.config.codebook_size)
        if tokens != (prior.config.num_image_tokens, prior.config.codebook_size):
            raise ValueError(
                "prior and vqvae must agree on the tokens: vqvae has num_tokens C={} and codebook_size K={}, prior has "
                "num_image_tokens={} and codebook_size={}".format(
                    *tokens, prior.config.num_image_tokens, prior.config.codebook_size
                )
            )
        self.register_modules(vqvae=vqvae, prior=prior)
        self.image_processor = QGVAEImageProcessor.from_model_config(vqvae.config)

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name, from the prior's `class_names` (empty for an unconditional prior)."""
        return dict(enumerate(self.prior.config.class_names))

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> id (names of the form "a, b" give one entry per synonym), as in diffusers' DiT pipeline."""
        return {name.strip(): int(key) for key, value in self.id2label.items() for name in value.split(",")}

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class names (e.g. `["3", "7"]`) -> class ids for `class_labels`."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"unknown class label(s) {unknown}; the prior's labels are {sorted(self.labels)}")
        return [self.labels[name] for name in names]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        num_images_per_label: int = 1,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        prefix_length: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
        num_tokens: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Sample images.

        Args:
            class_labels: class ids (see `get_label_ids`); None samples unconditionally (the prior must have a null
                token).
            num_images_per_label: images per label (consecutive in the output), or the number of images when
                `class_labels` is None.
            guidance_scale: classifier-free guidance scale s; 1 disables it. s > 1 needs class labels and a prior
                trained with class dropout.
            temperature: softmax temperature of the prior's sampling, > 0.
            top_k: sample among the k most likely codes only, k >= 1 (None: all K).
            top_p: nucleus sampling mass, in (0, 1] (None: 1).
            prefix_length: sample and decode only the first k of the C tokens (coarse images); None: all C.
            generator: makes the samples reproducible (a seed is drawn from it; successive calls differ); a list of
                one generator per image (`len(class_labels) * num_images_per_label` of them, or
                `num_images_per_label` when `class_labels` is None) makes image i depend on generator i only.
            output_type: `"pil"` (list of PIL images), `"np"` (float32 `[B, H, W, ch]` in [0, 1]) or `"pt"` (float
                `[B, ch, H, W]` in [0, 1]).
            return_dict: return an [`ImagePipelineOutput`] rather than a tuple `(images,)`.
            num_tokens: deprecated name of `prefix_length`.
        """
        prefix_length = resolve_prefix_length(prefix_length, num_tokens)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        count = num_images_per_label
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"num_images_per_label must be an int >= 1, got {count!r}")
        if class_labels is None and guidance_scale != 1:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs class_labels; use guidance_scale=1 to sample unconditionally"
            )
        if not (_is_number(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 (or None for all codes), got {top_k!r}")
        if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] (or None for 1), got {top_p!r}")

        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=self.prior.device).reshape(-1)
            labels = labels.repeat_interleave(num_images_per_label)
        sampling = {"guidance_scale": guidance_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        token_ids = self.prior.generate_image_tokens(
            labels,
            batch_size=num_images_per_label if labels is None else None,
            prefix_length=prefix_length,
            generator=generator,
            **{name: value for name, value in sampling.items() if value is not None},
        )  # (B, k)
        kept = token_ids.shape[1]
        token_ids = F.pad(token_ids, (0, self.vqvae.config.num_tokens - kept))  # (B, C): tokens >= k are masked out
        pixel_values = self.vqvae.decode(token_ids.to(self.vqvae.device), prefix_length=kept).pixel_values
        images = self.image_processor.postprocess(pixel_values, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


__all__ = ["QGVAEPipeline"]
