"""Data: records, dataset readers, synthetic generator (and, later, samplers and pipelines)."""

from dist_reid.data.datasets import DATASETS, VIReIDDataset, open_dataset
from dist_reid.data.records import MODALITIES, DatasetLayoutError, Modality, Record

__all__ = [
    "DATASETS",
    "MODALITIES",
    "DatasetLayoutError",
    "Modality",
    "Record",
    "VIReIDDataset",
    "open_dataset",
]
