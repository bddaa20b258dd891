"""SFT throughput features: packed rows see no other example, length grouping, bin packing."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from palign.data.sampling import ResumableShuffleSampler, pack_examples
from palign.data.sft import PackedSFTCollator, SFTCollator

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
    {"input_ids": [21, 22, 23, 24], "labels": [21, -100, -100, 24]},  # a supervised first token
]
BINS = [[EXAMPLES[0], EXAMPLES[1]], [EXAMPLES[2]]]  # a micro-batch of 2 packed bins


def test_a_packed_micro_batch_is_one_row_that_flash_attention_reads_as_packed():
    """Flash attention derives example boundaries from `position_ids` for a batch of one row only:
    transformers' own detection, called as its flash path calls it, must see the micro-batch as packed,
    and cut it where the examples are."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    packed = PackedSFTCollator()(BINS)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 12, 13, 21, 22, 23, 24]]  # no padding
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert "attention_mask" not in packed
    # every example's first token is unsupervised: the previous example's last token predicts nothing
    assert packed["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, 12, 13, -100, -100, -100, 24]]
    assert packed["real_tokens"].sum() == packed["input_ids"].numel() == 12
    batch_size = packed["input_ids"].shape[0]
    assert _is_packed_sequence(packed["position_ids"], batch_size)
    (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(packed["position_ids"])
    assert cu_seqlens.tolist() == [0, 5, 8, 12] and int(max_length) == 5


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_the_logits_it_has_alone(tiny_model, attention):
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    model.eval()
    packed = PackedSFTCollator()(BINS)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for example in EXAMPLES:
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(together[offset : offset + n], alone, atol=1e-5, rtol=1e-5)
            offset += n
    # the unpacked collator pads with an attention mask instead
    padded = SFTCollator(pad_token_id=0)(EXAMPLES)
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


def _examples_in(batch) -> list[tuple[int, ...]]:
    """The examples of a flattened packed row, cut where the positions restart."""
    ids, positions = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in itertools.pairwise(starts)]


def test_packed_loaders_shard_across_ranks_and_resume_mid_epoch():
    import datasets

    from palign.data.datamodule import train_loader

    lengths = [3, 9, 4, 7, 2, 8, 5, 6, 3, 9, 4, 7, 5]
    rows = [[100 * i + t for t in range(n)] for i, n in enumerate(lengths)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    every = {tuple(r) for r in rows}
    loaders = [
        train_loader(dataset, 0, micro_batch_size=2, seed=1, packing=True, pack_length=12, num_replicas=2, rank=rank)
        for rank in (0, 1)
    ]
    shards = [list(loader) for loader in loaders]
    assert len(shards[0]) == len(shards[1])  # the same number of forwards on every rank
    assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for s in shards for b in s)
    seen = [[e for b in shard for e in _examples_in(b)] for shard in shards]
    assert set(seen[0]) | set(seen[1]) == every  # together the epoch
    # 6 bins, 3 micro-batches of 2: the last round is filled with the epoch's first micro-batch
    assert len(loaders[0].dataset) == 6 and loaders[0].sampler.padded_items == 2
    assert set(seen[0]) & set(seen[1]) == set(_examples_in(shards[0][0]))
    assert all(sum(map(len, _examples_in(b))) <= 2 * 12 for shard in shards for b in shard)

    # a resumed rank-1 loader (state from Lightning's checkpoint) continues on its next unseen micro-batch
    resumed = train_loader(dataset, 0, micro_batch_size=2, seed=1, packing=True, pack_length=12, num_replicas=2, rank=1)
    resumed.load_state_dict({"epoch": 0, "batches_done": 1})
    rest = list(resumed)
    assert [b["input_ids"].tolist() for b in rest] == [b["input_ids"].tolist() for b in shards[1][1:]]
