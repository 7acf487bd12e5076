"""Image processor of the QG-VAE: images -> `pixel_values` `[B, num_channels, S, S]` in [0, 1], and back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import get_size_dict
from transformers.image_utils import ImageInput, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

from .image_io import check_aspect_ratio, to_8bit

if TYPE_CHECKING:
    from .configuration_qgvae import QGVAEConfig

# ITU-R 601-2 luma, the weights of PIL's `convert("L")`
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class QGVAEImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus `num_channels`: 1 (grey, PIL mode "L") or 3 (RGB)."""

    num_channels: int | None


class QGVAEImageProcessor(PilBackend):
    r"""PIL/NumPy image processor of a [`QGVAEModel`] (no torchvision needed).

    Each image is converted to grey ("L", `num_channels=1`) or RGB (`num_channels=3`), its shortest edge resized to
    `image_size` (bicubic), centre-cropped to `image_size` x `image_size` and rescaled by 1/255 to [0, 1]. There is no
    normalisation: the model consumes [0, 1]. Accepts PIL images, NumPy arrays or torch tensors (HW, HWC or CHW), or
    lists of them; as everywhere in transformers, float inputs are rescaled too, so pass `do_rescale=False` for floats
    already in [0, 1]. `return_tensors="pt"` gives `pixel_values` float32 `[B, num_channels, S, S]`.

    PIL images first go through `image_io.to_8bit`: 16-bit and float images are scaled by their range (Pillow's own
    conversion clips them at 255) and transparent ones composited onto white, whatever `num_channels` is. Images with
    an aspect ratio above `image_io.MAX_ASPECT_RATIO`:1 are refused (a ValueError), before the resize would blow them
    up. Files are best read with `image_io.load_image`, which also applies the EXIF orientation.

    The output size follows `size` alone: without an explicit `crop_size`, the crop is `size` itself
    (`{"height": H, "width": W}`) or S x S (`{"shortest_edge": S}`), in the constructor, in `from_pretrained(...,
    size=...)` and in a `preprocess(..., size=...)` call. A saved processor keeps the `crop_size` it was saved with.

    Args:
        image_size: shorthand for `size={"shortest_edge": S}` and `crop_size={"height": S, "width": S}`.
        num_channels: 1 or 3, the channels of `pixel_values`.
    """

    valid_kwargs = QGVAEImageProcessorKwargs
    model_input_names = ["pixel_values"]

    num_channels = 1
    size = {"shortest_edge": 28}
    crop_size = {"height": 28, "width": 28}
    default_to_square = False
    resample = PILImageResampling.BICUBIC
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = False
    do_convert_rgb = False  # colour conversion follows `num_channels` in `process_image`

    def __init__(self, image_size: int | None = None, **kwargs: Unpack[QGVAEImageProcessorKwargs]):
        if image_size is not None:
            kwargs.setdefault("size", {"shortest_edge": image_size})
            kwargs.setdefault("crop_size", {"height": image_size, "width": image_size})
        else:
            self._crop_follows_size(kwargs)
        super().__init__(**kwargs)
        self._check_num_channels(self.num_channels)

    def _crop_follows_size(self, kwargs: dict) -> None:
        """Set `kwargs["crop_size"]` from `kwargs["size"]` when a size and no crop size is given (and crops are on)."""
        size, do_center_crop = kwargs.get("size"), kwargs.get("do_center_crop")
        if size is None or kwargs.get("crop_size") is not None:
            return
        if not (self.do_center_crop if do_center_crop is None else do_center_crop):
            return
        size = size if isinstance(size, SizeDict) else SizeDict(**get_size_dict(size, default_to_square=False))
        if size.height is not None and size.width is not None:
            kwargs["crop_size"] = {"height": size.height, "width": size.width}
        elif size.shortest_edge is not None and size.longest_edge is None:
            kwargs["crop_size"] = {"height": size.shortest_edge, "width": size.shortest_edge}
        else:
            given = {k: v for k, v in dict(size).items() if v is not None}
            raise ValueError(
                f"size {given} fixes no output size: give {{'height': H, 'width': W}} or {{'shortest_edge': S}}, "
                "or an explicit crop_size"
            )

    @classmethod
    def from_dict(cls, image_processor_dict: dict, **kwargs):
        # `from_pretrained(folder, size=...)` (or `image_size=...`) overrides the saved size: the crop follows it too
        image_processor_dict = dict(image_processor_dict)
        if kwargs.get("image_size") is not None:
            image_processor_dict["image_size"] = kwargs.pop("image_size")
            for key in ("size", "crop_size"):
                if kwargs.get(key) is None:
                    image_processor_dict.pop(key, None)
        elif kwargs.get("size") is not None and kwargs.get("crop_size") is None:
            image_processor_dict.pop("crop_size", None)
        return super().from_dict(image_processor_dict, **kwargs)

    def preprocess(self, images: ImageInput, *args, **kwargs: Unpack[QGVAEImageProcessorKwargs]):
        """As `BaseImageProcessor.preprocess`; a `size` given without `crop_size` sets the crop too (see the class)."""
        self._crop_follows_size(kwargs)
        return super().preprocess(images, *args, **kwargs)

    @classmethod
    def from_model_config(cls, config: QGVAEConfig, **kwargs) -> QGVAEImageProcessor:
        """A processor whose output matches `config.image_size` and `config.num_channels`."""
        return cls(image_size=config.image_size, num_channels=config.num_channels, **kwargs)

    @property
    def image_size(self) -> int:
        """Side S of the square `pixel_values` (the centre-crop height)."""
        return self.crop_size.height

    @property
    def output_size(self) -> tuple[int, int] | None:
        """`(height, width)` of `pixel_values`: the crop, or the resize to height x width; None if it varies."""
        if self.do_center_crop:
            return self.crop_size.height, self.crop_size.width
        if self.do_resize and self.size.height is not None and self.size.width is not None:
            return self.size.height, self.size.width
        return None

    def check_model_config(self, config) -> None:
        """Raise a ValueError unless `pixel_values` fit a model of `config` (`image_size` and `num_channels`).

        `config` is a `QGVAEConfig`, `PatchVQVAEConfig` or any config with `image_size` (int) and `num_channels`.
        """
        expected = (config.image_size, config.image_size), config.num_channels
        if (self.output_size, self.num_channels) != expected:
            made = "images of varying size" if self.output_size is None else "{}x{} images".format(*self.output_size)
            raise ValueError(
                f"the image processor makes {made} with num_channels={self.num_channels}, but the model "
                f"({type(config).__name__}) takes {config.image_size}x{config.image_size} images with "
                f"num_channels={config.num_channels}"
            )

    @staticmethod
    def _check_num_channels(num_channels: int) -> None:
        if num_channels not in (1, 3):
            raise ValueError(f"QGVAEImageProcessor.num_channels must be 1 or 3, got {num_channels!r}")

    def _validate_preprocess_kwargs(self, num_channels: int | None = None, **kwargs) -> None:
        self._check_num_channels(num_channels)
        super()._validate_preprocess_kwargs(**kwargs)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list:
        # grey (H, W) arrays are images too: give them a trailing channel axis before transformers flattens the batch
        def add_axis(image):
            return image[..., None] if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 2 else image

        images = [add_axis(im) for im in images] if isinstance(images, (list, tuple)) else add_axis(images)
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(
        self, image: ImageInput, num_channels: int | None = None, input_data_format=None, **kwargs
    ) -> np.ndarray:
        """One image -> `(num_channels, H, W)` array, keeping its dtype (uint8 in [0, 255], or float)."""
        num_channels = num_channels or self.num_channels
        if isinstance(image, PIL.Image.Image):
            check_aspect_ratio(*image.size)
            image = to_8bit(image)  # "L" or "RGB", alpha composited onto white
            return super().process_image(image.convert("L" if num_channels == 1 else "RGB"), do_convert_rgb=False)
        image = super().process_image(image, do_convert_rgb=False, input_data_format=input_data_format)  # (c, H, W)
        check_aspect_ratio(image.shape[2], image.shape[1])
        if image.shape[0] == 4:
            image = image[:3]  # drop alpha
        if num_channels == 3 and image.shape[0] == 1:
            return np.repeat(image, 3, axis=0)
        if num_channels == 1 and image.shape[0] == 3:
            if image.dtype == np.uint8:  # exactly as PIL converts a PIL input
                return np.asarray(PIL.Image.fromarray(np.moveaxis(image, 0, -1)).convert("L"))[None]
            return np.einsum("c,chw->hw", _LUMA, image.astype(np.float32))[None]
        return image

    def postprocess(
        self, pixel_values: torch.Tensor | np.ndarray, output_type: Literal["pil", "np", "pt"] = "pil"
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Model output `[B, C, H, W]` (or `[C, H, W]`), nominally in [0, 1], clamped to [0, 1], then returned as:

        - `"pil"`: a list of B PIL images, mode "L" when C == 1 and "RGB" when C == 3 (rounded to uint8);
        - `"np"`: float32 `[B, H, W, C]` in [0, 1];
        - `"pt"`: a float tensor `[B, C, H, W]` in [0, 1] (same dtype and device as a tensor input).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(pixel_values, (torch.Tensor, np.ndarray)):
            raise TypeError(f"pixel_values must be a torch.Tensor or np.ndarray, got {type(pixel_values).__name__}")
        x = torch.as_tensor(pixel_values).detach()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"pixel_values must be [B, C, H, W] with C in (1, 3), got shape {tuple(x.shape)}")
        x = x.clamp(0, 1)
        if output_type == "pt":
            return x
        images = x.float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
        if output_type == "np":
            return images
        images = (images * 255).round().astype(np.uint8)
        # uint8 (H, W) -> mode "L", (H, W, 3) -> mode "RGB"
        return [PIL.Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]


__all__ = ["QGVAEImageProcessor"]
