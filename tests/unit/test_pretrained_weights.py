"""``model.pretrained``: imagenet tags resolved from a Hugging Face cache laid out in a temp
directory (no network), local files, the 90 % rule, the offline error and the null warning."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from huggingface_hub import constants
from safetensors.torch import save_file
from torch import nn

from dist_reid.builders import check_pretrained
from dist_reid.cli import main
from dist_reid.config import load_config
from dist_reid.models import AGW, PooledBackbone
from dist_reid.models.mip import MIP, resize_pos_embed
from dist_reid.models.pretrained import (
    PretrainedWeightsError,
    WeightsUnavailableError,
    cached_weights,
    imagenet_tag,
    load_backbone_weights,
)
from dist_reid.models.resnet import TwoStreamResNet

REPO = Path(__file__).resolve().parents[2]
METHODS = ("agw", "pdm", "icre", "emif", "mip")


def put_in_hub_cache(hub: Path, tag: str, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` where huggingface_hub keeps ``tag``'s weights:
    ``models--timm--<tag>/snapshots/<rev>/model.safetensors`` and ``refs/main`` = rev."""
    repo = timm.models.get_pretrained_cfg(tag).hf_hub_id
    folder = hub / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    snapshot = folder / "snapshots" / rev
    snapshot.mkdir(parents=True, exist_ok=True)
    path = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face cache (the library reads these at call time)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


# -- tags -------------------------------------------------------------------------------------
def test_imagenet_tags_are_the_released_weights():
    resnet = timm.models.get_pretrained_cfg(imagenet_tag("resnet50"))
    assert imagenet_tag("resnet50") == "resnet50.tv_in1k"
    # torchvision's re-serialised V1 file (the released code's resnet50-19c8e357.pth, same weights)
    assert resnet.url.endswith("/resnet50-0676ba61.pth")
    assert resnet.hf_hub_id == "timm/resnet50.tv_in1k"
    vit = timm.models.get_pretrained_cfg(imagenet_tag("vit_base_patch16_224"))
    assert imagenet_tag("vit_base_patch16_224") == "vit_base_patch16_224.orig_in21k_ft_in1k"
    assert vit.url.endswith("/jx_vit_base_p16_224-80ecf9dd.pth")
    assert vit.hf_hub_id == "timm/vit_base_patch16_224.orig_in21k_ft_in1k"
    assert imagenet_tag("resnet18") == "resnet18.a1_in1k"  # timm 1.0's default tag
    with pytest.raises(PretrainedWeightsError, match="no pretrained weights"):
        imagenet_tag("not_a_backbone")


@pytest.mark.parametrize("dataset", ["sysu", "regdb", "llcm"])
def test_every_paper_config_resolves_imagenet(dataset):
    for method in METHODS:
        cfg = load_config(REPO / f"configs/{dataset}/{method}.yaml", [])
        assert cfg.model.pretrained == "imagenet", method
        expected = (
            "vit_base_patch16_224.orig_in21k_ft_in1k" if method == "mip" else "resnet50.tv_in1k"
        )
        assert imagenet_tag(cfg.model.backbone) == expected, method
    for demo in (REPO / "configs/experiments").glob("*.yaml"):
        assert load_config(demo, []).model.pretrained is None, demo.name


# -- imagenet from the hub cache ---------------------------------------------------------------
def test_two_stream_resnet_gets_the_cached_weights_in_both_stems(hub, caplog):
    src = torchvision.models.resnet18()
    state = random_state(src, 1)
    state.pop("layer1.0.bn1.num_batches_tracked")  # counters are not weights: never counted
    put_in_hub_cache(hub, "resnet18.a1_in1k", state)
    with caplog.at_level(logging.INFO, logger="dist_reid.models.pretrained"):
        model = AGW(num_classes=3, backbone="resnet18", pretrained="imagenet", non_local=False)
    net = model.backbone
    ours = {}
    for stem in ("visible_stem", "infrared_stem"):
        for k, v in getattr(net, stem).state_dict().items():
            index, rest = k.split(".", 1)
            ours[f"{stem}:{('conv1', 'bn1')[int(index)]}.{rest}"] = v
    for k, v in net.stages.state_dict().items():
        index, rest = k.split(".", 1)
        ours[f"layer{int(index) + 1}.{rest}"] = v
    compared = 0
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        targets = [f"{s}:{key}" for s in ("visible_stem", "infrared_stem")]
        for target in targets if key.startswith(("conv1", "bn1")) else [key]:
            torch.testing.assert_close(ours[target], value, rtol=0, atol=0, msg=target)
            compared += 1
    assert compared == 2 * 5 + 95  # stems twice (conv1 + 4 bn1 tensors), 95 stage tensors
    assert "imagenet (resnet18.a1_in1k): 100 of 100 backbone tensors loaded, 0 skipped" in (
        caplog.text
    )


def test_pooled_backbone_equals_the_cached_file(hub):
    src = timm.create_model("resnet18", pretrained=False)
    state = random_state(src, 2)
    put_in_hub_cache(hub, "resnet18.a1_in1k", state)
    assert cached_weights("resnet18.a1_in1k") is not None
    model = PooledBackbone("resnet18", pretrained="imagenet").backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model[key], value, rtol=0, atol=0, msg=key)


def test_mip_vit_gets_the_cached_weights_and_a_resized_position_embedding(hub):
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, embed_dim=32,
                            num_heads=2, num_classes=0)  # fmt: skip
    state = random_state(src, 3)
    put_in_hub_cache(hub, imagenet_tag("vit_tiny_patch16_224"), state)
    model = MIP(num_classes=3, backbone="vit_tiny_patch16_224", pretrained="imagenet",
                input_size=(64, 32), depth=4, embed_dim=32, num_heads=2)  # fmt: skip
    torch.testing.assert_close(model.patch_embed.weight, state["patch_embed.proj.weight"])
    torch.testing.assert_close(model.cls_token, state["cls_token"])
    for i in range(2):  # prompted blocks
        for k, v in model.blocks[i].state_dict().items():
            torch.testing.assert_close(v, state[f"blocks.{i}.{k}"], rtol=0, atol=0)
    for k, v in model.head_global[0].state_dict().items():  # the last block
        torch.testing.assert_close(v, state[f"blocks.3.{k}"], rtol=0, atol=0)
    torch.testing.assert_close(model.head_global[1].weight, state["norm.weight"])
    assert model.pos_embed.shape == (1, 1 + 5 * 2, 32)
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(state["pos_embed"], (5, 2)))


def test_a_wrong_file_in_the_cache_names_the_mismatches(hub):
    put_in_hub_cache(hub, "resnet18.a1_in1k", torchvision.models.resnet50().state_dict())
    with pytest.raises(
        PretrainedWeightsError,
        match=r"under 90%.*layer1\.0\.conv1\.weight \(file \(64, 64, 1, 1\), model \(64, 64, 3, 3\)\)",
    ):
        TwoStreamResNet("resnet18", "imagenet")


# -- offline with an empty cache ----------------------------------------------------------------
def test_offline_empty_cache_is_one_line_and_exit_2_before_any_data(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    absent = tmp_path / "no-data-here"
    proc = subprocess.run(
        [sys.executable, "-m", "dist_reid", "train", "-c", "configs/sysu/agw.yaml",
         f"data.root={absent}", f"run.output_dir={tmp_path / 'runs'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1]
    assert "resnet50.tv_in1k" in lines[0]
    assert "dist-reid weights fetch --backbone resnet50" in lines[0]
    assert "does not exist" not in proc.stderr  # the data root was never opened
    assert not (tmp_path / "runs").exists()
    # Once the file is in HF_HOME's cache, the offline CLI finds it there (no download).
    path = put_in_hub_cache(tmp_path / "hf" / "hub", "resnet18.a1_in1k", {"x": torch.zeros(1)})
    proc = subprocess.run(
        [sys.executable, "-m", "dist_reid", "weights", "fetch", "--backbone", "resnet18"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith(f"-> {path}"), proc.stderr


def test_demo_checks_weights_before_generating_data(hub, tmp_path, capsys):
    root = tmp_path / "synthetic"
    code = main(["demo", "-c", "configs/sysu/agw.yaml", f"data.root={root}",
                 "data.synthetic.enabled=true"])  # fmt: skip
    assert code == 2 and not root.exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "weights fetch --backbone resnet50" in err


def test_weights_fetch_prints_the_cached_file(hub, capsys):
    path = put_in_hub_cache(hub, "resnet18.a1_in1k", {"conv1.weight": torch.zeros(64, 3, 7, 7)})
    assert main(["weights", "fetch", "--backbone", "resnet18"]) == 0
    assert capsys.readouterr().out.strip() == f"resnet18: resnet18.a1_in1k -> {path}"
    overrides = ["model.backbone=resnet18"]
    assert main(["weights", "fetch", "-c", "configs/sysu/agw.yaml", *overrides]) == 0
    assert str(path) in capsys.readouterr().out
    assert main(["weights", "fetch", "--backbone", "resnet50"]) == 2  # offline, not cached
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    with pytest.raises(WeightsUnavailableError, match=r"resnet50\.tv_in1k"):
        check_pretrained(load_config(REPO / "configs/sysu/agw.yaml", []))


# -- local files and the 90 % rule ---------------------------------------------------------------
def test_local_path_loads_weights_only(tmp_path):
    src = torchvision.models.resnet18()
    state = random_state(src, 4)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state}, path)
    net = TwoStreamResNet("resnet18", str(path), non_local=(0, 0, 0, 0))
    torch.testing.assert_close(net.infrared_stem[0].weight, state["conv1.weight"])
    torch.testing.assert_close(net.stages[3][1].bn2.running_var, state["layer4.1.bn2.running_var"])
    torch.save({"w": pathlib.PurePosixPath("x")}, path)  # a pickled object, not tensors
    with pytest.raises(PretrainedWeightsError, match=r"cannot read .*r18\.pth"):
        TwoStreamResNet("resnet18", str(path))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        TwoStreamResNet("resnet18", str(tmp_path / "absent.pth"))


def test_ninety_percent_rule_and_counts(caplog):
    module = nn.Sequential(*(nn.Linear(2, 2) for _ in range(10)))  # 20 tensors
    state = random_state(module, 5)
    state["0.weight"] = torch.zeros(3, 2)  # shape mismatch
    state["extra.weight"] = torch.zeros(1)  # unexpected
    del state["1.bias"]  # missing
    state["fc.weight"] = torch.zeros(5)  # a classifier head: ignored, not counted
    with caplog.at_level(logging.INFO, logger="dist_reid.models.pretrained"):
        report = load_backbone_weights(module, state, "f.pth")  # 18 of 20 = 90 %: loads
    assert (len(report.loaded), report.skipped, len(report.missing)) == (18, 2, 2)
    assert "18 of 20 backbone tensors loaded, 2 skipped (1 shape mismatches, 1 unexpected)" in (
        caplog.text
    )
    assert "2 missing" in caplog.text and "0.weight (file (3, 2), model (2, 2))" in caplog.text
    torch.testing.assert_close(module[5].weight, state["5.weight"])
    state["2.weight"] = torch.zeros(4, 4)  # 17 of 20 = 85 %: refused, nothing copied
    before = module[3].weight.detach().clone()
    with pytest.raises(PretrainedWeightsError, match=r"17 of 20 .*first mismatches: 0\.weight"):
        load_backbone_weights(module, {**state, "3.weight": torch.ones(2, 2)}, "f.pth")
    torch.testing.assert_close(module[3].weight, before)


# -- random init on a real dataset ---------------------------------------------------------------
def test_null_on_a_real_dataset_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="dist_reid.builders"):
        check_pretrained(load_config(REPO / "configs/sysu/agw.yaml", ["model.pretrained=null"]))
    assert "far below the papers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_reid.builders"):
        check_pretrained(load_config(REPO / "configs/experiments/demo_sysu_agw.yaml", []))
    assert "far below" not in caplog.text
