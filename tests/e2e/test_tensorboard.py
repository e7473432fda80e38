"""What a user watches on a long run is in TensorBoard: loss, lr, N, mu, images/s, the fp16
loss scale, memory, the FID of every evaluation sampler and the sample grids."""

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.support.launch import train_subprocess


def test_event_file_has_the_scalars_and_grids_of_a_run(tmp_path):
    run = tmp_path / "run"
    train_subprocess(run, ["data.shards=embedded:sklearn:digits", "data.resolution=16",
                           "net.preset=tiny16", "loss.mode=ct", "train.total_steps=4",
                           "train.global_batch=8", "train.precision=fp16", "log.every_steps=2",
                           "log.tensorboard=true", "sample.num_grid=4", "eval.every_images=16",
                           "eval.extractor=digits", "eval.num_images=16", "eval.batch_size=16"],
                     tmp_path / "cache")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    wanted = {"loss", "lr", "N", "mu", "img_per_s", "loss_scale", "memory/peak_rss_gib",
              "fid/onestep", "fid/ts=0,20,39/40"}
    assert wanted <= scalars, sorted(scalars)
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert [e.step for e in events.Scalars("fid/onestep")] == [2, 4]  # every 16 images, end
    # the reference's fp16 rule: log2(scale) 20 grows by 1e-3 per applied step (2 by step 2)
    assert events.Scalars("loss_scale")[0].value == pytest.approx(2.0 ** 20.002, rel=1e-6)
    assert "samples/onestep_multistep" in events.Tags()["images"]
