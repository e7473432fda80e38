"""Distributed FID (and KID, precision/recall) from feature statistics.

Each rank extracts features of its share of the images and accumulates float64 sums
(`FeatureStats`: count, sum of features, sum of outer products, as EDM's calculate_inception_stats);
`all_reduce()` sums them over ranks, so mean and covariance do not depend on the world size up
to float64 rounding. Work is split by global image index (index i goes to rank i % W), and
samples are generated per index (`compute_stats_from_generator`): with a generator seeded per
index, the images, and so the FID, do not depend on the world size or the batch size. (One
caveat below float64: a CPU convolution may round differently for another batch size, e.g. a
last batch of 1 image, so features can differ by about 1e-7 relative between world sizes.)

KID and precision/recall need features, not moments: every rank keeps a bounded sample of its
features (`max_kept`, default 10,000 in all), chosen by a hash of the global image index (the
`max_kept` smallest hashes), so the kept set is the same for any world size; `all_reduce()`
gathers it. Communication goes through `cmscale.dist`; with no process group everything is
single-process.

Numerics follow clean-fid: `frechet_distance` is clean-fid's formula, with Tr sqrt(S1 S2)
taken from the eigenvalues of S1 S2 instead of scipy's `sqrtm` (same value, cheaper, see
there); the covariance is the unbiased one (np.cov); `kernel_distance` is clean-fid's
unbiased MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets (ours draws them from a seeded generator, clean-fid from numpy's global one).

Reference statistics files (`save` / `load_stats`): an .npz readable by clean-fid and numpy,
no pickles: `mu` (D,) float64, `sigma` (D, D) float64, `count` int64, optionally `feats`
(N, D) float32 (the kept sample, for KID and precision/recall), and the evaluator settings as
0-d fields: `extractor` (str), `weights` (str, hash of the extractor weights), `resize` (str),
`input_resolution` (int, the network input side), `image_resolution` (int, the side of the
images the statistics were made from; -1 if mixed or not square), `feature_dim` (int),
`format` ("cmscale.fidstats/1"). Comparing statistics whose settings differ raises
`StatsMismatchError`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Callable, Iterable

import numpy as np
import torch

from .. import dist
from ..atomic import atomic_path
from ..imageio import to_uint8
from .features import FeatureExtractor

STATS_FORMAT = "cmscale.fidstats/1"
SETTING_KEYS = ("extractor", "weights", "resize", "input_resolution", "image_resolution", "feature_dim")
_STR_KEYS = ("extractor", "weights", "resize")


class StatsMismatchError(ValueError):
    """Statistics made under different evaluator settings (or dimensions) were compared."""


# ----------------------------------------------------------------------------
# Index hashing for the kept sample (same selection for any world size)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser, a bijection of uint64
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _priority(indices: np.ndarray, seed: int) -> np.ndarray:
    """int64 sort keys from global indices: order-preserving view of a 64-bit hash."""
    with np.errstate(over="ignore"):
        h = _mix64(np.asarray(indices, dtype=np.uint64) + _mix64(np.array([seed], dtype=np.uint64)))
    return (h ^ np.uint64(1 << 63)).view(np.int64)  # flip the top bit: uint64 order == int64 order


# ----------------------------------------------------------------------------
# Statistics


class FeatureStats:
    """float64 count, sum and sum of outer products of features, plus a bounded kept sample.

    `update(feats, indices)` with the global image indices of the rows (None: this rank's
    running count c gives index c * W + rank, i.e. the interleaved split). `all_reduce()` once
    after the last update, on every rank; then `mean()`, `cov()`, `kept()` are global.
    `settings` describes the evaluator (see the module docstring); `image_resolution` is
    filled in by the pipelines from the images they see.
    """

    def __init__(self, dim: int, settings: dict | None = None, *, max_kept: int = 10_000, seed: int = 0):
        self.dim = int(dim)
        self.settings = dict(settings or {})
        self.settings.setdefault("feature_dim", self.dim)
        self.max_kept, self.seed = int(max_kept), int(seed)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self._keys = np.zeros(0, dtype=np.int64)
        self._feats = torch.zeros(0, self.dim, dtype=torch.float32)
        self._local_seen = 0
        self._resolutions: set = set()
        self.reduced = False
        self._moments = None  # (mu, sigma) as loaded from a file

    # -- accumulation

    def note_images(self, images: torch.Tensor) -> None:
        """Record the resolution of input images (for the `image_resolution` setting)."""
        h, w = images.shape[-2:]
        self._resolutions.add(int(h) if h == w else -1)

    def update(self, feats, indices=None) -> None:
        if self.reduced or self._moments is not None:
            raise RuntimeError("statistics are final (reduced or loaded); make a new FeatureStats")
        f = torch.as_tensor(feats).detach().to("cpu", torch.float64).reshape(-1, self.dim)
        n = f.shape[0]
        if indices is None:
            rank, world = dist.get_rank(), dist.get_world_size()
            indices = (np.arange(self._local_seen, self._local_seen + n, dtype=np.int64) * world + rank)
        else:
            indices = np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64).reshape(-1)
            if len(indices) != n:
                raise ValueError(f"{len(indices)} indices for {n} feature rows")
        self._local_seen += n
        self.count += n
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        if self.max_kept > 0:
            self._keep(_priority(indices, self.seed), f.to(torch.float32))

    def _keep(self, keys: np.ndarray, feats: torch.Tensor) -> None:
        if len(self._keys) >= self.max_kept:  # full: only rows that beat the largest kept key
            sel = keys < self._keys[-1]
            if not sel.any():
                return
            keys, feats = keys[sel], feats[torch.from_numpy(sel)]
        keys = np.concatenate([self._keys, keys])
        feats = torch.cat([self._feats, feats])
        order = np.argsort(keys, kind="stable")[:self.max_kept]
        self._keys, self._feats = keys[order], feats[torch.from_numpy(order)]

    # -- reduction

    def all_reduce(self) -> "FeatureStats":
        """Sum the moments over ranks and gather the kept sample (collective; no-op single-process)."""
        if self.reduced:
            return self
        self.reduced = True
        res = sorted(self._resolutions)
        local_res = res[0] if len(res) == 1 else (-1 if res else 0)  # 0: saw no images, -1: mixed
        seen = [local_res]
        if dist.get_world_size() > 1:
            flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum,
                              self.sum_outer.reshape(-1)])
            flat = dist.all_reduce_sum(flat)
            self.count = int(round(float(flat[0])))
            self.sum = flat[1:1 + self.dim].clone()
            self.sum_outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()
            seen = [int(g) for g in dist.all_gather(torch.tensor([local_res], dtype=torch.int64))]
            if self.max_kept > 0:
                self._gather_kept()
        known = {r for r in seen if r != 0}
        if known:
            self.settings["image_resolution"] = known.pop() if len(known) == 1 else -1
        return self

    def _gather_kept(self) -> None:
        # 1) the global max_kept-th smallest key, from every rank's (already bottom-k) keys
        sizes = [int(n) for n in dist.all_gather(torch.tensor([len(self._keys)], dtype=torch.int64))]
        m = max(sizes)
        if m == 0:
            return
        pad = torch.full((m,), np.iinfo(np.int64).max, dtype=torch.int64)
        pad[:len(self._keys)] = torch.from_numpy(self._keys)
        merged = np.sort(torch.cat([k[:n] for k, n in zip(dist.all_gather(pad), sizes)]).numpy())
        threshold = merged[min(self.max_kept, len(merged)) - 1]
        # 2) every rank sends only its rows within the global bottom-k (about max_kept in all)
        sel = self._keys <= threshold
        keys, feats = self._keys[sel], self._feats[torch.from_numpy(sel)]
        sizes = [int(n) for n in dist.all_gather(torch.tensor([len(keys)], dtype=torch.int64))]
        m = max(sizes)
        kp = torch.full((m,), np.iinfo(np.int64).max, dtype=torch.int64)
        kp[:len(keys)] = torch.from_numpy(keys)
        fp = torch.zeros(m, self.dim, dtype=torch.float32)
        fp[:len(keys)] = feats
        keys_all, feats_all = dist.all_gather(kp), dist.all_gather(fp)
        self._keys, self._feats = np.zeros(0, dtype=np.int64), torch.zeros(0, self.dim)
        self._keep(np.concatenate([k[:n].numpy() for k, n in zip(keys_all, sizes)]),
                   torch.cat([f[:n] for f, n in zip(feats_all, sizes)]))

    # -- results

    def mean(self) -> np.ndarray:
        if self._moments is not None:
            return self._moments[0]
        if self.count < 1:
            raise ValueError("no features accumulated")
        return (self.sum / self.count).numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (as np.cov(feats, rowvar=False))."""
        if self._moments is not None:
            return self._moments[1]
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 features, have {self.count}")
        mu = self.sum / self.count
        sigma = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return ((sigma + sigma.T) / 2).numpy()

    def kept(self) -> np.ndarray:
        """The kept sample of features (float32, at most max_kept rows, ordered by index hash)."""
        return self._feats.numpy()

    # -- files

    def save(self, path: str) -> None:
        """Write the .npz described in the module docstring (atomically: temp file + rename)."""
        if self._moments is None and not self.reduced and dist.get_world_size() > 1:
            raise RuntimeError("call all_reduce() before saving distributed statistics")
        out = {"mu": np.asarray(self.mean(), np.float64), "sigma": np.asarray(self.cov(), np.float64),
               "count": np.asarray(self.count, np.int64), "format": np.asarray(STATS_FORMAT)}
        if len(self._feats):
            out["feats"] = self.kept().astype(np.float32)
        for k in SETTING_KEYS:
            if k in self.settings:
                v = self.settings[k]
                out[k] = np.asarray(str(v)) if k in _STR_KEYS else np.asarray(int(v), np.int64)
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        # Through a file object: given a name, np.savez would append ".npz" to the temporary one.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **out)

    @classmethod
    def from_moments(cls, mu, sigma, count: int, settings: dict | None = None, feats=None) -> "FeatureStats":
        mu = np.asarray(mu, np.float64)
        sigma = np.asarray(sigma, np.float64)
        s = cls(mu.shape[0], settings, max_kept=0)
        s.count = int(count)
        s._moments = (mu, sigma)
        if feats is not None:
            s._feats = torch.from_numpy(np.asarray(feats, np.float32))
            s.max_kept = len(s._feats)
        s.reduced = True
        return s


def load_stats(path: str, *, assume_settings: dict | None = None) -> FeatureStats:
    """Read a statistics .npz (ours, or clean-fid's `mu`/`sigma` files with `assume_settings`).

    A file without evaluator settings (e.g. clean-fid's precomputed statistics) cannot be
    checked: it is refused unless the caller states its settings, e.g.
    `assume_settings=InceptionExtractor().settings()` for clean-fid's "clean" Inception files.
    """
    with np.load(os.fspath(path), allow_pickle=False) as z:
        files = set(z.files)
        if "mu" not in files or "sigma" not in files:
            raise ValueError(f"{path}: not a statistics file (needs mu and sigma)")
        mu, sigma = z["mu"], z["sigma"]
        count = int(z["count"]) if "count" in files else 0
        feats = z["feats"] if "feats" in files else None
        settings = {k: (str(z[k]) if k in _STR_KEYS else int(z[k])) for k in SETTING_KEYS if k in files}
    if "extractor" not in settings:
        if assume_settings is None:
            raise StatsMismatchError(
                f"{path} records no evaluator settings (not written by cmscale); pass "
                f"assume_settings=<extractor>.settings() if you know how it was made")
        settings = {**assume_settings, **settings}
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: sigma {sigma.shape} does not match mu {mu.shape}")
    return FeatureStats.from_moments(mu, sigma, count, settings, feats)


def check_compatible(a: dict, b: dict) -> None:
    """Raise StatsMismatchError unless settings `a` and `b` describe the same evaluator and image size.

    image_resolution is compared when both are known (> 0): FID between 64 px samples and
    statistics of 256 px images measures the resolution, not the model.
    """
    diffs = []
    for k in SETTING_KEYS:
        va, vb = a.get(k), b.get(k)
        if k == "image_resolution" and (va is None or vb is None or int(va) <= 0 or int(vb) <= 0):
            continue
        if k == "weights" and (not va or not vb):
            continue
        if va != vb:
            diffs.append(f"{k}: {va!r} vs {vb!r}")
    if diffs:
        raise StatsMismatchError("statistics made under different evaluator settings: " + "; ".join(diffs))


# ----------------------------------------------------------------------------
# Distances


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) (Heusel et al. 2017).

    Tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2 (real parts of
    the principal roots), which is the trace of the matrix square root clean-fid takes with
    scipy's `sqrtm`, without forming that matrix (cheaper than a matrix square root), and
    equal to clean-fid's value to about 1e-12 relative for full-rank covariances,
    1e-8 for rank-deficient ones (fewer images than dimensions). As clean-fid does, eps is added
    to the diagonals if the eigenvalues cannot be computed.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise StatsMismatchError(f"feature dimensions differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"FID: {name} has non-finite entries (NaN or inf features)")
    diff = mu1 - mu2
    try:
        ev = np.linalg.eigvals(s1.dot(s2))
    except np.linalg.LinAlgError:
        warnings.warn(f"FID: eigenvalues of S1 S2 did not converge; adding {eps} to the diagonals")
        offset = np.eye(s1.shape[0]) * eps
        ev = np.linalg.eigvals((s1 + offset).dot(s2 + offset))
    tr_covmean = float(np.sqrt(ev.astype(np.complex128)).real.sum())
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def kernel_distance(feats1, feats2, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2, kernel (x.y / d + 1)^3, mean over subsets.

    Subsets of m = min(n1, n2, max_subset_size) rows without replacement, as clean-fid's
    `kernel_distance`; with m equal to both set sizes every subset is the whole set and the
    value equals clean-fid's exactly.
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    d = f1.shape[1]
    m = min(f1.shape[0], f2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 features on each side")
    rng = np.random.default_rng(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = f2[rng.choice(f2.shape[0], m, replace=False)]
        y = f1[rng.choice(f1.shape[0], m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


def _kth_nn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(out)


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    inside = 0
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centers)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls as manifold estimates.

    precision: fraction of fake features inside some real feature's k-NN ball; recall: the same
    with the roles swapped. Cost O(N^2 D): meant for the kept sample (<= 10k per side).
    """
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per side")
    precision = _coverage(fake, real, _kth_nn_radii(real, k))
    recall = _coverage(real, fake, _kth_nn_radii(fake, k))
    return precision, recall


# ----------------------------------------------------------------------------
# Pipelines


@dataclasses.dataclass
class FIDResult:
    fid: float
    count: int  # images in the evaluated set
    stats: FeatureStats
    kid: float | None = None
    precision: float | None = None
    recall: float | None = None


def _rank0_value(fn: Callable[[], list]) -> list:
    """Compute a list of floats on rank 0 only; every rank gets it (or the same error)."""
    if dist.get_world_size() == 1:
        return fn()
    n_max = 8
    buf = torch.full((n_max + 1,), math.nan, dtype=torch.float64)
    err = None
    if dist.is_main():
        try:
            vals = fn()
            buf[:len(vals)] = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64)
            buf[n_max] = len(vals)
        except Exception as e:  # re-raised below after telling the other ranks
            err = e
            buf[n_max] = -1
    dist.broadcast(buf, src=0)
    if err is not None:
        raise err
    if int(buf[n_max]) < 0:
        raise RuntimeError("FID computation failed on rank 0 (see its error)")
    return [None if math.isnan(v) else v for v in buf[:int(buf[n_max])].tolist()]


def fid_from_stats(stats: FeatureStats, ref: FeatureStats, *, kid: bool = False, pr: bool = False) -> FIDResult:
    """FID (and KID / precision-recall from the kept samples) of final `stats` against `ref`.

    Settings are checked first (same result on every rank). The distances are computed on
    rank 0 and broadcast, so every rank returns the same numbers.
    """
    check_compatible(stats.settings, ref.settings)
    if (kid or pr) and (len(ref.kept()) == 0 or len(stats.kept()) == 0):
        raise ValueError("KID and precision/recall need kept features on both sides (max_kept > 0; "
                         "reference statistics written with features)")

    def compute():
        vals = [frechet_distance(stats.mean(), stats.cov(), ref.mean(), ref.cov())]
        vals.append(kernel_distance(stats.kept(), ref.kept()) if kid else None)
        vals.extend(precision_recall(ref.kept(), stats.kept()) if pr else (None, None))
        return vals

    fid, kid_v, p, r = _rank0_value(compute)
    return FIDResult(fid=fid, count=stats.count, stats=stats, kid=kid_v, precision=p, recall=r)


def new_stats(extractor: FeatureExtractor, max_kept: int = 10_000, seed: int = 0) -> FeatureStats:
    return FeatureStats(extractor.dim, extractor.settings(), max_kept=max_kept, seed=seed)


def compute_stats_from_images(images: Iterable, extractor: FeatureExtractor, *, max_kept: int = 10_000,
                              seed: int = 0) -> FeatureStats:
    """Statistics of this rank's batches (uint8 NCHW or float [-1, 1]), all-reduced over ranks.

    Each rank passes its own iterable (its share of the images). Items may also be
    (images, indices) pairs giving global image indices (for the kept-sample selection).
    """
    stats = new_stats(extractor, max_kept, seed)
    for item in images:
        batch, idx = item if isinstance(item, (tuple, list)) else (item, None)
        batch = to_uint8(batch)
        stats.note_images(batch)
        stats.update(extractor(batch), idx)
    return stats.all_reduce()


def compute_fid_from_images(images: Iterable, extractor: FeatureExtractor, ref_stats: FeatureStats, *,
                            kid: bool = False, pr: bool = False, max_kept: int = 10_000) -> FIDResult:
    """FID of the images every rank iterates over (its share) against reference statistics."""
    check_compatible({k: v for k, v in extractor.settings().items()}, ref_stats.settings)
    stats = compute_stats_from_images(images, extractor, max_kept=max_kept if (kid or pr) else 0)
    return fid_from_stats(stats, ref_stats, kid=kid, pr=pr)


def rank_indices(num_images: int, rank: int | None = None, world_size: int | None = None) -> np.ndarray:
    """This rank's global image indices: i with i % W == rank (interleaved)."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    return np.arange(rank, num_images, world_size, dtype=np.int64)


def compute_stats_from_generator(generate: Callable[[torch.Tensor], torch.Tensor], num_images: int,
                                 extractor: FeatureExtractor, *, batch_size: int = 64, max_kept: int = 10_000,
                                 seed: int = 0) -> FeatureStats:
    """Statistics of images 0 .. num_images-1, `generate(indices)` making a batch of them.

    Rank r generates the indices i with i % W == r, `batch_size` at a time. `generate` must
    depend only on the indices (e.g. seed each image's noise by its index) for the result to
    be independent of world size and batch size; it must not run collectives (ranks may make
    different numbers of calls).
    """
    idx = rank_indices(num_images)
    stats = new_stats(extractor, max_kept, seed)
    for i in range(0, len(idx), batch_size):
        chunk = torch.from_numpy(idx[i:i + batch_size])
        with torch.no_grad():
            batch = to_uint8(generate(chunk))
        if batch.shape[0] != len(chunk):
            raise ValueError(f"generate() returned {batch.shape[0]} images for {len(chunk)} indices")
        stats.note_images(batch)
        stats.update(extractor(batch), chunk)
    return stats.all_reduce()


def compute_fid_from_generator(generate: Callable[[torch.Tensor], torch.Tensor], num_images: int,
                               extractor: FeatureExtractor, ref_stats: FeatureStats, *, batch_size: int = 64,
                               kid: bool = False, pr: bool = False, max_kept: int = 10_000) -> FIDResult:
    """FID of `num_images` generated images (see `compute_stats_from_generator`) against `ref_stats`."""
    check_compatible(extractor.settings(), ref_stats.settings)
    stats = compute_stats_from_generator(generate, num_images, extractor, batch_size=batch_size,
                                         max_kept=max_kept if (kid or pr) else 0)
    return fid_from_stats(stats, ref_stats, kid=kid, pr=pr)


# -- image folders (reference sets, saved samples)

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # clean-fid's (and npy)


def list_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, sorted by path (clean-fid's order and extensions;
    extensions are matched case-insensitively)."""
    out = []
    for d, subdirs, names in os.walk(folder):
        subdirs.sort()
        out.extend(os.path.join(d, n) for n in names if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS + ("npy",))
    return sorted(out)


def load_image_file(path: str) -> np.ndarray:
    """uint8 (H, W, 3) array; .npy arrays are taken as they are (HWC), as clean-fid does."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


class _Files(torch.utils.data.Dataset):
    def __init__(self, files, indices, preprocessor):
        self.files, self.indices, self.preprocessor = files, indices, preprocessor

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        a = load_image_file(self.files[self.indices[i]])
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
        return self.preprocessor(x)[0], int(self.indices[i]), (int(x.shape[2]) if x.shape[2] == x.shape[3] else -1)


def _collate(items):
    return torch.stack([t[0] for t in items]), torch.tensor([t[1] for t in items]), {t[2] for t in items}


def compute_stats_from_folder(folder: str, extractor: FeatureExtractor, *, batch_size: int = 64,
                              num_workers: int = 1, limit: int | None = None, max_kept: int = 10_000,
                              seed: int = 0) -> FeatureStats:
    """Statistics of the images in `folder` (first `limit` in sorted order), all-reduced.

    File i goes to rank i % W. Decoding and the extractor's preprocessing (e.g. the clean
    resize) run in `num_workers` DataLoader workers, the network in this process, so the two
    overlap.
    """
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    files = files[:limit] if limit else files
    idx = rank_indices(len(files))
    ds = _Files(files, idx, extractor.preprocessor)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate, prefetch_factor=4 if num_workers > 0 else None)
    stats = new_stats(extractor, max_kept, seed)
    for x, indices, res in loader:
        stats._resolutions |= res
        stats.update(extractor.forward_prepared(x), indices)
    return stats.all_reduce()
