"""Autoregressive prior over QG-VAE global tokens: transformers' Llama decoder, a class token, per-position codebooks.

Attention, the KV cache, SDPA and `generate()` (sampling, temperature, top-k/top-p, classifier-free guidance) are
transformers' own; this file adds the sequence layout, the per-position codebook mask and the class-token dropout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,  # noqa: F401  diffusers' pipeline loader looks this name up in the component's module
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .codec import resolve_prefix_length
from .configuration_qgprior import QGPriorConfig

ClassLabels = int | Sequence[int] | torch.Tensor | None


def codebook_offsets(config: QGPriorConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """`[C]` first vocabulary id of each image position's codebook: `c * K` ("offset") or 0 ("shared")."""
    step = config.codebook_size if config.vocab_layout == "offset" else 0
    return torch.arange(config.num_image_tokens, device=device) * step


class QGPriorCodebookLogitsProcessor(LogitsProcessor):
    r"""Keeps only the K ids of codebook c at image step c, so sampling can only emit valid tokens.

    The step is read off the sequence length (`c = input_ids_offset + input_ids.shape[-1] - 1`, one conditioning
    token first), so prompts that already hold some image tokens are continued correctly. Like Bark's
    `AlternatingCodebooksLogitsProcessor`, every other id gets `-inf`.

    Args:
        config: the prior's [`QGPriorConfig`].
        input_ids_offset: sequence positions before `input_ids[:, 0]`: the prompt length when `generate` is given the
            prompt as `inputs_embeds` alone (its `input_ids` then hold the generated tokens only), else 0.
    """

    def __init__(self, config: QGPriorConfig, input_ids_offset: int = 0):
        self.num_image_tokens = config.num_image_tokens
        self.codebook_size = config.codebook_size
        self.offsets = codebook_offsets(config).tolist()
        self.input_ids_offset = input_ids_offset

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = self.input_ids_offset + input_ids.shape[-1]
        step = length - 1
        if not 0 <= step < self.num_image_tokens:
            raise ValueError(
                f"the prior generates image tokens 0..{self.num_image_tokens - 1} after one conditioning token, but "
                f"was asked for token {step} (sequence length {length}): use max_length <= "
                f"{self.num_image_tokens + 1} or max_new_tokens <= {self.num_image_tokens + 1 - length}"
            )
        low = self.offsets[step]
        processed = torch.full_like(scores, -float("inf"))
        processed[:, low : low + self.codebook_size] = scores[:, low : low + self.codebook_size]
        return processed


class QGPriorForCausalLM(LlamaForCausalLM, GenerationMixin):
    r"""Class-conditional autoregressive prior over C image tokens, on transformers' [`LlamaForCausalLM`].

    A sequence is `[cond, t_0, ..., t_{C-1}]` (see [`QGPriorConfig`] for the id layout). `forward(input_ids,
    labels=input_ids)` returns the mean negative log-likelihood (nats per image token) of the image tokens under the
    model's distribution restricted to each position's codebook, the distribution `generate()` samples from; in
    training mode the class token is replaced by the null token with probability `class_dropout_prob` first.
    `generate()` always applies [`QGPriorCodebookLogitsProcessor`]; `guidance_scale=s` runs classifier-free guidance
    with the null token as the unconditional branch (transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor`).
    [`generate_image_tokens`] wraps it: class labels in, `[B, C]` codes in [0, K) out.
    """

    config_class = QGPriorConfig
    config: QGPriorConfig

    def __init__(self, config: QGPriorConfig):
        super().__init__(config)
        # the shared layout's ids say nothing about the position, so it gets learned absolute position embeddings
        self.position_embedding = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.vocab_layout == "shared"
            else None
        )
        # a sequence is exactly 1 + C tokens, and an image prior samples from its full distribution by default
        # (not greedily, and without transformers' global top_k=50 default)
        self.generation_config.max_length = config.max_position_embeddings
        self.generation_config.do_sample = True
        self.generation_config.top_k = 0
        self.post_init()

    # ------------------------------------------------------------------------------------------ sequence layout
    def conditioning_ids(
        self, class_labels: ClassLabels = None, batch_size: int | None = None, device: torch.device | str | None = None
    ) -> torch.LongTensor:
        """`[B, 1]` conditioning tokens: class tokens of `class_labels` (`[B]`, or one int repeated `batch_size`
        times), or `batch_size` null tokens if None (`batch_size` defaults to 1)."""
        cfg = self.config
        device = self.device if device is None else device
        if class_labels is None:
            batch_size = 1 if batch_size is None else batch_size
            if not cfg.has_null_token:
                raise ValueError(
                    "class_labels is required: this prior is class-conditional and was trained without a null token "
                    f"(class_dropout_prob={cfg.class_dropout_prob}), so it cannot sample unconditionally"
                )
            return torch.full((batch_size, 1), cfg.null_token_id, dtype=torch.long, device=device)
        if cfg.num_classes == 0:
            raise ValueError(
                f"this prior is unconditional (num_classes=0): class_labels must be None, got {class_labels!r}"
            )
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim > 1:
            raise TypeError(f"class_labels must be an int or a 1-D integer sequence/tensor, got {class_labels!r}")
        if labels.ndim == 0:
            labels = labels.reshape(1).expand(1 if batch_size is None else batch_size)
        elif batch_size is not None and len(labels) != batch_size:
            raise ValueError(f"class_labels must have batch_size={batch_size} entries, got {len(labels)}")
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
            raise ValueError(
                f"class_labels must be in [0, {cfg.num_classes}) (the prior's classes: "
                f"{dict(enumerate(cfg.class_names))}), got values in [{labels.min().item()}, {labels.max().item()}]"
            )
        return (labels + cfg.image_vocab_size)[:, None]

    def prepare_input_ids(self, token_ids: torch.Tensor, class_labels: ClassLabels = None) -> torch.LongTensor:
        """Codes `[B, k]` in [0, K) (k <= C, a prefix of the tokens) + labels -> sequences `[B, 1 + k]`."""
        cfg = self.config
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer torch.Tensor, got {token_ids!r:.80}")
        if token_ids.ndim != 2 or token_ids.shape[1] > cfg.num_image_tokens:
            raise ValueError(
                f"token_ids must have shape [batch, k] with k <= num_image_tokens={cfg.num_image_tokens}, got "
                f"{list(token_ids.shape)}"
            )
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= cfg.codebook_size):
            raise ValueError(
                f"token_ids must be in [0, {cfg.codebook_size}), got values in "
                f"[{token_ids.min().item()}, {token_ids.max().item()}]"
            )
        cond = self.conditioning_ids(class_labels, token_ids.shape[0], token_ids.device)
        offsets = codebook_offsets(cfg, token_ids.device)[: token_ids.shape[1]]
        return torch.cat((cond, token_ids.long() + offsets), dim=1)

    def image_token_ids(self, sequences: torch.Tensor) -> torch.LongTensor:
        """Sequences `[B, 1 + k]` (`generate` output) -> codes `[B, k]` in [0, K), token c from codebook c."""
        offsets = codebook_offsets(self.config, sequences.device)[: sequences.shape[1] - 1]
        return sequences[:, 1:] - offsets

    def drop_class_tokens(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Replace each sequence's class token by the null token with probability `class_dropout_prob` (CFG)."""
        drop = torch.rand(input_ids.shape[0], device=input_ids.device) < self.config.class_dropout_prob
        return torch.cat((input_ids[:, :1].masked_fill(drop[:, None], self.config.null_token_id), input_ids[:, 1:]), 1)

    # ------------------------------------------------------------------------------------------------- forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """[`LlamaForCausalLM.forward`] with the codebook-restricted loss; the KV cache passes through `kwargs`
        (`cache=` in transformers >= 5.24, `past_key_values=` before).

        Args:
            input_ids: `[B, T]` sequences, T <= C + 1, starting with the conditioning token (when not continuing a
                cache).
            inputs_embeds: `[B, T, hidden_size]` in place of `input_ids` (`get_input_embeddings()(input_ids)`; the
                shared layout's position embeddings are added here).
            labels: `[B, T]`, usually `input_ids`; -100 ignores a position; the conditioning token is never
                predicted. `loss` is the NLL in nats per image token: the mean over the labelled tokens, or their sum
                divided by `num_items_in_batch` when given (transformers' loss convention, which the Trainer relies on
                for gradient accumulation).
            shift_labels: `[B, T]` labels already shifted (`shift_labels[:, t]` is the id that position t predicts,
                `labels[:, t + 1]`), in place of `labels`.
            num_items_in_batch: labelled tokens of the whole (accumulated) batch the loss is normalised by.
            logits_to_keep: compute the logits of the last `logits_to_keep` positions only (0: all), or of the
                positions in a 1-D tensor; the loss is then over those positions.
        """
        has_labels = labels is not None or shift_labels is not None
        if has_labels and self.training and input_ids is not None and self.config.class_dropout_prob > 0:
            input_ids = self.drop_class_tokens(input_ids)
        input_ids, inputs_embeds, position_ids = self._with_position_embeddings(
            input_ids, inputs_embeds, position_ids, kwargs.get("cache", kwargs.get("past_key_values"))
        )
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if has_labels:
            if shift_labels is None:
                shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the id each position predicts
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            positions = torch.arange(shift_labels.shape[1], device=outputs.logits.device)[kept]
            targets = shift_labels[:, kept].to(outputs.logits.device)
            nll = self._codebook_nll(outputs.logits, targets, positions)
            if num_items_in_batch is None:
                num_items_in_batch = (targets != -100).sum().clamp(min=1)
            elif isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(nll.device)
            outputs.loss = nll.sum() / num_items_in_batch
        return outputs

    def _with_position_embeddings(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: object | None,
    ) -> tuple[torch.LongTensor | None, torch.Tensor | None, torch.LongTensor | None]:
        """The shared layout's inputs: the token embeddings plus the learned position embeddings (positions go on from
        the cache's length); the offset layout's pass through unchanged."""
        if self.position_embedding is None:
            return input_ids, inputs_embeds, position_ids
        if inputs_embeds is None:
            inputs_embeds, input_ids = self.get_input_embeddings()(input_ids), None
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        return None, inputs_embeds + self.position_embedding(position_ids), position_ids

    def codebook_logits(
        self, input_ids: torch.LongTensor, positions: torch.Tensor, cache: object | None = None
    ) -> torch.Tensor:
        """`[B, T]` sequences (or their continuation of `cache`, a transformers `Cache` that is updated) -> `[B, T, K]`
        logits of the K ids of the codebook each position predicts: sequence position t predicts image token
        `positions[t]` (`[T]`, in [0, C)). Only those K rows of the output projection are applied (not the whole
        vocabulary), in the model's dtype; the entropy coder's path."""
        _, inputs_embeds, position_ids = self._with_position_embeddings(input_ids, None, None, cache)
        hidden = self.model(
            input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
            position_ids=position_ids, cache=cache, use_cache=cache is not None,
        ).last_hidden_state  # fmt: skip
        index = codebook_offsets(self.config, hidden.device)[positions][:, None] + torch.arange(
            self.config.codebook_size, device=hidden.device
        )  # (T, K)
        return torch.einsum("bth,tkh->btk", hidden, self.lm_head.weight[index])

    def _codebook_nll(self, logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`[B, T, V]` logits at sequence positions `positions` (`[T]`) and `[B, T]` targets (the id each of those
        positions predicts, -100 to ignore) -> `[B, T]` NLL (nats) of each target under the softmax over the K ids of
        its codebook (position t predicts image token t; 0 where the target is -100)."""
        cfg = self.config
        ignore = targets == -100
        if (~ignore & (positions >= cfg.num_image_tokens)).any():
            raise ValueError(
                f"a sequence holds at most {cfg.num_image_tokens + 1} tokens (1 + C): labels must have at most that "
                "many columns, and shift_labels must be -100 from position C on"
            )
        offsets = codebook_offsets(cfg, logits.device)[positions.clamp(max=cfg.num_image_tokens - 1)]  # (T,)
        index = offsets[:, None] + torch.arange(cfg.codebook_size, device=logits.device)  # (T, K)
        image_logits = logits.float().gather(-1, index.expand(logits.shape[0], -1, -1))  # (B, T, K)
        codes = (targets - offsets).masked_fill(ignore, -100)
        if ((codes < 0) | (codes >= cfg.codebook_size))[~ignore].any():
            raise ValueError(
                f"labels[:, 1 + c] must be an id of codebook c, in [offset_c, offset_c + {cfg.codebook_size}) "
                f"({cfg.vocab_layout} layout), or -100"
            )
        return F.cross_entropy(image_logits.transpose(1, 2), codes, reduction="none", ignore_index=-100)

    def token_nll(self, logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """`[B, T, V]` logits and `[B, T]` label sequences -> `[B, T - 1]` NLL (nats) of each image token under the
        softmax over its codebook's K ids (0 where the label is -100)."""
        positions = torch.arange(labels.shape[1] - 1, device=logits.device)
        return self._codebook_nll(logits[:, :-1], labels[:, 1:].to(logits.device), positions)

    @torch.no_grad()
    def bits_per_image(self, token_ids: torch.Tensor, class_labels: ClassLabels = None) -> torch.Tensor:
        """`[B]` negative log2-likelihood of each image's tokens `[B, k]` given its class (null token if None)."""
        input_ids = self.prepare_input_ids(token_ids, class_labels)
        logits = self(input_ids, use_cache=False).logits
        return self.token_nll(logits, input_ids).sum(1) / math.log(2)

    # ---------------------------------------------------------------------------------------------- generation
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """[`GenerationMixin.generate`] with the codebook mask always on and the null token as the default
        `negative_prompt_ids` of classifier-free guidance (`guidance_scale=s`, s != 1).

        Sequences are at most 1 + C tokens: the default `max_length` is C + 1, and a `max_new_tokens` given without
        another `max_length` replaces it.

        Args:
            inputs: `[B, L]` prompts, 1 <= L <= C: a conditioning token, then optionally image tokens to continue.
                Default: one null token (unconditional), unless `inputs_embeds` holds the prompt.
            kwargs: as for `GenerationMixin.generate`, e.g. `inputs_embeds` (`[B, L, hidden_size]`, the embedded
                prompts; without `inputs`, only the generated tokens are returned, as for any transformers model).
        """
        cfg = self.config
        inputs = kwargs.pop("input_ids", None) if inputs is None else inputs
        inputs_embeds = kwargs.get("inputs_embeds")
        if inputs is None and inputs_embeds is None:
            inputs = self.conditioning_ids(None, 1)
        embedded = inputs_embeds is not None
        prompt = inputs_embeds if embedded else inputs  # (B, L, hidden_size) or (B, L)
        if prompt.ndim != (3 if embedded else 2) or not 1 <= prompt.shape[1] <= cfg.num_image_tokens:
            name, shape = ("inputs_embeds", "[batch, L, dim]") if embedded else ("inputs", "[batch, L]")
            raise ValueError(
                f"{name} must be {shape} prompts with 1 <= L <= {cfg.num_image_tokens}, got {list(prompt.shape)}"
            )
        if inputs is not None:
            self._check_conditioning_tokens(inputs)

        # 1 + C, the default max_length, is no length the caller set: a max_new_tokens becomes the max_length it
        # means (transformers would warn that both are set)
        max_new_tokens = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
        max_length = kwargs.get("max_length", getattr(generation_config, "max_length", None))
        if max_new_tokens is not None and max_length in (None, cfg.max_position_embeddings):
            kwargs.pop("max_new_tokens", None)
            if generation_config is None:
                kwargs["max_length"] = prompt.shape[1] + max_new_tokens
            else:
                generation_config = copy.deepcopy(generation_config)
                generation_config.max_new_tokens, generation_config.max_length = None, prompt.shape[1] + max_new_tokens
        scale = kwargs.get("guidance_scale", (generation_config or self.generation_config).guidance_scale)
        if scale is not None and scale != 1:
            if cfg.num_classes == 0 or cfg.class_dropout_prob == 0:
                raise ValueError(
                    f"guidance_scale={scale} needs a class-conditional prior trained with class dropout (the null "
                    f"token is the unconditional branch); this prior has num_classes={cfg.num_classes}, "
                    f"class_dropout_prob={cfg.class_dropout_prob}: use guidance_scale=1"
                )
            if kwargs.get("negative_prompt_ids") is None:
                if inputs is None:
                    raise ValueError(
                        "guidance_scale with a prompt given as inputs_embeds alone needs negative_prompt_ids (the "
                        "null token, then the prompt's image tokens), or the prompt as inputs"
                    )
                kwargs["negative_prompt_ids"] = inputs.clone().index_fill_(1, inputs.new_zeros(1), cfg.null_token_id)
        offset = prompt.shape[1] - (0 if inputs is None else inputs.shape[1])
        processors = LogitsProcessorList([QGPriorCodebookLogitsProcessor(cfg, offset), *(logits_processor or [])])
        return super().generate(inputs, generation_config, logits_processor=processors, **kwargs)

    def _check_conditioning_tokens(self, inputs: torch.LongTensor) -> None:
        """Raise `ValueError` unless each prompt of `inputs` (`[B, L]`) starts with a usable conditioning token."""
        cfg = self.config
        if ((inputs[:, 0] < cfg.image_vocab_size) | (inputs[:, 0] > cfg.null_token_id)).any():
            raise ValueError(
                f"inputs[:, 0] must be conditioning tokens: class tokens {cfg.image_vocab_size}.."
                f"{cfg.null_token_id - 1} or the null token {cfg.null_token_id} (see `conditioning_ids`)"
            )
        if not cfg.has_null_token and (inputs[:, 0] == cfg.null_token_id).any():
            raise ValueError(
                "inputs[:, 0] holds the null token, but this prior was trained without it "
                f"(class_dropout_prob={cfg.class_dropout_prob}): start with a class token"
            )

    @torch.no_grad()
    def generate_image_tokens(
        self,
        class_labels: ClassLabels = None,
        batch_size: int | None = None,
        prefix_length: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_tokens: int | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Sample image tokens: `[B, prefix_length]` codes in [0, K), token c from codebook c.

        Args:
            class_labels: `[B]` labels in [0, num_classes), or one int for `batch_size` images; None samples
                `batch_size` (default 1) images unconditionally.
            prefix_length: sample only the first k tokens (default C); the prefix equals that of a full sample drawn
                with the same seed. `num_tokens` is its deprecated name.
            generator: seeds the sampling (one seed is drawn from it, so successive calls differ); a list of B
                generators seeds each image with its own (one `generate` call per image, so image i depends on
                generator i only, as diffusers' per-image generators); None uses the global RNG.
            generate_kwargs: `guidance_scale`, `temperature`, `top_k`, `top_p`, ... as for `generate`.
        """
        num_tokens = resolve_prefix_length(prefix_length, num_tokens)
        num_tokens = self.config.num_image_tokens if num_tokens is None else num_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise TypeError(f"prefix_length must be an int or None, got {num_tokens!r}")
        if not 1 <= num_tokens <= self.config.num_image_tokens:
            raise ValueError(f"prefix_length must be in [1, {self.config.num_image_tokens}], got {num_tokens}")
        generators = generator if isinstance(generator, list) else [] if generator is None else [generator]
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                f"generator must be a torch.Generator, a list of them (one per image) or None, got {generator!r:.100}"
            )
        input_ids = self.conditioning_ids(class_labels, batch_size)
        if not isinstance(generator, list):
            return self.image_token_ids(self._seeded_generate(input_ids, num_tokens, generator, generate_kwargs))
        if len(generator) != len(input_ids):
            raise ValueError(
                f"generator: a list needs one torch.Generator per image, {len(input_ids)} here, got {len(generator)}"
            )
        rows = [
            self._seeded_generate(ids[None], num_tokens, g, generate_kwargs) for ids, g in zip(input_ids, generators)
        ]
        return self.image_token_ids(torch.cat(rows))

    def _seeded_generate(
        self, input_ids: torch.LongTensor, num_tokens: int, generator: torch.Generator | None, generate_kwargs: dict
    ) -> torch.LongTensor:
        """`generate` `num_tokens` image tokens after `input_ids` (`[B, 1]`), seeded by `generator` if given."""
        if generator is None:
            return self.generate(input_ids, max_length=num_tokens + 1, **generate_kwargs)
        # `generate` samples from the global RNG: seed it from `generator` inside a forked RNG state
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.generate(input_ids, max_length=num_tokens + 1, **generate_kwargs)


__all__ = ["QGPriorCodebookLogitsProcessor", "QGPriorForCausalLM", "codebook_offsets"]
