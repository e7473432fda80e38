"""The DeepSpeed ZeRO backend and an mpiexec launch, as real runs of the one training loop.

Every run is the tiny CT run of ``test_train`` (``tests.support.training.TINY``: digits, 16 px,
global batch 8) for 4 steps, with ``data.streams=2`` and a fixed ``train.micro_batch`` so that
runs at different world sizes and on different backends see the same data and draw the same
noise per sample. Runs are started
once per module and shared by the tests that compare them.

Cost: DeepSpeed JIT-compiles its shared-memory comm op on the first run on a machine (20-120 s
on 2 cores); it is cached in ``TORCH_EXTENSIONS_DIR`` (default here:
``~/.cache/cmscale/torch_extensions``), after which a 2-rank DeepSpeed run takes 15-40 s, most
of it importing DeepSpeed and starting processes.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from cmscale import checkpoint, dist
from cmscale.config import load_config

from tests.support import REPO
from tests.support import launch as _launch
from tests.support.training import TINY, ect_overrides, final_state, losses_of, random_teacher

EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser(
    "~/.cache/cmscale/torch_extensions")
TIMEOUT = 900  # a cold first DeepSpeed run compiles its comm op

# 4 steps of 8 images; checkpoints after step 2 (16 images) and at the end (32); a warm-up
# checks that the lr we set reaches DeepSpeed's optimizer.
COMMON = ["train.total_steps=4", "checkpoint.every_images=16", "data.streams=2",
          "train.micro_batch=4", "optim.warmup_steps=2"]
# 2 micro-batches per rank per step, warm-up, active clipping (the gradient norm is above
# 0.05 here) and bf16 autocast.
ACCUM = ["train.total_steps=4", "checkpoint.every_images=0", "data.streams=2",
         "train.micro_batch=2", "optim.warmup_steps=3", "optim.grad_clip=0.05",
         "train.precision=bf16"]


def zero(stage):
    return ["train.backend=deepspeed", f"train.zero_stage={stage}"]


def _env(cache):
    return _launch.clean_env(CMSCALE_CACHE=str(cache), TORCH_EXTENSIONS_DIR=EXTENSIONS)


def _cmd(run_dir, extra):
    return ["-m", "cmscale.train", "--run-dir", str(run_dir), *TINY, *extra]


def _finish(procs, what):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    # A finished rank occasionally aborts at interpreter exit (gloo/MPI teardown noise on
    # CPU, see _launch._EXIT_NOISE); the run is
    # judged by its exit codes otherwise and by its checkpoints.
    codes = [p.returncode for p in procs]
    assert all(c == 0 or c in _launch._EXIT_NOISE for c in codes) and 0 in codes, \
        f"{what}: exit codes {codes}\n" + "\n----\n".join(outs)
    return outs[0]


def run_one(run_dir, cache, *extra):
    """One plain process."""
    p = subprocess.Popen([sys.executable, *_cmd(run_dir, extra)], env=_env(cache), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _finish([p], f"1 process {extra}")


def run_ranks(run_dir, cache, nproc, *extra):
    """``nproc`` ranks with torchrun's environment, started by hand (as srun starts tasks)."""
    port = _launch.free_port()
    procs = [subprocess.Popen(
        [sys.executable, *_cmd(run_dir, extra)],
        env=dict(_env(cache), RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                 LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(nproc)]
    return _finish(procs, f"{nproc} ranks {extra}")


def run_mpiexec(run_dir, cache, nproc, *extra):
    mpiexec = _launch.mpiexec_path()
    p = subprocess.Popen([mpiexec, "-n", str(nproc), sys.executable, *_cmd(run_dir, extra)],
                         env=_env(cache), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    return _finish([p], f"mpiexec -n {nproc} {extra}")


class Runs:
    """Each run is made the first time a test asks for it, then shared."""

    def __init__(self, root, cache):
        self.root, self.cache, self.done = root, cache, {}

    def get(self, name, launch, *args):
        if name not in self.done:
            run_dir = self.root / name
            self.done[name] = (run_dir, launch(run_dir, self.cache, *args))
        return self.done[name][0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache"))


def max_diff(a, b):
    return max((a[w][k] - b[w][k]).abs().max().item() for w in a for k in a[w])


def assert_same_training(a_dir, b_dir):
    a, meta_a = final_state(a_dir)
    b, meta_b = final_state(b_dir)
    assert meta_a["nimg"] == meta_b["nimg"] == 32
    for which in a:  # online, target (if any) and both EMAs
        for k in a[which]:
            torch.testing.assert_close(a[which][k], b[which][k], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{which}.{k}: {m}")
    la, lb = losses_of(a_dir), losses_of(b_dir)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    return max_diff(a, b)


def needs_deepspeed():
    # find_spec, not importorskip: importing DeepSpeed here would cost the test process seconds
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")


# ----------------------------------------------------------------------------- mpiexec


@pytest.mark.dist
def test_mpiexec_ddp_matches_one_process(runs):
    pytest.importorskip("mpi4py")
    if _launch.mpiexec_path() is None:
        pytest.skip("no mpiexec (pip install mpich)")
    one = runs.get("one", run_one, *COMMON)
    mpi = runs.get("mpi", run_mpiexec, 2, *COMMON)
    meta = checkpoint.latest_checkpoint(mpi, warn=False).meta
    assert meta["world_size"] == 2 and meta["backend"] == "ddp"
    print(f"max |mpiexec DDP x2 - 1 process| = {assert_same_training(one, mpi):.3g}")


# ----------------------------------------------------------------------------- ZeRO


def ddp_two_ranks(runs):
    # The DDP reference at 2 ranks: under mpiexec if there is one (it is also the run the
    # mpiexec test checks), else started like torchrun.
    if _launch.mpiexec_path() is not None:
        return runs.get("mpi", run_mpiexec, 2, *COMMON)
    return runs.get("ddp2", run_ranks, 2, *COMMON)


@pytest.mark.dist
def test_zero2_two_ranks_match_ddp(runs):
    needs_deepspeed()
    z2 = runs.get("zero2", run_ranks, 2, *COMMON, *zero(2))
    ckpt = checkpoint.latest_checkpoint(z2, warn=False)
    assert ckpt.meta["backend"] == "deepspeed" and ckpt.meta["zero_stage"] == 2
    # DeepSpeed's own files for the partitioned optimizer state, one per rank
    files = sorted(os.listdir(ckpt.path / "deepspeed"))
    assert [f for f in files if "optim_states" in f] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    diff = assert_same_training(ddp_two_ranks(runs), z2)
    print(f"max |ZeRO-2 x2 - DDP x2| over online, target and EMAs = {diff:.3g}")


@pytest.mark.dist
def test_zero3_two_ranks_train_and_resume_bit_identically(runs):
    needs_deepspeed()
    z3 = runs.get("zero3", run_ranks, 2, *COMMON, *zero(3))
    diff = assert_same_training(ddp_two_ranks(runs), z3)
    print(f"max |ZeRO-3 x2 - DDP x2| = {diff:.3g}")

    resumed = assert_resume_from_step_2_is_bit_identical(runs, z3, *COMMON, *zero(3))
    assert final_state(resumed)[1]["nimg"] == 32
    assert losses_of(resumed) == {s: v for s, v in losses_of(z3).items() if s > 2}


def assert_resume_from_step_2_is_bit_identical(runs, run_dir, *args):
    """Save at step 2, resume: a copy of ``run_dir`` without its final checkpoint is the run as
    a kill after step 2 would have left it; the same command must end with the same weights.
    Returns the resumed run's directory."""
    resumed = runs.root / f"{run_dir.name}_resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(checkpoint.checkpoint_path(resumed, 32))
    (resumed / "metrics.jsonl").unlink()
    out = run_ranks(resumed, runs.cache, 2, *args)
    assert "resumed from 16 images (step 2, saved by 2 ranks)" in out
    a, _ = final_state(run_dir)
    b, _ = final_state(resumed)
    for which in a:
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), (which, k)
    return resumed


@pytest.mark.dist
def test_zero2_compiled_trains_like_eager_and_resumes_bit_identically(runs):
    """train.compile under DeepSpeed (the engine compiles its module in place) with the
    aot_eager backend (dynamo's capture and AOT autograd; inductor's code generation takes
    minutes on a CPU): the same training as the eager ZeRO-2 run, plain parameter names in
    the checkpoint, and a resume from step 2 that ends bit-identical."""
    needs_deepspeed()
    compiled = ["train.compile=true", "train.compile_backend=aot_eager"]
    z2 = runs.get("zero2", run_ranks, 2, *COMMON, *zero(2))
    z2c = runs.get("zero2_compiled", run_ranks, 2, *COMMON, *zero(2), *compiled)
    print(f"max |ZeRO-2 compiled - ZeRO-2 eager| = {assert_same_training(z2, z2c):.3g}")
    out = runs.done["zero2_compiled"][1]
    assert "train.compile (aot_eager): 0 graphs" not in out
    assert re.search(r"train.compile \(aot_eager\): [1-9]\d* graphs compiled", out), out
    state, _ = final_state(z2c)
    assert not any("_orig_mod" in k for which in state for k in state[which])
    assert_resume_from_step_2_is_bit_identical(runs, z2c, *COMMON, *zero(2), *compiled)


# sCT: stop-gradient online target, a JVP through it (under ZeRO-3 through a whole copy of the
# gathered weights), the learned weighting among the sharded parameters.
SCT = ["loss.mode=sct", "loss.tangent_warmup=2"]


@pytest.mark.dist
def test_sct_zero3_matches_ddp(runs):
    needs_deepspeed()
    ddp = runs.get("sct_ddp2", run_ranks, 2, *COMMON, *SCT)
    z3 = runs.get("sct_zero3", run_ranks, 2, *COMMON, *SCT, *zero(3))
    print(f"sCT: max |ZeRO-3 x2 - DDP x2| = {assert_same_training(ddp, z3):.3g}")


@pytest.mark.dist
def test_ect_zero3_matches_ddp(runs, tmp_path_factory):
    """ECT under ZeRO-3: the student starts as the teacher's weights (loaded into partitioned
    parameters), online and stop-gradient target share dropout masks, the gap shrinks by stage;
    the same training as DDP on 2 ranks."""
    needs_deepspeed()
    teacher = random_teacher(tmp_path_factory.mktemp("teacher") / "edm.safetensors")
    ect = ect_overrides(teacher)
    ddp = runs.get("ect_ddp2", run_ranks, 2, *COMMON, *ect)
    z3 = runs.get("ect_zero3", run_ranks, 2, *COMMON, *ect, *zero(3))
    print(f"ECT: max |ZeRO-3 x2 - DDP x2| = {assert_same_training(ddp, z3):.3g}")


@pytest.mark.dist
@pytest.mark.slow
def test_sct_zero1_bf16_with_accumulation_matches_one_process(runs):
    needs_deepspeed()
    one = runs.get("sct_one_accum", run_one, *ACCUM, *SCT)
    z1 = runs.get("sct_zero1_accum", run_ranks, 2, *ACCUM, *SCT, *zero(1))
    print(f"sCT: max |ZeRO-1 bf16 x2 - 1 process| = {assert_same_training(one, z1):.3g}")


@pytest.mark.dist
def test_zero1_bf16_with_accumulation_matches_one_process(runs):
    needs_deepspeed()
    one = runs.get("one_accum", run_one, *ACCUM)
    z1 = runs.get("zero1_accum", run_ranks, 2, *ACCUM, *zero(1))
    print(f"max |ZeRO-1 bf16 x2 - 1 process| = {assert_same_training(one, z1):.3g}")


@pytest.mark.dist
def test_resume_at_another_world_size_or_backend_is_a_clear_error(runs):
    needs_deepspeed()
    z2 = runs.get("zero2", run_ranks, 2, *COMMON, *zero(2))
    more = ["train.total_steps=6"]
    for extra, says in ((zero(2), "written by 2 ranks with DeepSpeed ZeRO-2; this run has 1"),
                        (["train.backend=ddp"], "written by train.backend=deepspeed")):
        r = subprocess.run([sys.executable, *_cmd(z2, COMMON + more + extra)],
                           env=_env(runs.cache), cwd=REPO, capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert r.returncode == 2 and says in r.stderr, r.stdout + r.stderr
    assert checkpoint.latest_checkpoint(z2, warn=False).nimg == 32  # nothing written


# ----------------------------------------------------------------------------- config


def test_deepspeed_config_follows_the_run_config():
    from cmscale import parallel

    cfg = load_config(None, [*zero(2), "optim.grad_clip=1.5", "train.precision=bf16"])
    ds = parallel.deepspeed_config(cfg, micro=4, accum=3, world=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (24, 4, 3)
    assert ds["zero_optimization"] == {"stage": 2} and ds["zero_allow_untested_optimizer"]
    assert ds["gradient_clipping"] == 1.5 and "optimizer" not in ds
    # bf16 = autocast over fp32 parameters, as on the DDP path; fp32 gradient reduction
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",
                                    "lower_precision_safe_modules": []}
    assert "bf16" not in ds and "fp16" not in ds
    fp16 = parallel.deepspeed_config(load_config(None, [*zero(3), "train.precision=fp16"]), 4, 1, 1)
    assert fp16["fp16"]["initial_scale_power"] == 20 and fp16["fp16"]["loss_scale"] == 0
    # a JVP through the weights (sCT/sCD): ZeRO-3 must not replace F.linear
    jvp = parallel.deepspeed_config(load_config(None, zero(3)), 4, 1, 1, forward_mode=True)
    assert jvp["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False}


def test_deepspeed_fp16_on_cpu_is_a_clear_error():
    from cmscale import parallel

    cfg = load_config(None, [*zero(2), "train.precision=fp16"])
    net = torch.nn.Linear(2, 2)
    info = dist.DistInfo("single", 0, 1, 0, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="fp16 with train.backend=deepspeed needs a GPU"):
        parallel.wrap_deepspeed(net, torch.optim.Adam(net.parameters()), cfg, info, 1, 1)
