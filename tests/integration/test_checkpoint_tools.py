"""A checkpoint is enough: eval, extract, plot, export and report run from a training run's
checkpoint (its stored config), reproduce the run's final metrics, and never change the
training run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_reid.builders import build_model
from dist_reid.cli import main
from dist_reid.config import load_config, plain_config
from dist_reid.data.synthetic.layouts import generate
from dist_reid.engine import trained as trained_module
from dist_reid.engine.build import build_trainer
from dist_reid.engine.trained import checkpoint_config, load_trained_model, read_trained_state
from dist_reid.models.backbones import state_dict_mismatch

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/experiments/demo_sysu_agw.yaml")


def _tiny(root: Path, out: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.synthetic.enabled=false",
        f"run.output_dir={out}",
        "run.name=run",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
        "train.epochs=1",
        "train.trackers=[]",
        "eval.trials=[0,1]",
        "eval.settings=[all]",
        "train.kernels=torch",
        "optim.milestones=[5]",
    ]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    root = out / "sysu"
    generate("sysu", root, 12, seed=3, images_per_camera=2)  # a one-epoch run of a few steps
    torch.manual_seed(0)
    trainer = build_trainer(load_config(CONFIG, _tiny(root, out)))
    trainer.fit()
    return root, out / "run"


@pytest.mark.slow
def test_a_bare_checkpoint_reproduces_the_runs_metrics_and_leaves_the_run_untouched(
    trained, tmp_path, capsys
):
    root, run = trained
    assert (run / "metrics.json").is_file() and (run / "metrics.md").is_file()  # training wrote
    before = _snapshot(run)
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--name", "bare"]) == 0
    # the README's form: a dataset config for the data side, the model from the checkpoint
    command = ["eval", "-c", "configs/datasets/sysu.yaml", "--checkpoint", str(run / "last.pt")]
    assert main([*command, f"data.root={root}", "eval.trials=[0,1]", "--name", "readme"]) == 0
    assert main(["plot", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "fig")]) == 0
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    after = _snapshot(run)
    for name, content in before.items():  # every file training wrote is byte-identical
        assert after[name] == content, name
    trained_metrics = json.loads(before["metrics.json"])["settings"]["all"]["mean"]
    for name in ("bare", "readme"):
        evaluated = json.loads((run / "eval" / name / "metrics.json").read_text())
        got = evaluated["settings"]["all"]["mean"]
        assert got == pytest.approx(trained_metrics, abs=1e-4), name
    assert "## Full protocol (sysu)" in (run / "report.md").read_text()  # from training's file


@pytest.mark.slow
def test_only_the_evaluation_side_of_a_config_is_taken(trained):
    root, run = trained
    cfg = checkpoint_config(
        run / "best.pt",
        REPO / "configs/datasets/sysu.yaml",
        [f"data.root={root}", "eval.flip=true"],
    )
    stored = load_config(run / "config.yaml")
    assert cfg.model == stored.model and (cfg.data.height, cfg.data.width) == (64, 32)
    assert cfg.data.root == str(root) and cfg.eval.flip is True
    model = load_trained_model(run / "best.pt", cfg)
    assert not model.training
    wrong = checkpoint_config(run / "last.pt", None, ["model.backbone=resnet34"])
    with pytest.raises(ValueError, match=r"does not fit model.name=agw \(resnet34\): \d+ missing"):
        load_trained_model(run / "last.pt", wrong)


def test_a_mismatch_names_the_first_keys_in_one_line():
    expected = {f"layer{i}.weight": torch.zeros(2, 2) for i in range(5)} | {"fc": torch.zeros(3)}
    given = {"layer0.weight": torch.zeros(2, 2), "fc": torch.zeros(4), "head.bias": torch.zeros(1)}
    message = state_dict_mismatch(expected, given)
    assert message == (
        "4 missing: layer1.weight, layer2.weight, layer3.weight (+1 more); "
        "1 unexpected: head.bias; 1 shape: fc (4,) vs (3,)"
    )
    assert state_dict_mismatch(given, given) == ""


def test_a_plain_weights_file_without_a_config_asks_for_one(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(Exception, match=r"w.pt holds no config: give -c CONFIG"):
        checkpoint_config(path)


def test_a_command_reads_its_checkpoint_once(tmp_path, monkeypatch):
    """The config and the weights come from one read of the file: ``state=`` hands the contents
    read once to both, and ``extract`` does so end to end."""
    root = tmp_path / "sysu"
    generate("sysu", root, 4, seed=3, images_per_camera=1)
    cfg = load_config(
        CONFIG,
        [f"data.root={root}", "data.synthetic.enabled=false", "data.height=64", "data.width=32"],
    )
    torch.manual_seed(0)
    model = build_model(cfg, 4, pretrained=False)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": plain_config(cfg), "num_classes": 4}, path)
    reads = []
    real_read = trained_module.read_model_file

    def counting_read(checkpoint):
        reads.append(Path(checkpoint))
        return real_read(checkpoint)

    monkeypatch.setattr(trained_module, "read_model_file", counting_read)
    state = read_trained_state(path)
    got = checkpoint_config(path, None, ["data.num_workers=0"], state=state)
    loaded = load_trained_model(path, got, state=state)
    assert reads == [path] and got.data.num_workers == 0 and got.model == cfg.model
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert read_trained_state(None) is None and read_trained_state("m_{trial}.pt") is None
    reads.clear()
    out = tmp_path / "features"
    command = ["extract", "--checkpoint", str(path), "--out", str(out), "data.num_workers=0"]
    assert main(command) == 0
    assert reads == [path]
