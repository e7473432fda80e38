"""Streaming one reader slot's samples in the order `cmscale.data.order` defines.

Tar shards are read sequentially by `shardlist.tar_samples` (webdataset's `gopen` and
`tar_file_iterator`; a fast path for plain local tars). Raw bytes are collected one shuffle
block at a time; decoding happens later, only for emitted samples, so samples skipped at a
resume point or in another slot's part of a shard are never decoded.

Structural bad input (policy as in `cmscale.data.images`):
- a shard that cannot be opened: ShardOpenError, whatever the policy;
- a truncated tar (read error after the shard was opened) or a shard with fewer samples than
  its manifest entry: "raise" -> BadInputError; "convert"/"skip" -> counted (each time the
  shard is read) as `truncated_shard` / `short_shard`, and every planned sample that did not arrive is emitted as
  a placeholder (None) that the loader skips and counts as `missing_sample`. Placeholders keep
  the planned positions, so the rest of the stream does not shift.
A shard with more samples than its manifest entry is read only up to that count.
"""
from __future__ import annotations

from typing import Callable, Iterator

from .images import BadInputError
from .order import Layout
from .shardlist import ShardOpenError, is_local, tar_samples


class Item:
    """One planned sample of a slot stream; `sample` is None when it is missing from its shard."""

    __slots__ = ("pos", "epoch", "index", "url", "key", "sample")

    def __init__(self, pos, epoch, index, url, key, sample):
        self.pos = pos  # slot position after this item (what a resume continues from)
        self.epoch = epoch
        self.index = index  # dataset index g
        self.url = url
        self.key = key
        self.sample = sample


def read_shard(url: str, first: int, stop: int, policy: str, count: Callable[[str], None]) -> Iterator[tuple]:
    """Yield (key, sample or None) for samples [first, stop) of a shard, in tar order.

    Samples before `first` are read and dropped without decoding. Missing samples (truncated or
    short shard) come as (None, None) under "convert"/"skip"; see the module docstring.
    """
    n = 0
    try:
        for key, sample in tar_samples(url):
            if n >= first:
                yield key, sample
            n += 1
            if n >= stop:
                return
        problem, kind = f"has {n} samples, its manifest entry says {stop} or more", "short_shard"
    except ShardOpenError:
        raise
    except Exception as e:
        if n == 0 and not is_local(url):
            # A remote object that yields nothing is taken as missing, not as truncated.
            raise ShardOpenError(f"cannot read shard {url}: {e}") from e
        problem, kind = f"is truncated after {n} complete samples ({type(e).__name__}: {e})", "truncated_shard"
    if policy == "raise":
        raise BadInputError(f"shard {url} {problem}")
    count(kind)
    for _ in range(max(n, first), stop):
        yield None, None


def read_range(layout: Layout, urls: list, epoch: int, t0: int, t1: int, policy: str, count) -> Iterator[tuple]:
    """Yield (dataset index, url, key, sample or None) for epoch positions [t0, t1) of `epoch`."""
    perm, starts = layout.epoch_shards(epoch)
    for j, shard in enumerate(perm):
        a, b = int(starts[j]), int(starts[j + 1])
        if b <= t0 or a == b:
            continue
        if a >= t1:
            break
        first, stop = max(t0, a) - a, min(t1, b) - a
        base = int(layout.shard_starts[shard])
        i = first
        for key, sample in read_shard(urls[shard], first, stop, policy, count):
            yield base + i, urls[shard], key, sample
            i += 1


def slot_items(layout: Layout, urls: list, q: int, start: int, policy: str, count) -> Iterator[Item]:
    """Slot q's infinite stream of planned samples from slot position `start` (see `order`)."""
    n_q = layout.slot_len(q)
    a_q = layout.slot_bounds(q)[0]
    B = layout.block
    pos = start
    while True:
        epoch, offset = divmod(pos, n_q)
        beta0, u0 = divmod(offset, B)
        raw = read_range(layout, urls, epoch, a_q + beta0 * B, a_q + n_q, policy, count)
        for beta in range(beta0, (n_q + B - 1) // B):
            length = min(B, n_q - beta * B)
            block = [next(raw) for _ in range(length)]
            order = layout.block_permutation(epoch, q, beta, length)
            for u in range(u0 if beta == beta0 else 0, length):
                g, url, key, sample = block[order[u]]
                pos += 1
                yield Item(pos, epoch, g, url, key, sample)
        raw.close()
        assert pos == (epoch + 1) * n_q  # the next epoch starts at offset 0
