"""The target network and the evaluation EMAs, kept apart by name.

- ``target``: the network that gives the consistency loss its target. Updated every step with
  the schedule's rate mu(k) (CT: adaptive; CD: 0.95). mu = 0 makes it a copy of the online
  network, i.e. iCT's stop-gradient target.
- ``ema``: any number of evaluation averages, e.g. ``{"0.9999": 0.9999, "0.99994": 0.99994}``,
  used only for sampling, FID and export.

Update rule (openai/consistency_models ``update_ema``): ``avg <- rate * avg + (1 - rate) * param``, on float32 master
parameters; buffers (if any) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import dist, kernels
from .checkpoint import shard_range


def ema_name(rate: float) -> str:
    """Canonical name of an evaluation EMA, e.g. ``ema_0_9999`` for 0.9999.

    The rate's exact repr with "." as "_" (module names cannot hold dots), so
    0.9999 and 0.9999432189950708 never collide."""
    return "ema_" + repr(float(rate)).replace(".", "_")


@torch.no_grad()
def update_average(avg: nn.Module, net: nn.Module, rate: float) -> None:
    """``avg <- rate * avg + (1 - rate) * net`` over parameters; buffers are copied."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
    dst = [p for p in avg.parameters()]
    src = [p.detach() for p in net.parameters()]
    if len(dst) != len(src):
        raise ValueError("average and network have different parameter lists")
    if rate == 0.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_mul_(dst, rate)
        torch._foreach_add_(dst, src, alpha=1.0 - rate)
    for b_avg, b_net in zip(avg.buffers(), net.buffers()):
        b_avg.copy_(b_net)


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy with gradients off (train/eval mode is left to the caller)."""
    avg = copy.deepcopy(net)
    avg.requires_grad_(False)
    return avg


class ShardedAverage:
    """One evaluation EMA, sharded: this rank owns a 1/W slice of the flattened parameters.

    The parameters of ``net`` are seen as one flat vector of ``numel`` entries (in
    ``net.parameters()`` order); rank r owns ``checkpoint.shard_range(numel, r, W)``. The
    update reads only the parts of the parameters that fall in that slice, so it costs 1/W of
    a full EMA in memory and time and needs no communication. ``gather()`` assembles
    the whole average (all ranks take part) for evaluation and export only.

    ``local`` is padded to ``ceil(numel / W)`` entries so that all ranks' slices have one size
    (what all_gather needs); the checkpoint saves it as a ``FlatShard``, which lets a run
    resume at another world size.
    """

    def __init__(self, net: nn.Module, rate: float, rank: int = 0, world_size: int = 1):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate, self.rank, self.world_size = float(rate), rank, world_size
        params = list(net.parameters())
        self.numel = sum(p.numel() for p in params)
        start, stop = shard_range(self.numel, rank, world_size)
        chunk = -(-self.numel // world_size)
        device = params[0].device if params else None
        self.local = torch.zeros(chunk, dtype=torch.float32, device=device)
        # (parameter index, its slice, slice of local) for the parameters in this rank's range
        self._plan = []
        offset = 0
        for k, p in enumerate(params):
            a, b = max(start, offset), min(stop, offset + p.numel())
            if a < b:
                self._plan.append((k, a - offset, b - offset, a - start, b - start))
            offset += p.numel()
        self._params = params
        with torch.no_grad():
            src, dst = self._views(params)
            if dst:
                torch._foreach_copy_(dst, src)

    def _views(self, params):
        if sum(p.numel() for p in params) != self.numel:
            raise ValueError(f"parameters hold {sum(p.numel() for p in params)} numbers, "
                             f"the average {self.numel}")
        src = [params[k].detach().reshape(-1)[a:b].float() for k, a, b, _, _ in self._plan]
        dst = [self.local[c:d] for _, _, _, c, d in self._plan]
        return src, dst

    @torch.no_grad()
    def update(self, params=None, rate: float | None = None) -> None:
        """``avg <- rate * avg + (1 - rate) * param`` on this rank's slice.

        ``params``: the full parameters in ``net.parameters()`` order, when they are not the
        tensors the average was built from (DeepSpeed replaces or partitions those).
        ``rate``: this update's rate instead of ``self.rate`` (the target's mu(k))."""
        rate = self.rate if rate is None else float(rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        src, dst = self._views(list(params) if params is not None else self._params)
        if dst:
            if rate == 0.0:
                torch._foreach_copy_(dst, src)
            else:
                torch._foreach_mul_(dst, rate)
                torch._foreach_add_(dst, src, alpha=1.0 - rate)

    def full(self) -> torch.Tensor:
        """The whole flat average (``numel`` entries; collective when W > 1)."""
        flat = dist.all_gather_flat(self.local) if self.world_size > 1 else self.local
        return flat[: self.numel]

    @torch.no_grad()
    def gather(self, into: nn.Module) -> nn.Module:
        """Write the whole average into ``into``'s parameters (collective when W > 1)."""
        flat = self.full()
        offset = 0
        for p in into.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return into


@torch.no_grad()
def update_averages(target: "ShardedTarget | None", emas, mu: float, params,
                    kernels_choice: str = "auto") -> None:
    """The target (rate ``mu``) and every evaluation average updated together from one read
    of ``params`` (``cmscale.kernels.ema_update``): all are shards of the same network on this
    rank, so they share one layout."""
    averages = ([target.avg] if target is not None else []) + list(emas)
    if not averages:
        return
    rates = ([float(mu)] if target is not None else []) + [e.rate for e in emas]
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {r}")
    first = averages[0]
    if any(a._plan != first._plan or a.numel != first.numel for a in averages):
        raise ValueError("averages of different networks or shard layouts")
    src, dst = first._views(list(params))
    n = sum(t.numel() for t in dst)
    kernels.ema_update([a.local[:n] for a in averages], src, rates, kernels_choice)
    if target is not None:
        target.release()


class ShardedTarget:
    """The target network of CD/CT, sharded like the evaluation EMAs: 1/W of it per rank.

    The loss needs the whole target for one forward per micro-batch. The first call in a step
    all-gathers the shards into one flat buffer and runs a parameter-less skeleton of the
    network on views of it (``torch.func.functional_call``); ``update()`` after the optimizer
    step drops the buffer. So between steps a rank holds 1/W of the target, and during a step
    one whole copy, at the cost of one all-gather of the weights per step (what ZeRO-3 pays
    for the online network). With one rank the shard is the whole target and nothing is
    gathered. The arithmetic of the update is the replicated target's, so the weights are
    bitwise the same at any world size.

    ``net``: the online network (plain module). Its train/eval mode and its buffers are used
    for the target's forward, as a replicated target copies them at every update.
    """

    def __init__(self, net: nn.Module, rank: int = 0, world_size: int = 1):
        self.avg = ShardedAverage(net, 0.0, rank, world_size)
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for p in net.parameters()]
        # Structure only: its parameters live on the meta device and are never used.
        self.skeleton = copy.deepcopy(net).requires_grad_(False).to("meta")
        self._flat: torch.Tensor | None = None
        self._forward = self._functional

    def _functional(self, params: dict, args, kwargs):
        return torch.func.functional_call(self.skeleton, params, args, kwargs)

    def compile(self, compiler) -> None:
        """Run the target's forward through ``compiler(fn)`` (e.g. ``torch.compile``)."""
        self._forward = compiler(self._functional)

    @property
    def local(self) -> torch.Tensor:
        return self.avg.local

    @property
    def numel(self) -> int:
        return self.avg.numel

    def update(self, rate: float, params=None) -> None:
        """``target <- rate * target + (1 - rate) * net`` on this rank's shard."""
        self.avg.update(params, rate=rate)
        self._flat = None

    def release(self) -> None:
        """Drop the gathered copy (if any) now; the next call gathers again."""
        self._flat = None

    def parameters_dict(self) -> dict:
        if self._flat is None:
            self._flat = self.avg.full()
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = self._flat[offset:offset + n].view(shape)
            offset += n
        out.update(dict(self.net.named_buffers()))
        return out

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        self.skeleton.train(self.net.training)
        return self._forward(self.parameters_dict(), args, kwargs)

    @torch.no_grad()
    def gather(self, into: nn.Module) -> nn.Module:
        """Write the whole target into ``into``'s parameters (collective when W > 1)."""
        return self.avg.gather(into)
