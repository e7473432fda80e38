"""make_shards (folder tree, lmdb, npz, embedded), its manifest, crash safety and CLI; embedded shards."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmscale.data import build_loader, center_crop_arr, ensure_embedded_shards, make_shards
from cmscale.data.sources import EmbeddedSource, _npz_member
from tests.support import REPO
from tests.support.data import decode_index, index_array, jpeg_bytes, png_bytes, take


def test_folder_tree_classes_conversions_and_skips(tmp_path):
    src = tmp_path / "src"
    for cls, n in (("cat", 3), ("dog", 2)):
        (src / cls / "sub").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (10 * i, 100, 0)).save(src / cls / "sub" / f"{i}.JPG")
    Image.new("L", (32, 32), 50).save(src / "dog" / "grey.png")  # converted
    (src / "cat" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped
    Image.new("RGB", (32, 32)).save(src / "stray.png")  # outside the class folders: skipped
    (src / "notes.txt").write_text("ignored: not an image")
    m = make_shards(str(src), str(tmp_path / "out"), 16, shard_size=2, progress=False)
    assert m["classes"] == ["cat", "dog"]
    assert m["num_samples"] == 6 and [s["samples"] for s in m["shards"]] == [2, 2, 2]
    assert m["converted"] == {"greyscale": 1}
    assert m["skipped"] == {"corrupt_image": 1, "outside_class_folders": 1}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    loader = build_loader(str(tmp_path / "out"), batch_size_per_rank=6, class_cond=True, random_flip=False)
    (images, labels), = take(loader, 1)
    assert loader.resolution == 16 and loader.classes == ["cat", "dog"]
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert images.shape == (6, 3, 16, 16)


def test_lmdb_export(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=1 << 24)
    photos = {}
    with env.begin(write=True) as txn:
        for i in range(7):
            img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8))
            key = f"{i:040x}".encode()
            photos[key] = jpeg_bytes(img)
            txn.put(key, photos[key])
    env.close()
    m = make_shards(str(tmp_path / "bedroom_train_lmdb"), str(tmp_path / "out"), 32, shard_size=4,
                    image_format="jpg", workers=2, progress=False)
    assert m["num_samples"] == 7 and m["classes"] is None and m["image_format"] == "jpg"
    with tarfile.open(tmp_path / "out" / "data-000000.tar") as tf:
        names = tf.getnames()
    assert names[:2] == ["00000000.jpg", "00000001.jpg"]


def _npz(path, n=10, compressed=False, labels=True):
    images = np.stack([index_array(i, 8) for i in range(n)])
    arrays = {"arr_0": images, **({"arr_1": np.arange(n) % 3 + 5} if labels else {})}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return images


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip_is_pixel_exact(tmp_path, compressed):
    images = _npz(tmp_path / "ref.npz", compressed=compressed)
    if not compressed:  # np.savez stores arrays uncompressed: read through a memory map
        assert isinstance(_npz_member(str(tmp_path / "ref.npz"), "arr_0"), np.memmap)
    m = make_shards(str(tmp_path / "ref.npz"), str(tmp_path / "out"), 8, shard_size=4, progress=False)
    assert m["classes"] == ["5", "6", "7"] and m["converted"] == {} and m["num_samples"] == 10
    loader = build_loader(str(tmp_path / "out"), batch_size_per_rank=10, class_cond=True, random_flip=False)
    (x, y), = take(loader, 1)
    got = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for img, label in zip(got, y.tolist()):
        i = decode_index(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
        assert np.array_equal(img, images[i]) and label == i % 3


def test_same_shards_for_any_number_of_workers(tmp_path):
    _npz(tmp_path / "a.npz", n=40)
    make_shards(str(tmp_path / "a.npz"), str(tmp_path / "w0"), 16, shard_size=15, progress=False)
    make_shards(str(tmp_path / "a.npz"), str(tmp_path / "w2"), 16, shard_size=15, workers=2, progress=False)
    for name in ("data-000000.tar", "data-000001.tar", "data-000002.tar"):
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


KILLED_RUN = r"""
import os, signal, sys
from cmscale.data.shards import make_shards
from cmscale.data.sources import EmbeddedSource

class Dies(EmbeddedSource):  # sklearn digits, but the process is SIGKILLed while loading item 25
    def load(self, i):
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen > 25:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(i)

make_shards(Dies("sklearn:digits"), sys.argv[1], 8, shard_size=10, progress=False)
"""


def test_a_killed_run_leaves_no_truncated_shard_under_a_final_name(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out)], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    # Shards 0 and 1 were complete; shard 2 was being written: only under its temporary name.
    names = sorted(os.listdir(out))
    assert names[:2] == ["data-000000.tar", "data-000001.tar"] and len(names) == 3
    assert names[2].startswith("data-000002.tar.tmp-")
    for name in names[:2]:
        with tarfile.open(out / name) as tf:
            assert len(tf.getnames()) == 20  # 10 samples x (png, cls)
    # No manifest, so nothing reads this as a dataset; the next run removes the temporary file
    # (and, since shards are there, wants overwrite=True).
    with pytest.raises(FileExistsError):
        make_shards("sklearn:digits", str(out), 8, progress=False)
    m = make_shards("sklearn:digits", str(out), 8, overwrite=True, progress=False, limit=50)
    assert sorted(os.listdir(out)) == ["data-000000.tar", "manifest.json"] and m["num_samples"] == 50


def test_an_interrupted_run_removes_its_partial_shard(tmp_path):
    class Interrupted(EmbeddedSource):
        def load(self, i):
            self.seen = getattr(self, "seen", 0) + 1
            if self.seen > 25:
                raise KeyboardInterrupt
            return super().load(i)

    with pytest.raises(KeyboardInterrupt):
        make_shards(Interrupted("sklearn:digits"), str(tmp_path), 8, shard_size=10, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["data-000000.tar", "data-000001.tar"]


def test_cli_writes_shards_and_prints_a_summary(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(src / "a.png")
    Image.new("CMYK", (64, 64)).save(src / "b.jpg")
    (src / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(src), str(tmp_path / "out"),
                        "--resolution", "32", "--format", "webp", "--shard-size", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "written   2 samples, 32x32 webp, in 2 shard(s)" in r.stdout
    assert "converted 1 (cmyk: 1)" in r.stdout and "skipped   1 (corrupt_image: 1)" in r.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == ["data-000000.tar", "data-000001.tar"]
    # the subcommand with --out (the tools/ script above is its wrapper)
    r = subprocess.run([sys.executable, "-m", "cmscale.cli", "make-shards", str(src), "--out",
                        str(tmp_path / "out2"), "--resolution", "32", "--bad-input", "raise"],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert r.returncode == 1 and "make-shards: error:" in r.stderr


@pytest.mark.parametrize("name,resolution,n,classes", [("sklearn:digits", 16, 1797, 10), ("skimage:lfw", 32, 100, None)])
def test_embedded_shards_are_built_once(tmp_path, name, resolution, n, classes):
    path = ensure_embedded_shards(name, str(tmp_path), resolution)
    manifest = Path(path) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert ensure_embedded_shards(name, str(tmp_path), resolution) == path
    assert manifest.stat().st_mtime_ns == stamp  # reused, not rebuilt
    m = json.loads(manifest.read_text())
    assert m["num_samples"] == n and m["resolution"] == resolution and m["skipped"] == {}
    assert (len(m["classes"]) if m["classes"] else None) == classes
    loader = build_loader(path, batch_size_per_rank=8, class_cond=classes is not None, random_flip=False)
    (x, y), = take(loader, 1)
    assert x.shape == (8, 3, resolution, resolution) and x.std() > 0.1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # greyscale as RGB
    # Same code path as the CLI: a digit is the reference crop of the 8x8 digit scaled to 0-255.
    if name == "sklearn:digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        grey = np.rint(d.images * (255 / 16)).astype(np.uint8)
        crops = {center_crop_arr(Image.fromarray(np.repeat(g[:, :, None], 3, 2)), 16).tobytes() for g in grey}
        got = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert all(img.tobytes() in crops for img in got)


def test_png_encoding_is_lossless_and_jpg_close():
    from cmscale.data.images import encode_image

    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(arr, "png")))), arr)
    smooth = np.repeat(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], 16, 0).repeat(3, 2)
    dec = np.asarray(Image.open(io.BytesIO(encode_image(smooth, "jpg")))).astype(int)
    assert np.abs(dec - smooth).max() <= 8
    assert png_bytes(arr)[:4] == b"\x89PNG"


def test_worker_pool_finishes_when_the_caller_ignores_sigterm(tmp_path):
    """A process that already ran a training loop ignores the stop signals; make_shards' pool
    workers must still finish (and be stoppable) there, not hang at the end of the pool."""
    import signal

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (20, 20), (i, 100, 0)).save(src / "a" / f"{i}.png")
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        for _ in range(3):  # the hang depended on where the workers were when the pool ended
            out = tmp_path / f"out{_}"
            m = make_shards(str(src), str(out), 8, shard_size=16, workers=2, progress=False)
            assert m["num_samples"] == 40
    finally:
        signal.signal(signal.SIGTERM, old)
