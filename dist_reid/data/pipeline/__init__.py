"""Training data pipelines behind one interface (torch DataLoader now, DALI later).

A pipeline is built for one rank from the records and a :class:`ModalityBalancedSampler`;
``set_epoch(e)`` fixes the epoch's plan, ``iterate(start_step)`` yields batches
``{"images", "labels", "modalities", "cams", "indices"}`` from that step on, ``len()`` is exact.
"""

from dist_reid.data.pipeline.torch_loader import TorchTrainPipeline, TrainPipeline

__all__ = ["TorchTrainPipeline", "TrainPipeline"]
