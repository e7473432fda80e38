"""train.compile: the forward passes go through torch.compile, the plain module is what is
saved, and where compilation is unavailable one warning and eager execution.

Inductor on a CPU takes minutes for a UNet, so the in-process tests compile with dynamo's
``eager`` backend (graph capture, guards and recompiles as in a real compile, no code
generation); the inductor test on a tiny MLP is marked slow."""
import functools
import warnings

import pytest
import torch

from cmscale import dist, parallel
from cmscale.config import load_config
from cmscale.networks import MLP
from cmscale.training_loop import Trainer

CPU = torch.device("cpu")


@pytest.fixture
def eager_dynamo(monkeypatch):
    """torch.compile with the ``eager`` backend (counted), for speed."""
    calls = []
    real = torch.compile

    def fake(module, **kw):
        calls.append(module)
        return real(module, **dict(kw, backend="eager"))

    monkeypatch.setattr(torch, "compile", fake)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def test_compile_unavailable_warns_once_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(parallel, "_WARNED", set())
    monkeypatch.setattr(parallel, "compile_unavailable", lambda device, backend: "no C++ compiler")
    net = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="train.compile: no C\\+\\+ compiler; running eagerly") as rec:
        assert parallel.compile_module(net, CPU) is net
        assert parallel.compile_module(net, CPU) is net
    assert len(rec) == 1


def test_compile_is_available_on_this_machine():
    # g++ is installed here; a missing compiler is what the warning above is for
    assert parallel.compile_unavailable(CPU) is None


def _trainer(tmp_path, name, compile_):
    cfg = load_config(None, ["net.preset=tiny16", "data.resolution=16", "train.global_batch=4",
                             "loss.mode=ct", "ema.rates=[0.9]", "log.tensorboard=false",
                             "log.progress_bar=false", f"train.compile={compile_}"])
    return Trainer(cfg, str(tmp_path / name))


def test_compiled_trainer_steps_bitwise_like_eager_and_saves_plain_keys(tmp_path, eager_dynamo):
    g = torch.Generator().manual_seed(0)
    batches = [[(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, None)] for _ in range(2)]
    plain = _trainer(tmp_path, "plain", False)
    assert not eager_dynamo
    compiled = _trainer(tmp_path, "compiled", True)
    # the forward (around DDP or the module) and the target's functional forward
    assert len(eager_dynamo) == 2
    assert compiled.backend.wrapped is not compiled.net
    for step, b in enumerate(batches):
        for t in (plain, compiled):
            t.step = step
        assert plain.train_step(b) == compiled.train_step(b)
    for a, b in zip(plain.net.state_dict().values(), compiled.net.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(plain.target.local, compiled.target.local)
    model = compiled.state()["model"].state_dict()["model"]
    assert set(model) == set(plain.net.state_dict())
    assert not any("_orig_mod" in k for k in model)
    # sampling / FID network: compiled for calling, same outputs
    net = compiled.eval_net("ema_0_9", compiled=True)
    ref = compiled.eval_net("ema_0_9")
    x, sigma = torch.randn(3, 3, 16, 16), torch.full((3,), 2.0)
    with torch.no_grad():
        assert torch.equal(net(x, sigma), ref(x, sigma))
    assert compiled.backend.ddp is compiled.net  # one process: no DDP around the module


@pytest.mark.slow
def test_inductor_compiled_mlp_matches_eager_and_batch_change_does_not_break():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, emb_dim=16)
    cfg = load_config(None, ["train.compile=true"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    backend = parallel.DDPBackend(net, opt, cfg, dist.DistInfo("none", 0, 1, 0, CPU, None))
    assert isinstance(backend.wrapped, torch._dynamo.eval_frame.OptimizedModule)
    for b in (8, 8, 5, 3):  # one recompile (dynamic), then no more
        x, sigma = torch.randn(b, 2), torch.rand(b) + 0.5
        out = backend.wrapped(x, sigma)
        torch.testing.assert_close(out, net(x, sigma), atol=1e-5, rtol=1e-5)
        backend.backward(out.square().mean())
        assert backend.step()
    keys = backend.state()["model"].state_dict()["model"]
    assert set(keys) == set(net.state_dict()) and not any("_orig_mod" in k for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.compile_module(net, CPU)
