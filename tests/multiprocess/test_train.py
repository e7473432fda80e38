"""The training system end to end: real processes, real shards, real checkpoints on disk."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cmscale import checkpoint
from cmscale.config import ConfigError, load_config
from cmscale.networks import EDMPrecond
from cmscale.runs import load_network
from cmscale.sampler import Sampler
from cmscale.sampling import PerImageNoise
from tests.support import REPO
from tests.support.training import TINY, ect_overrides, final_state, losses_of, random_teacher

ROOT = str(REPO)


def _env(tmp_cache):
    env = dict(os.environ, CMSCALE_CACHE=str(tmp_cache), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT)
    return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One shard cache for the module: built by the first run, reused by the others.
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny16 EDM weights file for the ECT runs."""
    return random_teacher(tmp_path_factory.mktemp("teacher") / "edm.safetensors")


def method_overrides(method, request):
    """The extra overrides that make TINY (CT) a run of ``method``."""
    if method == "ect":
        return ect_overrides(request.getfixturevalue("teacher"))
    if method == "sct":
        return ["loss.mode=sct", "loss.tangent_warmup=4"]
    return []


def train(run_dir, cache, *extra, background=False, nproc=1, nan_at=()):
    """``nan_at``: steps whose loss is made NaN (tests/support/nan_train.py)."""
    if nproc == 1:
        module = "tests.support.nan_train" if nan_at else "cmscale.train"
        cmd = [sys.executable, "-m", module, "--run-dir", str(run_dir), *TINY, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "cmscale.train", "--run-dir", str(run_dir),
               *TINY, *extra]
    env = dict(_env(cache), CMSCALE_TEST_NAN_AT=",".join(map(str, nan_at)))
    kw = dict(env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
              text=True)
    if background:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=600, **kw)


def test_bad_config_is_a_clear_error_before_work(tmp_path, cache):
    r = train(tmp_path / "run", cache, "loss.mode=dc")
    assert r.returncode == 2 and "loss.mode='dc'" in r.stdout
    assert not (tmp_path / "run").exists()
    r = train(tmp_path / "run", cache, "train.global_batch=7", "train.micro_batch=2")
    assert r.returncode == 2 and "micro_batch" in r.stdout
    with pytest.raises(ConfigError, match="loss.teacher"):
        load_config(None, ["loss.mode=cd"])


def test_dry_run_prints_config_and_size(tmp_path, cache):
    r = train(tmp_path / "run", cache, "--dry-run")
    assert r.returncode == 0, r.stdout
    assert "parameters:" in r.stdout and "mode: ct" in r.stdout


@pytest.mark.parametrize("method", ["ct", "ect", "sct"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, cache, method, request):
    # ECT: the resume lands in stage 2 of 3, with dropout masks shared by online and target;
    # sCT: stop-gradient target, JVP tangent, learned weighting, a warm-up spanning the resume
    extra = method_overrides(method, request)
    straight = tmp_path / "straight"
    r = train(straight, cache, *extra)
    assert r.returncode == 0, r.stdout
    assert (straight / "samples").is_dir() and list((straight / "samples").iterdir())

    killed = tmp_path / "killed"
    p = train(killed, cache, *extra, background=True)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.latest_checkpoint(killed, warn=False):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = checkpoint.latest_checkpoint(killed, warn=False)
    assert done is not None and done.nimg == 24, "no checkpoint was written before the kill"
    r = train(killed, cache, *extra)
    assert r.returncode == 0, r.stdout
    assert "resumed from" in r.stdout

    a, meta_a = final_state(straight)
    b, meta_b = final_state(killed)
    assert meta_a["nimg"] == meta_b["nimg"] == 48
    for which in a:
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), (which, k)
    la, lb = losses_of(straight), losses_of(killed)
    for step in range(4, 7):
        assert la[step] == lb[step]

    if method == "ct":  # (the same for every method)
        # a re-submitted finished run ends cleanly without training, or loading the checkpoint
        r = train(killed, cache, *extra)
        assert r.returncode == 0 and "already finished" in r.stdout
        assert "resumed from" not in r.stdout, r.stdout


def test_partial_checkpoint_is_ignored(tmp_path, cache):
    run = tmp_path / "run"
    r = train(run, cache, "train.total_steps=3", "checkpoint.every_images=0")
    assert r.returncode == 0, r.stdout
    # a later checkpoint dir without commit marker (killed mid-write) must be skipped
    partial = checkpoint.checkpoint_path(run, 10**6)
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"truncated")
    latest = checkpoint.latest_checkpoint(run, warn=False)
    assert latest.path.name == "nimg-000000000024"
    r = train(run, cache, "train.total_steps=3", "checkpoint.every_images=0")
    assert r.returncode == 0 and "already finished" in r.stdout


def test_forced_nan_never_reaches_weights_or_checkpoints(tmp_path, cache):
    run = tmp_path / "run"
    r = train(run, cache, "train.total_steps=4", "checkpoint.every_images=0", nan_at=[1, 2])
    assert r.returncode == 0, r.stdout
    assert r.stdout.count("non-finite") >= 2
    nets, meta = final_state(run)
    for which, sd in nets.items():
        assert all(torch.isfinite(v).all() for v in sd.values()), which
    # repeated non-finite steps stop the run with its exit code and no new checkpoint
    run2 = tmp_path / "run2"
    r = train(run2, cache, "train.total_steps=6", "train.max_nonfinite_steps=3",
              "checkpoint.every_images=0", nan_at=range(6))
    assert r.returncode == 65, r.stdout
    assert "consecutive non-finite" in r.stdout
    assert checkpoint.list_checkpoints(run2) == []


def launch_ranks(run_dir, cache, nproc, *extra):
    """nproc processes with torchrun's environment, started by hand (as srun starts tasks), so
    each one's own exit code can be checked."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = dict(_env(cache), RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "cmscale.train", "--run-dir", str(run_dir), *TINY, *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.dist
def test_signal_to_two_process_run_checkpoints_and_exits_75(tmp_path, cache):
    run = tmp_path / "run"
    procs = launch_ranks(run, cache, 2, "train.total_steps=100000", "checkpoint.every_images=0")
    # wait until training steps are being logged, then signal every rank (as SLURM does)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs
    done = checkpoint.latest_checkpoint(run, warn=False)
    assert done is not None and "stop signal" in outs[0], outs[0]
    info = json.loads((done.path / "commit.json").read_text())
    assert info["reason"] == "preempted" and info["world_size"] == 2
    # the same command resumes from it (here: 1 rank, the DDP path reshards the EMAs)
    r = train(run, cache, "train.total_steps=%d" % (info["step"] + 2), "checkpoint.every_images=0")
    assert r.returncode == 0, r.stdout
    assert "saved by 2 ranks" in r.stdout


@pytest.mark.dist
@pytest.mark.parametrize("method", ["ct", "ect", "sct"])
def test_two_ranks_ddp_match_one_process_with_the_same_global_batch(tmp_path, cache, method,
                                                                   request):
    # data.streams and train.micro_batch fixed: both runs see the same global batches and draw
    # the same noise (and, for ECT, the same t, r and dropout masks) per sample; one process
    # accumulates 2 micro-batches, two ranks average.
    common = ["train.total_steps=3", "checkpoint.every_images=0", "data.streams=2",
              "train.micro_batch=4", *method_overrides(method, request)]
    one = tmp_path / "one"
    r = train(one, cache, *common)
    assert r.returncode == 0, r.stdout
    two = tmp_path / "two"
    procs = launch_ranks(two, cache, 2, *common)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, _ = final_state(one)
    b, _ = final_state(two)
    for which in a:
        for k in a[which]:
            torch.testing.assert_close(a[which][k], b[which][k], atol=1e-5, rtol=1e-4)
    la, lb = losses_of(one), losses_of(two)
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)


def test_edm_teacher_then_cd_from_its_export_and_fp16(tmp_path, cache):
    # An EDM teacher trains, is exported as one weights file, and teaches CD (Heun) from it.
    teacher_run = tmp_path / "edm"
    r = train(teacher_run, cache, "loss.mode=edm", "train.total_steps=2",
              "checkpoint.every_images=0")
    assert r.returncode == 0, r.stdout
    out = tmp_path / "teacher.safetensors"
    e = subprocess.run([sys.executable, "-m", "cmscale.export", str(teacher_run), "--out",
                        str(out)], env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    cd_run = tmp_path / "cd"
    r = train(cd_run, cache, "loss.mode=cd", f"loss.teacher={out}", "train.total_steps=2",
              "checkpoint.every_images=0")
    assert r.returncode == 0, r.stdout
    # step 1's logged loss is the CD loss written out from Algorithm 2 (Heun step of the
    # exported teacher, l2, uniform n) on the first batch with the step's seed
    from cmscale import dist
    from cmscale.methods import build_net
    from cmscale.methods.cd import build_teacher
    from cmscale.training_loop import build_data, step_seed
    from tests.support import reference

    cfg = load_config(None, TINY + ["loss.mode=cd", f"loss.teacher={out}",
                                    "train.total_steps=2"])
    torch.manual_seed(cfg.train.seed)
    student = build_net(cfg).train()
    os.environ["CMSCALE_CACHE"] = str(cache)
    try:
        loader = build_data(cfg, dist.info(), 1, 0, torch.device("cpu"))[0]
        images, _ = next(iter(loader))
    finally:
        del os.environ["CMSCALE_CACHE"]
    teacher = build_teacher(cfg, torch.device("cpu"))  # (building it draws random numbers)
    torch.manual_seed(step_seed(cfg.train.seed, 0, 0))
    with torch.no_grad():
        want = reference.pair_loss(student, student, images, cfg.loss.num_scales,
                                   teacher=teacher).mean()
    assert losses_of(cd_run)[1] == pytest.approx(want.item(), rel=1e-5)
    # ECT tunes the same export into a consistency model (stages 1 and 2 in 3 steps)
    ect_run = tmp_path / "ect"
    r = train(ect_run, cache, *ect_overrides(str(out)), "train.total_steps=3",
              "loss.ect_stage_steps=2", "checkpoint.every_images=0")
    assert r.returncode == 0, r.stdout
    records = [json.loads(line) for line in (ect_run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["stage"] for rec in records] == [1, 1, 2]
    assert all(math.isfinite(rec["loss"]) and rec["loss"] > 0 for rec in records)
    assert list((ect_run / "samples").iterdir())  # one- and two-step preview grid
    assert "sigmas=80.0,0.821 (NFE 2)" in r.stdout
    # the run samples as an EDM-parametrised consistency model, with the consistency samplers
    net, info = load_network(str(ect_run), "ema_0_9")
    assert info["mode"] == "ect" and isinstance(net, EDMPrecond)
    noise = PerImageNoise(0, range(2), (3, 16, 16))
    for spec in ("onestep", "sigmas=80,0.821", "ts=0,20,39/40"):
        images = Sampler.parse(spec).check("ect").run(net, noise)
        assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    # a teacher file that does not fit the preset is a clear error before training
    r = train(tmp_path / "bad", cache, "loss.mode=cd", f"loss.teacher={out}",
              "loss.teacher_preset=tiny32")
    assert r.returncode == 2 and "does not fit UNet preset" in r.stdout
    # fp16 with the reference's dynamic loss scale on the DDP path: log2(scale) starts at 20,
    # +1e-3 per applied step, -1 per skipped one; the checkpoint holds it exactly
    r = train(tmp_path / "fp16", cache, "train.precision=fp16", "train.total_steps=2",
              "checkpoint.every_images=0")
    assert r.returncode == 0, r.stdout
    skipped = r.stdout.count("step skipped")
    state = {"scaler": {"log2_scale": torch.tensor(0.0, dtype=torch.float64)}}
    checkpoint.load(checkpoint.checkpoint_path(tmp_path / "fp16", 16), state)
    assert float(state["scaler"]["log2_scale"]) == pytest.approx(
        20.0 + (2 - skipped) * 1e-3 - skipped, abs=1e-12)


def test_fp16_resume_is_bit_identical(tmp_path, cache):
    """A resumed fp16 run restores the loss-scale exponent, growth included, exactly."""
    import shutil

    run = tmp_path / "run"
    r = train(run, cache, "train.precision=fp16", "train.total_steps=4")
    assert r.returncode == 0, r.stdout
    want, _ = final_state(run)
    shutil.rmtree(checkpoint.checkpoint_path(run, 32))  # back to the checkpoint of step 3
    r = train(run, cache, "train.precision=fp16", "train.total_steps=4")
    assert r.returncode == 0 and "resumed from 24 images" in r.stdout, r.stdout
    got, meta = final_state(run)
    assert meta["nimg"] == 32
    for which in want:
        for k in want[which]:
            assert torch.equal(want[which][k], got[which][k]), (which, k)


def test_resume_from_a_checkpoint_with_a_whole_target(tmp_path, cache, monkeypatch):
    """Checkpoints written before the target was sharded hold it as a whole module: a run
    resumes from one with the same target."""
    from cmscale.ema import frozen_copy
    from cmscale.training_loop import Trainer

    monkeypatch.setenv("CMSCALE_CACHE", str(cache))
    cfg = load_config(None, TINY + ["data.num_workers=0"])
    old = Trainer(cfg, str(tmp_path / "run"))
    old.step = 3
    whole = frozen_copy(old.net)
    with torch.no_grad():
        for p in whole.parameters():
            p.add_(torch.randn_like(p))  # a target unlike the online net
    state = old.state()
    state["target"] = whole  # the earlier layout
    checkpoint.save(str(tmp_path / "run"), state, {"nimg": 24, "step": 3, "reason": "periodic",
                                                   "backend": "ddp"})
    new = Trainer(cfg, str(tmp_path / "run"))
    assert new.resume()["nimg"] == 24 and new.step == 3
    got = new.target.gather(frozen_copy(new.net))
    for a, b in zip(got.parameters(), whole.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["cd", "ct", "ict"])
def test_student_starts_from_the_teacher(tmp_path, cache, monkeypatch, mode):
    """loss.init_from_teacher: the student, its target and its EMAs start as the teacher (CT
    and iCT too: the reference's cm_train.py copies the teacher whenever it is given one)."""
    from cmscale.ema import frozen_copy
    from cmscale.networks import create_unet
    from cmscale.training_loop import Trainer
    from cmscale.weights import save_state_dict

    monkeypatch.setenv("CMSCALE_CACHE", str(cache))
    torch.manual_seed(123)
    teacher = create_unet("tiny16")
    path = str(tmp_path / "teacher.safetensors")
    save_state_dict(teacher.state_dict(), path)
    base = TINY + ["data.num_workers=0", f"loss.mode={mode}", f"loss.teacher={path}"]
    t = Trainer(load_config(None, base + ["loss.init_from_teacher=true"]), str(tmp_path / "a"))
    nets = {"online": t.net, "ema": t.emas["ema_0_9"].gather(frozen_copy(t.net))}
    if t.target is not None:
        nets["target"] = t.target.gather(frozen_copy(t.net))
    for which, net in nets.items():
        for (k, a), b in zip(net.model.state_dict().items(), teacher.state_dict().values()):
            assert torch.equal(a, b), (which, k)
    fresh = Trainer(load_config(None, base), str(tmp_path / "b"))  # default: random init
    assert not torch.equal(next(fresh.net.model.parameters()), next(teacher.parameters()))
    with pytest.raises(ValueError, match="init_from_teacher"):
        Trainer(load_config(None, base + ["loss.init_from_teacher=true",
                                          "net.overrides.model_channels=64"]), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="loss.teacher"):  # nothing to start from
        load_config(None, TINY + [f"loss.mode={mode}", "loss.init_from_teacher=true"])


def test_ect_student_starts_as_the_teacher(tmp_path, cache, teacher, monkeypatch):
    """ECT: the student and its EMAs start with the teacher's weights, so the student's D(x, s)
    is the teacher's; a file of another shape, or the export of a consistency model, is a
    clear error before training."""
    from cmscale.ema import frozen_copy
    from cmscale.networks import EDMPrecond, create_unet
    from cmscale.training_loop import Trainer
    from cmscale.weights import load_state_dict, save_state_dict

    monkeypatch.setenv("CMSCALE_CACHE", str(cache))
    base = TINY + ["data.num_workers=0"] + ect_overrides(teacher)
    t = Trainer(load_config(None, base), str(tmp_path / "a"))
    assert t.target is None  # the target is the online network itself (stop-gradient)
    want = load_state_dict(teacher)
    nets = {"online": t.net, "ema": t.emas["ema_0_9"].gather(frozen_copy(t.net))}
    for which, net in nets.items():
        got = net.model.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (which, k)
    raw = create_unet("tiny16")
    raw.load_state_dict(want)
    denoiser = EDMPrecond(raw).eval()
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 80.0])
    with torch.no_grad():
        assert torch.equal(t.net.eval()(x, sigma), denoiser(x, sigma))

    with pytest.raises(ValueError, match="does not fit UNet preset 'tiny16'.*shape mismatch"):
        Trainer(load_config(None, base + ["net.overrides.model_channels=64"]),
                str(tmp_path / "b"))
    ct_export = tmp_path / "ct.safetensors"
    save_state_dict(want, str(ct_export))
    (tmp_path / "ct.safetensors.json").write_text(json.dumps({"export": {"mode": "ct"}}))
    with pytest.raises(ValueError, match="export of a 'ct' run; ECT starts from an EDM"):
        Trainer(load_config(None, base + [f"loss.teacher={ct_export}"]), str(tmp_path / "c"))


def test_stop_request_on_the_last_step_finishes_the_run(tmp_path, cache, monkeypatch):
    """A stop signal that lands on the final step ends the run normally (exit 0, a "final"
    checkpoint), not with the requeue code: there is nothing left to resume."""
    import signal as sig

    from cmscale import dist
    from cmscale.training_loop import Trainer

    monkeypatch.setenv("CMSCALE_CACHE", str(cache))
    monkeypatch.setattr(dist, "_stop_signal", None)
    saved = {s: sig.getsignal(s) for s in dist.STOP_SIGNALS}
    try:
        t = Trainer(load_config(None, TINY + ["data.num_workers=0", "train.total_steps=1"]),
                    str(tmp_path / "run"))
        dist.request_stop(sig.SIGUSR1)
        assert t.run() == 0
    finally:
        for s, h in saved.items():
            sig.signal(s, h)
    done = checkpoint.latest_checkpoint(tmp_path / "run", warn=False)
    assert done is not None and done.meta["reason"] == "final" and done.nimg == 8


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_trainer_target_is_the_ema_of_the_updated_online_net_with_the_same_k(
        tmp_path, cache, monkeypatch):
    """Inside the real Trainer: after the optimizer step of step k, target <- mu(k) target +
    (1 - mu(k)) online (the updated weights), and the loss of step k used N(k)."""
    from cmscale import schedules
    from cmscale.training_loop import Trainer

    monkeypatch.setenv("CMSCALE_CACHE", str(cache))
    cfg = load_config(None, TINY + ["data.num_workers=0", "optim.name=adam", "optim.lr=0.01"])
    t = Trainer(cfg, str(tmp_path / "run"))
    used = []
    loss = t.method.loss
    monkeypatch.setattr(t.method, "loss", lambda net, target, images, labels, N, step=0:
                        used.append(N) or loss(net, target, images, labels, N, step))
    torch.manual_seed(0)
    for k in range(3):
        N, mu = schedules.ct_schedule(k, cfg.train.total_steps, cfg.loss.start_scales,
                                      cfg.loss.end_scales, cfg.loss.start_ema)
        assert (N, mu) != schedules.ct_schedule(k + 1, cfg.train.total_steps, 2, 150, 0.95)
        target, online = t.target.local.clone(), _flat(t.net)
        _, applied = t.train_step([(torch.rand(8, 3, 16, 16) * 2 - 1, None)])
        assert applied and used[-1] == N
        updated = _flat(t.net)
        assert not torch.allclose(updated, online, atol=1e-6)  # the step moved the weights
        err = (t.target.local - (mu * target + (1 - mu) * updated)).abs().max()
        assert err < 1e-7, (k, err)
        # the weights from before the step would give another target
        stale = (t.target.local - (mu * target + (1 - mu) * online)).abs().max()
        assert stale > 100 * err, (k, stale)
        t.step += 1


def test_ict_trainer_target_is_the_stop_gradient_online_net_with_shared_dropout(
        tmp_path, cache, monkeypatch):
    """iCT inside the real Trainer: no target network; the loss value and the gradient are
    those of the online net against itself under no_grad, with the online pass's dropout
    masks (written out in tests/support/reference.py)."""
    import copy

    from cmscale import schedules
    from cmscale.training_loop import Trainer, step_seed
    from tests.support import reference

    monkeypatch.setenv("CMSCALE_CACHE", str(cache))
    cfg = load_config(None, TINY + ["data.num_workers=0", "loss.mode=ict",
                                    "loss.metric=pseudo_huber", "net.overrides.dropout=0.3"])
    t = Trainer(cfg, str(tmp_path / "run"))
    assert t.target is None and t.backend.stop_gradient_network() is t.net
    grads = {}
    step = t.backend.step

    def capture():
        grads.update({k: p.grad.clone() for k, p in t.net.named_parameters()
                      if p.grad is not None})
        return step()

    monkeypatch.setattr(t.backend, "step", capture)
    torch.manual_seed(1)
    with torch.no_grad():  # the UNet zero-initialises the layers after its dropouts: wake them
        for p in t.net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    before = copy.deepcopy(t.net)
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    loss, applied = t.train_step([(images, None)])
    assert applied
    N, _ = t.method.schedule(0)
    probs = schedules.lognormal_index_probs(schedules.karras_sigmas(N), cfg.loss.p_mean,
                                            cfg.loss.p_std).float()
    torch.manual_seed(step_seed(cfg.train.seed, 0, 0))
    want = reference.pair_loss(
        before, before, images, N, metric=reference.pseudo_huber,
        index=lambda B: torch.multinomial(probs, B, replacement=True),
        weight=lambda s, n: (1 / (s[:-1].double() - s[1:].double())).float()[n]).mean()
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    assert grads.keys() == {k for k, p in before.named_parameters() if p.grad is not None}
    for k, p in before.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[k], p.grad, rtol=1e-4, atol=1e-6), k


def test_fp16_checkpoint_of_the_gradscaler_era_resumes_from_its_scale(tmp_path, cache,
                                                                      monkeypatch):
    """A checkpoint written before the reference's loss scale holds only ``scaler.scale`` and
    no ``loss_scale`` marker entry: the resumed run continues from log2 of that scale."""
    from cmscale.training_loop import Trainer

    monkeypatch.setenv("CMSCALE_CACHE", str(cache))
    cfg = load_config(None, TINY + ["data.num_workers=0", "train.precision=fp16"])
    old = Trainer(cfg, str(tmp_path / "run"))
    monkeypatch.setattr(old.backend, "state", lambda loading=False: {
        "model": checkpoint.ModelOptimizer(old.net, old.opt),
        "scaler": {"scale": torch.tensor(2.0**19)}})
    monkeypatch.setattr(old.backend, "meta", lambda: {})
    old.step = 3
    old.save("periodic")
    new = Trainer(cfg, str(tmp_path / "run"))
    assert "loss_scale" not in new.latest_meta
    assert new.resume() is not None and new.step == 3
    assert new.backend.loss_scale.log2_scale == 19.0
