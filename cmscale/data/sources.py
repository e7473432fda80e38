"""Image sources for make_shards: a folder tree, an LSUN lmdb export, an .npz array, embedded datasets.

A source lists picklable references to its items in a fixed natural order (`refs()`), and
`load(ref)` returns (PIL image or encoded bytes, label or None) in any process; processes open
their own handles lazily, so a source object can be sent to pool workers. Nothing is unpickled:
npz files are read with `allow_pickle=False`, lmdb values are image bytes.

Specs (`open_source`):
- `sklearn:digits`: scikit-learn's 1797 handwritten digits, 8x8, values 0-16 scaled to 0-255,
  replicated to RGB, labels 0-9 (classes "0".."9").
- `skimage:lfw`: the 100 face crops (25x25, greyscale replicated to RGB) of scikit-image's
  `lfw_subset`, which also holds 100 non-face background patches that we leave out; no labels.
- `PATH.npz`: `arr_0` uint8 NHWC (the reference batches' layout; C = 3, or 1/none for greyscale,
  4 with alpha); optional `arr_1` integer labels of length N (classes are their sorted values).
- an lmdb environment (a directory holding `data.mdb`, or a `.mdb`/`.lmdb` file), LSUN's export:
  values are encoded images; no labels.
- a directory tree of images: the class is the first sub-folder under SRC (classes sorted by
  name); with no sub-folders there are no labels. In a tree with class folders, images lying
  directly in SRC have no class and are skipped (reason `outside_class_folders`).
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
from PIL import Image

from .images import IMAGE_EXTS

EMBEDDED = ("sklearn:digits", "skimage:lfw")


class Source:
    name: str = ""
    classes: list | None = None
    pre_skipped: dict  # reason -> count of items left out before processing

    def refs(self) -> list:
        raise NotImplementedError

    def load(self, ref):
        raise NotImplementedError

    def close(self):
        """Drop per-process handles (called before forking workers)."""


class FolderSource(Source):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.name = root
        files = []
        for d, subdirs, names in os.walk(self.root):
            subdirs.sort()
            for n in sorted(names):
                if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    files.append(os.path.relpath(os.path.join(d, n), self.root))
        nested = [f for f in files if os.sep in f]
        self.pre_skipped = {}
        if nested:
            self.classes = sorted({f.split(os.sep, 1)[0] for f in nested})
            index = {c: i for i, c in enumerate(self.classes)}
            if len(nested) < len(files):
                self.pre_skipped["outside_class_folders"] = len(files) - len(nested)
            self._refs = [(f, index[f.split(os.sep, 1)[0]]) for f in nested]
        else:
            self.classes = None
            self._refs = [(f, None) for f in files]

    def refs(self):
        return self._refs

    def load(self, ref):
        path, label = ref
        with open(os.path.join(self.root, path), "rb") as f:
            return f.read(), label


class LmdbSource(Source):
    def __init__(self, path: str):
        self.path, self.name = path, path
        self.classes, self.pre_skipped = None, {}
        self._env = None
        with self._open().begin() as txn:
            self._refs = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        self.close()

    def _open(self):
        import lmdb  # optional dependency: cmscale[data]

        if self._env is None:
            self._env = lmdb.open(self.path, readonly=True, lock=False, readahead=False,
                                  meminit=False, subdir=os.path.isdir(self.path), max_readers=512)
        return self._env

    def refs(self):
        return self._refs

    def load(self, key):
        with self._open().begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            raise KeyError(f"lmdb key {key!r} vanished")
        return value, None

    def close(self):
        if self._env is not None:
            self._env.close()
            self._env = None

    def __getstate__(self):
        return {**self.__dict__, "_env": None}


def _npz_member(path: str, name: str):
    """Array `name` of an .npz: memory-mapped when stored uncompressed (np.savez), else loaded."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)  # local file header: name and extra lengths at bytes 26-29
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
                f.seek(start)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:  # npy 3.0 (utf-8 field names): no public reader
                    shape, fortran, dtype = np.lib.format._read_array_header(f, version)
                if dtype.hasobject:
                    raise ValueError(f"{path}:{name} holds Python objects; refusing to unpickle")
                return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                 order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as z:
        return z[name]


class NpzSource(Source):
    def __init__(self, path: str):
        self.path, self.name = path, path
        self.pre_skipped = {}
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
        if "arr_0" not in names:
            raise ValueError(f"{path}: no arr_0 (expected uint8 NHWC images, the reference-batch layout)")
        images = _npz_member(path, "arr_0")
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise ValueError(f"{path}: arr_0 must be uint8 NHWC (C in 1, 3, 4), got {images.dtype} {images.shape}")
        self._n = len(images)
        self._labels = None
        self.classes = None
        if "arr_1" in names:
            labels = np.asarray(_npz_member(path, "arr_1"))
            if labels.shape == (self._n,) and labels.dtype.kind in "iu":
                values = sorted(set(labels.tolist()))
                self.classes = [str(v) for v in values]
                index = {v: i for i, v in enumerate(values)}
                self._labels = [index[v] for v in labels.tolist()]
        self._images = None

    def refs(self):
        return list(range(self._n))

    def load(self, i):
        if self._images is None:
            self._images = _npz_member(self.path, "arr_0")
        a = np.asarray(self._images[i])
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        return Image.fromarray(np.ascontiguousarray(a)), (self._labels[i] if self._labels else None)

    def close(self):
        self._images = None

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


class EmbeddedSource(Source):
    """Real images shipped inside a dependency (see module docstring); greyscale made RGB here."""

    def __init__(self, name: str):
        if name not in EMBEDDED:
            raise ValueError(f"unknown embedded dataset {name!r}; known: {', '.join(EMBEDDED)}")
        self.name, self.pre_skipped = name, {}
        self._images = images, labels = self._arrays()
        self._n = len(images)
        self.classes = [str(i) for i in range(10)] if labels is not None else None

    def _arrays(self):
        if self.name == "sklearn:digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)
        from skimage.data import lfw_subset

        faces = lfw_subset()[:100]  # the first 100 are faces; the rest are background patches
        if faces.dtype != np.uint8:
            faces = np.rint(np.clip(faces, 0, 1) * 255.0).astype(np.uint8)
        return faces, None

    def refs(self):
        return list(range(self._n))

    def load(self, i):
        if self._images is None:
            self._images = self._arrays()
        images, labels = self._images
        grey = images[i]
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        return Image.fromarray(rgb, "RGB"), (int(labels[i]) if labels is not None else None)

    def close(self):
        self._images = None

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


def open_source(spec) -> Source:
    """A Source for a spec string (see module docstring) or a Source object as is."""
    if isinstance(spec, Source):
        return spec
    spec = os.fspath(spec)
    if ":" in spec and spec.split(":", 1)[0] in ("sklearn", "skimage"):
        return EmbeddedSource(spec)
    if spec.endswith(".npz"):
        return NpzSource(spec)
    if (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "data.mdb"))) or spec.endswith((".mdb", ".lmdb")):
        return LmdbSource(spec)
    if os.path.isdir(spec):
        return FolderSource(spec)
    raise FileNotFoundError(f"no image source at {spec!r} (a folder, lmdb, .npz, or one of {', '.join(EMBEDDED)})")
