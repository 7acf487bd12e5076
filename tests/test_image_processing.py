"""QGVAEImageProcessor: grey/RGB conversion, resize + centre crop, [0, 1] range, postprocess, save/load."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from qg_tokenizer.configuration_qgvae import QGVAEConfig
from qg_tokenizer.image_processing_qgvae import QGVAEImageProcessor

try:  # `qg_tokenizer/__init__.py` may already have registered it
    AutoImageProcessor.register(QGVAEConfig, image_processor_classes={"pil": QGVAEImageProcessor})
except ValueError:
    pass


def random_rgb(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("num_channels", [1, 3])
def test_rgb_pil_to_pixel_values(num_channels):
    processor = QGVAEImageProcessor(image_size=16, num_channels=num_channels)
    out = processor([random_rgb(40, 30), random_rgb(20, 20, seed=1)], return_tensors="pt")["pixel_values"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == (2, num_channels, 16, 16)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.1


def test_grey_conversion_is_pil_luma():
    image = random_rgb(28, 28)
    expected = np.asarray(image.convert("L"), dtype=np.float32) / 255
    processor = QGVAEImageProcessor(image_size=28, num_channels=1)
    from_pil = processor(image, return_tensors="pt")["pixel_values"][0, 0].numpy()
    from_array = processor(np.asarray(image), return_tensors="pt")["pixel_values"][0, 0].numpy()  # HWC uint8
    np.testing.assert_allclose(from_pil, expected, atol=1e-6)
    np.testing.assert_allclose(from_array, expected, atol=1e-6)


def test_grey_input_to_rgb_repeats_channels():
    grey = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    out = QGVAEImageProcessor(image_size=28, num_channels=3)(grey, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 28, 28)
    for c in range(3):
        np.testing.assert_allclose(out[0, c].numpy(), grey / 255, atol=1e-6)


def test_uint8_passes_through_exactly():
    grey = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    processor = QGVAEImageProcessor()  # defaults: 28 x 28, one channel
    for image in (PIL.Image.fromarray(grey), grey, grey[..., None]):
        out = processor(image, return_tensors="pt")["pixel_values"]
        assert out.shape == (1, 1, 28, 28)
        np.testing.assert_allclose(out[0, 0].numpy(), grey / 255, atol=1e-7)


def test_non_square_is_resized_then_centre_cropped():
    # 40 x 80 (H x W), black sides, white centre columns 10:70 -> shortest edge 20: 20 x 40 -> crop columns 10:30,
    # which lie inside the white band (bicubic support included), so all the black is cropped away
    wide = np.zeros((40, 80), dtype=np.uint8)
    wide[:, 10:70] = 255
    out = QGVAEImageProcessor(image_size=20)(PIL.Image.fromarray(wide), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 1, 20, 20)
    assert out.min() == 1.0
    # 80 x 40, white rows 30:50 -> 40 x 20, white rows 15:25 -> crop rows 10:30: white middle, black top and bottom
    tall = np.zeros((80, 40), dtype=np.uint8)
    tall[30:50] = 255
    out = QGVAEImageProcessor(image_size=20)(tall, return_tensors="pt")["pixel_values"][0, 0]
    assert out.shape == (20, 20)
    np.testing.assert_allclose(out[7:13].numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(out[:3].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(out[-3:].numpy(), 0.0, atol=1e-6)


def test_float_input_with_do_rescale_false():
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = QGVAEImageProcessor(image_size=32, num_channels=3)(x, do_rescale=False, return_tensors="pt")["pixel_values"]
    # the PIL resize step quantises floats to uint8 steps
    torch.testing.assert_close(out[0], x, atol=1 / 255, rtol=0)


def test_invalid_num_channels():
    with pytest.raises(ValueError, match="num_channels must be 1 or 3, got 2"):
        QGVAEImageProcessor(num_channels=2)
    with pytest.raises(ValueError, match="num_channels must be 1 or 3, got 4"):
        QGVAEImageProcessor()(np.zeros((28, 28), np.uint8), num_channels=4)


def test_from_model_config():
    config = QGVAEConfig.from_preset("photos32-cpu")
    processor = QGVAEImageProcessor.from_model_config(config)
    assert (processor.image_size, processor.num_channels) == (32, 3)
    out = processor(random_rgb(50, 64), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, config.num_channels, config.image_size, config.image_size)


def test_postprocess():
    processor = QGVAEImageProcessor()
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 5).repeat(2, 1, 3, 1)  # (2, 1, 3, 5)
    pt = processor.postprocess(x, output_type="pt")
    assert pt.shape == x.shape and pt.dtype == torch.float32
    assert pt[0, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    np_out = processor.postprocess(x, output_type="np")
    assert isinstance(np_out, np.ndarray) and np_out.shape == (2, 3, 5, 1)
    np.testing.assert_array_equal(np_out[1, 2, :, 0], [0.0, 0.0, 0.5, 1.0, 1.0])
    grey = processor.postprocess(x)
    assert len(grey) == 2 and grey[0].mode == "L" and grey[0].size == (5, 3)
    assert np.asarray(grey[0])[0].tolist() == [0, 0, 128, 255, 255]
    rgb = processor.postprocess(x.repeat(1, 3, 1, 1).numpy(), output_type="pil")
    assert rgb[1].mode == "RGB" and np.asarray(rgb[1]).shape == (3, 5, 3)


def test_postprocess_round_trips_uint8():
    image = random_rgb(32, 32)
    processor = QGVAEImageProcessor(image_size=32, num_channels=3)
    back = processor.postprocess(processor(image, return_tensors="pt")["pixel_values"])[0]
    np.testing.assert_array_equal(np.asarray(back), np.asarray(image))


def test_postprocess_invalid_output_type():
    with pytest.raises(ValueError, match="'latent'"):
        QGVAEImageProcessor().postprocess(torch.zeros(1, 1, 4, 4), output_type="latent")
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\)"):
        QGVAEImageProcessor().postprocess(torch.zeros(1, 2, 4, 4))


def test_save_load_round_trip(tmp_path):
    processor = QGVAEImageProcessor(image_size=32, num_channels=3)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["num_channels"] == 3 and saved["crop_size"] == {"height": 32, "width": 32}
    assert saved["do_normalize"] is False

    loaded = QGVAEImageProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.num_channels) == (32, 3)
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto) is QGVAEImageProcessor
    assert (auto.image_size, auto.num_channels) == (32, 3)
    image = random_rgb(48, 40)
    torch.testing.assert_close(
        auto(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )


@pytest.mark.parametrize(
    "kwargs, shape",
    [({"size": {"height": 32, "width": 32}, "num_channels": 3}, (1, 3, 32, 32)),
     ({"size": {"height": 20, "width": 24}}, (1, 1, 20, 24)),
     ({"size": {"shortest_edge": 20}}, (1, 1, 20, 20)),
     ({"size": 24}, (1, 1, 24, 24)),
     ({"image_size": 12}, (1, 1, 12, 12)),
     ({"size": {"shortest_edge": 20}, "crop_size": {"height": 16, "width": 16}}, (1, 1, 16, 16))],
)  # fmt: skip
def test_size_alone_sets_the_output_size(kwargs, shape):
    processor = QGVAEImageProcessor(**kwargs)
    out = processor(random_rgb(40, 50), return_tensors="pt")["pixel_values"]
    assert out.shape == shape  # not the 28 x 28 of the class default crop
    assert processor.output_size == shape[2:]


def test_size_per_call_sets_the_crop_too():
    processor = QGVAEImageProcessor()  # 28 x 28
    image = random_rgb(40, 50)
    assert processor(image, size={"height": 32, "width": 32}, return_tensors="pt")["pixel_values"].shape[2:] == (32, 32)
    assert processor(image, size={"shortest_edge": 16}, return_tensors="pt")["pixel_values"].shape[2:] == (16, 16)
    explicit = processor(image, size={"shortest_edge": 16}, crop_size={"height": 8, "width": 10}, return_tensors="pt")
    assert explicit["pixel_values"].shape[2:] == (8, 10)
    assert processor.crop_size.height == 28 and processor(image)["pixel_values"][0].shape == (1, 28, 28)  # unchanged
    # same pixels as a processor made with that size
    torch.testing.assert_close(
        processor(image, size={"shortest_edge": 16}, return_tensors="pt")["pixel_values"],
        QGVAEImageProcessor(image_size=16)(image, return_tensors="pt")["pixel_values"],
    )


def test_a_size_without_a_fixed_output_asks_for_a_crop():
    with pytest.raises(ValueError, match=r"size \{'longest_edge': 20\} fixes no output size.*explicit crop_size"):
        QGVAEImageProcessor(size={"longest_edge": 20})
    with pytest.raises(ValueError, match="fixes no output size"):
        QGVAEImageProcessor()(random_rgb(8, 8), size={"longest_edge": 20})
    assert QGVAEImageProcessor(size={"longest_edge": 20}, crop_size={"height": 8, "width": 8}).output_size == (8, 8)


def test_size_survives_save_and_load(tmp_path):
    processor = QGVAEImageProcessor(size={"height": 32, "width": 32}, num_channels=3)
    assert processor.to_dict()["crop_size"] == {"height": 32, "width": 32}
    processor.save_pretrained(tmp_path)
    for loaded in (QGVAEImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert loaded.to_dict() == processor.to_dict()
        assert loaded(random_rgb(40, 50), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    overridden = QGVAEImageProcessor.from_pretrained(tmp_path, size={"shortest_edge": 16})
    assert overridden.output_size == (16, 16) and overridden.num_channels == 3
    assert QGVAEImageProcessor.from_pretrained(tmp_path, image_size=20).output_size == (20, 20)


def test_a_config_with_an_explicit_crop_loads_as_it_was_saved(tmp_path):
    # what the processor before the size fix saved for `size={"height": 32, "width": 32}`: a 28 x 28 crop
    saved = {
        "image_processor_type": "QGVAEImageProcessor", "size": {"height": 32, "width": 32},
        "crop_size": {"height": 28, "width": 28}, "do_center_crop": True, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": False, "do_convert_rgb": False, "resample": 3, "num_channels": 3,
    }  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    loaded = QGVAEImageProcessor.from_pretrained(tmp_path)
    assert loaded.output_size == (28, 28) and dict(loaded.size) == {"height": 32, "width": 32}
    assert {k: v for k, v in loaded.to_dict().items() if k in saved} == saved
    assert loaded(random_rgb(40, 50), return_tensors="pt")["pixel_values"].shape == (1, 3, 28, 28)


def test_check_model_config_names_both_sizes():
    config = QGVAEConfig.from_preset("photos32-cpu")  # 32 x 32 RGB
    QGVAEImageProcessor.from_model_config(config).check_model_config(config)
    QGVAEImageProcessor(size={"height": 32, "width": 32}, num_channels=3).check_model_config(config)
    with pytest.raises(ValueError, match=r"makes 28x28 images with num_channels=3, but the model \(QGVAEConfig\) takes "
                       r"32x32 images with num_channels=3"):  # fmt: skip
        QGVAEImageProcessor(num_channels=3).check_model_config(config)
    with pytest.raises(ValueError, match=r"makes 32x32 images with num_channels=1, .* num_channels=3"):
        QGVAEImageProcessor(image_size=32).check_model_config(config)
    with pytest.raises(ValueError, match="makes images of varying size"):
        QGVAEImageProcessor(image_size=32, num_channels=3, do_center_crop=False).check_model_config(config)


def test_16_bit_and_float_pil_images_are_scaled_not_clipped():
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    processor = QGVAEImageProcessor(image_size=16)
    for image in (PIL.Image.fromarray(levels * 257), PIL.Image.fromarray(levels.astype(np.float32) / 255)):
        assert image.mode in ("I;16", "F")
        out = processor(image, return_tensors="pt")["pixel_values"][0, 0]
        np.testing.assert_allclose(out.numpy(), levels / 255, atol=1e-6)  # Pillow's convert("L") clips at 255


def test_transparent_pixels_are_white_for_grey_and_rgb():
    rgba = PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    for num_channels in (1, 3):
        out = QGVAEImageProcessor(image_size=16, num_channels=num_channels)(rgba, return_tensors="pt")
        assert out["pixel_values"].min() == 1.0


def test_absurd_aspect_ratios_are_refused_before_the_resize():
    processor = QGVAEImageProcessor()
    with pytest.raises(ValueError, match="of 100000x1 pixels is refused: its aspect ratio exceeds 64:1"):
        processor(PIL.Image.new("L", (100_000, 1)))
    with pytest.raises(ValueError, match="of 1x100000 pixels is refused"):
        processor(np.zeros((100_000, 1), np.uint8))
    assert processor(np.zeros((2, 128), np.uint8), return_tensors="pt")["pixel_values"].shape == (1, 1, 28, 28)
