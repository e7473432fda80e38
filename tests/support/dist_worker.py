"""One rank of a multi-process test; started by tests/multiprocess/test_dist.py and
test_checkpoint_ranks.py (through tests/support/launch.py).

    python tests/support/dist_worker.py SCENARIO OUT_DIR

The launcher (torchrun, mpiexec, or a hand-made torchrun/SLURM environment) decides
rank and world size; ``cmscale.dist.init()`` must find them. Each rank writes
``OUT_DIR/result-rank{R}.json`` after ``shutdown()``; an assertion failure exits
non-zero with a traceback. Scenarios:

- ``save``: train a small DDP model 2 steps, save a checkpoint (model, optimizer,
  EMA flat shards, Python values), write what was saved and the
  result of one more step to ``expect-rank{R}.pt`` for the loaders to compare.
- ``load``: fresh model, ``load_latest``, compare bit for bit, take the same extra
  step and compare its result bit for bit; then load the 1-process checkpoint in
  ``OUT_DIR/run1`` (written by the test) into 2 EMA shards (1 -> 2 resharding).
- ``signal``: install the stop handlers, report the pid, loop until
  ``should_stop()``; exit with EXIT_REQUEUE.
- ``collectives``: report rank/world/launcher and the results of a few collectives.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch

# Run as a script: the repository (tests/support/../..) must be importable; launch.clean_env
# sets PYTHONPATH too, this covers a hand-run worker.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from cmscale import checkpoint as ck  # noqa: E402
from cmscale import dist  # noqa: E402

BATCH = 4
SAVE_NIMG = 2 * BATCH * 2  # 2 steps of BATCH images on each of 2 ranks


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 5*16 + 16 + 16*3 + 3 = 147 parameters: odd, so the 2 EMA shards differ in size.
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))


def train_step(ddp, opt, step: int) -> float:
    # Data depends on (rank, step) only, as the training loop's randomness will.
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    x = torch.randn(BATCH, 5, generator=g)
    y = torch.randn(BATCH, 3, generator=g)
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def ema_shard(net) -> tuple[torch.Tensor, int]:
    """A padded local EMA buffer: this rank's slice of 0.5 * flat params, then -1s."""
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]) * 0.5
    numel = flat.numel()
    start, stop = ck.shard_range(numel, dist.get_rank(), dist.get_world_size())
    c = -(-numel // dist.get_world_size())
    buf = torch.full((c,), -1.0)
    buf[: stop - start] = flat[start:stop]
    return buf, numel


def build_state(net, opt, ema_buf, numel, train):
    return {
        "net": ck.ModelOptimizer(net, opt),
        "ema": {"0.9999": ck.FlatShard(ema_buf, numel)},
        "train": train,
        "loss_scale": torch.tensor([2.0]),
    }


def scenario_save(out: str) -> dict:
    net = make_net(0)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(2):
        train_step(ddp, opt, step)
    ema_buf, numel = ema_shard(net)
    train = {"nimg": SAVE_NIMG, "step": 2, "note": "after 2 steps"}
    state = build_state(net, opt, ema_buf, numel, train)
    path = ck.save(os.path.join(out, "run"), state, {"nimg": SAVE_NIMG, "step": 2})
    expect = {
        "params": {k: v.clone() for k, v in net.state_dict().items()},
        "opt": copy.deepcopy(opt.state_dict()),  # the extra step mutates it
        "ema": ema_buf.clone(),
    }
    train_step(ddp, opt, 2)
    expect["next_params"] = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(expect, os.path.join(out, f"expect-rank{dist.get_rank()}.pt"))
    return {"path": str(path)}


def scenario_load(out: str) -> dict:
    net = make_net(1)  # different weights: everything must come from the checkpoint
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    numel = sum(p.numel() for p in net.parameters())
    c = -(-numel // dist.get_world_size())
    ema_buf = torch.full((c,), -1.0)
    train = {"nimg": 0, "step": 0, "note": None}
    state = build_state(net, opt, ema_buf, numel, train)
    state["loss_scale"] = torch.tensor([0.0])
    meta = ck.load_latest(os.path.join(out, "run"), state)
    assert meta is not None and meta["nimg"] == SAVE_NIMG and meta["world_size"] == 2, meta
    expect = torch.load(os.path.join(out, f"expect-rank{dist.get_rank()}.pt"), weights_only=True)
    assert train == {"nimg": SAVE_NIMG, "step": 2, "note": "after 2 steps"}, train
    assert torch.equal(state["loss_scale"], torch.tensor([2.0]))
    for k, v in net.state_dict().items():
        assert torch.equal(v, expect["params"][k]), k
    got, want = opt.state_dict(), expect["opt"]
    assert got["param_groups"] == want["param_groups"], (got["param_groups"], want["param_groups"])
    for i, s in want["state"].items():
        for name, t in s.items():
            assert torch.equal(got["state"][i][name], t), (i, name)
    assert torch.equal(ema_buf, expect["ema"]), (ema_buf, expect["ema"])
    # Resume equivalence: the next step gives bit-identical weights.
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    train_step(ddp, opt, 2)
    for k, v in net.state_dict().items():
        assert torch.equal(v, expect["next_params"][k]), f"continuation differs: {k}"

    # 1 -> 2 resharding: OUT_DIR/run1 was written by one process (the test) with
    # one_rank_ema(147) as one flat tensor; each rank gets its slice.
    start, stop = ck.shard_range(147, dist.get_rank(), 2)
    shard = torch.full((74,), -1.0)
    meta1 = ck.load_latest(os.path.join(out, "run1"), {"ema": ck.FlatShard(shard, 147)})
    assert meta1["world_size"] == 1
    assert torch.equal(shard[: stop - start], one_rank_ema(147)[start:stop])
    assert torch.all(shard[stop - start:] == -1.0)  # padding untouched
    return {"meta": meta}


def one_rank_ema(numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32) * 0.25


def scenario_signal(out: str) -> dict:
    dist.install_signal_handlers()
    with open(os.path.join(out, f"pid-rank{dist.get_rank()}"), "w") as f:
        f.write(str(os.getpid()))
    steps = 0
    deadline = time.monotonic() + 60
    while not dist.should_stop():
        steps += 1
        time.sleep(0.02)
        assert time.monotonic() < deadline, "no stop signal arrived"
    return {"steps": steps, "local_signal": dist.stop_requested(), "exit": dist.EXIT_REQUEUE}


def scenario_collectives(out: str) -> dict:
    r = dist.get_rank()
    return {
        "sum": dist.all_reduce_sum(float(r + 1)),
        "mean": dist.all_reduce_mean(torch.tensor([float(r), 10.0])).tolist(),
        "bcast": dist.broadcast(torch.tensor([r + 5])).tolist(),
        "obj": dist.broadcast_object({"from": r}),
    }


def main() -> int:
    scenario, out = sys.argv[1], sys.argv[2]
    info = dist.init()
    try:
        result = globals()[f"scenario_{scenario}"](out)
        result.update(
            launcher=info.launcher, rank=info.rank, world_size=info.world_size,
            local_rank=info.local_rank, backend=info.backend,
            master_addr=info.master_addr, master_port=info.master_port,
        )
    finally:
        dist.shutdown()
    with open(os.path.join(out, f"result-rank{info.rank}.json"), "w") as f:
        json.dump(result, f)
    return result.get("exit", 0)


if __name__ == "__main__":
    sys.exit(main())
