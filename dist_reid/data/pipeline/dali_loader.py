"""NVIDIA DALI training pipeline behind the :class:`TrainPipeline` interface.

The modality-balanced sampler decides every batch (architecture decision 4); DALI only decodes and
augments. Encoded bytes are read by a thread pool and handed to ``fn.external_source`` together
with the labels, modalities, cameras, indices and the *augmentation parameters* of each sample.
Those parameters (crop offset, flip, channel-mix matrix and offset, erasing box) are drawn on the host from
``sample_seed(seed, epoch, step, position)`` — the same per-sample seeds the torch pipeline uses —
so a batch is a pure function of (seed, epoch, step): resume is exact and a failed batch can be
rebuilt. The graph: decode (``mixed`` on GPU, ``cpu`` otherwise) -> Lanczos resize -> pad + crop
(``fn.slice`` with zero padding) -> flip + normalise (``fn.crop_mirror_normalize``, HWC) ->
channel mix (``fn.coord_transform`` on the channel axis: grayscale as an affine map of the
normalised pixel, then CAJ) -> CHW -> ``fn.erase``.

Decode-once cache (``cache=True``): each image is decoded and resized once into a uint8
``(N, H, W, 3)`` host tensor (pinned when a GPU exists); later batches feed those pixels to the
augmentation half of the graph, which runs on the GPU when there is one. Resizing is deterministic, so cached and
uncached batches are identical.

BMP (RegDB) is decoded on the CPU even with ``device="mixed"``: nvJPEG handles JPEG only.

Stop signals (preemption): the readers are threads of the training process and the graph uses no
parallel external-source worker processes, so a SIGTERM/SIGUSR1 sent to the whole job reaches
only the training loop's handler, which checkpoints at the step boundary; nothing here can die of
it (``tests/integration/test_preemption.py`` checks this on the CPU graph).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, feed_ndarray

from dist_reid.data.augment import (
    LUMA,
    PIL_LUMA,
    RELEASED_ERASING_R1,
    RELEASED_ERASING_TRIES,
    AugmentOptions,
)
from dist_reid.data.images import ImageDecodeError, load_rgb
from dist_reid.data.pipeline.torch_loader import sample_seed
from dist_reid.data.records import MODALITIES, Record
from dist_reid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dist_reid.data.sampler import IdentitySampler

log = logging.getLogger(__name__)

FIELDS = ("labels", "modalities", "cams", "indices")
# Leading bytes of the formats the datasets ship (JPEG, BMP, PNG): a cheap first corruption check.
MAGIC = (b"\xff\xd8", b"BM", b"\x89PNG")
_DALI_DTYPES = {
    torch.float32: types.FLOAT,
    torch.float16: types.FLOAT16,
    torch.bfloat16: types.FLOAT,
}


def sample_params(
    seed: int, height: int, width: int, modality: str, options: AugmentOptions
) -> dict[str, np.ndarray]:
    """Augmentation parameters of one sample, drawn like the torch pipeline's transforms.

    ``start`` is the (x, y) corner of the crop in the resized image (negative = inside the zero
    padding), ``flip`` 0/1, ``mix``/``shift`` the affine channel map ``mix @ x + shift`` applied
    to the normalised pixel ``x`` (grayscale, then identity, one channel replicated or CAJ's luma
    gray), ``erase_anchor``/``erase_shape`` the (y, x) box set to ``options.erasing_fill`` after
    normalisation (shape 0 = nothing erased). A switch that is off draws nothing, so adding a key
    at its default leaves the other parameters unchanged.
    """
    rng = np.random.default_rng(seed)
    pad = options.pad
    dx, dy = rng.integers(0, 2 * pad + 1, size=2) if pad else (0, 0)
    flip = int(options.flip and rng.random() < 0.5)
    mix = np.eye(3, dtype=np.float64)
    shift = np.zeros(3, np.float64)
    if options.grayscale > 0 and rng.random() < options.grayscale:
        # gray g = sum_j w_j p_j of the raw pixel p_j = std_j x_j + mean_j, normalised per channel
        w, m, s = (np.asarray(v, np.float64) for v in (PIL_LUMA, options.mean, options.std))
        mix = (w * s)[None, :] / s[:, None]
        shift = (w @ m - m) / s
    if options.channel_aug:
        replicate = rng.random() < (0.5 if modality == "visible" else 0.75)
        if replicate:
            caj = np.zeros((3, 3), np.float64)
            caj[:, int(rng.integers(3))] = 1.0
            mix, shift = caj @ mix, caj @ shift
        elif modality == "infrared" and rng.random() < 0.5:
            caj = np.tile(np.asarray(LUMA, np.float64), (3, 1))
            mix, shift = caj @ mix, caj @ shift
    anchor, shape = np.zeros(2, np.float32), np.zeros(2, np.float32)  # fn.erase takes floats
    if options.random_erasing > 0 and rng.random() < options.random_erasing:
        # torchvision's RandomErasing.get_params: up to 10 tries at an area/aspect that fits;
        # released mode: aspect uniform in [r1, 1/r1], up to 100 tries
        low, high = options.erasing_scale
        released = options.erasing_mode == "released"
        r1 = RELEASED_ERASING_R1
        for _ in range(RELEASED_ERASING_TRIES if released else 10):
            area = height * width * rng.uniform(low, high)
            if released:
                aspect = rng.uniform(r1, 1 / r1)
            else:
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < height and w < width:
                anchor = np.array(
                    [rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)], np.float32
                )
                shape = np.array([h, w], np.float32)
                break
    return {
        "start": np.array([dx - pad, dy - pad], np.int32),
        "flip": np.array(flip, np.int32),
        "mix": mix.astype(np.float32),
        "shift": shift.astype(np.float32),
        "erase_anchor": anchor,
        "erase_shape": shape,
    }


def read_bytes(path: str) -> np.ndarray:
    """The encoded file as uint8; a missing, empty or unrecognised file raises ImageDecodeError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {path}") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image {path}: {exc}") from None
    if not data.startswith(MAGIC):
        raise ImageDecodeError(f"cannot decode image {path}: not a JPEG, BMP or PNG file")
    return np.frombuffer(data, dtype=np.uint8)


def _augment(images, params, height: int, width: int, dtype, mean, std, fill):
    """Pad/crop, flip, normalise, channel mix, CHW, erase — the torch pipeline's order."""
    start, flip, mix, shift, erase_anchor, erase_shape = params
    images = fn.slice(
        images,
        start=start,
        shape=[width, height],
        axis_names="WH",
        out_of_bounds_policy="pad",
        fill_values=0,
    )
    images = fn.crop_mirror_normalize(
        images,
        mirror=flip,
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        dtype=types.FLOAT,
        output_layout="HWC",
    )
    images = fn.coord_transform(images, M=mix, T=shift)  # innermost axis = channels
    images = fn.transpose(images, perm=[2, 0, 1], output_layout="CHW")
    images = fn.erase(
        images, anchor=erase_anchor, shape=erase_shape, axis_names="HW", fill_value=list(fill)
    )
    if dtype != types.FLOAT:
        images = fn.cast(images, dtype=dtype)
    return images


@pipeline_def
def _train_graph(source, height: int, width: int, dtype, gpu: bool, cached: bool, mean, std, fill):
    encoded, *params, labels, modalities, cams, indices = fn.external_source(
        source=source, num_outputs=11, batch=True, device="cpu", no_copy=False
    )
    if cached:
        images = encoded.gpu() if gpu else encoded  # already decoded + resized uint8 HWC
    else:
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(
            images,
            resize_x=width,
            resize_y=height,
            interp_type=types.INTERP_LANCZOS3,
            antialias=True,
        )
    images = _augment(images, params, height, width, dtype, mean, std, fill)
    return images, labels, modalities, cams, indices


@pipeline_def
def _decode_graph(height: int, width: int, gpu: bool):
    encoded = fn.external_source(name="encoded", device="cpu")
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    return fn.resize(
        images, resize_x=width, resize_y=height, interp_type=types.INTERP_LANCZOS3, antialias=True
    )


class _DaliFailure(RuntimeError):
    """DALI failed on a batch in flight (usually an image it cannot decode)."""


class _EpochSource:
    """Batch-mode ``external_source`` callback: one list per graph input for each planned step."""

    def __init__(
        self, owner: DaliTrainPipeline, plan: list[list[int]], epoch: int, start_step: int
    ) -> None:
        self.owner, self.plan, self.epoch = owner, plan, epoch
        self.step = start_step
        self.fed: list[int] = []  # steps handed to DALI, in order

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        if self.step >= len(self.plan):
            raise StopIteration
        step, self.step = self.step, self.step + 1
        self.fed.append(step)
        return self.owner._batch_inputs(self.plan[step], self.epoch, step)


class DaliTrainPipeline:
    """DALI graph fed by the rank's identity sampler (see the module docstring).

    ``device``: a CUDA device decodes with nvJPEG (``mixed``) and augments on that GPU; ``None`` or
    a CPU device runs the same graph on the CPU. Batches match :class:`TorchTrainPipeline`'s keys;
    images come out in ``dtype`` on ``device`` (CPU tensors on the CPU graph).
    """

    name = "dali"

    def __init__(
        self,
        records: Sequence[Record],
        labels: dict[int, int],
        sampler: IdentitySampler | None,
        *,
        height: int,
        width: int,
        augment: AugmentOptions | None = None,
        num_threads: int = 2,
        device: torch.device | str | None = None,
        seed: int = 0,
        cache: bool = False,
        skip_corrupt: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in _DALI_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(map(str, _DALI_DTYPES))}, got {dtype}")
        self.records = list(records)
        self.labels = labels
        self.sampler = sampler
        self._rank = sampler.rank if sampler is not None else 0
        self.height, self.width = height, width
        self.augment = augment or AugmentOptions()
        self.num_threads = max(1, num_threads)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.gpu = device.type == "cuda"
        self.device_id = (
            (device.index if device.index is not None else torch.cuda.current_device())
            if self.gpu
            else None
        )
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.dtype = dtype
        self.skipped = 0  # replacement samples served so far (skip_corrupt)
        self.bad: set[int] = set()  # indices known to be missing or corrupt
        self._pools: dict[tuple[int, str], list[int]] = {}
        for i, r in enumerate(self.records):
            self._pools.setdefault((r.pid, r.modality), []).append(i)
        self._io = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="dali-read")
        self.cache: torch.Tensor | None = None
        self._cached = np.zeros(len(self.records), dtype=bool)
        if cache:
            # Host memory (pinned when a GPU exists, so the copy to the device is asynchronous).
            self.cache = torch.empty(
                (len(self.records), height, width, 3),
                dtype=torch.uint8,
                pin_memory=torch.cuda.is_available(),
            )
        bmp = sum(r.path.lower().endswith(".bmp") for r in self.records)
        if bmp and self.gpu:
            log.info(
                "DALI: %d of %d images are BMP; nvJPEG decodes JPEG only, so these decode on the CPU",
                bmp,
                len(self.records),
            )

    # -- interface ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def close(self) -> None:
        """Nothing to stop: DALI decodes in threads of this process, per epoch."""

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start_step..len-1`` of the sampler's current epoch."""
        yield from self._iterate_plan(list(self.sampler), self.sampler.epoch, start_step)

    # -- internals ---------------------------------------------------------------------------
    def _iterate_plan(
        self, plan: list[list[int]], epoch: int, start_step: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        step = start_step
        while step < len(plan):
            source = _EpochSource(self, plan, epoch, step)
            try:
                for batch in self._run(source):
                    step += 1
                    yield batch
            except _DaliFailure as failure:
                # Find the bad file among the batches DALI had in flight; skip it or name it.
                pending = [
                    i for s in source.fed if s >= step for i in self._replaced(plan[s], epoch, s)
                ]
                culprit = self._first_undecodable(pending)
                if culprit is None:
                    raise (failure.__cause__ or failure) from None
                index, error = culprit
                if not self.skip_corrupt:
                    raise error from None
                self._mark_bad(index, error)  # then rebuild the graph and redo from ``step``

    def _run(self, source: _EpochSource) -> Iterator[dict[str, torch.Tensor]]:
        batch_size = max(len(b) for b in source.plan)  # eval's last batch may be shorter
        cpu = not self.gpu
        pipe = _train_graph(
            source,
            self.height,
            self.width,
            _DALI_DTYPES[self.dtype],
            self.gpu,
            self.cache is not None,
            tuple(self.augment.mean),
            tuple(self.augment.std),
            tuple(self.augment.erasing_fill),
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            # The CPU graph runs synchronously (the setting the CPU runs were checked with); the
            # GPU graph keeps DALI's default asynchronous, pipelined executor.
            exec_async=not cpu,
            exec_pipelined=not cpu,
            prefetch_queue_depth=1 if cpu else 2,
        )
        try:
            pipe.build()
            iterator = DALIGenericIterator([pipe], ["images", *FIELDS], auto_reset=False)
        except RuntimeError as exc:
            raise _DaliFailure(str(exc)) from exc
        while True:
            try:
                out = next(iterator)[0]
            except StopIteration:
                return
            except RuntimeError as exc:
                raise _DaliFailure(str(exc)) from exc
            batch = {k: out[k].reshape(-1).long() for k in FIELDS}
            images = out["images"]
            if self.dtype != images.dtype:
                images = images.to(self.dtype)
            yield {"images": images, **batch}

    def _replaced(self, batch: list[int], epoch: int, step: int) -> list[int]:
        """The batch with known-bad images swapped for another image of the same identity and
        modality (chosen from the sample's seed, so a rebuilt batch is the same)."""
        if not self.bad:
            return list(batch)
        offset = self._rank * len(batch)
        out = []
        for position, index in enumerate(batch):
            if index in self.bad:
                r = self.records[index]
                pool = [i for i in self._pools[(r.pid, r.modality)] if i not in self.bad]
                if not pool:
                    raise ImageDecodeError(
                        f"cannot replace corrupt image {r.path}: identity {r.pid} has no other readable {r.modality} image"
                    )
                rng = np.random.default_rng(
                    sample_seed(self.seed, epoch, step, offset + position) + 1
                )
                index = int(pool[int(rng.integers(len(pool)))])
            out.append(index)
        return out

    def _mark_bad(self, index: int, error: Exception) -> None:
        self.bad.add(index)
        self.skipped += 1
        log.warning(
            "skipping corrupt image (%d so far), using another of the same identity: %s",
            self.skipped,
            error,
        )

    def _read(self, index: int) -> np.ndarray:
        return read_bytes(self.records[index].path)

    def _read_all(self, indices: list[int]) -> list[np.ndarray]:
        """Encoded bytes of ``indices`` (thread pool); with skip_corrupt, unreadable files are
        marked bad and the caller retries with replacements."""
        futures = [self._io.submit(self._read, i) for i in indices]
        out, failed = [], None
        for i, f in zip(indices, futures, strict=True):
            try:
                out.append(f.result())
            except ImageDecodeError as exc:
                if not self.skip_corrupt:
                    raise
                self._mark_bad(i, exc)
                failed = True
        if failed:
            raise _Retry
        return out

    def _batch_inputs(
        self, batch: list[int], epoch: int, step: int
    ) -> tuple[list[np.ndarray], ...]:
        while True:
            indices = self._replaced(batch, epoch, step)
            try:
                pixels = self._pixels(indices)
                break
            except _Retry:
                continue
        offset = self._rank * len(batch)
        params = [
            sample_params(
                sample_seed(self.seed, epoch, step, offset + p),
                self.height,
                self.width,
                self.records[i].modality,
                self.augment,
            )
            for p, i in enumerate(batch)  # parameters follow the slot, not the replacement
        ]
        columns = [
            [p[k] for p in params]
            for k in ("start", "flip", "mix", "shift", "erase_anchor", "erase_shape")
        ]
        records = [self.records[i] for i in indices]
        # a replacement shares the slot's identity and modality; cam and index are its own
        return (
            pixels,
            *columns,
            [np.array(self.labels.get(r.pid, -1), np.int64) for r in records],
            [np.array(MODALITIES.index(r.modality), np.int64) for r in records],
            [np.array(r.cam, np.int64) for r in records],
            [np.array(i, np.int64) for i in indices],
        )

    def _pixels(self, indices: list[int]) -> list[np.ndarray]:
        """Encoded bytes, or (cache mode) decoded uint8 HWC images, filling the cache on a miss."""
        if self.cache is None:
            return self._read_all(indices)
        missing = sorted({i for i in indices if not self._cached[i]})
        if missing:
            self._fill_cache(missing)
        return [self.cache[i].numpy() for i in indices]

    def _fill_cache(self, indices: list[int]) -> None:
        encoded = self._read_all(indices)
        pipe = _decode_graph(
            self.height,
            self.width,
            self.gpu,
            batch_size=len(indices),
            num_threads=self.num_threads,
            device_id=self.device_id,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        try:
            pipe.build()
            pipe.feed_input("encoded", encoded)
            (out,) = pipe.run()
        except RuntimeError:
            culprit = self._first_undecodable(indices)
            if culprit is None:
                raise
            index, error = culprit
            if not self.skip_corrupt:
                raise error from None
            self._mark_bad(index, error)
            raise _Retry from None
        target = torch.empty(
            (len(indices), self.height, self.width, 3),
            dtype=torch.uint8,
            device=torch.device("cuda", self.device_id) if self.gpu else "cpu",
        )
        feed_ndarray(
            out.as_tensor(), target, cuda_stream=torch.cuda.current_stream() if self.gpu else None
        )
        self.cache[indices] = target.cpu()
        self._cached[indices] = True

    def _first_undecodable(self, indices: list[int]) -> tuple[int, ImageDecodeError] | None:
        """The first index whose file PIL cannot decode either (a DALI error's culprit)."""
        for index in dict.fromkeys(indices):
            try:
                load_rgb(self.records[index].path)
            except ImageDecodeError as exc:
                return index, exc
        return None


class _Retry(Exception):
    """Internal: bad images were just marked; rebuild the batch with replacements."""


class DaliEvalPipeline:
    """Test-time DALI pipeline: decode + Lanczos resize + normalise (``mean``/``std``), no
    augmentation.

    ``for images, indices in pipeline`` walks ``records`` in order in batches of ``batch_size``
    (the last one shorter), like a ``DataLoader`` over :class:`RecordImageDataset`.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        height: int = 288,
        width: int = 144,
        batch_size: int = 64,
        num_threads: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._runner = DaliTrainPipeline(
            records,
            {},
            None,
            height=height,
            width=width,
            augment=AugmentOptions(pad=0, flip=False, mean=tuple(mean), std=tuple(std)),
            num_threads=num_threads,
            device=device,
            dtype=dtype,
        )

    def __len__(self) -> int:
        return math.ceil(len(self._runner.records) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self._runner.records)
        plan = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        for batch in self._runner._iterate_plan(plan, 0, 0):
            yield batch["images"], batch["indices"]
