"""cmscale.checkpoint across processes: a checkpoint saved by a real 2-rank torchrun, loaded
bit for bit by 2 ranks (and resharded 1 -> 2), and loaded into one process.

The ranks run tests/support/dist_worker.py (scenarios ``save`` and ``load``); the in-process
checkpoint tests are tests/unit/test_checkpoint.py."""
from __future__ import annotations

import pytest
import torch

from cmscale import checkpoint as ck
from tests.support import dist_worker as _dist_worker
from tests.support import launch as _launch


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A checkpoint saved by a real `torchrun --standalone --nproc_per_node=2`."""
    out = tmp_path_factory.mktemp("two_rank")
    # For the 1 -> 2 case in the worker's load scenario: one process, one flat EMA.
    ck.save(out / "run1", {"ema": ck.FlatShard(_dist_worker.one_rank_ema(147), 147)}, {"nimg": 8})
    proc = _launch.run_command(_launch.torchrun_cmd("save", out))
    results = _launch.wait([proc], 2, out)
    assert [(r["launcher"], r["rank"], r["world_size"]) for r in results] == \
        [("torchrun", 0, 2), ("torchrun", 1, 2)]
    for r in range(2):
        (out / f"result-rank{r}.json").unlink()
    return out


@pytest.mark.dist
def test_two_ranks_load_bitwise_and_reshard_one_to_two(two_rank_run):
    procs = _launch.start_ranks("load", two_rank_run, _launch.torchrun_env(2, _launch.free_port()))
    results = _launch.wait(procs, 2, two_rank_run)  # the worker asserts bit equality
    assert results[0]["meta"]["nimg"] == _dist_worker.SAVE_NIMG


@pytest.mark.dist
def test_two_rank_checkpoint_loads_into_one_process(two_rank_run):
    exp = [torch.load(two_rank_run / f"expect-rank{r}.pt", weights_only=True) for r in range(2)]
    numel = 147
    net = _dist_worker.make_net(3)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    ema = torch.zeros(numel)
    state = _dist_worker.build_state(net, opt, ema, numel, {"nimg": 0, "step": 0, "note": None})
    meta = ck.load_latest(two_rank_run / "run", state)
    assert meta["world_size"] == 2 and meta["nimg"] == _dist_worker.SAVE_NIMG
    # The EMA, saved as two uneven shards (74 + 73), is one flat tensor here.
    sizes = [stop - start for start, stop in (ck.shard_range(numel, r, 2) for r in range(2))]
    assert sizes == [74, 73]
    full = torch.cat([exp[r]["ema"][: sizes[r]] for r in range(2)])
    assert torch.equal(ema, full)
    for k, v in net.state_dict().items():  # replicated state: the same as any rank's
        assert torch.equal(v, exp[0]["params"][k])
    for i, s in exp[0]["opt"]["state"].items():
        for name, t in s.items():
            assert torch.equal(opt.state_dict()["state"][i][name], t)
    assert state["train"] == {"nimg": _dist_worker.SAVE_NIMG, "step": 2, "note": "after 2 steps"}
