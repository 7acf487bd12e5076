"""Per-token vector quantisation and the Voronoi-style codebook reset of QG-VAE (SPEC sections 1-2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

RESET_EPSILON = 1e-6  # statistic given to a codeword once it took part in a split (reference: EPSILON)
RESET_NOISE = 1e-4  # half-width of the uniform noise added to a copied codeword


@dataclass
class QuantizerOutput:
    """Result of [`PerTokenQuantizer.forward`].

    Attributes:
        quantized: `[B, C, D]` codewords, with the straight-through gradient to the input.
        token_ids: `[B, C]` int64 codeword indices, token c into codebook c.
        codebook_loss: `mean((sg(z) - e)^2)`, the only term that reaches the codebooks.
        commitment_loss: `mean((z - sg(e))^2)`, the term that pulls the encoder to its codewords.
    """

    quantized: torch.Tensor
    token_ids: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class PerTokenQuantizer(nn.Module):
    """C independent codebooks `[C, K, D]`: token c is quantised against codebook c only.

    Also holds the global offset `[C, D]` that the decoder adds to every codeword of token c.

    Buffers (saved with the model, summed over processes by a distributed trainer):
        reset_statistic `[C, K]`: accumulated mean |dL/dE| per codeword since the last reset (the Voronoi reset's M).
        usage_counts `[C, K]`: how often each codeword was selected in training since the counts were cleared.
    """

    def __init__(self, num_tokens: int, codebook_size: int, codeword_dim: int):
        super().__init__()
        self.num_tokens, self.codebook_size, self.codeword_dim = num_tokens, codebook_size, codeword_dim
        self.codebook = nn.Parameter(torch.empty(num_tokens, codebook_size, codeword_dim))
        # one learned D-vector per token position, added to its codeword before decoding ("global offset")
        self.global_offset = nn.Parameter(torch.empty(num_tokens, codeword_dim))
        self.register_buffer("reset_statistic", torch.zeros(num_tokens, codebook_size))
        self.register_buffer("usage_counts", torch.zeros(num_tokens, codebook_size))

    @torch.no_grad()
    def nearest_codewords(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, C, D]` -> `[B, C]` index of the nearest codeword of each token's own codebook.

        All C searches run as one batched matmul: `||e||^2 - 2 z.e` (||z||^2 does not change the argmin).
        """
        codebook = self.codebook.float()
        # (C, 1, K) + (C, B, D) @ (C, D, K) -> (C, B, K)
        distances = torch.baddbmm(
            codebook.square().sum(-1).unsqueeze(1), z.float().transpose(0, 1), codebook.transpose(1, 2), alpha=-2.0
        )
        return distances.argmin(-1).transpose(0, 1)

    def lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[B, C]` ids -> `[B, C, D]` codewords (token c read from codebook c)."""
        token_index = torch.arange(self.num_tokens, device=token_ids.device)
        return self.codebook[token_index, token_ids]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise `z [B, C, D]` in fp32 (autocast off); count codeword usage in training mode."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            token_ids = self.nearest_codewords(z)
            codewords = self.lookup(token_ids)
            codebook_loss = (z.detach() - codewords).square().mean()
            commitment_loss = (z - codewords.detach()).square().mean()
            quantized = z + (codewords - z).detach()
        if self.training:
            self.count_usage(token_ids)
        return QuantizerOutput(quantized, token_ids, codebook_loss, commitment_loss)

    @torch.no_grad()
    def count_usage(self, token_ids: torch.Tensor) -> None:
        flat = token_ids + torch.arange(self.num_tokens, device=token_ids.device) * self.codebook_size
        self.usage_counts.view(-1).index_add_(
            0, flat.reshape(-1), torch.ones(flat.numel(), device=flat.device, dtype=self.usage_counts.dtype)
        )

    @torch.no_grad()
    def accumulate_reset_statistic(self, codebook_grad: torch.Tensor | None = None) -> None:
        """`M += mean_D |dL/dE|`; call after every (unscaled) backward pass of an autoencoder step."""
        grad = self.codebook.grad if codebook_grad is None else codebook_grad
        if grad is None:
            raise RuntimeError("accumulate_reset_statistic needs the codebook gradient: call it after backward()")
        self.reset_statistic += grad.detach().abs().float().mean(-1)

    @torch.no_grad()
    def voronoi_reset(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Split the busiest Voronoi cells into the dead codewords of each token, then clear the statistic.

        Uses `reset_statistic` as it stands (a distributed trainer all-reduces it first and passes the same seeded
        `generator` to every process, so all processes end with identical codebooks). Returns `[C]` resets per token.
        """
        resets = voronoi_reset(self.codebook.data, self.reset_statistic, generator)
        self.reset_statistic.zero_()
        return resets

    @torch.no_grad()
    def init_from_samples(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent initialisation: codebook c becomes K of token c's own encoder outputs `z [N, C, D]`.

        Each token draws its own random K of the N samples (without replacement while N >= K; with replacement and
        U(-1e-4, 1e-4) noise otherwise, so that no two codewords coincide). Pass the same `generator` state and the
        same (gathered) `z` on every process to keep the codebooks identical.
        """
        if z.ndim != 3 or z.shape[1:] != (self.num_tokens, self.codeword_dim):
            raise ValueError(f"z must have shape [N, {self.num_tokens}, {self.codeword_dim}], got {list(z.shape)}")
        num, k = z.shape[0], self.codebook_size
        scores = torch.rand(self.num_tokens, max(num, k), generator=generator)
        index = scores.argsort(-1)[:, :k] % num  # (C, K): a permutation of the samples, repeated when N < K
        samples = z.transpose(0, 1).float().cpu()  # (C, N, D)
        chosen = samples.gather(1, index.unsqueeze(-1).expand(-1, -1, self.codeword_dim))
        if num < k:
            noise = torch.rand(chosen.shape, generator=generator) * 2 - 1
            chosen = chosen + noise * RESET_NOISE
        self.codebook.copy_(chosen.to(self.codebook.device, self.codebook.dtype))

    def codebook_usage(self) -> dict[str, torch.Tensor]:
        """Per-token usage statistics of `usage_counts`, see [`usage_statistics`]."""
        return usage_statistics(self.usage_counts)


@torch.no_grad()
def usage_statistics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token usage of codeword counts `[C, K]`.

    Returns `used_fraction [C]`, `perplexity [C]` (exp of the entropy of the usage distribution) and `dead [C]`.
    """
    counts = counts.float()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    used = counts > 0
    return {"used_fraction": used.float().mean(-1), "perplexity": entropy.exp(), "dead": (~used).sum(-1)}


@torch.no_grad()
def voronoi_reset(
    codebook: torch.Tensor, statistic: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The reference reset, vectorised over tokens and codewords; edits `codebook [C, K, D]` in place.

    For each token c: the dead codewords (statistic exactly 0), in index order, are paired one-to-one with the live
    codewords whose statistic exceeds 1e-6, in descending order of the statistic; each dead codeword becomes a copy of
    its partner plus U(-1e-4, 1e-4)^D noise. So #resets = min(#dead, #live) and used codewords at most double.
    The noise tensor has a fixed shape `[C, K, D]`, so the same generator state gives the same result everywhere.
    Returns `[C]` int64, the number of codewords reset per token.
    """
    num_tokens, codebook_size, dim = codebook.shape
    statistic = statistic.to(device=codebook.device, dtype=torch.float32)
    dead = statistic == 0
    live = statistic > RESET_EPSILON
    # rank j -> j-th dead codeword (in index order) and j-th busiest live codeword
    dead_order = torch.sort((~dead).to(torch.int8), dim=-1, stable=True).indices
    live_order = torch.sort(statistic, dim=-1, descending=True, stable=True).indices
    num_resets = torch.minimum(dead.sum(-1), live.sum(-1))
    token, rank = (torch.arange(codebook_size, device=codebook.device) < num_resets[:, None]).nonzero(as_tuple=True)
    device = generator.device if generator else None
    noise = torch.rand(num_tokens, codebook_size, dim, generator=generator, device=device)
    noise = (noise.to(codebook.device, codebook.dtype) * 2 - 1) * RESET_NOISE
    codebook[token, dead_order[token, rank]] = codebook[token, live_order[token, rank]] + noise[token, rank]
    return num_resets


__all__ = ["PerTokenQuantizer", "QuantizerOutput", "usage_statistics", "voronoi_reset"]
