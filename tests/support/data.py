"""Helpers for the data tests: tiny real shards whose pixels encode the sample index.

An "index image" is a constant-colour RGB image whose (R, G) channels hold the sample index
(index % 256, index // 256) and whose B channel is 77; column 0 is white, so a horizontal flip
moves the white column to the right. PNG keeps it exact, so a loaded batch tells which samples
it holds and whether each was flipped (checked by
tests/unit/test_data_loader.py::test_index_images_round_trip).
"""
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import torch
from PIL import Image


def index_array(i: int, size: int = 8) -> np.ndarray:
    a = np.empty((size, size, 3), np.uint8)
    a[:] = (i % 256, i // 256, 77)
    a[:, 0] = 255
    return a


def png_bytes(arr_or_img, mode=None) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img, mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png16_bytes(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale HxW or RGB HxWx3 uint16); PIL cannot write 16-bit RGB itself."""
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_tar(path, samples) -> str:
    """Write [(key, {ext: bytes})] as a WebDataset tar (members <key>.<ext>, in order)."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return str(path)


def index_sample(i: int, size: int = 8, label: int | None = None) -> tuple:
    members = {"png": png_bytes(index_array(i, size))}
    if label is not None:
        members["cls"] = str(label).encode()
    return f"{i:06d}", members


def write_index_shards(root, counts, size: int = 8, labels: bool = True, manifest: bool = True) -> str:
    """Shards data-00000k.tar with `counts[k]` index images (global indices in order); returns root."""
    os.makedirs(root, exist_ok=True)
    i, entries = 0, []
    for k, c in enumerate(counts):
        name = f"data-{k:06d}.tar"
        write_tar(os.path.join(root, name), [index_sample(j, size, j % 10 if labels else None) for j in range(i, i + c)])
        entries.append({"name": name, "samples": c})
        i += c
    if manifest:
        with open(os.path.join(root, "manifest.json"), "w") as f:
            json.dump({"resolution": size, "classes": [str(c) for c in range(10)] if labels else None,
                       "shards": entries}, f)
    return str(root)


def decode_index(images: torch.Tensor) -> list[int]:
    """Sample indices of a batch of index images in [-1, 1] (read from the centre pixel)."""
    px = ((images[:, :, images.shape[2] // 2, images.shape[3] // 2] + 1) * 127.5).round().long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def decode_flipped(images: torch.Tensor) -> list[bool]:
    """Whether each index image was mirrored (its white column is on the right)."""
    return (images[:, 1, :, -1] > images[:, 1, :, 0]).all(dim=1).tolist()


def take(loader, n_batches: int) -> list:
    """The first n batches of a loader as [(images, labels)]."""
    it = iter(loader)
    return [next(it) for _ in range(n_batches)]

