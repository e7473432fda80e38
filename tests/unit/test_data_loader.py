"""The loader: exactly-once epochs over ranks and workers, exact resume, world-size change, shard specs.

Ranks are simulated in one process (rank=r, world_size=2): the split is a pure function of the
layout, so this is the real code path; DataLoader workers are real processes.
"""
import io
import os
import subprocess
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from cmscale.data import BadInputWarning, ShardOpenError, build_loader, center_crop_arr
from cmscale.data.order import Layout, flip_bit
from tests.support import REPO
from tests.support.data import decode_flipped, decode_index, index_sample, take, write_index_shards, write_tar

UNEQUAL = [10, 0, 31, 7, 40, 15]  # N = 103: not a multiple of anything below; one empty shard


def worker_streams(batches, K: int, first: int = 0):
    """Split a rank's batches into its K workers' sample streams (rank batch j <- worker (first + j) % K)."""
    streams = {k: [] for k in range(K)}
    for j, (images, _) in enumerate(batches):
        streams[(first + j) % K] += list(zip(decode_index(images), decode_flipped(images)))
    return streams


def test_index_images_round_trip(tmp_path):
    """The helpers of tests/support/data.py: index images load back as their indices, unflipped."""
    root = write_index_shards(tmp_path, [3, 2])
    loader = build_loader(root, batch_size_per_rank=5, random_flip=False, class_cond=True)
    (images, labels), = take(loader, 1)
    assert sorted(decode_index(images)) == [0, 1, 2, 3, 4]
    assert labels.dtype == torch.int64 and sorted(labels.tolist()) == [0, 1, 2, 3, 4]
    assert decode_flipped(images) == [False] * 5
    assert images.dtype == torch.float32 and images.shape == (5, 3, 8, 8)
    # (255 -> 1, 77 -> 77 / 127.5 - 1 exactly as the reference computes it in float32)
    assert images[:, :, :, 0].eq(1.0).all()
    assert images[0, 2, 0, 1].item() == np.float32(77) / np.float32(127.5) - np.float32(1)


def test_each_sample_exactly_once_per_epoch_2_ranks_x_2_workers(tmp_path):
    # N = 96 = 2 ranks x 2 workers x 4 per batch x 6: an epoch is exactly 12 batches per rank.
    root = write_index_shards(tmp_path, [30, 18, 25, 23])
    per_rank = [take(build_loader(root, batch_size_per_rank=4, rank=r, world_size=2, seed=3,
                                  num_workers=2, shuffle_block=10), 24) for r in range(2)]
    for epoch in range(2):
        seen = Counter()
        for batches in per_rank:
            for images, _ in batches[12 * epoch: 12 * (epoch + 1)]:
                seen.update(decode_index(images))
        assert seen == Counter(range(96)), f"epoch {epoch}"
    first_batches = [decode_index(per_rank[r][0][0]) for r in range(2)]
    assert first_batches[0] != first_batches[1]


@pytest.mark.parametrize("num_workers", [0, 2])  # in-process and worker processes
def test_stream_is_the_documented_order_with_unequal_shards(tmp_path, num_workers):
    # N = 103 over P = 4 (or 2) slots: slot epochs of 25 or 26 samples, per-slot epoch boundaries.
    root = write_index_shards(tmp_path, UNEQUAL)
    seed, b, K = 11, 3, max(1, num_workers)
    layout = Layout(counts=UNEQUAL, world_size=2, workers=K, batch_size=b, seed=seed, block=7)
    for r in range(2):
        batches = take(build_loader(root, batch_size_per_rank=b, rank=r, world_size=2, seed=seed,
                                    num_workers=num_workers, shuffle_block=7), 20 * (3 - K))
        for k, stream in worker_streams(batches, K).items():
            q = layout.slot(r, k)
            assert len(stream) > layout.slot_len(q)  # crosses into the slot's epoch 1
            expected = [layout.sample_at(q, p) for p in range(len(stream))]
            assert [g for g, _ in stream] == [g for _, g in expected]
            assert [f for _, f in stream] == [flip_bit(seed, e, g) for e, g in expected]


@pytest.mark.parametrize("steps_done", [5, 19])  # mid-block; past the slots' epoch boundary
def test_resume_at_k_images_continues_the_uninterrupted_stream(tmp_path, steps_done):
    root = write_index_shards(tmp_path, UNEQUAL)
    kw = dict(batch_size_per_rank=3, world_size=2, seed=2, num_workers=2, shuffle_block=7, class_cond=True)
    total = steps_done + 6
    G = 3 * 2
    for r in range(2):
        full = take(build_loader(root, rank=r, **kw), total)
        resumed_loader = build_loader(root, rank=r, start_images=steps_done * G, **kw)
        resumed = take(resumed_loader, total - steps_done)
        for (xa, ya), (xb, yb) in zip(full[steps_done:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert resumed_loader.images_seen == total * G


def test_state_dict_resume_is_exact_with_skipped_samples(tmp_path):
    samples = [index_sample(i) for i in range(40)]
    for i in (3, 17, 18, 30):  # corrupt images: skipped under the default policy
        samples[i] = (samples[i][0], {"png": b"\x89PNG not really"})
    write_tar(tmp_path / "data-000000.tar", samples[:25])
    write_tar(tmp_path / "data-000001.tar", samples[25:])
    kw = dict(batch_size_per_rank=2, rank=1, world_size=2, num_workers=2, resolution=8, shuffle_block=5)
    with pytest.warns(BadInputWarning):
        full = take(build_loader(str(tmp_path), **kw), 14)
        first = build_loader(str(tmp_path), **kw)
        take(first, 6)
        state = first.state_dict()
        resumed = take(build_loader(str(tmp_path), state=state, **kw), 8)
        by_count = take(build_loader(str(tmp_path), start_images=state["images_seen"], **kw), 8)
    assert state["images_seen"] == 6 * 4
    for (xa, _), (xb, _) in zip(full[6:], resumed):
        assert torch.equal(xa, xb)
    # Why the state exists: from the image count alone, a worker that skipped samples is placed
    # by usable images, i.e. too early, and repeats some.
    assert [decode_index(x) for x, _ in by_count] != [decode_index(x) for x, _ in full[6:]]
    assert first.bad_input_counts.get("skipped.corrupt_image", 0) >= 1


def test_world_size_change_resumes_and_the_next_epoch_is_exactly_once(tmp_path):
    root = write_index_shards(tmp_path, UNEQUAL)
    N, b, seed = 103, 4, 9
    old = [build_loader(root, batch_size_per_rank=b, rank=r, world_size=2, seed=seed) for r in range(2)]
    for loader in old:
        take(loader, 7)
    images_seen = old[0].images_seen
    assert images_seen == 7 * 8
    # Resume on 3 ranks (1 worker each): no error; each slot continues at ~images_seen / 3.
    layout = Layout(counts=UNEQUAL, world_size=3, workers=1, batch_size=b, seed=seed)
    E = 1 + max(layout.start_positions(images_seen, r)[1][0] // layout.slot_len(r) for r in range(3))
    seen = Counter()
    for r in range(3):
        start = layout.start_positions(images_seen, r)[1][0]
        n_q = layout.slot_len(r)
        end = (E + 1) * n_q  # the end of the first epoch that every slot starts afresh
        n_batches = -(-(end - start) // b)
        batches = take(build_loader(root, batch_size_per_rank=b, rank=r, world_size=3, seed=seed,
                                    start_images=images_seen), n_batches)
        stream = [g for images, _ in batches for g in decode_index(images)]
        seen.update(stream[E * n_q - start: end - start])
    assert seen == Counter(range(N))
    # Fewer ranks and more workers also just work.
    (images, _), = take(build_loader(root, batch_size_per_rank=5, world_size=1, num_workers=2,
                                     seed=seed, start_images=images_seen), 1)
    assert images.shape == (5, 3, 8, 8)


def test_pipe_urls_brace_patterns_and_globs_read_the_same_stream(tmp_path):
    root = write_index_shards(tmp_path, [12, 9, 14])
    kw = dict(batch_size_per_rank=5, seed=1, shuffle_block=4)
    ref = [decode_index(x) for x, _ in take(build_loader(root, **kw), 6)]
    specs = [
        os.path.join(root, "data-{000000..000002}.tar"),
        os.path.join(root, "data-*.tar"),
        [os.path.join(root, f"data-00000{k}.tar") for k in range(3)],
        f"pipe:cat {root}/data-{{000000..000002}}.tar",
        f"pipe:cat {root}/data-{{000000..000002}}.tar | cat -",  # names found inside the command
    ]
    for spec in specs:
        manifest = os.path.join(root, "manifest.json") if str(spec).startswith("pipe:") else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the manifest must cover every shard: no counting pass
            loader = build_loader(spec, manifest=manifest, **kw)
        assert [decode_index(x) for x, _ in take(loader, 6)] == ref, spec
    # A remote shard without a manifest entry is counted by streaming it once (with a warning).
    with pytest.warns(UserWarning, match="streaming it once"):
        loader = build_loader(f"pipe:cat {root}/data-000001.tar", resolution=8, batch_size_per_rank=3)
    assert loader.num_samples == 9


def test_missing_shards_and_empty_patterns_are_clear_errors(tmp_path):
    root = write_index_shards(tmp_path / "d", [5, 5])
    with pytest.raises(FileNotFoundError, match="data-000002.tar"):
        build_loader(os.path.join(root, "data-{000000..000002}.tar"), batch_size_per_rank=2)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        build_loader(os.path.join(root, "train-*.tar"), batch_size_per_rank=2)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no manifest.json and no"):
        build_loader(str(tmp_path / "empty"), batch_size_per_rank=2)
    # A pipe that yields nothing is a missing shard, whatever the bad-input policy; named in the error.
    manifest = _manifest_for(tmp_path, "data-000000.tar", 5)
    loader = build_loader(f"pipe:cat {tmp_path}/nowhere/data-000000.tar", manifest=manifest,
                          batch_size_per_rank=2, bad_input="skip")
    with pytest.raises(ShardOpenError, match="nowhere/data-000000.tar"):
        take(loader, 1)


def _manifest_for(tmp_path, name, n):
    path = tmp_path / f"manifest-{name}.json"
    path.write_text(f'{{"resolution": 8, "shards": [{{"name": "{name}", "samples": {n}}}]}}')
    return str(path)


def test_shards_packed_by_the_plain_tar_command_are_read(tmp_path):
    from skimage.data import astronaut

    photo = Image.fromarray(astronaut())  # 512 x 512
    files = tmp_path / "files"
    files.mkdir()
    expected = {}
    for i in range(6):
        crop = photo.crop((i * 40, i * 20, i * 40 + 200, i * 20 + 150))  # 200 x 150: resized by the loader
        data = io.BytesIO()
        crop.save(data, format="JPEG", quality=90)
        (files / f"sample{i:03d}.jpg").write_bytes(data.getvalue())
        (files / f"sample{i:03d}.cls").write_text(str(i % 3))
        expected[i % 3, tuple(center_crop_arr(Image.open(io.BytesIO(data.getvalue())).convert("RGB"), 32)[16, 16])] = i
    out = tmp_path / "shards"
    out.mkdir()
    # The shell sorts the glob, so each sample's members are adjacent (WebDataset's convention).
    subprocess.run("tar -cf ../shards/part-000.tar sample000.* sample001.* sample002.* && "
                   "tar -cf ../shards/part-001.tar sample003.* sample004.* sample005.*",
                   shell=True, cwd=files, check=True)
    loader = build_loader(str(out), batch_size_per_rank=6, resolution=32, class_cond=True, random_flip=False)
    assert loader.num_samples == 6 and loader.classes is None
    (images, labels), = take(loader, 1)
    assert images.shape == (6, 3, 32, 32)
    for x, y in zip(images, labels):
        px = tuple(((x[:, 16, 16] + 1) * 127.5).round().to(torch.uint8).tolist())
        assert (y.item(), px) in expected
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert loader.bad_input_counts == {}
    # A manifest written for them makes counting at start-up unnecessary.
    from cmscale.data.shardlist import index_shards

    m = index_shards(str(out), resolution=32)
    assert [s["samples"] for s in m["shards"]] == [3, 3] and (out / "manifest.json").exists()
    assert build_loader(str(out), batch_size_per_rank=2).resolution == 32


def test_output_dtypes_device_and_batches_kept_by_the_caller(tmp_path):
    root = write_index_shards(tmp_path, [40, 24])
    kw = dict(batch_size_per_rank=4, seed=1, num_workers=2)
    # Batches come out of reused shared buffers: keeping 12 of them must not alias any.
    floats = take(build_loader(root, **kw), 12)
    raw = take(build_loader(root, dtype=torch.uint8, device="cpu", **kw), 12)
    for (xf, yf), (xu, yu) in zip(floats, raw):
        assert yf is None and yu is None
        assert xu.dtype == torch.uint8 and xu.shape == (4, 3, 8, 8)
        assert torch.equal(xf, xu.float() / 127.5 - 1)
    assert len({tuple(decode_index(x)) for x, _ in floats}) == 12
    assert all(x.is_contiguous() and x.dtype == torch.float32 for x, _ in floats)
    (xb, _), = take(build_loader(root, dtype=torch.bfloat16, **kw), 1)
    assert xb.dtype == torch.bfloat16 and torch.equal(xb, floats[0][0].to(torch.bfloat16))


def test_grey_loader_gives_pils_luminance_in_one_channel(tmp_path):
    """channels=1: the batch is the RGB batch reduced as PIL's convert("L") (bit for bit), in
    DataLoader workers' shared buffers as in process; tied channels keep their values."""
    from cmscale.data.loader import to_grey

    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=g)
    pil = np.stack([np.asarray(Image.fromarray(a.numpy(), "RGB").convert("L")) for a in rgb])
    assert torch.equal(to_grey(rgb)[..., 0], torch.from_numpy(pil))
    tied = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3)
    assert torch.equal(to_grey(tied), tied[..., :1])
    root = write_index_shards(tmp_path, [20, 12])
    for workers in (0, 2):
        kw = dict(batch_size_per_rank=4, seed=1, num_workers=workers, dtype=torch.uint8)
        for (colour, yc), (grey, yg) in zip(take(build_loader(root, **kw), 3),
                                            take(build_loader(root, channels=1, **kw), 3)):
            assert grey.shape == (4, 1, 8, 8) and yc is None and yg is None
            assert torch.equal(grey, to_grey(colour.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    (x, _), = take(build_loader(root, batch_size_per_rank=4, channels=1), 1)
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="channels must be 1 \\(grey\\) or 3"):
        build_loader(root, batch_size_per_rank=4, channels=2)


def test_float_conversion_is_the_references_on_every_device_path():
    """float32(x) / 127.5 - 1 for all 256 values, from the NCHW view of an NHWC batch: the CPU
    arithmetic and the table gather used on accelerators (where dividing by a Python scalar
    multiplies by its reciprocal, 1 ulp off for 111 values) give the reference's floats."""
    import numpy as np

    from cmscale.data.loader import to_unit_range

    nhwc = torch.arange(256, dtype=torch.uint8)[torch.randperm(256)].repeat(6).view(2, 16, 16, 3)
    x = nhwc.permute(0, 3, 1, 2)
    ref = torch.from_numpy(x.numpy().astype(np.float32) / np.float32(127.5) - np.float32(1))
    for table in (False, True):
        y = to_unit_range(x, table=table)
        assert y.dtype == torch.float32 and y.is_contiguous() and torch.equal(y, ref), table


def _child_pids() -> list[int]:
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    # pid (comm) state ppid ...: comm may hold spaces, so split after ')'
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                out.append(int(name))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_workers_survive_the_stop_signals(tmp_path):
    """SLURM signals every process of a step (scancel, preemption, the time-limit warning),
    DataLoader workers included. They must keep serving batches while the trainer finishes
    its step and checkpoints: with torch's own worker handler SIGTERM kills them and the
    consumer's next check raises "DataLoader worker ... is killed by signal: Terminated"."""
    import signal
    import time

    root = write_index_shards(tmp_path, [40, 24])
    kw = dict(batch_size_per_rank=4, seed=1, num_workers=2)
    want = [decode_index(x) for x, _ in take(build_loader(root, **kw), 8)]
    it = iter(build_loader(root, **kw))
    # One batch from each worker (they take turns) before the signals: a worker that has made a
    # batch has run its start-up, where it starts ignoring them. (In the trainer the workers
    # start after its handlers are installed, which they inherit until then.)
    got = [decode_index(next(it)[0]) for _ in range(2)]
    workers = _child_pids()
    assert len(workers) >= 2, workers
    for pid in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(pid, sig)
    time.sleep(0.3)
    got += [decode_index(next(it)[0]) for _ in range(6)]
    assert got == want


@pytest.mark.parametrize("how", ["exception", "module_global"])
def test_a_program_ending_with_a_live_loader_exits(tmp_path, how):
    """The workers ignore SIGTERM, which multiprocessing's exit handler uses on daemonic
    children before joining them: a loader iterator still alive at exit (kept by a module
    global, or by the traceback of the exception that ends a training loop) made the process
    hang forever instead of exiting."""
    import sys
    import textwrap

    root = write_index_shards(tmp_path / "shards", [40, 24])
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        from cmscale.data import build_loader

        def train():
            global its
            its = [iter(build_loader({root!r}, batch_size_per_rank=4, num_workers=2))]
            next(its[0])
            if {how!r} == "exception":
                raise RuntimeError("the training step failed")

        train()
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == (1 if how == "exception" else 0), proc.stderr[-2000:]
    if how == "exception":
        assert "the training step failed" in proc.stderr
