"""qg-tokenizer: the Quantised Global Autoencoder (arXiv 2407.11913) as a Hugging Face-native image tokenizer.

Importing the package registers the models with the transformers Auto classes, so
`AutoModel.from_pretrained(...)` and `AutoImageProcessor.from_pretrained(...)` work without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_qgvae import QGVAE_PRESETS, QGVAEConfig
from .image_processing_qgvae import QGVAEImageProcessor
from .modeling_qgvae import QGVAEDecoderOutput, QGVAEEncoderOutput, QGVAEModel, QGVAEModelOutput, QGVAEPreTrainedModel
from .quantizer_qgvae import PerTokenQuantizer, voronoi_reset

AutoConfig.register(QGVAEConfig.model_type, QGVAEConfig, exist_ok=True)
AutoModel.register(QGVAEConfig, QGVAEModel, exist_ok=True)
AutoImageProcessor.register(QGVAEConfig, image_processor_classes={"pil": QGVAEImageProcessor}, exist_ok=True)
# saved repos also carry `auto_map` and the flat modeling files, for users without the package
QGVAEConfig.register_for_auto_class()
QGVAEModel.register_for_auto_class("AutoModel")
QGVAEImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "QGVAE_PRESETS",
    "PerTokenQuantizer",
    "QGVAEConfig",
    "QGVAEDecoderOutput",
    "QGVAEEncoderOutput",
    "QGVAEImageProcessor",
    "QGVAEModel",
    "QGVAEModelOutput",
    "QGVAEPreTrainedModel",
    "voronoi_reset",
]
