"""train.precision=auto and the warning for bf16 on a CPU without native bf16 kernels.

The capability probe (oneDNN's bf16 support) is monkeypatched so that both branches run on
any machine."""
import warnings

import pytest
import torch

from cmscale import dist, parallel
from cmscale.config import ConfigError, load_config

CPU = torch.device("cpu")


@pytest.fixture
def probe(monkeypatch):
    """Set what oneDNN reports about native bf16 on this CPU; reset the warn-once memory."""
    monkeypatch.setattr(parallel, "_WARNED", set())

    def set_native(value: bool):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: value)

    return set_native


def _backend(precision: str) -> parallel.DDPBackend:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    info = dist.DistInfo("none", 0, 1, 0, CPU, None)
    cfg = load_config(None, [f"train.precision={precision}"])
    return parallel.DDPBackend(net, opt, cfg, info)


def test_auto_is_bf16_on_a_cpu_with_native_bf16(probe):
    probe(True)
    assert parallel.native_bf16(CPU)
    assert parallel.resolve_precision("auto", CPU) == "bf16"
    backend = _backend("auto")
    assert backend.precision == "bf16" and backend.loss_scale is None
    with backend.autocast():
        y = backend.net(torch.ones(1, 2))
    assert y.dtype == torch.bfloat16
    ds = parallel.deepspeed_config(load_config(None, ["train.precision=auto"]), 4, 1, 1,
                                   precision=parallel.resolve_precision("auto", CPU))
    assert ds["torch_autocast"]["dtype"] == "bfloat16"


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_does_not_warn(probe):
    probe(False)
    assert not parallel.native_bf16(CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parallel.resolve_precision("auto", CPU) == "fp32"
        backend = _backend("auto")
    assert backend.precision == "fp32"
    with backend.autocast():
        assert backend.net(torch.ones(1, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="resolved precision"):
        parallel.deepspeed_config(load_config(None, ["train.precision=auto"]), 4, 1, 1)


def test_explicit_bf16_without_native_support_warns_once_with_the_reason(probe):
    probe(False)
    with pytest.warns(UserWarning, match="without native bf16.*slow") as record:
        assert parallel.resolve_precision("bf16", CPU) == "bf16"  # kept: the user asked
        _backend("bf16")
        parallel.resolve_precision("bf16", CPU)
    assert len([w for w in record if "native bf16" in str(w.message)]) == 1


def test_explicit_bf16_with_native_support_and_fp32_do_not_warn(probe):
    probe(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parallel.resolve_precision("bf16", CPU) == "bf16"
        probe(False)
        assert parallel.resolve_precision("fp32", CPU) == "fp32"
        assert parallel.resolve_precision("fp16", CPU) == "fp16"


def test_precision_choices_include_auto():
    assert load_config(None, ["train.precision=auto"]).train.precision == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=int8"])
