"""RegDB on its real layout (protocols.md section 2)."""

from __future__ import annotations

import os

from dist_reid.data.datasets.base import VIReIDDataset, read_list_file, require_dir
from dist_reid.data.records import Modality, Record

LAYOUT = (
    "RegDB/Visible/<id>/*.bmp, RegDB/Thermal/<id>/*.bmp, RegDB/idx/{train,test}_{visible,thermal}_"
    "{1..10}.txt ('<relative path> <label>' per line)"
)
# RegDB has one camera per modality; the reference gives queries camera 1 and gallery camera 2.
CAMERA = {"visible": 1, "infrared": 2}
LIST_NAME = {"visible": "visible", "infrared": "thermal"}


class RegDB(VIReIDDataset):
    """RegDB: ten trials, each its own 206/206 identity split and its own trained model.

    ``trial`` picks the training split; evaluate a model only on its own trial's test lists
    (protocols.md pitfall 1). ``pid`` is the label of the list file.
    """

    name = "regdb"
    metric_protocol = "regdb"
    settings = ("v2t", "t2v")

    def __init__(self, root: str | os.PathLike[str], *, trial: int = 1) -> None:
        super().__init__(root)
        require_dir(self.root / "Visible", LAYOUT)
        require_dir(self.root / "Thermal", LAYOUT)
        require_dir(self.root / "idx", LAYOUT)
        self.trial = trial
        self._check_trial(trial)
        self.train = self._read("train", trial, "visible") + self._read("train", trial, "infrared")

    @property
    def trials(self) -> tuple[int, ...]:
        return tuple(range(1, 11))

    def scored_trials(self) -> tuple[int, ...]:
        """Only the trial this object was opened for: the other trials' test identities are
        this split's training identities (protocols.md pitfall 1)."""
        return (self.trial,)

    def _read(self, part: str, trial: int, modality: Modality) -> list[Record]:
        path = self.root / "idx" / f"{part}_{LIST_NAME[modality]}_{trial}.txt"
        return [
            Record(image, label, CAMERA[modality], modality)
            for image, label in read_list_file(path, self.root, LAYOUT)
        ]

    def test_split(
        self, trial: int = 1, direction: str = "v2t"
    ) -> tuple[list[Record], list[Record]]:
        """(query, gallery): the whole test list of each modality, in file order."""
        self._check_trial(trial)
        self._check_setting(direction)
        visible = self._read("test", trial, "visible")
        thermal = self._read("test", trial, "infrared")
        return (visible, thermal) if direction == "v2t" else (thermal, visible)

    def split(self, setting: str, trial: int, **options: bool) -> tuple[list[Record], list[Record]]:
        return self.test_split(trial=trial, direction=setting)
