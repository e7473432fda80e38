"""Each kind of bad input meets its documented outcome under each policy (convert / skip / raise).

A shard holds 4 good index images and one bad sample (key 000002); we read one (slot-)epoch
with batch size 1 and look at what came out and at loader.bad_input_counts. shuffle_block=1
keeps the tar order, so the batch that crosses into epoch 1 holds sample 0 and the counts seen
then are exactly epoch 0's.
"""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from cmscale.data import BadInputError, BadInputWarning, build_loader, center_crop_arr
from cmscale.data.images import prepare_image
from tests.support.data import decode_index, index_sample, jpeg_bytes, png16_bytes, png_bytes, write_tar

R = 8


def _grey(v):
    return Image.new("L", (R, R), v)


def _jpeg_corrupt():
    data = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


# kind -> (members of the bad sample, expected centre pixel after "convert" or None if not checked)
CASES = {
    "cmyk": ({"jpg": jpeg_bytes(Image.new("CMYK", (R, R), (0, 255, 255, 0)))}, None),
    "greyscale": ({"png": png_bytes(_grey(90))}, (90, 90, 90)),
    "16bit": ({"png": png_bytes(Image.fromarray(np.full((R, R), 0x1234, np.uint16)))}, (0x12, 0x12, 0x12)),
    "16bit_rgb": ({"png": png16_bytes(np.full((R, R, 3), (0xAB00, 0x1200, 0x3456), np.uint16))}, (0xAB, 0x12, 0x34)),
    "alpha": ({"png": png_bytes(Image.new("RGBA", (R, R), (10, 20, 30, 0)))}, (10, 20, 30)),
    "palette": ({"png": png_bytes(Image.new("RGB", (R, R), (200, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE))}, (200, 0, 0)),
    "too_small": ({"png": png_bytes(Image.new("RGB", (R // 2, R // 2), (5, 6, 7)))}, (5, 6, 7)),
    "corrupt_image": ({"jpg": _jpeg_corrupt()}, None),
    "no_image": ({"txt": b"a caption without its image"}, None),
    "no_label": ({"png": png_bytes(Image.new("RGB", (R, R), (1, 2, 3)))}, None),
}
CONVERTIBLE = {"cmyk", "greyscale", "16bit", "16bit_rgb", "alpha", "palette", "too_small"}


def _shard(tmp_path, case):
    samples = [index_sample(i, R, label=i) for i in range(5)]
    members = dict(CASES[case][0])
    if case != "no_label":
        members["cls"] = b"2"
    samples[2] = ("000002", members)
    write_tar(tmp_path / "data-000000.tar", samples)
    return str(tmp_path)


def _epoch(loader, planned):
    """Batches (of 1) whose sample lies in the slot's first epoch of `planned` samples."""
    out, it = [], iter(loader)
    while True:
        images, labels = next(it)
        if loader.state_dict()["positions"][0] > planned:
            return out
        out.append(images)


@pytest.mark.parametrize("policy", ["convert", "skip", "raise"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_outcome(tmp_path, case, policy):
    pixel = CASES[case][1]
    root = _shard(tmp_path, case)
    kind = case.replace("16bit_rgb", "16bit")
    loader = build_loader(root, batch_size_per_rank=1, resolution=R, class_cond=True,
                          random_flip=False, bad_input=policy, shuffle_block=1)
    if policy == "raise":
        with pytest.raises(BadInputError, match=f"{kind}.*000002"):
            _epoch(loader, 5)
        return
    with pytest.warns(BadInputWarning, match=kind):
        images = _epoch(loader, 5)
    indices = [decode_index(x)[0] for x in images]
    if policy == "convert" and case in CONVERTIBLE:
        assert len(images) == 5
        assert loader.bad_input_counts == {f"converted.{kind}": 1}
        centres = [tuple(((x[0, :, R // 2, R // 2] + 1) * 127.5).round().int().tolist()) for x in images]
        assert pixel is None or pixel in centres  # the converted image, with the expected colour
    else:
        assert sorted(indices) == [0, 1, 3, 4]
        assert loader.bad_input_counts == {f"skipped.{kind}": 1}


def _cut_inside(path, member):
    """Truncate a tar in the middle of `member`'s data."""
    with tarfile.open(path) as tf:
        m = tf.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)


@pytest.mark.parametrize("policy", ["convert", "skip", "raise"])
@pytest.mark.parametrize("with_manifest", [True, False])
def test_truncated_tar(tmp_path, policy, with_manifest):
    path = write_tar(tmp_path / "data-000000.tar", [index_sample(i, R) for i in range(5)])
    _cut_inside(path, "000003.png")
    if with_manifest:  # the plan says 5; samples 3 (cut) and 4 (gone) are missing
        (tmp_path / "manifest.json").write_text(json.dumps({"resolution": R, "shards": [{"name": "data-000000.tar", "samples": 5}]}))
    kw = dict(batch_size_per_rank=1, resolution=R, random_flip=False, bad_input=policy, shuffle_block=1)
    planned = 5 if with_manifest else 3  # without a manifest the count stops before the cut sample
    if policy == "raise":
        with pytest.raises(BadInputError, match="data-000000.tar is truncated"):
            _epoch(build_loader(str(tmp_path), **kw), planned)
        return
    with pytest.warns(BadInputWarning) as warned:
        loader = build_loader(str(tmp_path), **kw)
        assert loader.num_samples == planned
        images = _epoch(loader, planned)
    assert any("truncated_shard" in str(w.message) for w in warned)
    assert sorted(decode_index(x)[0] for x in images) == [0, 1, 2]
    expected = {"skipped.truncated_shard": 1}
    if with_manifest:
        expected["skipped.missing_sample"] = 2
    assert loader.bad_input_counts == expected


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_shard_shorter_than_its_manifest(tmp_path, policy):
    write_tar(tmp_path / "data-000000.tar", [index_sample(i, R) for i in range(5)])
    (tmp_path / "manifest.json").write_text(json.dumps({"resolution": R, "shards": [{"name": "data-000000.tar", "samples": 7}]}))
    loader = build_loader(str(tmp_path), batch_size_per_rank=1, random_flip=False, bad_input=policy, shuffle_block=1)
    if policy == "raise":
        with pytest.raises(BadInputError, match="has 5 samples"):
            _epoch(loader, 7)
        return
    with pytest.warns(BadInputWarning) as warned:
        images = _epoch(loader, 7)
    assert {str(w.message).split(":")[2].strip().split(" ")[0] for w in warned} == {"short_shard", "missing_sample"}
    assert sorted(decode_index(x)[0] for x in images) == [0, 1, 2, 3, 4]
    assert loader.bad_input_counts == {"skipped.missing_sample": 2, "skipped.short_shard": 1}


def test_bad_samples_in_worker_processes_are_counted(tmp_path):
    samples = [index_sample(i, R) for i in range(12)]
    for i in (1, 7):
        samples[i] = (samples[i][0], {"png": png_bytes(_grey(7))})
    write_tar(tmp_path / "data-000000.tar", samples)
    loader = build_loader(str(tmp_path), batch_size_per_rank=2, num_workers=2, resolution=R, bad_input="skip")
    with pytest.warns(BadInputWarning, match="greyscale"):
        it = iter(loader)
        for _ in range(5):  # 2 workers x 5 usable each = one epoch
            next(it)
    assert loader.bad_input_counts == {"skipped.greyscale": 2}


def reference_center_crop_arr(pil_image, image_size):
    # guided-diffusion/guided_diffusion/image_datasets.py, verbatim in substance.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size,res", [((300, 200), 64), ((64, 64), 64), ((40, 90), 64), ((1000, 700), 128), ((257, 256), 256)])
def test_center_crop_matches_the_reference(size, res):
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = center_crop_arr(img, res)
    assert ours.shape == (res, res, 3)
    assert np.array_equal(ours, reference_center_crop_arr(img, res))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    policy = "convert" if min(size) < res else "raise"
    assert np.array_equal(prepare_image(buf.getvalue(), res, policy), ours)
