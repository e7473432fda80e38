"""The training data loader: WebDataset tar shards -> per-rank batches of [-1, 1] float NCHW images.

    loader = build_loader("data/lsun_cat/data-{000000..000127}.tar", batch_size_per_rank=32,
                          rank=rank, world_size=world_size, seed=0, num_workers=4,
                          start_images=images_seen)          # images_seen from the checkpoint
    for images, labels in loader:                            # infinite, over epochs
        ...                                                  # labels: None or LongTensor (b,)
        log(loader.images_seen, loader.bad_input_counts)

Which sample a rank sees at each step is a pure function of (seed, shard counts, world size R,
workers per rank K, batch size b); `cmscale.data.order` states it in full. In short: each epoch
visits the shards in a permutation drawn from (seed, epoch); the concatenated samples are split
into P = R*K contiguous ranges, one per (rank, worker) slot; each slot emits its range shuffled
in blocks of `shuffle_block` samples; the DataLoader interleaves a rank's workers round-robin.

Resume: `start_images` is the global number of images already consumed (all ranks). It is exact
(the same batches as an uninterrupted run) for a multiple of the global batch b*R with the same
R, K and b, as long as no sample was skipped as bad input in the slots' current epochs. Skipped
samples shift a slot's stream; `state_dict()` / `load_state_dict()` (per rank) store positions
in planned samples and are exact even then. After a change of R, K or b the loader starts every
slot at the same epoch and fraction of epoch: the rest of that epoch comes from the new split
(some of its samples may repeat, some be missed); from the next epoch on every sample is seen
exactly once per epoch. This never fails.

Work split: DataLoader workers read tars, decode and crop (`cmscale.data.images`; R x R JPEGs
through its exact libjpeg-turbo fast path), and write uint8 NHWC batches plus each sample's
flip bit into shared-memory buffers that the consumer allocated (`_SharedBatches`: workers x
(prefetch_factor + 2) batches; no tensor crosses the DataLoader's queue). Without an
accelerator (`device` None or CPU) the workers also mirror the flagged images, and the
consuming process (the one that trains) only copies the batch out: a uint8 NCHW view of a
copy, or float [-1, 1] converted one image at a time (`to_unit_range`, so that each image's
float copy stays in cache). With an accelerator `device` the consumer copies the uint8 batch there
(4x fewer bytes than float) and mirrors and converts there, where it is cheap (the float
values are the reference's on every device). Flip bits are a hash of (seed, epoch, sample
index): no RNG state. With `channels=1` the consumer reduces the uint8 RGB batch to one grey
channel first (`to_grey`: PIL's convert("L") bit for bit; tied channels keep their value).

Bad input (`bad_input` = "convert" | "skip" | "raise"): see the table in `cmscale.data.images`
and `cmscale.data.reader`. Skips and conversions are counted per kind in `bad_input_counts`
(this rank; keys "skipped.<kind>" / "converted.<kind>"), and warned about once per kind by the
consuming process (BadInputWarning, with one example). A missing shard or a pattern matching
nothing raises FileNotFoundError naming it, whatever the policy; so does a shard that vanishes
mid-run, when it is opened (ShardOpenError). A worker that skips a whole pass over its slot
without one usable sample (all its shards unreadable) raises BadInputError rather than
looping for ever while the other ranks wait for it.
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  registers its exit handler before ours (see _stop_live_workers)
import warnings
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..dist import worker_ignore_signals
from .images import IMAGE_EXTS, BadInput, BadInputError, check_policy, fast_jpeg_decoder, prepare_image
from .order import Layout, flip_bit
from .reader import slot_items
from .shardlist import ShardSet, load_shard_set


class BadInputWarning(UserWarning):
    """A bad sample was converted or skipped (emitted once per kind per loader; all are counted)."""


class _Counter:
    """Per-process bad-input counts and the first example of each kind (for the warning)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, what: str, kind: str, where: str = "", detail: str = ""):
        key = f"{what}.{kind}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if key not in self.examples:
            self.examples[key] = f"{where}: {detail}" if where and detail else (where or detail)


def _image_key(sample: dict) -> str | None:
    for ext in sorted(sample):
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
            return ext
    return None


class _SharedBatches:
    """Batch buffers (images, labels, flip bits) in shared memory, allocated by the consumer.

    Worker i fills buffers[i, j] for j = 0, 1, ..., n-1, 0, ... and sends only (i, j, seq): no
    tensor crosses the DataLoader's queue. (A fresh shared tensor per batch costs a shm file,
    an fd handed over through an authenticated socket, and page faults on both sides: about as
    much as decoding the image.) The DataLoader keeps at most
    `prefetch_factor` batches per worker in flight and the consumer copies each batch (float
    conversion, device copy or clone) before it asks for the next one, so n = prefetch_factor + 2
    buffers are never overwritten while in use. Each buffer has a stamp (its batch number, -1
    while being filled) that the consumer checks after its copy: should that assumption ever
    break, the loader raises instead of silently corrupting a batch.
    """

    def __init__(self, workers: int, n: int, b: int, R: int, labels: bool):
        self.n = n
        self.images = torch.empty((workers, n, b, R, R, 3), dtype=torch.uint8).share_memory_()
        self.labels = torch.empty((workers, n, b), dtype=torch.int64).share_memory_() if labels else None
        self.flips = torch.zeros((workers, n, b), dtype=torch.bool).share_memory_()
        self.stamps = torch.zeros((workers, n), dtype=torch.int64).share_memory_()


_live_worker_iterators: weakref.WeakSet = weakref.WeakSet()


def _stop_live_workers():
    """At interpreter exit: stop the workers of loaders still being iterated.

    The workers ignore SIGTERM (`worker_ignore_signals`), and multiprocessing's exit handler
    stops daemonic children with SIGTERM and then joins them: without this, a process whose
    loader iterator is still alive at exit (a module-level iterator, or a training loop's frame
    kept by the traceback of the exception that ends the program) hung there forever. Registered
    after multiprocessing's handler, so it runs before it. Workers get the DataLoader's normal
    shutdown, then SIGKILL if one is still alive.
    """
    for it in list(_live_worker_iterators):
        workers = list(getattr(it, "_workers", ()))
        try:
            it._shutdown_workers()
        except Exception:
            pass
        for w in workers:
            try:
                if w.is_alive():
                    w.kill()
            except Exception:
                pass


atexit.register(_stop_live_workers)


def _cache_pil_blocks(blocks: int = 16):
    """Let PIL reuse freed image memory in this worker process (as PILLOW_BLOCKS_MAX would).

    By default PIL frees every decoded image, and a 256x256 RGB image (256 KiB) is above glibc's
    mmap threshold, so each decode maps fresh, zeroed pages: that cost 30-40% of the decode time
    here. A small cache of blocks (at most `blocks` x PIL's block size, 16 MiB; a few MiB for
    256-pixel images) removes it. A larger value set by the user is kept.
    """
    from PIL import Image

    if Image.core.get_blocks_max() < blocks:
        Image.core.set_blocks_max(blocks)


class _SlotDataset(IterableDataset):
    """The per-worker pipeline: slot stream -> decode -> crop -> uint8 NHWC batches (+ flip bits).

    Yields (batch, meta) with meta = (worker, position after the batch, counts, examples).
    In a DataLoader worker, batch = (worker id, buffer, seq) in `shared`; in-process it is
    (images uint8 (b, R, R, 3), labels int64 (b,) or None, flips bool (b,)). Images stay NHWC
    as the decoders deliver them (a contiguous copy per image is the cheapest thing a worker can
    do). Mirroring (flips: the per-sample bits of `order.flip_bit`) happens here when
    `flip_here`, i.e. when the consumer is a CPU: ~17 us per mirrored 256x256 image in a worker
    (~2% of its time), where the consuming process, which also trains, needed twice that.
    Otherwise the consumer mirrors on its accelerator, where it is free. The NCHW permutation
    and the float conversion happen at the consumer.
    """

    def __init__(self, layout: Layout, urls: list, rank: int, first: int, positions: list, *,
                 resolution: int, class_cond: bool, random_flip: bool, policy: str,
                 shared: _SharedBatches | None, flip_here: bool):
        super().__init__()
        self.layout, self.urls, self.rank = layout, urls, rank
        self.first, self.positions = first, positions
        self.resolution, self.class_cond = resolution, class_cond
        self.random_flip, self.policy = random_flip, policy
        self.shared, self.flip_here = shared, flip_here

    def _decode(self, item, counter: _Counter, jpeg_decoder=None):
        where = f"{item.url} key {item.key}" if item.key is not None else f"{item.url} sample {item.index}"
        sample = item.sample
        if sample is None:
            raise BadInput("missing_sample", "not in its shard")
        ext = _image_key(sample)
        if ext is None:
            raise BadInput("no_image", f"members {sorted(sample)}")
        label = -1
        if self.class_cond:
            try:
                label = int(sample["cls"].decode("ascii").strip())
            except Exception:
                raise BadInput("no_label", "class_cond=True but no integer .cls member") from None
        converted = []
        arr = prepare_image(sample[ext], self.resolution, self.policy, converted, jpeg_decoder)
        for kind in converted:
            counter.add("converted", kind, where)
        return arr, label

    def _buffers(self, wid: int):
        """Endless (batch ref, images, labels, flips) to fill: shared slots round-robin, or fresh tensors."""
        b, R = self.layout.batch_size, self.resolution
        seq = 0
        while True:
            seq += 1
            if self.shared is None:
                images = torch.empty((b, R, R, 3), dtype=torch.uint8)
                labels = torch.empty(b, dtype=torch.int64) if self.class_cond else None
                flips = torch.zeros(b, dtype=torch.bool)
                yield (images, labels, flips), images, labels, flips
            else:
                j = (seq - 1) % self.shared.n
                self.shared.stamps[wid, j] = -1  # being filled
                labels = self.shared.labels[wid, j] if self.shared.labels is not None else None
                yield (wid, j, seq), self.shared.images[wid, j], labels, self.shared.flips[wid, j]

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None:
            _cache_pil_blocks()
        worker = (self.first + wid) % self.layout.workers  # the logical worker this process plays
        q = self.layout.slot(self.rank, worker)
        b, seed = self.layout.batch_size, self.layout.seed
        counter = _Counter()
        items = slot_items(self.layout, self.urls, q, self.positions[worker], self.policy,
                           lambda kind: counter.add("skipped", kind))
        buffers = self._buffers(wid)
        flip_here = self.random_flip and self.flip_here
        jpeg_decoder = fast_jpeg_decoder()  # probed by the consumer already: forked workers inherit it
        ref, images, labels, flips = next(buffers)
        arrays, flip_bits, n = images.numpy(), flips.numpy(), 0
        # Skipped planned samples in a row: a whole pass over the slot without one usable
        # sample (every shard it reads gone or unreadable) would otherwise loop for ever, and
        # the other ranks would wait for this one in their next collective.
        n_q, skipped_in_a_row = self.layout.slot_len(q), 0
        for item in items:
            try:
                arr, label = self._decode(item, counter, jpeg_decoder)
            except BadInput as e:
                if self.policy == "raise":
                    raise BadInputError(f"{e.kind} in shard {item.url} key {item.key}: {e.detail}") from None
                counter.add("skipped", e.kind, f"{item.url} key {item.key}" if item.key else item.url, e.detail)
                skipped_in_a_row += 1
                if skipped_in_a_row >= max(1, n_q):
                    raise BadInputError(
                        f"rank {self.rank} worker {worker}: none of the {n_q} samples it plans to "
                        f"read in an epoch is usable ({e.kind}, last in shard {item.url}): its "
                        f"shards are missing, unreadable or corrupt; counts: {dict(counter.counts)}")
                continue
            skipped_in_a_row = 0
            arrays[n] = arr
            flip_bits[n] = flipped = self.random_flip and flip_bit(seed, item.epoch, item.index)
            if flipped and flip_here:
                # Mirror W in place: torch has a vectorised kernel for contiguous HWC uint8
                # (numpy's negative-stride copy of 3-byte pixels is far slower).
                image = images[n]
                image.copy_(image.flip(1))
            if labels is not None:
                labels[n] = label
            n += 1
            if n == b:
                if self.shared is not None:
                    self.shared.stamps[ref[0], ref[1]] = ref[2]
                yield ref, (worker, item.pos, dict(counter.counts), dict(counter.examples))
                ref, images, labels, flips = next(buffers)
                arrays, flip_bits, n = images.numpy(), flips.numpy(), 0


class ShardLoader:
    """Infinite iterable of (images, labels) for one rank; see the module docstring.

    images: (b, C, R, R) float32 in [-1, 1] (or `dtype`), C = `channels` (3, or 1: grey);
    labels: int64 (b,) when class_cond,
    else None. Each `iter()` continues from the current position (images_seen / state).
    """

    def __init__(self, shard_set: ShardSet, layout: Layout, *, rank: int, resolution: int,
                 class_cond: bool, random_flip: bool, bad_input: str, num_workers: int,
                 start_images: int, device=None, dtype=torch.float32, prefetch_factor: int = 2,
                 channels: int = 3):
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} not in [0, {layout.world_size})")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.channels = channels
        self.shard_set, self.layout, self.rank = shard_set, layout, rank
        self.resolution, self.class_cond, self.random_flip = resolution, class_cond, random_flip
        self.bad_input = check_policy(bad_input)
        self.num_workers, self.device, self.dtype = num_workers, device, dtype
        self.prefetch_factor = prefetch_factor
        self._images_seen = int(start_images)
        self._positions = None  # per-worker slot positions (planned samples); None: from images_seen
        self._base_counts: dict[str, int] = {}
        self._live_counts: dict[int, dict] = {}
        self._warned: set[str] = set()

    # -- what the training loop reads -------------------------------------------------------
    @property
    def images_seen(self) -> int:
        """Global images consumed (all ranks): start_images + batches yielded * b * R."""
        return self._images_seen

    @property
    def epoch(self) -> float:
        """Global progress in epochs (images_seen / dataset size)."""
        return self._images_seen / self.layout.num_samples

    @property
    def bad_input_counts(self) -> dict[str, int]:
        """This rank's counts of converted/skipped bad input, e.g. {"skipped.corrupt_image": 2}."""
        total = dict(self._base_counts)
        for c in self._live_counts.values():
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))

    @property
    def num_samples(self) -> int:
        return self.layout.num_samples

    @property
    def classes(self) -> list | None:
        return self.shard_set.classes

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    def _count_at_build(self, key: str, where: str):
        self._base_counts[key] = self._base_counts.get(key, 0) + 1
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"cmscale.data: {key.replace('.', ' bad input: ')} ({where}); its complete "
                          "samples are used", BadInputWarning, stacklevel=3)

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's reader state; exact resume even after skipped samples (same layout)."""
        positions = self._positions or self.layout.start_positions(self._images_seen, self.rank)[1]
        return dict(images_seen=self._images_seen, positions=list(positions),
                    layout=self.layout.fingerprint(self.rank))

    def load_state_dict(self, state: dict):
        """Continue from `state`; if the layout changed, from its images_seen (see module docstring)."""
        self._images_seen = int(state["images_seen"])
        if state.get("layout") == self.layout.fingerprint(self.rank):
            self._positions = list(state["positions"])
        else:
            self._positions = None
            warnings.warn("cmscale.data: the saved loader state is for another layout (dataset, world "
                          "size, workers, batch size, seed or block); resuming from its images_seen")

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        first, positions = self.layout.start_positions(self._images_seen, self.rank)
        if self._positions is not None:
            positions = list(self._positions)
        self._positions = list(positions)
        for c in self._live_counts.values():  # a new iteration restarts the workers' counters
            for k, v in c.items():
                self._base_counts[k] = self._base_counts.get(k, 0) + v
        self._live_counts = {}
        shared = None
        flip_here = self.device is None or torch.device(self.device).type == "cpu"
        fast_jpeg_decoder()  # probe once here, not in every (forked) worker
        if self.num_workers > 0:
            shared = _SharedBatches(self.num_workers, self.prefetch_factor + 2, self.layout.batch_size,
                                    self.resolution, self.class_cond)
        dataset = _SlotDataset(self.layout, self.shard_set.urls, self.rank, first, positions,
                               resolution=self.resolution, class_cond=self.class_cond,
                               random_flip=self.random_flip, policy=self.bad_input, shared=shared,
                               flip_here=flip_here)
        # Workers ignore the stop signals (SIGUSR1/USR2/TERM): SLURM delivers them to every
        # process of a step, and torch's worker handler dies of SIGTERM, which would make the
        # trainer's next DataLoader check raise while it finishes its step and checkpoints.
        kw = (dict(prefetch_factor=self.prefetch_factor, worker_init_fn=worker_ignore_signals)
              if self.num_workers > 0 else {})
        dl = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, **kw))
        if self.num_workers > 0:
            _live_worker_iterators.add(dl)
        step = self.layout.global_batch
        for ref, (worker, pos, counts, examples) in dl:
            self._positions[worker] = pos
            self._live_counts[worker] = counts
            for key in counts.keys() - self._warned:
                # Warn here, in the consuming process: warnings raised in workers are easy to miss.
                self._warned.add(key)
                warnings.warn(f"cmscale.data: {key.replace('.', ' bad input: ')} ({examples.get(key, '')}); "
                              "further ones are only counted in loader.bad_input_counts",
                              BadInputWarning, stacklevel=2)
            self._images_seen += step
            if shared is None:
                images, labels, flips = ref
            else:
                wid, j, seq = ref
                images, flips = shared.images[wid, j], shared.flips[wid, j]
                labels = shared.labels[wid, j] if shared.labels is not None else None
            if self.device is not None:
                images, flips = images.to(self.device), flips.to(self.device)
                labels = labels.to(self.device) if labels is not None else None
            if labels is not None and shared is not None and labels.device.type == "cpu":
                labels = labels.clone()  # still the shared buffer (also after .to("cpu"))
            if self.random_flip and not flip_here:  # on an accelerator: one vectorised op, no host sync
                images = torch.where(flips.view(-1, 1, 1, 1), images.flip(2), images)
            # A shared buffer is reused later: copy out (conversion, device copy or clone) first.
            out = self._convert(images, copy=shared is not None and images.device.type == "cpu")
            if shared is not None and int(shared.stamps[wid, j]) != seq:
                raise RuntimeError("cmscale.data: a worker reused a batch buffer still in use; "
                                   "this is a bug, please report it with your DataLoader settings")
            yield out, labels

    def _convert(self, images: torch.Tensor, copy: bool) -> torch.Tensor:
        """uint8 NHWC -> NCHW: float in [-1, 1] (contiguous), or a uint8 NCHW view (of a copy)."""
        if self.channels == 1:
            images, copy = to_grey(images), False  # a new tensor: no copy needed
        x = images.permute(0, 3, 1, 2)
        if self.dtype == torch.uint8:
            return x.clone() if copy else x
        return to_unit_range(x).to(self.dtype)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3) -> uint8 grey (..., 1): PIL's convert("L") bit for bit, the ITU-R
    601-2 luminance in 16-bit fixed point, rounded. The weights sum to 2^16, so an image whose
    channels are tied (a grey image stored as RGB) keeps its values exactly."""
    rgb = images.to(torch.int32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8).unsqueeze(-1)


_UNIT_TABLE = torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0)  # on the CPU: exact division
_unit_tables: dict = {}


def to_unit_range(x: torch.Tensor, table: bool | None = None) -> torch.Tensor:
    """uint8 (any layout, any device) -> contiguous float32 float32(x) / 127.5 - 1, as the reference.

    On a CPU the arithmetic itself, written straight into the contiguous output (the cast does
    any permutation; torch.div(uint8, 127.5) gives the same values through a slower
    mixed-type path), one leading-dim slice (image) at a time so that its float copy stays in
    cache for the three passes, which whole-batch ops and a permuting float copy do not.
    Elsewhere (`table`, default: not a CPU) a gather from the 256
    values computed on the CPU: CUDA divides by a Python scalar as a multiplication by its
    reciprocal, which is 1 ulp off for 111 of the 256 values.
    """
    if table is None:
        table = x.device.type != "cpu"
    if table:
        lut = _unit_tables.get(x.device)
        if lut is None:
            lut = _unit_tables[x.device] = _UNIT_TABLE.to(x.device)
        return lut.index_select(0, x.reshape(-1).int()).view(x.shape)
    out = torch.empty(x.shape, dtype=torch.float32)
    for src, dst in zip(x, out) if x.dim() else ((x, out),):
        dst.copy_(src).div_(127.5).sub_(1.0)
    return out


def build_loader(shards, *, batch_size_per_rank: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, start_images: int = 0,
                 resolution: int | None = None, class_cond: bool = False,
                 random_flip: bool = True, bad_input: str = "skip", manifest: str | None = None,
                 shuffle_block: int = 1000, state: dict | None = None, device=None,
                 dtype: torch.dtype = torch.float32, prefetch_factor: int = 2,
                 channels: int = 3) -> ShardLoader:
    """Build one rank's infinite loader over WebDataset shards (see the module docstring).

    shards: path, directory, brace pattern, glob, `pipe:` URL, or a list of them
        (`cmscale.data.shardlist`). resolution: output size; default the manifest's.
    start_images: global images already consumed (resume). state: a `state_dict()` of this
        rank (exact resume with skipped samples); its images_seen overrides start_images.
    shuffle_block: samples per shuffle block (raw bytes of that many samples per worker in RAM).
    device: move each batch there (as uint8) before mirroring and converting (without it, or
        with a CPU device, the workers mirror and this process converts). dtype: float32 (default) or
        another float type for [-1, 1] contiguous NCHW; torch.uint8 for the raw 0..255 NCHW view
        (a permuted NHWC tensor) to convert yourself.
    channels: 3 (RGB) or 1 (each image reduced to grey by `to_grey`).
    """
    check_policy(bad_input)
    shard_set = load_shard_set(shards, manifest=manifest)
    if resolution is None:
        resolution = shard_set.resolution
        if resolution is None:
            raise ValueError(f"no manifest gives the resolution of {shards!r}: pass resolution=")
    layout = Layout(counts=shard_set.counts, world_size=world_size, workers=max(1, num_workers),
                    batch_size=batch_size_per_rank, seed=seed, block=shuffle_block)
    loader = ShardLoader(shard_set, layout, rank=rank, resolution=int(resolution),
                         class_cond=class_cond, random_flip=random_flip, bad_input=bad_input,
                         num_workers=num_workers, start_images=start_images, device=device,
                         dtype=dtype, prefetch_factor=prefetch_factor, channels=channels)
    for url in shard_set.truncated or ():
        # Found while counting a shard without manifest entry: the plan stops before the cut.
        if bad_input == "raise":
            raise BadInputError(f"shard {url} is truncated (found while counting its samples)")
        loader._count_at_build("skipped.truncated_shard", url)
    if state is not None:
        loader.load_state_dict(state)
    return loader
