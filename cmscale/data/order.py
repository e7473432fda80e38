"""The sample order: which sample every rank and worker sees, as pure functions of the layout.

Everything the loader streams is defined here; the reader (`cmscale.data.reader`) only makes it
fast, and the tests check the two against each other.

Notation: M shards with c_0..c_{M-1} samples (the manifest's counts, in shard-list order),
N = sum c_j samples; dataset index g = (samples in earlier shards) + index inside the shard.
R = world size, K = reader slots per rank (DataLoader workers, 1 when num_workers=0),
P = R * K slots, slot q = rank * K + worker; b = batch size per rank; G = b * R global batch.

1. Epoch order. Epoch e lists the shards in the order of a permutation drawn from (seed, e) and
   concatenates their samples: N positions t = 0..N-1 (the samples of a shard stay in tar order).
2. Split at the sample level, contiguously. Slot q owns epoch positions [q*N//P, (q+1)*N//P):
   n_q = N//P or N//P + 1 samples. Each slot therefore opens only the shards overlapping its
   range and skips (reads, never decodes) at most a part of its first shard: exact, and I/O is
   the dataset once per epoch plus at most P partial shard prefixes, whatever R and K are.
3. Shuffle. A slot's range is cut into blocks of B samples (the last may be shorter); block beta
   of epoch e is emitted in the order of a permutation drawn from (seed, e, P, q, beta).
4. Slot stream. Slot q emits its epoch-0 range, then epoch 1, ... forever; slot position p
   (samples emitted, counting skipped bad ones) is epoch p // n_q, offset p % n_q. Epoch
   boundaries are per slot: since n_q differs by at most 1 between slots, after E epochs slots
   are at most E samples apart. Every sample appears exactly once in every slot-epoch
   partition: for each e the P slot-epoch ranges partition the dataset.
5. Batches. A worker cuts its stream into batches of b usable samples. The rank's DataLoader
   takes batches from its workers round-robin: rank batch j comes from worker j % K and is
   that worker's batch j // K.
6. Flips. Sample g in (slot-)epoch e is flipped iff a hash of (seed, e, g) says so: independent
   of rank, worker and world size, and needs no RNG state.

Resume from S = images seen (global count). Every rank consumed c = S // R images, that is
j0 = c // b batches plus rem = c % b: worker k is at position b * #{j < j0 : j % K == k} (plus
rem for worker j0 % K) and the DataLoader's worker i plays worker (j0 + i) % K so that the next
batch comes from worker j0 % K.
- Same layout (seed, counts, R, K, b, B), S a multiple of G, and no sample skipped as bad input
  before S in the current slot-epochs: the resumed stream is the uninterrupted one, batch for
  batch (exact). With skipped samples, the loader's `state_dict()` stores positions in planned
  samples and is exact too.
- Same layout, S not a multiple of G: every worker continues exactly where the formula puts it
  (nothing repeated or skipped within a worker), but batches are cut differently.
- R, K, b or B changed: the same formula puts every slot at about S / P samples, i.e. at the
  same epoch and fraction of epoch. The rest of that epoch comes from the new split (some of
  its samples may repeat, others be missed); from the next epoch on every sample is seen
  exactly once per epoch again. This never fails.

Trade-off: a per-sample global shuffle with every rank taking every P-th sample would give a
world-size-independent order, but every slot would read every shard (P times the I/O, fatal on
object stores). Contiguous ranges plus block shuffles read each sample once; mixing comes from
the per-epoch shard permutation, the blocks, and the interleaving of P slots in a global batch.
Shards must therefore not be class-sorted inside (make_shards shuffles its input).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

_TAG_SHARDS, _TAG_BLOCK, _TAG_FLIP = 0x5A4D, 0xB10C, 0xF11B
_M64 = (1 << 64) - 1


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a cheap, well-mixed hash of a 64-bit integer.
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def flip_bit(seed: int, epoch: int, index: int) -> bool:
    """Whether dataset sample `index` is mirrored in epoch `epoch` (pure function, p = 1/2)."""
    return bool(_mix64(_mix64(_mix64(_TAG_FLIP ^ (int(seed) & _M64)) ^ int(epoch)) ^ int(index)) >> 63)


def shard_permutation(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the shards (indices into the shard list)."""
    return _rng(seed, _TAG_SHARDS, epoch).permutation(num_shards)


@dataclass(frozen=True)
class Layout:
    """Everything the sample order depends on (see the module docstring)."""

    counts: tuple  # samples per shard, in shard-list order (the manifest's counts)
    world_size: int  # R
    workers: int  # K: reader slots per rank, max(1, num_workers)
    batch_size: int  # b: images per rank per step
    seed: int = 0
    block: int = 1000  # B: shuffle block, in samples

    def __post_init__(self):
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        if min(self.world_size, self.workers, self.batch_size, self.block) < 1:
            raise ValueError(f"world_size, workers, batch_size and block must be >= 1: {self}")
        if any(c < 0 for c in self.counts):
            raise ValueError("shard sample counts must be >= 0")
        if self.num_samples < self.num_slots:
            raise ValueError(
                f"{self.num_samples} samples cannot be split over {self.num_slots} reader slots "
                f"(world size {self.world_size} x {self.workers} workers); use fewer workers"
            )

    @property
    def num_samples(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @cached_property
    def shard_starts(self) -> np.ndarray:
        """Dataset index of each shard's first sample; last entry is N."""
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def slot_bounds(self, q: int) -> tuple[int, int]:
        """Slot q's range [start, end) of epoch positions."""
        n, p = self.num_samples, self.num_slots
        return q * n // p, (q + 1) * n // p

    def slot_len(self, q: int) -> int:
        a, b = self.slot_bounds(q)
        return b - a

    def epoch_shards(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(perm, starts): shard perm[j] occupies epoch positions [starts[j], starts[j+1])."""
        perm = shard_permutation(self.seed, epoch, len(self.counts))
        counts = np.asarray(self.counts, dtype=np.int64)[perm]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return perm, starts

    def block_permutation(self, epoch: int, q: int, beta: int, length: int) -> np.ndarray:
        """Emission order of block beta of slot q in epoch `epoch` (indices into the block)."""
        return _rng(self.seed, _TAG_BLOCK, epoch, self.num_slots, q, beta).permutation(length)

    def sample_at(self, q: int, p: int) -> tuple[int, int]:
        """(epoch, dataset index) of slot q's stream position p: the definition the reader implements."""
        n_q = self.slot_len(q)
        epoch, o = divmod(p, n_q)
        beta, u = divmod(o, self.block)
        length = min(self.block, n_q - beta * self.block)
        t = self.slot_bounds(q)[0] + beta * self.block + int(self.block_permutation(epoch, q, beta, length)[u])
        perm, starts = self.epoch_shards(epoch)
        j = int(np.searchsorted(starts, t, side="right")) - 1
        return epoch, int(self.shard_starts[perm[j]] + (t - starts[j]))

    def start_positions(self, images_seen: int, rank: int) -> tuple[int, list[int]]:
        """(first worker, slot position of each of this rank's K workers) after `images_seen` global images."""
        del rank  # every rank has consumed the same number of images
        K, b = self.workers, self.batch_size
        c = max(0, int(images_seen)) // self.world_size
        j0, rem = divmod(c, b)
        first = j0 % K
        positions = [b * (j0 // K + (1 if k < first else 0)) for k in range(K)]
        positions[first] += rem
        return first, positions

    def fingerprint(self, rank: int) -> dict:
        """What a saved reader state is only valid for."""
        counts = hashlib.sha1(np.asarray(self.counts, dtype=np.int64).tobytes()).hexdigest()
        return dict(
            counts_sha1=counts, world_size=self.world_size, workers=self.workers,
            batch_size=self.batch_size, seed=self.seed, block=self.block, rank=rank,
        )
