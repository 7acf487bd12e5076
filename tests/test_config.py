import pytest

from qg_tokenizer import QGVAE_PRESETS, QGVAEConfig

from .conftest import TINY


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(num_tokens=9), ValueError, r"num_tokens \(9\) must be divisible by num_heads \(2\)"),
        (dict(codebook_size=1), ValueError, "codebook_size"),
        (dict(num_channels=2), ValueError, "num_channels must be 1 or 3"),
        (dict(image_size=18, downsample_factor=2), ValueError, "image_size .* divisible by 2\\*\\*downsample_factor"),
        (dict(image_size=36, min_resolution=2, downsample_factor=0), ValueError, "incompatible with the hourglass"),
        (dict(min_channels=32, max_channels=16), ValueError, "min_channels"),
        (dict(token_dropout_prob=1.5), ValueError, "token_dropout_prob"),
        (dict(num_heads=0), ValueError, "num_heads must be >= 1"),
        (dict(downsample_factor=-1), ValueError, "downsample_factor"),
        (dict(num_tokens=8.0), TypeError, "num_tokens must be an int"),
        (dict(codebook_loss_weight=-1), ValueError, "codebook_loss_weight"),
    ],
)
def test_invalid_configs_name_the_field(overrides, error, match):
    with pytest.raises(error, match=match):
        QGVAEConfig(**{**TINY, **overrides})


def test_presets_and_overrides():
    assert set(QGVAE_PRESETS) >= {"cifar10-demo", "imagenet128", "mnist-cpu", "photos32-cpu"}
    config = QGVAEConfig.from_preset("cifar10-demo", reset_interval=7)
    assert (config.num_tokens, config.codeword_dim, config.codebook_size, config.downsample_factor) == (64, 64, 512, 0)
    assert (config.num_heads, config.num_res_blocks, config.max_channels, config.reset_interval) == (8, 1, 128, 7)
    assert config.token_map_size == 32
    assert QGVAEConfig.from_preset("imagenet128").token_map_size == 16
    with pytest.raises(ValueError, match="unknown QGVAEConfig preset 'nope'"):
        QGVAEConfig.from_preset("nope")


def test_config_round_trip(tmp_path):
    config = QGVAEConfig(**TINY, token_dropout_prob=0.25)
    config.save_pretrained(tmp_path)
    loaded = QGVAEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
