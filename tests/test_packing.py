"""SFT throughput features: packed rows see no other example, length grouping, bin packing."""

from __future__ import annotations

import torch

from palign.data.sampling import ResumableShuffleSampler, pack_examples
from palign.data.sft import PackedSFTCollator, SFTCollator


def test_packed_rows_give_each_example_the_logits_it_has_alone(tiny_model):
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
        {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
        {"input_ids": [21, 22, 23, 24], "labels": [-100, -100, -100, 24]},
    ]
    packed = PackedSFTCollator(pad_token_id=0)([[examples[0], examples[1]], [examples[2]]])
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert packed["labels"][1].tolist() == [-100, -100, -100, 24, -100, -100, -100, -100]
    assert packed["real_tokens"].sum() == 12
    tiny_model.eval()
    with torch.no_grad():
        together = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for row, offset, example in ((0, 0, examples[0]), (0, 5, examples[1]), (1, 0, examples[2])):
            alone = tiny_model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            n = len(example["input_ids"])
            assert torch.allclose(together[row, offset : offset + n], alone, atol=1e-5)
    # and the unpacked collator pads with an attention mask instead
    padded = SFTCollator(pad_token_id=0)(examples)
    assert padded["attention_mask"].sum() == 12 and "position_ids" not in padded


def test_pack_examples_fills_bins_without_overflow():
    lengths = [700, 300, 500, 200, 1000, 90, 400]
    bins = pack_examples(lengths, capacity=1000, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins)
    assert len(bins) == 4  # 3190 tokens need at least 4 rows of 1000
    assert pack_examples(lengths, 1000, seed=0) == bins  # deterministic


def test_length_grouped_order_is_a_permutation_with_similar_lengths_per_batch():
    lengths = [10, 500, 20, 480, 30, 470, 40, 460] * 4
    sampler = ResumableShuffleSampler(len(lengths), seed=3, lengths=lengths, batch_size=2, group_size=8)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i : i + 2] for i in range(0, len(order), 2)]
    spread = sum(abs(lengths[a] - lengths[b]) for a, b in batches) / len(batches)
    plain = ResumableShuffleSampler(len(lengths), seed=3)
    plain_batches = [list(plain)[i : i + 2] for i in range(0, len(lengths), 2)]
    plain_spread = sum(abs(lengths[a] - lengths[b]) for a, b in plain_batches) / len(plain_batches)
    assert spread < plain_spread
    sampler.resume(epoch=0, items_done=6)
    assert list(sampler) == order[6:]  # resuming skips exactly the consumed items


def test_length_grouping_keeps_batches_aligned_when_the_count_is_not_a_multiple():
    """A short batch shuffled into the middle would shift every later DataLoader batch boundary."""
    lengths = [5, 900, 40, 870, 60, 910, 30, 880, 50, 890]  # 10 items, batches of 4: one short batch
    for seed in range(20):
        order = ResumableShuffleSampler(len(lengths), seed=seed, lengths=lengths, batch_size=4, group_size=64).order(0)
        assert sorted(order) == list(range(10))
        batches = [order[i : i + 4] for i in range(0, 10, 4)]
        for batch in batches[:2]:  # the two full batches, by length, in either order
            assert sorted(batch) in ([1, 5, 7, 9], [2, 3, 4, 8])
        assert sorted(batches[2]) == [0, 6]  # the short batch comes last
