"""Evaluation metrics: distributed FID / KID / precision-recall with pluggable feature extractors.

- `cmscale.metrics.features`: `InceptionExtractor` (clean-fid "clean"), `DigitsExtractor`
  (offline, embedded digits), `CustomExtractor`, `build_extractor("inception" | "digits")`.
- `cmscale.metrics.fid`: `FeatureStats` (float64 sums, all-reduced), `frechet_distance`,
  `kernel_distance`, `precision_recall`, `compute_fid_from_images`, `compute_fid_from_generator`,
  `compute_stats_from_folder`, statistics files (`FeatureStats.save`, `load_stats`).

`to_uint8` (the quantisation of float samples before the extractor) is `cmscale.imageio.to_uint8`.
"""
from ..imageio import to_uint8
from .features import (CustomExtractor, DigitsExtractor, FeatureExtractor, InceptionExtractor,
                       InceptionWeightsNotFound, build_extractor)
from .fid import (FeatureStats, FIDResult, StatsMismatchError, check_compatible, compute_fid_from_generator,
                  compute_fid_from_images, compute_stats_from_folder, compute_stats_from_generator,
                  compute_stats_from_images, fid_from_stats, frechet_distance, kernel_distance, load_stats,
                  precision_recall)

__all__ = [
    "CustomExtractor", "DigitsExtractor", "FeatureExtractor", "InceptionExtractor", "InceptionWeightsNotFound",
    "build_extractor", "to_uint8", "FeatureStats", "FIDResult", "StatsMismatchError", "check_compatible",
    "compute_fid_from_generator", "compute_fid_from_images", "compute_stats_from_folder",
    "compute_stats_from_generator", "compute_stats_from_images", "fid_from_stats", "frechet_distance",
    "kernel_distance", "load_stats", "precision_recall",
]
