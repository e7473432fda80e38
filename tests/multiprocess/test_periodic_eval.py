"""Periodic FID in training: every eval.every_images images the chosen EMA is sampled with each
setting, FID is computed across ranks and logged, and the best checkpoint is marked and kept."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from cmscale.config import ConfigError, load_config
from tests.support import REPO

ROOT = str(REPO)

RUN = [
    "data.shards=embedded:sklearn:digits", "data.resolution=8", "data.num_workers=0",
    "net.preset=tiny16", "net.overrides.image_size=8", "net.overrides.attention_resolutions=[4]",
    "loss.mode=ict", "train.total_steps=6", "train.global_batch=8", "optim.lr=1e-3",
    "ema.rates=[0.9]", "checkpoint.every_images=0", "checkpoint.keep_last=1",
    "log.progress_bar=false", "log.tensorboard=false", "sample.num_grid=4",
    "eval.every_images=16", "eval.extractor=digits", "eval.num_images=48", "eval.batch_size=16",
    "eval.samplers=[onestep, \"ts=0,20,39/40\"]",
]


def _env(tmp):
    env = dict(os.environ, CMSCALE_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(k, None)
    return env


def _run(cmd, env, timeout=400):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.dist
def test_periodic_fid_two_ranks_marks_and_keeps_best(tmp_path):
    env = _env(tmp_path)
    run = tmp_path / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "cmscale.train", "--run-dir", str(run), *RUN], env)
    with open(run / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "fid/onestep" in r]
    # at 16 and 32 images, and at the end (48): one record each, both settings
    assert [r["nimg"] for r in evals] == [16, 32, 48]
    for r in evals:
        assert r["fid/onestep"] > 0 and r["fid/ts=0,20,39/40"] > 0
    best = json.loads((run / "best.json").read_text())
    fids = {r["nimg"]: r["fid/onestep"] for r in evals}
    assert best["fid"] == min(fids.values()) and fids[best["nimg"]] == best["fid"]
    assert best["metric"] == "fid/onestep" and best["ema"] == "ema_0_9"
    # keep_last=1 keeps the newest checkpoint, and the best one besides it
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert (run / best["checkpoint"] / "commit.json").exists(), kept
    assert len(kept) == (1 if best["nimg"] == 48 else 2), kept

    # The same FID from the batch report (1 process) on the best checkpoint: the value does not
    # depend on the world size, and the trainer evaluated the checkpoint it marked.
    shards = _run([sys.executable, "-c", "from cmscale.data.embedded import ensure_embedded_shards"
                   " as e; print(e('sklearn:digits', resolution=8))"], env).strip().splitlines()[-1]
    ref = tmp_path / "ref.npz"
    _run([sys.executable, "tools/ref_stats.py", shards, str(ref), "--extractor", "digits",
          "--max-kept", "0"], env)
    out = tmp_path / "report"
    _run([sys.executable, "tools/fid_report.py", str(run), "--out", str(out), "--ref", str(ref),
          "--extractor", "digits", "--num", "48", "--batch-size", "16", "--sampler", "onestep",
          "--sampler", "ts=0,20,39/40"], env)
    with open(out / "report.csv") as f:
        rows = {(int(r["nimg"]), r["sampler"]): float(r["fid"]) for r in csv.DictReader(f)}
    for sampler in ("onestep", "ts=0,20,39/40"):
        assert rows[(best["nimg"], sampler)] == pytest.approx(best["all"][f"fid/{sampler}"],
                                                              rel=1e-6)


def test_eval_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="eval.ref"):
        load_config(None, ["eval.every_images=100", "data.shards=/data/x-{000..003}.tar"])
    with pytest.raises(ConfigError, match="eval.samplers"):
        load_config(None, ["eval.every_images=100", "eval.samplers=[edm=18]"])
    with pytest.raises(ConfigError, match="eval.samplers"):
        load_config(None, ["eval.every_images=100", "eval.samplers=[ts=0,50/40]"])
    with pytest.raises(ConfigError, match="eval.extractor"):
        load_config(None, ["eval.extractor=vgg"])
    with pytest.raises(ConfigError, match="sample.ema"):
        load_config(None, ["ema.rates=[0.99]", "sample.ema=ema_0_995"])
    with pytest.raises(ConfigError, match="eval.ema"):
        load_config(None, ["ema.rates=[0.99]", "eval.ema=ema_0_999"])
    load_config(None, ["ema.rates=[0.99]", "sample.ema=ema_0_99", "eval.ema=online"])
    # off (the default): nothing is required
    load_config(None, ["data.shards=/data/x-{000..003}.tar"])


def test_missing_reference_file_stops_before_training(tmp_path):
    env = _env(tmp_path)
    r = subprocess.run([sys.executable, "-m", "cmscale.train", "--run-dir", str(tmp_path / "run"),
                        *RUN, f"eval.ref={tmp_path / 'nope.npz'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nope.npz" in r.stdout + r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
