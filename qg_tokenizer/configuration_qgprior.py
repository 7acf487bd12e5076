"""Configuration of the autoregressive prior over QG-VAE global tokens (a Llama-style decoder)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

VOCAB_LAYOUTS = ("offset", "shared")


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

    `vocab_size`, `max_position_embeddings` (C + 1) and `bos_token_id` (the null token) are derived; a saved or
    explicit value that disagrees raises. Every other field is a [`LlamaConfig`] field (the defaults are a ~4M
    parameter model sized for MNIST tokens on a CPU).

    Args:
        num_image_tokens: C, image tokens per sequence (the tokenizer's `num_tokens`).
        codebook_size: K, codes per image token.
        num_classes: class tokens; 0 for an unconditional prior.
        vocab_layout: `"offset"` or `"shared"` (see above).
        class_dropout_prob: probability that a training sequence's class token is replaced by the null token, which
            trains the unconditional branch used by classifier-free guidance. 0 means the prior was never trained
            unconditionally, so guidance (and unconditional sampling from a class-conditional prior) is refused.
    """

    model_type = "qgprior"

    num_image_tokens: int = 16
    codebook_size: int = 512
    num_classes: int = 10
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
        derived = {
            "vocab_size": self.image_vocab_size + self.num_classes + 1,
            "max_position_embeddings": self.num_image_tokens + 1,
            "bos_token_id": self.null_token_id,
        }
        for name, value in derived.items():
            if getattr(self, name) not in (None, value):
                raise ValueError(
                    f"QGPriorConfig.{name} is derived from num_image_tokens, codebook_size, num_classes and "
                    f"vocab_layout: expected {value}, got {getattr(self, name)}"
                )
            setattr(self, name, value)
        if self.id2label is None and self.num_classes:
            self.id2label = {y: str(y) for y in range(self.num_classes)}
        super().__post_init__(**kwargs)
        if self.num_classes and len(self.id2label) != self.num_classes:
            raise ValueError(
                f"QGPriorConfig.id2label must name the {self.num_classes} classes, got {len(self.id2label)} entries"
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
