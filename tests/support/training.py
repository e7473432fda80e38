"""The tiny training run the end-to-end training tests share (tests/multiprocess/test_train.py,
test_deepspeed.py), and readers of what a run left on disk."""
import json
import os

# A tiny CT run on the embedded digits: 16 px, batch 8, 6 steps, checkpoint at step 3.
TINY = [
    "data.shards=embedded:sklearn:digits", "data.resolution=16", "data.num_workers=1",
    "net.preset=tiny16", "loss.mode=ct", "train.total_steps=6", "train.global_batch=8",
    "ema.rates=[0.9,0.99]", "checkpoint.every_images=24", "checkpoint.keep_last=5",
    "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false",
    "sample.num_grid=4", "optim.lr=1e-3",
]


def final_state(run_dir):
    """Weights, optimizer-free: model + target (if the method has one) + EMAs of the newest
    checkpoint, as tensors."""
    from torch.distributed.checkpoint import FileSystemReader  # noqa: F401 (DCP present)

    from cmscale.config import load_config
    from cmscale.methods import METHODS
    from cmscale.runs import load_run

    mode = load_config(os.path.join(run_dir, "config.yaml")).loss.mode
    target = ("target",) if METHODS[mode].needs_target else ()  # iCT, sCT: the online net
    nets = {}
    for which in ("online", *target, "ema_0_9", "ema_0_99"):
        net, meta = load_run(str(run_dir), which)
        nets[which] = {k: v.clone() for k, v in net.state_dict().items()}
    return nets, meta


def ect_overrides(teacher: str) -> list:
    """TINY as ECT from ``teacher``: the gap shrinks every 2 steps (stages 1-3 in 6 steps), with
    dropout (online and target share its masks) and ECT's CIFAR-10 metric."""
    return ["loss.mode=ect", f"loss.teacher={teacher}", "loss.metric=pseudo_huber",
            "loss.huber_c=0", "loss.ect_stage_steps=2", "net.overrides.dropout=0.2"]


def random_teacher(path) -> str:
    """A tiny16 EDM teacher weights file (seeded random weights: the tests need its shapes and
    a fixed value, not a trained denoiser)."""
    import torch

    from cmscale.networks import create_unet
    from cmscale.weights import save_state_dict

    torch.manual_seed(123)
    save_state_dict(create_unet("tiny16").state_dict(), str(path))
    return str(path)


def losses_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}
