"""Export a trained model to ONNX (dynamic batch, one graph per modality) and check it
against eager PyTorch through onnxruntime."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_reid.builders import build_dataset, build_model
from dist_reid.config import ExperimentConfig
from dist_reid.engine.trained import load_trained_model
from dist_reid.models.export import EmbeddingModule

log = logging.getLogger(__name__)


def export_onnx(
    cfg: ExperimentConfig,
    checkpoint: str | None,
    out_dir: str | Path,
    *,
    parity_batch: int = 3,
    atol: float = 1e-4,
    checkpoint_state: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float | str]]:
    """Write ``<out>/embed_<modality>.onnx``; return per modality the file and the largest
    absolute difference to eager PyTorch on a batch size other than the traced one.
    ``checkpoint_state``: the checkpoint's contents when the caller has read them already."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "export needs onnx, onnxscript and onnxruntime: pip install -e '.[export]'"
        ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(cfg)
    if checkpoint:
        model = load_trained_model(checkpoint, cfg, dataset.num_train_ids, state=checkpoint_state)
    else:
        model = build_model(cfg, dataset.num_train_ids, pretrained=False)  # untrained
    model.eval()
    shape = (3, cfg.data.height, cfg.data.width)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    results: dict[str, dict[str, float | str]] = {}
    for modality in ("visible", "infrared"):
        module = EmbeddingModule(model, modality).eval()
        example = (torch.randn(2, *shape, generator=generator),)
        names, dynamic = ["images"], {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
        if module.takes_cams:
            example += (torch.ones(2, dtype=torch.long),)
            names.append("cams")
            dynamic["cams"] = {0: dynamic["images"][0]}
        path = out / f"embed_{modality}.onnx"
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=names,
            output_names=["embedding"],
            dynamic_shapes=dynamic,
            dynamo=True,
            external_data=False,
        )
        probe = (torch.randn(parity_batch, *shape, generator=generator),)
        if module.takes_cams:
            probe += (torch.ones(parity_batch, dtype=torch.long),)
        with torch.no_grad():
            eager = module(*probe).numpy()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {n: t.numpy() for n, t in zip(names, probe, strict=True)})[0]
        diff = float(np.abs(onnx_out - eager).max())
        if onnx_out.shape != eager.shape or not diff <= atol:
            raise RuntimeError(
                f"ONNX export of {modality} differs from eager PyTorch: max |diff| {diff:.3g} > {atol}"
            )
        results[modality] = {"file": str(path), "max_abs_diff": diff}
        log.info("exported %s (max |onnx - eager| = %.2e at batch %d)", path, diff, parity_batch)
    return results
