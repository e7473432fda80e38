"""The sample order as pure functions (cmscale.data.order): partition, resume positions, flips."""
from collections import Counter
from dataclasses import replace

import pytest

from cmscale.data.order import Layout, flip_bit, shard_permutation


def test_slot_epochs_partition_the_dataset():
    # Unequal shards, N = 103 not divisible by P = 6 slots nor by the block size.
    layout = Layout(counts=(10, 0, 31, 7, 40, 15), world_size=3, workers=2, batch_size=4, seed=5, block=8)
    N, P = layout.num_samples, layout.num_slots
    assert N == 103 and P == 6
    assert sorted(layout.slot_len(q) for q in range(P)) == [17, 17, 17, 17, 17, 18]
    for epoch in range(3):
        seen = Counter()
        for q in range(P):
            n_q = layout.slot_len(q)
            for p in range(epoch * n_q, (epoch + 1) * n_q):
                e, g = layout.sample_at(q, p)
                assert e == epoch
                seen[g] += 1
        assert seen == Counter(range(N)), f"epoch {epoch} is not a partition"


def test_order_depends_on_seed_and_epoch_only_through_the_layout():
    a = Layout(counts=(50, 50), world_size=2, workers=1, batch_size=2, seed=1, block=16)
    b = Layout(counts=(50, 50), world_size=2, workers=1, batch_size=2, seed=2, block=16)
    stream = lambda lay, e: [lay.sample_at(0, p)[1] for p in range(e * 50, (e + 1) * 50)]  # noqa: E731
    assert stream(a, 0) != stream(a, 1)  # a new shuffle every epoch
    assert stream(a, 0) != stream(b, 0)  # and per seed
    assert stream(a, 3) == stream(replace(a), 3)  # and nothing else
    assert sorted(shard_permutation(7, 3, 10)) == list(range(10))
    assert list(shard_permutation(7, 3, 10)) == list(shard_permutation(7, 3, 10))


def test_start_positions_exact_values():
    # R=2, K=3, b=4: global batch 8. After 5 global steps every rank consumed 20 images = 5
    # batches: workers 0,1,2,0,1 -> positions (8, 8, 4); the next batch comes from worker 2.
    layout = Layout(counts=(100,), world_size=2, workers=3, batch_size=4)
    assert layout.start_positions(40, rank=1) == (2, [8, 8, 4])
    assert layout.start_positions(0, rank=0) == (0, [0, 0, 0])
    # Not a multiple of the global batch: 44 -> 22 per rank = 5 batches + 2: worker 2 at 4 + 2.
    assert layout.start_positions(44, rank=0) == (2, [8, 8, 6])
    assert sum(layout.start_positions(48 * 7, 0)[1]) == 48 * 7 // 2


def test_flip_bit_is_a_fair_pure_function():
    bits = [flip_bit(3, e, g) for e in range(4) for g in range(2000)]
    assert 0.47 < sum(bits) / len(bits) < 0.53
    assert bits == [flip_bit(3, e, g) for e in range(4) for g in range(2000)]
    assert [flip_bit(3, 0, g) for g in range(200)] != [flip_bit(3, 1, g) for g in range(200)]
    assert [flip_bit(3, 0, g) for g in range(200)] != [flip_bit(4, 0, g) for g in range(200)]


def test_too_few_samples_for_the_slots_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be split over 8 reader slots"):
        Layout(counts=(3, 4), world_size=4, workers=2, batch_size=1)
