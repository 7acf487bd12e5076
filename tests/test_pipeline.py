"""Tests of the diffusers pipeline `QGVAEPipeline` (qg_tokenizer/pipeline_qgvae.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from qg_tokenizer import PatchVQVAEConfig, PatchVQVAEModel, QGPriorConfig, QGPriorForCausalLM, QGVAEModel, QGVAEPipeline

from .conftest import tiny_config

C, K, SIZE = 8, 32, 16  # the tiny QG-VAE of conftest.py


def tiny_prior(**overrides) -> QGPriorForCausalLM:
    config = dict(
        num_image_tokens=C, codebook_size=K, num_classes=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, initializer_range=0.5, class_names=["zero", "one, uno", "two"],
    )  # fmt: skip
    torch.manual_seed(1)
    return QGPriorForCausalLM(QGPriorConfig(**{**config, **overrides})).eval()


@pytest.fixture(scope="module")
def pipe() -> QGVAEPipeline:
    torch.manual_seed(0)
    return QGVAEPipeline(vqvae=QGVAEModel(tiny_config()).eval(), prior=tiny_prior())


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_output_types(pipe):
    pil = pipe([0, 2], num_images_per_label=2, generator=seeded()).images
    assert len(pil) == 4 and all(isinstance(im, PIL.Image.Image) and im.mode == "L" for im in pil)
    assert pil[0].size == (SIZE, SIZE)
    array = pipe([0, 2], num_images_per_label=2, generator=seeded(), output_type="np").images
    assert array.shape == (4, SIZE, SIZE, 1) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    tensor = pipe([0, 2], num_images_per_label=2, generator=seeded(), output_type="pt").images
    assert tensor.shape == (4, 1, SIZE, SIZE)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array)
    np.testing.assert_array_equal(np.asarray(pil[3]), np.round(array[3, ..., 0] * 255).astype(np.uint8))
    (images,) = pipe(1, generator=seeded(), output_type="pt", return_dict=False)
    assert images.shape == (1, 1, SIZE, SIZE)


def test_pipeline_is_prior_sampling_then_decoding(pipe):
    sampling = dict(guidance_scale=2.0, temperature=0.8, top_k=5, top_p=0.9)
    images = pipe([2, 0], num_images_per_label=2, generator=seeded(7), output_type="pt", **sampling).images
    token_ids = pipe.prior.generate_image_tokens([2, 2, 0, 0], generator=seeded(7), **sampling)
    expected = pipe.vqvae.decode(token_ids).pixel_values.clamp(0, 1)
    torch.testing.assert_close(images, expected)
    plain = pipe([2, 0], num_images_per_label=2, generator=seeded(7), output_type="pt").images
    assert not torch.equal(images, plain)  # the sampling arguments reach the prior


def test_prefix_length_decodes_a_prefix(pipe):
    full = pipe.prior.generate_image_tokens([1, 2], generator=seeded(5))
    images = pipe([1, 2], prefix_length=3, generator=seeded(5), output_type="pt").images
    prefix = torch.cat((full[:, :3], torch.zeros(2, C - 3, dtype=torch.long)), dim=1)
    torch.testing.assert_close(images, pipe.vqvae.decode(prefix, prefix_length=3).pixel_values.clamp(0, 1))
    assert not torch.allclose(images, pipe([1, 2], generator=seeded(5), output_type="pt").images)
    torch.testing.assert_close(
        pipe([1, 2], prefix_length=C, generator=seeded(5), output_type="pt").images,
        pipe([1, 2], generator=seeded(5), output_type="pt").images,
    )


def test_generator_makes_results_reproducible(pipe):
    first = pipe([0, 1, 2], num_images_per_label=2, generator=seeded(11), output_type="pt").images
    assert torch.equal(first, pipe([0, 1, 2], num_images_per_label=2, generator=seeded(11), output_type="pt").images)
    other = pipe([0, 1, 2], num_images_per_label=2, generator=seeded(12), output_type="pt").images
    assert not torch.equal(first, other)
    generator = seeded(11)
    assert torch.equal(first, pipe([0, 1, 2], num_images_per_label=2, generator=generator, output_type="pt").images)
    assert not torch.equal(first, pipe([0, 1, 2], num_images_per_label=2, generator=generator, output_type="pt").images)


def test_list_of_generators_seeds_each_image(pipe):
    # diffusers' contract: with one generator per image, image i depends on generator i only
    batch = pipe([0, 1], generator=[seeded(1), seeded(2)], output_type="pt").images
    torch.testing.assert_close(batch[0], pipe([0], generator=seeded(1), output_type="pt").images[0])
    torch.testing.assert_close(batch[1], pipe([1], generator=[seeded(2)], output_type="pt").images[0])
    swapped = pipe([0, 1], generator=[seeded(1), seeded(3)], output_type="pt").images
    torch.testing.assert_close(swapped[0], batch[0])
    assert not torch.equal(swapped[1], batch[1])  # the second generator does reach the second image
    # with num_images_per_label, the generators follow the output order (labels repeated consecutively)
    sampling = dict(top_k=4, guidance_scale=2.0, output_type="pt")
    seeds = [5, 6, 7, 8]
    images = pipe([2, 0], num_images_per_label=2, generator=[seeded(s) for s in seeds], **sampling).images
    for image, label, seed in zip(images, [2, 2, 0, 0], seeds):
        torch.testing.assert_close(image, pipe([label], generator=seeded(seed), **sampling).images[0])


def test_list_of_generators_unconditional():
    torch.manual_seed(0)
    pipe = QGVAEPipeline(vqvae=QGVAEModel(tiny_config()).eval(), prior=tiny_prior(num_classes=0, class_names=None))
    images = pipe(num_images_per_label=2, generator=[seeded(4), seeded(9)], output_type="pt").images
    torch.testing.assert_close(images[1], pipe(generator=seeded(9), output_type="pt").images[0])


@pytest.mark.parametrize(("top_k", "top_p"), [(1, None), (K, None), (None, 1.0), (None, 1), (3, 0.5)])
def test_sampling_arguments_at_the_ends_of_their_ranges(pipe, top_k, top_p):
    images = pipe([0, 1], top_k=top_k, top_p=top_p, generator=seeded(2), output_type="pt").images
    assert images.shape == (2, 1, SIZE, SIZE)
    if top_k == 1:  # one code per step: the samples are the greedy ones, whatever the seed
        torch.testing.assert_close(images, pipe([0, 1], top_k=1, generator=seeded(3), output_type="pt").images)


def test_labels_and_get_label_ids(pipe):
    assert pipe.id2label == {0: "zero", 1: "one, uno", 2: "two"}
    assert pipe.labels == {"zero": 0, "one": 1, "uno": 1, "two": 2}
    assert pipe.get_label_ids(["two", "uno"]) == [2, 1]
    assert pipe.get_label_ids("zero") == [0]
    with pytest.raises(ValueError, match=r"unknown class label\(s\) \['seven'\]"):
        pipe.get_label_ids(["one", "seven"])


def test_unconditional_sampling():
    torch.manual_seed(0)
    pipe = QGVAEPipeline(vqvae=QGVAEModel(tiny_config()).eval(), prior=tiny_prior(num_classes=0, class_names=None))
    assert pipe.id2label == {}
    images = pipe(num_images_per_label=3, generator=seeded(), output_type="pt").images
    assert images.shape == (3, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="this prior is unconditional"):
        pipe([0])


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "QGVAEPipeline"
    assert model_index["prior"] == ["qg_tokenizer.modeling_qgprior", "QGPriorForCausalLM"]
    assert model_index["vqvae"] == ["qg_tokenizer.modeling_qgvae", "QGVAEModel"]
    loaded = QGVAEPipeline.from_pretrained(tmp_path)
    assert type(loaded.prior) is QGPriorForCausalLM and type(loaded.vqvae) is QGVAEModel
    assert loaded.id2label == pipe.id2label
    torch.testing.assert_close(
        loaded([0, 1], generator=seeded(3), output_type="pt", guidance_scale=1.5).images,
        pipe([0, 1], generator=seeded(3), output_type="pt", guidance_scale=1.5).images,
    )


def test_patch_vqvae_tokenizer():
    torch.manual_seed(0)
    config = PatchVQVAEConfig(
        image_size=SIZE, grid_size=2, codebook_size=K, codeword_dim=8, block_out_channels=[8, 8, 16, 16]
    )
    pipe = QGVAEPipeline(vqvae=PatchVQVAEModel(config).eval(), prior=tiny_prior(num_image_tokens=4))
    assert pipe([0, 1], generator=seeded(), output_type="pt").images.shape == (2, 1, SIZE, SIZE)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        ({"class_labels": [0, 3]}, ValueError, r"class_labels must be in \[0, 3\)"),
        ({"class_labels": [-1]}, ValueError, r"class_labels must be in \[0, 3\)"),
        ({"class_labels": [0], "prefix_length": C + 1}, ValueError, r"prefix_length must be in \[1, 8\], got 9"),
        ({"class_labels": [0], "prefix_length": 0}, ValueError, r"prefix_length must be in \[1, 8\]"),
        ({"class_labels": [0], "output_type": "latent"}, ValueError, "output_type must be one of"),
        ({"class_labels": [0], "num_images_per_label": 0}, ValueError, "num_images_per_label must be an int >= 1"),
        ({"guidance_scale": 3.0}, ValueError, "guidance_scale=3.0 needs class_labels"),
        ({"class_labels": [0], "generator": [seeded(), 3]}, TypeError, "generator must be a torch.Generator, a list"),
        ({"class_labels": [0], "generator": 3}, TypeError, "generator must be a torch.Generator, a list"),
        ({"class_labels": [0, 1], "num_images_per_label": 2, "generator": [seeded(1), seeded(2)]}, ValueError,
         "generator: a list needs one torch.Generator per image, 4 here, got 2"),
        ({"num_images_per_label": 3, "generator": [seeded()]}, ValueError, "one torch.Generator per image, 3 here"),
        ({"class_labels": [0], "top_k": 0}, ValueError, r"top_k must be an int >= 1 \(or None for all codes\), got 0"),
        ({"class_labels": [0], "top_k": 2.5}, ValueError, "top_k must be an int >= 1"),
        ({"class_labels": [0], "top_k": True}, ValueError, "top_k must be an int >= 1"),
        ({"class_labels": [0], "top_p": 0}, ValueError, r"top_p must be a number in \(0, 1\] \(or None for 1\), got 0"),
        ({"class_labels": [0], "top_p": 1.5}, ValueError, r"top_p must be a number in \(0, 1\].*got 1.5"),
        ({"class_labels": [0], "top_p": -0.1}, ValueError, r"top_p must be a number in \(0, 1\]"),
        ({"class_labels": [0], "temperature": 0}, ValueError, "temperature must be a number > 0, got 0"),
    ],
)  # fmt: skip
def test_bad_calls_raise(pipe, call, error, match):
    with pytest.raises(error, match=match):
        pipe(**call)


def test_guidance_from_a_prior_without_null_token_raises():
    torch.manual_seed(0)
    pipe = QGVAEPipeline(vqvae=QGVAEModel(tiny_config()).eval(), prior=tiny_prior(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match=r"guidance_scale=4.0 needs a class-conditional prior trained with class"):
        pipe([0], guidance_scale=4.0)
    with pytest.raises(ValueError, match="class_labels is required"):
        pipe()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"num_image_tokens": 4}, "num_image_tokens=4"), ({"codebook_size": 64}, "codebook_size=64")],
)
def test_prior_vqvae_mismatch_raises(overrides, match):
    vqvae = QGVAEModel(tiny_config())
    with pytest.raises(ValueError, match=rf"vqvae has num_tokens C=8 and codebook_size K=32, prior has .*{match}"):
        QGVAEPipeline(vqvae=vqvae, prior=tiny_prior(**overrides))


def test_import_qg_tokenizer_does_not_import_diffusers():
    code = (
        "import sys, qg_tokenizer; assert 'diffusers' not in sys.modules; "
        "qg_tokenizer.QGVAEPipeline; assert 'diffusers' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
