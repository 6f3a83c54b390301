"""ONNX export with a dynamic batch, checked against eager PyTorch through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_reid.cli import main
from dist_reid.models import create_model
from dist_reid.models.export import EmbeddingModule

pytest.importorskip("onnxruntime")


def test_embedding_module_matches_embed_and_routes_by_modality():
    torch.manual_seed(0)
    model = create_model("agw", num_classes=3, backbone="resnet18").eval()
    with torch.no_grad():  # the two stems start as copies of one another
        model.backbone.infrared_stem[0].weight.mul_(1.5)
    images = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(
        EmbeddingModule(model, "infrared")(images), model.embed(images, "infrared")
    )
    assert not torch.allclose(
        EmbeddingModule(model, "visible")(images), model.embed(images, "infrared")
    )
    with pytest.raises(ValueError, match="modality"):
        EmbeddingModule(model, "thermal")


@pytest.mark.slow
def test_export_command_writes_graphs_that_match_eager(synthetic_trees, tmp_path, capsys):
    import onnxruntime as ort

    root, _ = synthetic_trees["sysu"]
    overrides = [f"data.root={root}", "data.height=64", "data.width=32", "model.backbone=resnet18"]
    assert (
        main(
            [
                "export",
                "-c",
                "configs/sysu/agw.yaml",
                "--untrained",
                "--out",
                str(tmp_path),
                *overrides,
            ]
        )
        == 0
    )
    assert "max |onnx - eager|" in capsys.readouterr().out
    for modality in ("visible", "infrared"):
        session = ort.InferenceSession(str(tmp_path / f"embed_{modality}.onnx"))
        for batch in (1, 7):  # dynamic batch axis
            out = session.run(
                None,
                {
                    "images": np.random.default_rng(batch)
                    .normal(size=(batch, 3, 64, 32))
                    .astype(np.float32)
                },
            )[0]
            assert out.shape == (batch, 512) and np.isfinite(out).all()
