"""The method contract: every registered model and loss declares what the engine relies on
(batch fields, output keys, required outputs, lr groups), the declarations match what they do,
and a model/loss pair that does not fit is one ConfigError when they are built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dist_reid.builders import build_loss, build_model, check_method
from dist_reid.config import ConfigError, load_config
from dist_reid.losses.contract import EpochAwareLoss, ReIDLoss
from dist_reid.models.contract import ReIDModel

REPO = Path(__file__).resolve().parents[2]
METHODS = ("agw", "pdm", "icre", "emif", "mip")


def _cfg(method: str, *extra: str):
    # the CPU-sized presets of the accuracy benchmark: small backbones at 128x64
    return load_config(str(REPO / f"configs/experiments/accuracy/sysu_{method}.yaml"), list(extra))


def _batch(cfg, ids: int = 2, k: int = 2):
    n = 2 * ids * k
    images = torch.randn(n, 3, cfg.data.height, cfg.data.width)
    labels = torch.arange(ids).repeat_interleave(k).repeat(2)
    modalities = torch.cat([torch.zeros(ids * k), torch.ones(ids * k)]).long()
    return images, labels, modalities, torch.ones(n, dtype=torch.long)


@pytest.mark.parametrize("method", METHODS)
def test_declarations_match_what_the_method_does(method):
    torch.manual_seed(0)
    cfg = _cfg(method)
    model, loss = build_model(cfg, num_classes=6), build_loss(cfg)
    assert isinstance(model, ReIDModel) and isinstance(loss, ReIDLoss)
    check_method(model, loss, cfg)
    images, labels, modalities, cams = _batch(cfg)
    fields = {"cams": cams} if "cams" in model.batch_fields else {}
    outputs = model(images, modalities, **fields)
    assert tuple(outputs) == tuple(model.output_keys)  # declared = returned, in order
    read = {}

    class Recorder(dict):
        def __getitem__(self, key):
            read[key] = True
            return super().__getitem__(key)

    terms = loss(Recorder(outputs), labels, modalities)
    assert terms and all(torch.isfinite(v) for v in terms.values())
    assert set(loss.required_outputs) <= set(read)  # it does read what it requires
    assert set(read) <= set(model.output_keys)
    groups = model.lr_groups()
    assert sum(len(p) for p, _ in groups.values()) == len(list(model.parameters()))
    assert isinstance(loss, EpochAwareLoss) == (method == "mip")  # MSEL is epoch-gated


def test_output_keys_follow_the_options():
    mip = build_model(_cfg("mip", "model.options.jpm=false"), num_classes=4)
    assert "local" not in mip.output_keys and "logits_local" not in mip.output_keys
    icre = build_model(_cfg("icre", "model.options.use_mpfr=false"), num_classes=4)
    assert "masks" not in icre.output_keys


def test_a_loss_that_reads_what_the_model_lacks_is_one_config_error():
    # PDM's loss (global and generated-set features) on AGW's model (one pooled feature)
    cfg = _cfg("pdm", "model.name=agw")
    model = build_model(_cfg("agw"), num_classes=4)
    with pytest.raises(ConfigError, match=r"loss.name=pdm reads \['global', 'feature'") as err:
        check_method(model, build_loss(cfg), cfg)
    assert "model.name=agw as configured returns only ['features'" in str(err.value)


def test_a_model_without_the_contract_is_named():
    cfg = _cfg("agw")
    with pytest.raises(ConfigError, match="Linear lacks batch_fields, output_keys, embed"):
        check_method(nn.Linear(2, 2), build_loss(cfg), cfg)
    model = build_model(cfg, num_classes=4)
    model.batch_fields = ("depth",)
    with pytest.raises(ConfigError, match=r"unknown batch fields \['depth'\]"):
        check_method(model, build_loss(cfg), cfg)
