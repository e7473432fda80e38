"""Data: image sources -> WebDataset shards (make_shards) -> deterministic, resumable per-rank loader.

- `build_loader(shards, *, batch_size_per_rank, rank, world_size, seed, num_workers, start_images, ...)`
  (`cmscale.data.loader`): the training loader; the order it streams is `cmscale.data.order`.
- `make_shards(source, out_dir, resolution, ...)` (`cmscale.data.shards`, CLI cmscale make-shards).
- `ensure_embedded_shards(name, cache_dir, resolution)` (`cmscale.data.embedded`): sklearn digits
  or LFW faces as shards, for the quickstart and tests.
- `index_shards(spec)` (`cmscale.data.shardlist`): a manifest for shards packed by other tools.
- `center_crop_arr`, bad-input policies and `BadInputError` (`cmscale.data.images`).

Names are imported lazily, so tools that only write shards do not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "build_loader": "loader", "ShardLoader": "loader", "BadInputWarning": "loader",
    "make_shards": "shards", "ensure_embedded_shards": "embedded",
    "center_crop_arr": "images", "prepare_image": "images", "BadInputError": "images", "POLICIES": "images",
    "Layout": "order", "load_shard_set": "shardlist", "index_shards": "shardlist",
    "ShardOpenError": "shardlist",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
