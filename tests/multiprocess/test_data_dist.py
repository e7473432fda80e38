"""Two real processes (torchrun, gloo), each with 2 DataLoader workers: one epoch covers every sample once."""
import json
import subprocess
import sys

import pytest

from tests.support.data import write_index_shards
from tests.support.launch import clean_env

SCRIPT = r'''
import json, os, sys
import torch
import torch.distributed as dist
from cmscale.data import build_loader
from tests.support.data import decode_index

root, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loader = build_loader(root, batch_size_per_rank=4, rank=rank, world_size=world, seed=3, num_workers=2)
it = iter(loader)
mine = [g for _ in range(12) for g in decode_index(next(it)[0])]  # 96 samples / (2 x 4) = 12 steps
seen = [None] * world
dist.all_gather_object(seen, mine)
counts = torch.tensor([sum(loader.bad_input_counts.values())])
dist.all_reduce(counts)  # how a training loop would aggregate the bad-input counts
if rank == 0:
    every = sorted(g for s in seen for g in s)
    with open(out, "w") as f:
        json.dump({"once": every == list(range(96)), "images_seen": loader.images_seen, "bad": int(counts)}, f)
del it
dist.destroy_process_group()
'''


@pytest.mark.dist
def test_torchrun_two_ranks_each_sample_once_per_epoch(tmp_path):
    root = write_index_shards(tmp_path / "shards", [30, 18, 25, 23])
    script, out = tmp_path / "run.py", tmp_path / "result.json"
    script.write_text(SCRIPT)
    env = clean_env()  # the repository on PYTHONPATH, one thread, no launcher variables
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), root, str(out)], env=env, capture_output=True, text=True, timeout=240)
    # A rank may abort at interpreter exit after all work is done (seen on these machines):
    # the result file, written after the collective, is what counts.
    assert out.exists(), r.stderr[-3000:]
    assert json.loads(out.read_text()) == {"once": True, "images_seen": 96, "bad": 0}
