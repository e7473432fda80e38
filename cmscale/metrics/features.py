"""Feature extractors for FID/KID: images -> (B, D) float features.

The interface (`FeatureExtractor`):

    feats = extractor(images)   # images: uint8 (B, C, H, W) in [0, 255], or float in [-1, 1]
                                # feats: float32 (B, D) on the CPU

Float images are generated samples: they are quantised to uint8 first with
`cmscale.imageio.to_uint8` (round((x + 1) * 127.5)), so the FID of samples computed in memory
equals the FID of the same samples saved as PNG. C = 1 is replicated to RGB.

A call runs two stages, kept apart so that pipelines can put the first one in DataLoader workers:
`extractor.preprocessor` (a picklable CPU function: uint8 batch -> the network's input, e.g. the
resize to 299) and `extractor.forward_prepared(x)` (the network). `extractor.settings()` is the
evaluator description stored with reference statistics (`cmscale.metrics.fid`): statistics made
under different settings are never compared.

Extractors:
- `InceptionExtractor`: clean-fid's "clean" mode, the evaluator our FID numbers refer to. The
  TorchScript Inception-v3 `inception-2015-12-05.pt` (the one StyleGAN2-ADA, EDM and clean-fid
  use; 2048-D pool features) from a local file; the resize is `CleanResize` (below). Not
  clean-fid's "legacy_tensorflow" mode (the network's own resize of uint8 images), which gives
  different numbers; FID values from different evaluators must not be mixed.
- `DigitsExtractor`: 64-D penultimate-layer features of a small CNN trained here, in seconds,
  on scikit-learn's digits (the embedded dataset). It gives a real Frechet distance on machines
  without Inception weights; its numbers are only comparable with themselves.
- `CustomExtractor(fn, ...)`: any function or module of the network input (after the resize),
  like clean-fid's `custom_feat_extractor` (which receives float B x 3 x 299 x 299 in [0, 255]).

The "clean" resize (`CleanResize`): clean-fid's `build_resizer("clean")` is
`make_resizer("PIL", quantize_after=False, "bicubic", (299, 299))`: each channel of the uint8
image becomes a PIL float ("F") image, is resized with BICUBIC to 299 x 299, and the float
result is clipped to [0, 255], without rounding to uint8. `CleanResize` makes the same Pillow
calls (our code), so it equals clean-fid's resize bit for bit with whatever Pillow is installed.
A float64 matrix model of Pillow's separable resampling is not bit-exact for every shape (one
float32 ulp on some downscales), so the resize stays Pillow's; pipelines run it in DataLoader
workers.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.fx
import torch.nn.functional as F

from ..atomic import atomic_path
from ..imageio import to_uint8

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def default_cache_dir() -> str:
    """$CMSCALE_CACHE, else ~/.cache/cmscale (the same place cmscale.data caches embedded shards)."""
    return os.environ.get("CMSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cmscale")


# ----------------------------------------------------------------------------
# Input conventions


# ----------------------------------------------------------------------------
# clean-fid's "clean" resize, batched (see module docstring)


class CleanResize:
    """clean-fid's "clean" resize of a batch: uint8 (B, C, H, W) -> float32 (B, C, S, S) in [0, 255].

    Per image and channel: PIL float ("F") image, BICUBIC resize to S x S, clip to [0, 255]
    (see the module docstring). Picklable (DataLoader workers).
    """

    mode = "clean"

    def __init__(self, size: int = 299):
        self.size = int(size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        x = images.detach().cpu().numpy()
        b, c = x.shape[:2]
        s = self.size
        out = np.empty((b, c, s, s), dtype=np.float32)
        for i in range(b):
            for ch in range(c):
                im = Image.fromarray(x[i, ch].astype(np.float32))  # mode "F"
                out[i, ch] = np.asarray(im.resize((s, s), resample=Image.BICUBIC))
        np.clip(out, 0, 255, out=out)
        return torch.from_numpy(out)


class AntialiasResize:
    """Bilinear (antialiased when shrinking) resize of (B, C, H, W) in [0, 255] to S x S, then to [-1, 1].

    torch's `interpolate(mode="bilinear", antialias=True, align_corners=False)`; the identity
    when the input is already S x S. Picklable.
    """

    mode = "bilinear-antialias"

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 255)
        return x / 127.5 - 1


# ----------------------------------------------------------------------------
# The interface


class FeatureExtractor:
    """Base class; see the module docstring. Subclasses set the attributes and `forward_prepared`."""

    name: str = ""  # evaluator id stored with statistics, e.g. "inception-2015-12-05"
    weights: str = ""  # short hash of the weights, "" when not known
    dim: int = 0  # feature dimension D
    input_size: int = 0  # the network's input side (299 for Inception)
    preprocessor: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> network input (picklable)
    device: torch.device = torch.device("cpu")

    @property
    def resize(self) -> str:
        return self.preprocessor.mode

    def forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_prepared(self.preprocessor(to_uint8(images)))

    def settings(self) -> dict:
        """Evaluator settings (the image resolution is added by the statistics, which see the images)."""
        return {"extractor": self.name, "weights": self.weights, "resize": self.resize,
                "input_resolution": int(self.input_size), "feature_dim": int(self.dim)}


def _prepare_module(net: nn.Module, device, channels_last: bool) -> nn.Module:
    net = net.to(device).eval()
    if channels_last:
        # Same values up to float summation order; oneDNN's NHWC convolutions are faster on CPU.
        net = net.to(memory_format=torch.channels_last)
    return net


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # One fixed memory layout: convolutions round differently for NCHW and NHWC inputs (about
    # 1e-7 relative), and a batch permuted from NHWC arrays would otherwise change the features.
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _checked(original, candidate, example: torch.Tensor, what: str):
    """`candidate` if it reproduces `original` on `example` (relative 1e-4), else `original`.

    Guards the inference optimisations (batch-norm folding): they must not change the
    evaluator, only its speed; a model they do not handle falls back with a warning.
    """
    try:
        with torch.inference_mode():
            a, b = original(example).float(), candidate(example).float()
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
        if a.shape == b.shape and err < 1e-4:
            return candidate
        reason = f"outputs differ (relative {err:.1e})"
    except Exception as e:  # unsupported model structure
        reason = f"{type(e).__name__}: {e}"
    warnings.warn(f"{what}: optimisation not applied ({reason}); using the model as it is")
    return original


def fold_batchnorm(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """Conv + BatchNorm folded (torch.fx, eval mode), checked against `net` on `example`."""
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(net)
    except Exception as e:  # not fx-traceable: keep the module
        warnings.warn(f"batch-norm folding not applied ({type(e).__name__}: {e})")
        return net
    return _checked(net, fused, example, "batch-norm folding")


# On CPU the network runs stage by stage, each stage on chunks of the batch sized so that its
# largest activation stays around this many bytes: the 147 x 147 stem layers of Inception run
# faster on a few images at a time (cache reuse), while the late 1 x 1 convolutions want the
# whole batch to amortise their weights (benchmarks/bench_fid.py measures it).
CHUNK_BYTES = 24 << 20


class ChunkedStages(nn.Module):
    """`stages` in sequence; stage i sees the batch in chunks of at most `chunks[i]` images.

    Images are independent through an inference network, so this changes only the batch the
    kernels see (checked against the unchunked network where it is built, see `_checked`).
    """

    def __init__(self, stages, chunks):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.chunks = [int(c) for c in chunks]

    def forward(self, x):
        for stage, c in zip(self.stages, self.chunks):
            x = stage(x) if x.shape[0] <= c else torch.cat([stage(t) for t in x.split(c)])
        return x


def _chain_of_stages(gm) -> list | None:
    """An fx GraphModule cut wherever a single tensor is live: its stages (GraphModules), or
    None when the graph has no such cut (e.g. several inputs)."""
    from torch.fx.passes.split_module import split_module

    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    part, current, cut_after, reach = {}, 0, False, 0
    for n in nodes:
        if n.op not in ("placeholder", "output"):
            if cut_after:
                current += 1
            part[n] = current
            # A cut after n if n is still needed later and nothing defined before it is
            # (`reach`: the last use of any earlier value).
            i = order[n]
            cut_after = reach <= i < last_use[n] and n.op != "get_attr"
        reach = max(reach, last_use[n])
    if current == 0:
        return None
    split = split_module(gm, None, lambda n: part[n])
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    prev = next(n for n in split.graph.nodes if n.op == "placeholder")
    for n in calls:  # a pure chain: each stage takes exactly the previous stage's output
        if len(n.args) != 1 or n.args[0] is not prev or n.kwargs:
            return None
        prev = n
    out = next(n for n in split.graph.nodes if n.op == "output")
    if out.args[0] is not prev:
        return None
    return [getattr(split, n.target) for n in calls]


def _largest_activation(stage, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(stage(x), bytes of the largest tensor any node of the stage makes) for an fx stage;
    for other modules the output's size."""
    if not isinstance(stage, torch.fx.GraphModule):
        y = stage(x)
        return y, y.numel() * y.element_size()
    sizes = [x.numel() * x.element_size()]

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if isinstance(r, torch.Tensor):
                sizes.append(r.numel() * r.element_size())
            return r

    y = Probe(stage).run(x)
    return y, max(sizes)


def chunk_stages(net, stages, example: torch.Tensor, batch_bytes: int = CHUNK_BYTES):
    """`ChunkedStages` over `stages` (what `net` computes, in order), chunk sizes from the
    largest activation per image (measured on one example image), checked against `net`."""
    sizes = []
    with torch.inference_mode():
        x = example[:1]
        for stage in stages:
            x, size = _largest_activation(stage, x)
            sizes.append(size)
    chunks = [max(1, batch_bytes // max(1, s)) for s in sizes]
    # Merge neighbours with the same chunk size.
    merged_stages, merged_chunks = [], []
    for stage, c in zip(stages, chunks):
        if merged_chunks and merged_chunks[-1] == c:
            merged_stages[-1].append(stage)
        else:
            merged_stages.append([stage])
            merged_chunks.append(c)
    chunked = ChunkedStages([s[0] if len(s) == 1 else nn.Sequential(*s) for s in merged_stages], merged_chunks)
    # Check on a batch that is split at least once.
    n = min(merged_chunks) + 1
    reps = -(-n // example.shape[0])
    check = torch.cat([example] * reps)[:n]
    return _checked(net, chunked, check, "chunked stages")


def chunk_graph(gm, example: torch.Tensor, batch_bytes: int = CHUNK_BYTES):
    """`chunk_stages` over the cuts of an fx GraphModule; `gm` itself when it has no cut."""
    try:
        stages = _chain_of_stages(gm)
    except Exception as e:  # an fx graph split_module does not handle
        warnings.warn(f"chunked stages not applied ({type(e).__name__}: {e})")
        return gm
    if not stages:
        return gm
    return chunk_stages(gm, stages, example, batch_bytes)


class CustomExtractor(FeatureExtractor):
    """Any `fn(x) -> (B, D)` of the resized network input, as clean-fid's `custom_feat_extractor`.

    With the default resize ("clean", 299) `fn` receives float32 B x 3 x 299 x 299 in [0, 255],
    exactly what clean-fid passes its custom extractor, so both pipelines compute the same
    features. `name` (and `weights`) identify the evaluator in statistics files. If `fn` is an
    nn.Module it is put in eval mode on `device`; `channels_last` runs it in NHWC layout, and
    `optimize` also folds batch norms into the convolutions (checked against the original at
    construction). Both change features only by float32 rounding (about 1e-7 relative).
    """

    def __init__(self, fn, *, name: str, dim: int, input_size: int = 299, resize: str = "clean",
                 weights: str = "", device="cpu", channels_last: bool = False, optimize: bool = False):
        self.device = torch.device(device)
        self.channels_last = channels_last or optimize
        self.name, self.weights, self.dim, self.input_size = name, weights, int(dim), int(input_size)
        if isinstance(fn, nn.Module):
            fn = _prepare_module(fn, self.device, False)
            if optimize:
                g = torch.Generator().manual_seed(0)
                example = torch.rand(2, 3, input_size, input_size, generator=g).to(self.device) * 255
                fn = fold_batchnorm(fn, example)
            if self.channels_last:
                fn = fn.to(memory_format=torch.channels_last)  # parameters only: same module
            if optimize and self.device.type == "cpu" and isinstance(fn, torch.fx.GraphModule):
                fn = chunk_graph(fn, _layout(example, self.channels_last))
        self.fn = fn
        if resize == "clean":
            self.preprocessor = CleanResize(input_size)
        elif resize == "bilinear-antialias":
            self.preprocessor = AntialiasResize(input_size)
        else:
            raise ValueError(f"unknown resize {resize!r} (clean or bilinear-antialias)")

    @torch.inference_mode()
    def forward_prepared(self, x):
        x = _layout(x.to(self.device), self.channels_last)
        return self.fn(x).reshape(x.shape[0], -1).float().cpu()


# ----------------------------------------------------------------------------
# Inception (clean-fid "clean")


class InceptionWeightsNotFound(FileNotFoundError):
    pass


def _file_digest(path: str, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def inception_candidates(path: str | None = None) -> list[str]:
    """Where `InceptionExtractor` looks, in order.

    An explicit location, `path` (a file or a directory holding it) or else $CMSCALE_INCEPTION,
    is the only candidate: if it is wrong, that is an error, not a reason to use another copy.
    Otherwise: <cache>/inception-2015-12-05.pt, then /tmp/inception-2015-12-05.pt (clean-fid's
    default download location on Linux).
    """
    explicit = path or os.environ.get("CMSCALE_INCEPTION")
    if explicit:
        p = os.path.expanduser(os.fspath(explicit))
        return [os.path.join(p, INCEPTION_FILE) if os.path.isdir(p) else p]
    return [os.path.join(default_cache_dir(), INCEPTION_FILE), os.path.join("/tmp", INCEPTION_FILE)]


def _download_inception(dest_dir: str) -> str:
    """clean-fid's own download helper, into a private directory, then renamed into place."""
    from cleanfid.downloads_helper import check_download_inception

    os.makedirs(dest_dir, exist_ok=True)
    tmp = os.path.join(dest_dir, f".download-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        got = check_download_inception(fpath=tmp)
        final = os.path.join(dest_dir, INCEPTION_FILE)
        os.replace(got, final)
        return final
    finally:
        try:
            for name in os.listdir(tmp):
                os.remove(os.path.join(tmp, name))
            os.rmdir(tmp)
        except OSError:
            pass


def find_inception(path: str | None = None, download: bool = False) -> str:
    """The path of inception-2015-12-05.pt (see `inception_candidates`), or a clear error."""
    candidates = inception_candidates(path)
    for c in candidates:
        if os.path.isfile(c):
            return c
    reason = "not downloaded: download=False"
    if download:
        try:
            return _download_inception(default_cache_dir())
        except Exception as e:  # offline: URLError, timeouts, proxies
            reason = f"download failed: {type(e).__name__}: {e}"
    looked = "\n".join(f"  {c}" for c in candidates)
    raise InceptionWeightsNotFound(
        f"Inception weights {INCEPTION_FILE} not found ({reason}). Looked at:\n{looked}\n"
        f"Get the file (the TorchScript Inception-v3 of clean-fid, StyleGAN2-ADA and EDM, about 95 MB) from\n"
        f"  {INCEPTION_URL}\n"
        f"on a machine with internet access, and put it at {os.path.join(default_cache_dir(), INCEPTION_FILE)} "
        f"(or /tmp/{INCEPTION_FILE}, clean-fid's default), or set CMSCALE_INCEPTION=/path/to/{INCEPTION_FILE}, "
        f"or pass path=... (cmscale ref-stats --inception PATH). Where the network allows, download=True "
        f"(cmscale ref-stats --download) fetches it with clean-fid's helper. Offline, the digits "
        f"extractor (--extractor digits) gives a Frechet distance comparable only with itself.")


def _freeze(module):
    """torch.jit.freeze(module) (constants folded, batch norms into convolutions), or None."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.freeze(module.eval())
    except Exception as e:
        warnings.warn(f"Inception: freezing not applied ({type(e).__name__}: {e})")
        return None


class InceptionExtractor(FeatureExtractor):
    """clean-fid "clean" mode: `CleanResize(299)`, then the TorchScript Inception's layers on
    (x - 128) / 128, 2048-D pool features (what clean-fid's InceptionV3W does with resize_inside=False).

    The file is found by `find_inception(path, download)`; loading it with `torch.jit.load` is
    the only way to read TorchScript (it holds no pickled Python objects).
    """

    name = "inception-2015-12-05"
    dim = 2048
    input_size = 299

    def __init__(self, path: str | None = None, *, device="cpu", download: bool = False,
                 channels_last: bool | None = None, optimize: bool | None = None):
        self.path = find_inception(path, download)
        self.device = torch.device(device)
        self.weights = _file_digest(self.path)
        self.preprocessor = CleanResize(299)
        with warnings.catch_warnings():  # TorchScript is deprecated, but the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            base = torch.jit.load(self.path, map_location=self.device).eval()
        layers = base.layers
        cpu = self.device.type == "cpu"
        self.channels_last = cpu if channels_last is None else channels_last
        if self.channels_last:  # before freezing: frozen weights become constants in their layout
            layers = layers.to(memory_format=torch.channels_last)
        if cpu if optimize is None else optimize:
            # Batch norms folded into the convolutions by TorchScript's freezing; checked
            # against the original layers on two random inputs (see `_checked`).
            g = torch.Generator().manual_seed(0)
            example = (torch.rand(2, 3, 299, 299, generator=g).to(self.device) * 255 - 128) / 128
            example = _layout(example, self.channels_last)
            frozen = _freeze(layers)
            if frozen is not None:
                layers = _checked(layers, frozen, example, "Inception freezing")
            # On CPU, a Sequential runs stage by stage on chunks of the batch (`ChunkedStages`),
            # each stage frozen on its own.
            children = list(base.layers.children())
            if cpu and getattr(base.layers, "original_name", "") == "Sequential" and children:
                stages = [_freeze(c) for c in children]
                if all(st is not None for st in stages):
                    layers = chunk_stages(layers, stages, example)
        self.layers = layers

    @torch.inference_mode()
    def forward_prepared(self, x):
        if tuple(x.shape[-2:]) != (299, 299):
            raise ValueError(f"Inception expects 299 x 299 inputs after the resize, got {tuple(x.shape)}")
        x = _layout(x.to(self.device), self.channels_last)
        return self.layers.forward((x - 128) / 128).reshape(x.shape[0], 2048).float().cpu()


# ----------------------------------------------------------------------------
# Digits CNN (offline evaluator)

DIGITS_VERSION = "v1"
DIGITS_RES = 16  # classifier input side; other resolutions are resized to it (AntialiasResize)


class DigitsNet(nn.Module):
    """16x16x3 in [-1, 1] -> (features (B, 64), logits (B, 10)). Features: the penultimate
    layer before its ReLU (no dead coordinates, so the covariance is full rank)."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, 10)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc1(x.flatten(1))

    def forward(self, x):
        h = self.features(x)
        return h, self.fc2(F.relu(h))


def digits_images(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as uint8 (N, 3, R, R) and labels, rendered as cmscale.data
    renders them into shards: values 0-16 scaled to 0-255, greyscale to RGB, PIL BICUBIC to R."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    if resolution == 8:
        up = grey
    else:
        up = np.stack([np.asarray(Image.fromarray(g, "L").convert("RGB").resize(
            (resolution, resolution), resample=Image.BICUBIC))[:, :, 0] for g in grey])
    return np.repeat(up[:, None], 3, axis=1), d.target.astype(np.int64)


def _digits_inputs(split_seed: int = 0):
    """Training/test inputs at the classifier resolution, from two renderings (8 -> 16 directly,
    and 8 -> 32 -> 16 as a 32-pixel shard would arrive), and a fixed 75/25 split of the digits."""
    to_input = AntialiasResize(DIGITS_RES)
    x16, y = digits_images(DIGITS_RES)
    x32, _ = digits_images(32)
    views = [to_input(torch.from_numpy(x16)), to_input(torch.from_numpy(x32))]
    perm = np.random.default_rng(split_seed).permutation(len(y))
    n_test = len(y) // 4
    test, train = torch.from_numpy(perm[:n_test]), torch.from_numpy(perm[n_test:])
    yt = torch.from_numpy(y)
    xtr = torch.cat([v[train] for v in views])
    ytr = torch.cat([yt[train]] * len(views))
    xte = torch.cat([v[test] for v in views])
    yte = torch.cat([yt[test]] * len(views))
    return xtr, ytr, xte, yte


def train_digits_net(seed: int = 0, epochs: int = 12, batch_size: int = 64) -> tuple[DigitsNet, dict]:
    """Train DigitsNet deterministically (fixed seeds, CPU); return (net, info with test accuracy)."""
    t0 = time.time()
    xtr, ytr, xte, yte = _digits_inputs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        net.train()
        for epoch in range(epochs):
            # one-pixel random translations: robustness to the jitter of generated digits
            order = torch.randperm(len(ytr), generator=g)
            shifts = torch.randint(-1, 2, (len(ytr), 2), generator=g)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                xb = torch.stack([torch.roll(xtr[j], tuple(shifts[j].tolist()), dims=(1, 2)) for j in idx.tolist()])
                _, logits = net(xb)
                loss = F.cross_entropy(logits, ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for group in opt.param_groups:  # step decay in the last third
                if epoch + 1 == (2 * epochs) // 3:
                    group["lr"] *= 0.1
        net.eval()
    with torch.inference_mode():
        acc = float((net(xte)[1].argmax(1) == yte).float().mean())
    info = {"test_accuracy": acc, "train_seconds": time.time() - t0, "seed": seed, "epochs": epochs,
            "version": DIGITS_VERSION, "n_train": int(len(ytr)), "n_test": int(len(yte))}
    return net, info


def _state_digest(state: dict, n: int = 12) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:n]


def load_digits_net(cache_dir: str | None = None, retrain: bool = False) -> tuple[DigitsNet, dict]:
    """The digits CNN from <cache>/metrics/digits-cnn16-v1.safetensors; trained and cached if missing.

    Written to a temporary file and renamed, so concurrent ranks never read half a file (each may
    train its own copy once: training is deterministic and takes seconds).
    """
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = os.path.join(cache_dir or default_cache_dir(), "metrics", f"digits-cnn{DIGITS_RES}-{DIGITS_VERSION}.safetensors")
    if os.path.isfile(path) and not retrain:
        net = DigitsNet()
        net.load_state_dict(load_file(path))
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        info = {k: (float(v) if k in ("test_accuracy", "train_seconds") else v) for k, v in meta.items()}
    else:
        net, info = train_digits_net()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp,
                      metadata={k: str(v) for k, v in info.items()})
    info["path"] = path
    return net.eval(), info


class DigitsExtractor(FeatureExtractor):
    """Offline evaluator: DigitsNet features (64-D) of images resized to 16 x 16 (`AntialiasResize`).

    Meant for the embedded digits dataset (any resolution); `info` holds the classifier's test
    accuracy and training time. `weights` is a hash of the weights, so statistics made with a
    differently trained copy are refused.
    """

    input_size = DIGITS_RES

    def __init__(self, *, cache_dir: str | None = None, device="cpu", retrain: bool = False):
        net, self.info = load_digits_net(cache_dir, retrain)
        self.device = torch.device(device)
        self.net = _prepare_module(net, self.device, channels_last=False)
        self.name = f"digits-cnn{DIGITS_RES}-{DIGITS_VERSION}"
        self.weights = _state_digest(net.state_dict())
        self.dim = net.fc1.out_features
        self.preprocessor = AntialiasResize(DIGITS_RES)

    @torch.inference_mode()
    def forward_prepared(self, x):
        return self.net.features(_layout(x.to(self.device), False)).float().cpu()


def build_extractor(name: str, **kwargs) -> FeatureExtractor:
    """"inception" or "digits" -> an extractor (kwargs go to its constructor)."""
    if name == "inception":
        return InceptionExtractor(**kwargs)
    if name == "digits":
        return DigitsExtractor(**kwargs)
    raise ValueError(f"unknown extractor {name!r} (inception or digits)")
