"""The one record type every dataset reader produces (readers never load pixels)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Modality = Literal["visible", "infrared"]
MODALITIES: tuple[Modality, Modality] = ("visible", "infrared")


class DatasetLayoutError(ValueError):
    """A dataset folder does not have the layout its reader expects.

    The message names the offending path and the expected layout.
    """


@dataclass(frozen=True, slots=True)
class Record:
    """One image of a dataset.

    ``pid`` is the identity as the dataset names it (SYSU/LLCM folder id, RegDB list label),
    ``cam`` the camera number, ``modality`` ``"visible"`` or ``"infrared"``.
    """

    path: str
    pid: int
    cam: int
    modality: Modality

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"record {self.path}: modality must be one of {MODALITIES}, got {self.modality!r}")


def summarize(records: Iterable[Record]) -> dict[str, object]:
    """Counts of images, identities and cameras per modality (for logs and tests)."""
    records = list(records)
    out: dict[str, object] = {"images": len(records), "ids": len({r.pid for r in records})}
    for modality in MODALITIES:
        subset = [r for r in records if r.modality == modality]
        out[modality] = {
            "images": len(subset),
            "ids": len({r.pid for r in subset}),
            "cams": dict(sorted(Counter(r.cam for r in subset).items())),
        }
    return out
