"""The loader's JPEG fast path (torchvision's libjpeg-turbo op) gives PIL's pixels and PIL's decisions.

`prepare_image(..., jpeg_decoder=fast_jpeg_decoder())` must be indistinguishable from the PIL
path: the same arrays for clean JPEGs of every chroma subsampling, progressive or not, and the
same outcome (array or bad-input kind) for damaged ones. End to end, the loader's batches from
R x R JPEG shards are PIL's decode of the planned samples, mirrored by their flip bits.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cmscale.data import build_loader, center_crop_arr
from cmscale.data.images import BadInput, fast_jpeg_decoder, prepare_image
from cmscale.data.order import Layout, flip_bit
from tests.support.data import write_tar


def _photo(rng, size: int) -> np.ndarray:
    """Smooth gradients plus noise: exercises both the DC/AC coding and the chroma upsampling."""
    yy, xx = np.mgrid[0:size, 0:size]
    smooth = np.stack([xx * 255 // size, yy * 255 // size, (xx ^ yy) % 256], -1)
    return ((smooth + rng.integers(0, 96, (size, size, 3))) % 256).astype(np.uint8)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _outcome(data: bytes, R: int, decoder):
    try:
        return "ok", prepare_image(data, R, "skip", [], decoder).copy()
    except BadInput as e:
        return "bad", e.kind


@pytest.fixture(scope="module")
def decoder():
    dec = fast_jpeg_decoder()
    if dec is None:
        pytest.skip("torchvision's JPEG op is unavailable or differs from PIL here: the loader uses PIL")
    return dec


@pytest.mark.parametrize("R", [16, 37, 64])
def test_fast_path_gives_pils_pixels(decoder, R):
    rng = np.random.default_rng(R)
    for subsampling in (0, 1, 2):
        for progressive in (False, True):
            for quality in (50, 95, 100):
                data = _jpeg(_photo(rng, R), quality=quality, subsampling=subsampling, progressive=progressive)
                ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                fast = prepare_image(data, R, "skip", [], decoder)
                assert fast.shape == (R, R, 3) and fast.dtype == np.uint8
                assert np.array_equal(fast, ref), (subsampling, progressive, quality)
                assert np.array_equal(prepare_image(data, R, "skip", []), ref)


def test_fast_path_takes_pils_decisions_on_damaged_jpegs(decoder):
    """Truncations, bit flips, inserted and deleted bytes: the same array or the same bad-input kind."""
    R, rng = 24, np.random.default_rng(7)
    outcomes = set()
    for trial in range(400):
        data = bytearray(_jpeg(_photo(rng, R), quality=int(rng.integers(50, 100)),
                               subsampling=int(rng.integers(0, 3)), progressive=bool(rng.integers(0, 2))))
        damage = trial % 4
        if damage == 0:
            data = data[: int(rng.integers(2, len(data)))]
        elif damage == 1:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        elif damage == 2:
            i = int(rng.integers(0, len(data)))
            data[i:i] = rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8).tobytes()
        else:
            i = int(rng.integers(len(data) // 2, len(data)))
            del data[i:i + int(rng.integers(1, 50))]
        fast, pil = _outcome(bytes(data), R, decoder), _outcome(bytes(data), R, None)
        assert fast[0] == pil[0], (trial, fast, pil)
        if fast[0] == "ok":
            assert np.array_equal(fast[1], pil[1]), trial
        else:
            assert fast[1] == pil[1], trial
        outcomes.add(fast[0])
    assert outcomes == {"ok", "bad"}  # both kinds of outcome were exercised


def test_other_jpegs_take_the_pil_path(decoder):
    R, rng = 16, np.random.default_rng(3)
    # Not R x R: cropped by PIL as the reference does.
    big = _jpeg(_photo(rng, 40)[:, :29])
    assert np.array_equal(prepare_image(big, R, "skip", [], decoder),
                          center_crop_arr(Image.open(io.BytesIO(big)).convert("RGB"), R))
    # Greyscale and CMYK are bad-input kinds decided from PIL's header, with or without the fast path.
    grey = _jpeg(_photo(rng, R)[:, :, 0])
    cmyk = io.BytesIO()
    Image.new("CMYK", (R, R), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    for data, kind in ((grey, "greyscale"), (cmyk.getvalue(), "cmyk")):
        assert _outcome(data, R, decoder) == ("bad", kind)
        converted = []
        out = prepare_image(data, R, "convert", converted, decoder)
        assert converted == [kind] and np.array_equal(out, prepare_image(data, R, "convert"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_are_pils_decode_mirrored_by_flip_bits(tmp_path, num_workers):
    R, seed, b, counts = 32, 5, 4, [10, 14]
    rng = np.random.default_rng(0)
    encoded, g = [], 0
    for k, c in enumerate(counts):
        samples = []
        for _ in range(c):
            data = _jpeg(_photo(rng, R), quality=90, subsampling=g % 3)
            encoded.append(data)
            samples.append((f"{g:06d}", {"jpg": data}))
            g += 1
        write_tar(tmp_path / f"data-{k:06d}.tar", samples)
    decoded = [center_crop_arr(Image.open(io.BytesIO(d)).convert("RGB"), R) for d in encoded]
    K = max(1, num_workers)
    layout = Layout(counts=counts, world_size=1, workers=K, batch_size=b, seed=seed, block=5)
    kw = dict(batch_size_per_rank=b, seed=seed, num_workers=num_workers, resolution=R, shuffle_block=5)
    n_batches = 14  # past the end of every slot's first epoch
    for dtype, device in ((torch.uint8, None), (torch.float32, None), (torch.uint8, "cpu")):
        it = iter(build_loader(str(tmp_path), dtype=dtype, device=device, **kw))
        for j in range(n_batches):
            images, _ = next(it)
            k, p0 = j % K, b * (j // K)
            want = []
            for p in range(p0, p0 + b):
                epoch, g = layout.sample_at(layout.slot(0, k), p)
                img = decoded[g]
                want.append(img[:, ::-1] if flip_bit(seed, epoch, g) else img)
            want = torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2)
            if dtype == torch.uint8:
                assert torch.equal(images, want), (dtype, device, j)
            else:
                assert torch.equal(images, want.float() / 127.5 - 1), (dtype, device, j)
        del it
