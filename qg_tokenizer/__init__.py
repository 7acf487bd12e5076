"""qg-tokenizer: the Quantised Global Autoencoder (arXiv 2407.11913) as a Hugging Face-native image tokenizer.

Importing the package registers the models with the transformers Auto classes, so
`AutoModel.from_pretrained(...)` and `AutoImageProcessor.from_pretrained(...)` work without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM

from .configuration_patch_vqvae import PATCH_VQVAE_PRESETS, PatchVQVAEConfig
from .configuration_qgprior import QGPriorConfig
from .configuration_qgvae import QGVAE_PRESETS, QGVAEConfig
from .image_processing_qgvae import QGVAEImageProcessor
from .modeling_patch_vqvae import PatchVQVAEModel, PatchVQVAEPreTrainedModel
from .modeling_qgprior import QGPriorCodebookLogitsProcessor, QGPriorForCausalLM
from .modeling_qgvae import QGVAEDecoderOutput, QGVAEEncoderOutput, QGVAEModel, QGVAEModelOutput, QGVAEPreTrainedModel
from .quantizer_qgvae import PerTokenQuantizer, voronoi_reset

AutoConfig.register(QGVAEConfig.model_type, QGVAEConfig, exist_ok=True)
AutoModel.register(QGVAEConfig, QGVAEModel, exist_ok=True)
AutoImageProcessor.register(QGVAEConfig, image_processor_classes={"pil": QGVAEImageProcessor}, exist_ok=True)
AutoConfig.register(PatchVQVAEConfig.model_type, PatchVQVAEConfig, exist_ok=True)
AutoModel.register(PatchVQVAEConfig, PatchVQVAEModel, exist_ok=True)
AutoImageProcessor.register(PatchVQVAEConfig, image_processor_classes={"pil": QGVAEImageProcessor}, exist_ok=True)
AutoConfig.register(QGPriorConfig.model_type, QGPriorConfig, exist_ok=True)
AutoModelForCausalLM.register(QGPriorConfig, QGPriorForCausalLM, exist_ok=True)
# saved repos also carry `auto_map` and the flat modeling files, for users without the package
QGVAEConfig.register_for_auto_class()
QGVAEModel.register_for_auto_class("AutoModel")
QGVAEImageProcessor.register_for_auto_class("AutoImageProcessor")
PatchVQVAEConfig.register_for_auto_class()
PatchVQVAEModel.register_for_auto_class("AutoModel")
QGPriorConfig.register_for_auto_class()
QGPriorForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def __getattr__(name: str):
    # the diffusers pipeline is imported on first use, keeping diffusers off `import qg_tokenizer`
    if name == "QGVAEPipeline":
        from .pipeline_qgvae import QGVAEPipeline

        return QGVAEPipeline
    # dataset tokenisation is imported on first use too, keeping `datasets` off `import qg_tokenizer`
    if name in ("load_tokenizer", "tokenize_dataset"):
        from . import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PATCH_VQVAE_PRESETS",
    "QGVAE_PRESETS",
    "PatchVQVAEConfig",
    "PatchVQVAEModel",
    "PatchVQVAEPreTrainedModel",
    "PerTokenQuantizer",
    "QGPriorCodebookLogitsProcessor",
    "QGPriorConfig",
    "QGPriorForCausalLM",
    "QGVAEConfig",
    "QGVAEDecoderOutput",
    "QGVAEEncoderOutput",
    "QGVAEImageProcessor",
    "QGVAEModel",
    "QGVAEModelOutput",
    "QGVAEPipeline",
    "QGVAEPreTrainedModel",
    "load_tokenizer",
    "tokenize_dataset",
    "voronoi_reset",
]
