"""Readers for SYSU-MM01, RegDB and LLCM on their real folder layouts."""

from __future__ import annotations

import os
from typing import Any

from dist_reid.data.datasets.base import VIReIDDataset
from dist_reid.data.datasets.llcm import LLCM
from dist_reid.data.datasets.regdb import RegDB
from dist_reid.data.datasets.sysu import SYSUMM01
from dist_reid.registry import Registry

DATASETS: Registry[type[VIReIDDataset]] = Registry("dataset")
DATASETS.register("sysu")(SYSUMM01)
DATASETS.register("regdb")(RegDB)
DATASETS.register("llcm")(LLCM)


def open_dataset(name: str, root: str | os.PathLike[str], **options: Any) -> VIReIDDataset:
    """Validate the layout under ``root`` and return the dataset (no pixels are loaded).

    ``options`` go to the reader: ``include_val`` (SYSU-MM01), ``trial`` (RegDB training split).
    """
    return DATASETS.get(name)(root, **options)


__all__ = ["DATASETS", "LLCM", "SYSUMM01", "RegDB", "VIReIDDataset", "open_dataset"]
