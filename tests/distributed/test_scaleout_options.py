"""optim.impl (apex when present), train.sync_bn, and the preemption signal flag."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from dist_reid.config import ConfigError
from dist_reid.config.schema import OptimConfig, TrainConfig
from dist_reid.engine.fused import apex_available, make_optimizer, maybe_sync_batchnorm
from dist_reid.engine.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionHandler


def _groups() -> list[dict]:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return [{"params": list(model.parameters()), "lr": 0.5}]


def test_torch_impl_keeps_the_recipe_hyperparameters():
    sgd = make_optimizer(
        "sgd", "torch", _groups(), lr=0.1, weight_decay=5e-4, momentum=0.8, nesterov=True
    )
    assert type(sgd) is torch.optim.SGD
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.5,  # the group's own lr wins over the default
        0.8,
        True,
        5e-4,
    )
    adamw = make_optimizer("adamw", "torch", _groups(), lr=1e-3, weight_decay=0.05)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.05
    # fused kernels only where the parameters will live on CUDA
    assert adamw.defaults["fused"] is (True if torch.cuda.is_available() else None)


@pytest.mark.skipif(apex_available(), reason="apex is installed here")
def test_apex_absent_auto_falls_back_and_asking_for_it_is_one_clear_error():
    assert type(make_optimizer("adamw", "auto", _groups(), lr=1e-3, weight_decay=0)) is (
        torch.optim.AdamW
    )
    with pytest.raises(ConfigError, match=r"optim\.impl: 'apex' asked for but NVIDIA apex"):
        make_optimizer("adamw", "apex", _groups(), lr=1e-3, weight_decay=0)
    with pytest.raises(ConfigError, match=r"optim\.impl"):
        OptimConfig(impl="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not apex_available(), reason="needs NVIDIA apex")
def test_apex_gives_fused_optimisers():
    from apex.optimizers import FusedAdam, FusedSGD

    assert isinstance(
        make_optimizer("adamw", "auto", _groups(), lr=1e-3, weight_decay=0), FusedAdam
    )
    assert isinstance(make_optimizer("sgd", "apex", _groups(), lr=0.1, weight_decay=0), FusedSGD)


def test_sync_bn_is_off_by_default_and_a_clear_error_without_cuda():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert maybe_sync_batchnorm(model, False) is model
    assert TrainConfig().sync_bn is False
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train\.sync_bn: SyncBatchNorm needs CUDA"):
            maybe_sync_batchnorm(model, True)


@pytest.mark.gpu
def test_sync_bn_converts_every_batchnorm_on_cuda():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm1d(4))
    converted = maybe_sync_batchnorm(model, True)
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.SyncBatchNorm, nn.SyncBatchNorm]


class _OneRank:
    world_size = 1
    device = torch.device("cpu")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_only_sets_the_flag_and_uninstall_restores_the_old_handler(sig):
    before = signal.getsignal(sig)
    handler = PreemptionHandler().install()
    try:
        assert not handler.stop_requested(_OneRank())
        os.kill(os.getpid(), sig)  # delivered before the next bytecode: the flag, no exit
        assert handler.received == sig
        assert handler.stop_requested(_OneRank())
    finally:
        handler.uninstall()
    assert signal.getsignal(sig) is before


def test_preempted_exits_with_its_own_code():
    with pytest.raises(SystemExit) as info:
        raise Preempted(7)
    assert info.value.code == PREEMPTED_EXIT_CODE == 75 and info.value.global_step == 7
