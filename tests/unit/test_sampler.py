"""ModalityBalancedSampler invariants, property-based (hypothesis)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_reid.data.sampler import ModalityBalancedSampler


def _records(draw_counts: list[tuple[int, int]]) -> tuple[list[int], list[str]]:
    pids, mods = [], []
    for pid, (n_vis, n_ir) in enumerate(draw_counts):
        pids += [pid * 7 + 3] * (n_vis + n_ir)  # non-contiguous dataset identities
        mods += ["visible"] * n_vis + ["infrared"] * n_ir
    return pids, mods


def _check_layout(batch: list[int], pids, mods, n_ids: int, k: int) -> list[int]:
    """Assert the reference layout; return the identity order."""
    assert len(batch) == 2 * n_ids * k
    vis, ir = batch[: n_ids * k], batch[n_ids * k :]
    assert all(mods[i] == "visible" for i in vis) and all(mods[i] == "infrared" for i in ir)
    order_vis = [pids[vis[j * k]] for j in range(n_ids)]
    order_ir = [pids[ir[j * k]] for j in range(n_ids)]
    assert order_vis == order_ir  # same identity order in both halves
    assert len(set(order_vis)) == n_ids  # distinct identities
    for j, pid in enumerate(order_vis):  # K images of an identity contiguous
        assert {pids[i] for i in vis[j * k : (j + 1) * k]} == {pid}
        assert {pids[i] for i in ir[j * k : (j + 1) * k]} == {pid}
    return order_vis


counts = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=4, max_size=14)


@settings(max_examples=60, deadline=None)
@given(
    counts=counts,
    k=st.integers(1, 4),
    world=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 5),
)
def test_world_size_invariance_and_layout(counts, k, world, seed, epoch):
    pids, mods = _records(counts)
    p = world * max(1, min(len(counts) // world, 2))
    single = ModalityBalancedSampler(pids, mods, p, k, seed=seed)
    single.set_epoch(epoch)
    ranks = [
        ModalityBalancedSampler(pids, mods, p, k, num_replicas=world, rank=r, seed=seed)
        for r in range(world)
    ]
    for sampler in ranks:
        sampler.set_epoch(epoch)
    assert len({len(s) for s in ranks}) == 1 and len(ranks[0]) == len(single)  # equal lengths
    global_batches = list(single)
    local = [list(s) for s in ranks]
    assert len(global_batches) == len(single) and all(
        len(batches) == len(single) for batches in local
    )
    for step, batch in enumerate(global_batches):
        _check_layout(batch, pids, mods, p, k)
        owners = [
            set(_check_layout(local[r][step], pids, mods, p // world, k)) for r in range(world)
        ]
        assert sum(len(o) for o in owners) == len(set().union(*owners))  # ranks never share an id
        union = Counter(i for r in range(world) for i in local[r][step])
        assert union == Counter(batch)  # union of ranks == single-process batch


@settings(max_examples=25, deadline=None)
@given(counts=counts, seed=st.integers(0, 1000))
def test_epochs_reshuffle_deterministically(counts, seed):
    pids, mods = _records(counts)
    a = ModalityBalancedSampler(pids, mods, 4, 2, seed=seed)
    b = ModalityBalancedSampler(pids, mods, 4, 2, seed=seed)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(4)
    assert list(a) != first or (len(counts) == 4 and all(c == (1, 1) for c in counts))


def test_length_is_the_references_batch_count():
    pids, mods = _records([(10, 6)] * 8)  # 80 visible, 48 infrared
    sampler = ModalityBalancedSampler(pids, mods, 4, 4)
    assert len(sampler) == 80 // 16 + 1 == len(list(sampler))


def test_replacement_only_when_an_identity_has_fewer_than_k_images():
    pids, mods = _records([(2, 8), (8, 8), (8, 8), (8, 2)])
    for batch in ModalityBalancedSampler(pids, mods, 4, 4, seed=1):
        vis, ir = batch[:16], batch[16:]
        for j in range(4):
            for half in (vis[j * 4 : (j + 1) * 4], ir[j * 4 : (j + 1) * 4]):
                available = sum(
                    1 for i, p in enumerate(pids) if p == pids[half[0]] and mods[i] == mods[half[0]]
                )
                if available >= 4:
                    assert len(set(half)) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ids_per_batch": 3, "num_replicas": 2}, "not divisible by the world size"),
        ({"ids_per_batch": 8}, "only 4 identities"),
        ({"rank": 2, "num_replicas": 2}, "rank 2"),
    ],
)
def test_impossible_settings_are_clear_errors(kwargs, match):
    pids, mods = _records([(3, 3)] * 4)
    args = {"ids_per_batch": 2, "instances_per_modality": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ModalityBalancedSampler(pids, mods, **args)


def test_identities_missing_a_modality_are_not_sampled():
    pids, mods = _records([(3, 3), (3, 0), (3, 3), (3, 3)])
    sampler = ModalityBalancedSampler(pids, mods, 3, 1)
    assert sampler.identities == [3, 17, 24]
    with pytest.raises(ValueError, match="modalities must be"):
        ModalityBalancedSampler([1, 1], ["rgb", "ir"], 1, 1)
