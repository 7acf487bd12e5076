import pytest
import torch

from qg_tokenizer import PerTokenQuantizer, voronoi_reset
from qg_tokenizer.quantizer_qgvae import RESET_EPSILON


def reference_reset(codebook: torch.Tensor, statistic: torch.Tensor) -> list[list[tuple[int, int]]]:
    """The notebook's sequential loop; returns the (dead, live) pairs per token instead of editing."""
    statistic = statistic.clone()
    pairs = []
    for c in range(statistic.shape[0]):
        token_pairs = []
        while True:
            unused = int(statistic[c].argmin())
            if statistic[c, unused] > 0:
                break
            busiest = int(statistic[c].argmax())
            if statistic[c, busiest] <= RESET_EPSILON:
                break
            token_pairs.append((unused, busiest))
            statistic[c, busiest] = statistic[c, unused] = RESET_EPSILON
        pairs.append(token_pairs)
    return pairs


def test_reset_matches_reference_loop_on_hand_built_statistics():
    codebook = torch.arange(3 * 6 * 2, dtype=torch.float32).reshape(3, 6, 2)
    statistic = torch.tensor(
        [
            [0.0, 5.0, 0.0, 2.0, 0.0, 9.0],  # 3 dead, 3 live: 0<-5, 2<-1, 4<-3
            [1.0, 0.0, 3.0, 0.0, 0.0, 0.0],  # 4 dead, 2 live: 1<-2, 3<-0; 4 and 5 stay dead
            [1e-7, 0.0, 4.0, 1.0, 1.0, 2.0],  # 1 dead; 1e-7 is neither dead nor splittable: 1<-2
        ]
    )
    original = codebook.clone()
    resets = voronoi_reset(codebook, statistic, torch.Generator().manual_seed(0))
    expected_pairs = reference_reset(original, statistic)
    assert expected_pairs == [[(0, 5), (2, 1), (4, 3)], [(1, 2), (3, 0)], [(1, 2)]]
    assert resets.tolist() == [3, 2, 1]
    moved = torch.zeros(3, 6, dtype=torch.bool)
    for c, token_pairs in enumerate(expected_pairs):
        for dead, live in token_pairs:
            moved[c, dead] = True
            diff = codebook[c, dead] - original[c, live]
            assert diff.abs().max() <= 1e-4 and diff.abs().max() > 0  # copy + noise in (-1e-4, 1e-4)
    assert torch.equal(codebook[~moved], original[~moved])  # nothing else moves, sources untouched


def test_reset_random_statistics_against_reference():
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        statistic = torch.rand(4, 50, generator=generator)
        statistic[torch.rand(4, 50, generator=generator) < 0.6] = 0
        codebook = torch.randn(4, 50, 3, generator=generator)
        original = codebook.clone()
        voronoi_reset(codebook, statistic)
        for c, token_pairs in enumerate(reference_reset(original, statistic)):
            for dead, live in token_pairs:
                assert (codebook[c, dead] - original[c, live]).abs().max() <= 1e-4
            changed = (codebook[c] != original[c]).any(-1).nonzero().flatten().tolist()
            assert sorted(changed) == sorted(dead for dead, _ in token_pairs)


def test_used_codewords_at_most_double_and_reset_is_deterministic():
    statistic = torch.zeros(2, 64)
    statistic[0, :5] = torch.rand(5) + 0.1
    statistic[1, :40] = torch.rand(40) + 0.1
    results = []
    for _ in range(2):
        codebook = torch.zeros(2, 64, 4)
        codebook[:, :, 0] = torch.arange(64.0)
        resets = voronoi_reset(codebook, statistic, torch.Generator().manual_seed(7))
        results.append(codebook)
        distinct_live = [(codebook[c, :, 0] - torch.arange(64.0)).ne(0).sum().item() for c in range(2)]
        assert distinct_live == [5, 24]  # token 0: 5 dead filled (5 -> 10 used); token 1: all 24 dead filled
        assert resets.tolist() == [5, 24]
    assert torch.equal(results[0], results[1])
    other = torch.zeros(2, 64, 4)
    other[:, :, 0] = torch.arange(64.0)
    voronoi_reset(other, statistic, torch.Generator().manual_seed(8))
    assert not torch.equal(other, results[0])


def test_quantizer_module_reset_clears_statistic_and_accumulates_grad():
    torch.manual_seed(0)
    quantizer = PerTokenQuantizer(num_tokens=3, codebook_size=16, codeword_dim=4)
    torch.nn.init.uniform_(quantizer.codebook, -0.5, 0.5)
    torch.nn.init.zeros_(quantizer.global_offset)
    z = torch.randn(32, 3, 4, requires_grad=True)
    out = quantizer(z)
    (0.25 * out.codebook_loss).backward()
    quantizer.accumulate_reset_statistic()
    expected = quantizer.codebook.grad.abs().mean(-1)
    torch.testing.assert_close(quantizer.reset_statistic, expected)
    used = torch.zeros(3, 16, dtype=torch.bool)
    used[torch.arange(3).expand(32, 3), out.token_ids] = True
    assert torch.equal(quantizer.reset_statistic > 0, used)  # exactly 0 for codewords not selected
    before = quantizer.codebook.detach().clone()
    resets = quantizer.voronoi_reset(torch.Generator().manual_seed(0))
    assert quantizer.reset_statistic.sum() == 0
    assert torch.equal(resets, torch.minimum(used.sum(-1), (~used).sum(-1)))
    changed = (quantizer.codebook.detach() != before).any(-1)
    assert torch.equal(changed.sum(-1), resets)
    assert not (changed & used).any()  # only dead codewords move


def test_accumulate_without_backward_raises():
    quantizer = PerTokenQuantizer(2, 4, 3)
    with pytest.raises(RuntimeError, match="after backward"):
        quantizer.accumulate_reset_statistic()
