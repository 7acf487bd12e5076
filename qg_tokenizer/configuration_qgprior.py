"""Configuration of the autoregressive prior over QG-VAE global tokens (a Llama-style decoder)."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

VOCAB_LAYOUTS = ("offset", "shared")
# the fields that fix the sequence layout, and the Llama fields derived from them
LAYOUT_FIELDS = ("num_image_tokens", "codebook_size", "num_classes", "vocab_layout")
DERIVED_FIELDS = ("vocab_size", "max_position_embeddings", "bos_token_id")


def default_class_names(num_classes: int) -> list[str]:
    """Names of unnamed classes: "0", "1", ..."""
    return [str(y) for y in range(num_classes)]


@strict
class QGPriorConfig(LlamaConfig):
    r"""Configuration of a [`QGPriorForCausalLM`]: a Llama decoder over one conditioning token and C image tokens.

    A sequence is `[cond, t_0, ..., t_{C-1}]`: `cond` is a class token (class y) or the null token (unconditional,
    also the `bos_token_id`), and `t_c` is token c of a QG-VAE (or any tokenizer with C positions of K codes). The
    vocabulary is the image ids, then `num_classes` class tokens, then the null token:

    - `vocab_layout="offset"`: image token c with code k has id `c * K + k` (C*K image ids): every position has its
      own input embeddings and output rows, as every QG-VAE token has its own codebook;
    - `vocab_layout="shared"`: image token c with code k has id `k` (K image ids shared by all positions), plus a
      learned absolute position embedding (C + 1 entries) added to the input.

    "offset" is the default, as for other models whose tokens come from per-position codebooks (MusicGen, Bark keep
    separate embeddings and heads per codebook); its vocabulary grows as C * K (8,203 ids for MNIST's 16 x 512, but
    131k for 256 x 512), which "shared" avoids. `benchmarks/prior.py` measures held-out bits per image of both.

    `vocab_size`, `max_position_embeddings` (C + 1) and `bos_token_id` (the null token) are derived from the layout
    fields (`num_image_tokens`, `codebook_size`, `num_classes`, `vocab_layout`) and follow them when one is set later
    (`config.num_image_tokens = 8`, `from_pretrained(path, num_image_tokens=8)`), so what `save_pretrained` writes
    loads back; a value given for a derived field that disagrees raises. Every other field is a [`LlamaConfig`] field
    (the defaults are a ~4M parameter model sized for MNIST tokens on a CPU). The standard fields (`num_labels`,
    `id2label`, `label2id`, unknown keyword arguments kept as attributes) work as in any transformers config: the
    prior names its classes in `class_names`.

    Args:
        num_image_tokens: C, image tokens per sequence (the tokenizer's `num_tokens`).
        codebook_size: K, codes per image token.
        num_classes: class tokens; 0 for an unconditional prior.
        class_names: the name of each class, class y at index y (`num_classes` entries). None: the names of an
            `id2label` that maps exactly the ids 0..num_classes-1 (configs saved before `class_names` existed named
            their classes there), else "0", "1", ...
        vocab_layout: `"offset"` or `"shared"` (see above).
        class_dropout_prob: probability that a training sequence's class token is replaced by the null token, which
            trains the unconditional branch used by classifier-free guidance. 0 means the prior was never trained
            unconditionally, so guidance (and unconditional sampling from a class-conditional prior) is refused.
    """

    model_type = "qgprior"

    num_image_tokens: int = 16
    codebook_size: int = 512
    num_classes: int = 10
    class_names: list[str] | None = None
    vocab_layout: str = "offset"
    class_dropout_prob: float | int = 0.1
    vocab_size: int | None = None
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self.validate_prior()
        for name, value in self.derived_fields().items():
            if getattr(self, name) not in (None, value):
                raise ValueError(self._derived_error(name, getattr(self, name)))
            setattr(self, name, value)
        if self.class_names is None:
            names = {int(y): name for y, name in (self.id2label or {}).items()}
            legacy = self.num_classes > 0 and sorted(names) == list(range(self.num_classes))
            self.class_names = [names[y] for y in sorted(names)] if legacy else default_class_names(self.num_classes)
        super().__post_init__(**kwargs)
        self.validate_class_names()

    def __setattr__(self, name: str, value: Any) -> None:
        initialised = self.__dict__.get("_post_init_done", False)
        if initialised and name in DERIVED_FIELDS and value != self.derived_fields()[name]:
            raise ValueError(self._derived_error(name, value))
        unnamed = initialised and name == "num_classes" and self.class_names == default_class_names(self.num_classes)
        super().__setattr__(name, value)
        if initialised and name in LAYOUT_FIELDS:
            # the derived fields (and the names of unnamed classes) follow, so that the saved config loads back
            self.__dict__.update(self.derived_fields())
            if unnamed:
                self.__dict__["class_names"] = default_class_names(value)

    def derived_fields(self) -> dict[str, int]:
        """The values of `vocab_size`, `max_position_embeddings` and `bos_token_id` that the layout fields give."""
        return {
            "vocab_size": self.image_vocab_size + self.num_classes + 1,
            "max_position_embeddings": self.num_image_tokens + 1,
            "bos_token_id": self.null_token_id,
        }

    def _derived_error(self, name: str, value: Any) -> str:
        return (
            f"QGPriorConfig.{name} is derived from num_image_tokens, codebook_size, num_classes and vocab_layout: "
            f"expected {self.derived_fields()[name]}, got {value}"
        )

    def validate_prior(self) -> None:
        """Raise `TypeError`/`ValueError` naming the field of an invalid value."""
        for name in ("num_image_tokens", "codebook_size", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"QGPriorConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
        for name, low in (("num_image_tokens", 1), ("codebook_size", 2), ("num_classes", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"QGPriorConfig.{name} must be >= {low}, got {getattr(self, name)}")
        if self.vocab_layout not in VOCAB_LAYOUTS:
            raise ValueError(f"QGPriorConfig.vocab_layout must be one of {VOCAB_LAYOUTS}, got {self.vocab_layout!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"QGPriorConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    def validate_class_names(self) -> None:
        """Raise `TypeError`/`ValueError` unless `class_names` is a list of `num_classes` strings."""
        names = self.class_names
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise TypeError(f"QGPriorConfig.class_names must be a list of str, got {names!r}")
        if len(names) != self.num_classes:
            raise ValueError(
                f"QGPriorConfig.class_names must name the {self.num_classes} classes, got {len(names)} names"
            )

    @property
    def image_vocab_size(self) -> int:
        """Ids used by image tokens: C * K (`"offset"`) or K (`"shared"`)."""
        return self.codebook_size * (self.num_image_tokens if self.vocab_layout == "offset" else 1)

    @property
    def null_token_id(self) -> int:
        """Id of the null (unconditional) conditioning token, the last of the vocabulary."""
        return self.image_vocab_size + self.num_classes

    @property
    def has_null_token(self) -> bool:
        """Whether the prior was trained on null-token sequences (unconditional, or with class dropout)."""
        return self.num_classes == 0 or self.class_dropout_prob > 0


__all__ = ["QGPriorConfig"]
