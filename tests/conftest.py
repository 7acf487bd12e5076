import pytest
import torch

from qg_tokenizer import QGVAEConfig, QGVAEModel

TINY = dict(
    image_size=16, num_channels=1, num_tokens=8, codebook_size=32, codeword_dim=8, num_heads=2, downsample_factor=1,
    min_channels=8, max_channels=16, num_octaves=4,
)  # fmt: skip


def tiny_config(**overrides) -> QGVAEConfig:
    return QGVAEConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_model() -> QGVAEModel:
    torch.manual_seed(0)
    return QGVAEModel(tiny_config()).eval()
