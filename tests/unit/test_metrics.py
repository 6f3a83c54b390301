"""Evaluation metrics: hand-computed cases, reference equivalence (hypothesis), benchmark smoke."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dist_reid.bench.common import machine_info, write_report
from dist_reid.bench.eval_speed import main as bench_main
from dist_reid.bench.eval_speed import run_eval_benchmark
from dist_reid.evaluation import metrics
from dist_reid.evaluation.metrics import METRIC_PROTOCOLS, EvalResult, MetricProtocol, evaluate
from dist_reid.evaluation.reference import reference_evaluate

# protocols.md section 4 worked example: gallery already in ranked order (distance = column).
WORKED_IDS = np.array([5, 7, 9, 9, 12, 7, 9, 7])
WORKED_CAMS = np.array([2, 2, 1, 4, 5, 1, 5, 4])
SYSU_IMAGE = MetricProtocol(
    "sysu-image", cmc="image", exclusion="camera_pairs", camera_pairs=((3, 2),)
)
COLLAPSED_NO_FILTER = MetricProtocol("collapsed", cmc="identity", exclusion="none")


def ranked_distances(num_queries: int, num_gallery: int) -> np.ndarray:
    """Distance row 0, 1, 2, ... for every query: column j is ranked j-th."""
    return np.tile(np.arange(num_gallery, dtype=np.float64), (num_queries, 1))


def cmc_from_first_ranks(first_ranks: list[int], length: int) -> np.ndarray:
    """Expected CMC from 1-based first-hit ranks, built independently of the code under test."""
    return np.array(
        [sum(r <= k for r in first_ranks) / len(first_ranks) for k in range(1, length + 1)],
        dtype=np.float32,
    )


def worked(query_cams: list[int], protocol: str | MetricProtocol = "sysu") -> EvalResult:
    n = len(query_cams)
    return evaluate(
        ranked_distances(n, 8),
        np.full(n, 7),
        WORKED_IDS,
        np.array(query_cams),
        WORKED_CAMS,
        protocol,
    )


# ---------------------------------------------------------------------------------------------
# worked example (protocols.md section 4)


def test_worked_example_cam3_query() -> None:
    res = worked([3])
    # cam2 rule drops (5,c2) (7,c2): list 9 9 12 7 9 7 -> true matches at positions 4 and 6
    assert res.mAP == pytest.approx((1 / 4 + 2 / 6) / 2)  # = 0.2917
    assert res.mAP == pytest.approx(0.2917, abs=5e-5)
    assert res.mINP == pytest.approx(2 / 6)  # = 0.3333
    # collapsed list 9 12 7 -> first hit at rank 3; max_rank 20 clipped to the 8-image gallery
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([3], 8))
    assert res.cmc.dtype == np.float32 and res.num_valid == 1


def test_worked_example_cam3_query_image_level_rank_4() -> None:
    res = worked([3], SYSU_IMAGE)
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([4], 8))  # 7 is the 4th kept image
    assert res.mAP == pytest.approx((1 / 4 + 2 / 6) / 2)  # AP does not depend on the CMC variant


def test_worked_example_cam6_query() -> None:
    res = worked([6])
    # nothing dropped: matches at 2, 6, 8
    assert res.mAP == pytest.approx((1 / 2 + 2 / 6 + 3 / 8) / 3)  # = 29/72 = 0.4028
    assert res.mAP == pytest.approx(0.4028, abs=5e-5)
    assert res.mINP == pytest.approx(3 / 8)  # = 0.375
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([2], 8))  # collapsed list 5 7 ...


def test_worked_example_both_queries_and_reference() -> None:
    res = worked([3, 6])
    assert res.mAP == pytest.approx(((1 / 4 + 2 / 6) / 2 + (1 / 2 + 2 / 6 + 3 / 8) / 3) / 2)
    assert res.mINP == pytest.approx((2 / 6 + 3 / 8) / 2)
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([3, 2], 8))  # [0, .5, 1, 1, ...]
    cmc, m_ap, m_inp = reference_evaluate(
        ranked_distances(2, 8), np.full(2, 7), WORKED_IDS, np.array([3, 6]), WORKED_CAMS, "sysu"
    )
    np.testing.assert_array_equal(res.cmc, cmc)
    assert res.mAP == pytest.approx(m_ap, abs=1e-12) and res.mINP == m_inp
    assert res.as_dict()["R1"] == 0.0 and res.as_dict()["R5"] == 100.0
    assert res.as_dict()["mAP"] == pytest.approx(100 * res.mAP)


# ---------------------------------------------------------------------------------------------
# hand-computed small cases


def test_ties_follow_numpy_default_argsort() -> None:
    rng = np.random.default_rng(7)
    row = rng.integers(0, 3, 40).astype(np.float32)  # only 3 distinct values: ties everywhere
    g_ids = rng.integers(0, 5, 40)
    q_id = 2
    order = np.argsort(row)  # the same call the reference makes on each row

    def expected(order: np.ndarray) -> tuple[float, float, int]:
        ranked = g_ids[order]
        hits = [p for p, gid in enumerate(ranked, start=1) if gid == q_id]
        ap = sum(k / p for k, p in enumerate(hits, start=1)) / len(hits)
        seen: list[int] = []
        for gid in ranked:
            if gid not in seen:
                seen.append(int(gid))
        return ap, len(hits) / hits[-1], seen.index(q_id) + 1

    ap, inp, first = expected(order)
    res = evaluate(row[None, :], np.array([q_id]), g_ids, protocol="regdb")
    assert res.mAP == pytest.approx(ap, abs=1e-12)
    assert res.mINP == pytest.approx(inp, abs=1e-12)
    res_id = evaluate(row[None, :], np.array([q_id]), g_ids, protocol=COLLAPSED_NO_FILTER)
    np.testing.assert_array_equal(res_id.cmc, cmc_from_first_ranks([first], 20))
    # A different tie order (e.g. a stable sort) generally gives other numbers; where it does on
    # this numpy build, this shows the test above really pins the tie order.
    ap_stable, _, _ = expected(np.argsort(row, kind="stable"))
    if not np.array_equal(order, np.argsort(row, kind="stable")) and ap_stable != pytest.approx(ap):
        assert res.mAP != pytest.approx(ap_stable)


def test_invalid_query_is_excluded_from_every_metric() -> None:
    g_ids = np.array([1, 2, 1, 3, 2, 3])
    g_cams = np.array([1, 4, 5, 1, 4, 5])
    dist = ranked_distances(3, 6)
    q_ids = np.array([1, 99, 2])  # id 99 is not in the gallery
    q_cams = np.array([6, 6, 6])
    full = evaluate(dist, q_ids, g_ids, q_cams, g_cams, "sysu")
    valid_only = evaluate(dist[[0, 2]], q_ids[[0, 2]], g_ids, q_cams[[0, 2]], g_cams, "sysu")
    assert (full.num_valid, full.num_queries) == (2, 3)
    np.testing.assert_array_equal(full.cmc, valid_only.cmc)
    assert full.mAP == valid_only.mAP and full.mINP == valid_only.mINP
    # id 1: hits at 1, 3 -> AP (1 + 2/3)/2, INP 2/3, rank 1; id 2: hits at 2, 5 -> AP (1/2 + 2/5)/2,
    # INP 2/5, collapsed list 1 2 -> rank 2
    assert full.mAP == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 5) / 2) / 2)
    assert full.mINP == pytest.approx((2 / 3 + 2 / 5) / 2)
    np.testing.assert_array_equal(full.cmc, cmc_from_first_ranks([1, 2], 6))


def test_sysu_cam3_query_whose_id_is_only_in_cam2_is_invalid() -> None:
    g_ids = np.array([4, 5, 4])
    g_cams = np.array([2, 1, 2])
    dist = ranked_distances(2, 3)
    # same query from cam3 (both id-4 images dropped -> invalid) and from cam6 (valid, AP 1/1 & 2/3)
    res = evaluate(dist, np.array([4, 4]), g_ids, np.array([3, 6]), g_cams, "sysu")
    assert res.num_valid == 1
    assert res.mAP == pytest.approx((1 + 2 / 3) / 2)
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([1], 3))


def test_sysu_camera_rule_drops_other_identities_in_cam2() -> None:
    g_ids = np.array([9, 7, 8, 7])
    g_cams = np.array([2, 1, 2, 4])
    dist = ranked_distances(1, 4)
    cam3 = evaluate(dist, np.array([7]), g_ids, np.array([3]), g_cams, "sysu")
    # (9,c2) and (8,c2) are dropped although they are other identities: list 7 7
    assert cam3.mAP == pytest.approx(1.0) and cam3.mINP == pytest.approx(1.0)
    assert cam3.cmc[0] == 1.0
    cam6 = evaluate(dist, np.array([7]), g_ids, np.array([6]), g_cams, "sysu")
    # nothing dropped: 9 7 8 7 -> hits at 2, 4
    assert cam6.mAP == pytest.approx((1 / 2 + 2 / 4) / 2) and cam6.mINP == pytest.approx(2 / 4)
    np.testing.assert_array_equal(cam6.cmc, cmc_from_first_ranks([2], 4))
    # LLCM's rule only drops same-id-same-camera items: nothing here for a cam3 query
    llcm = evaluate(dist, np.array([7]), g_ids, np.array([3]), g_cams, "llcm")
    assert llcm.mAP == pytest.approx(cam6.mAP)


def test_llcm_drops_same_id_same_camera_but_keeps_other_ids_of_that_camera() -> None:
    g_ids = np.array([7, 9, 7, 9, 7])
    g_cams = np.array([4, 4, 1, 1, 4])
    dist = ranked_distances(1, 5)
    res = evaluate(dist, np.array([7]), g_ids, np.array([4]), g_cams, "llcm")
    # both (7,c4) dropped, (9,c4) kept: list 9 7 9 -> hit at position 2
    assert res.mAP == pytest.approx(1 / 2) and res.mINP == pytest.approx(1 / 2)
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([2], 5))
    # without the rule (SYSU, cam4 query): hits at 1, 3, 5
    sysu = evaluate(dist, np.array([7]), g_ids, np.array([4]), g_cams, "sysu")
    assert sysu.mAP == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_regdb_image_level_cmc_differs_from_collapsed_beyond_rank1() -> None:
    g_ids = np.array([9, 9, 9, 7, 7])
    dist = ranked_distances(2, 5)
    q_ids = np.array([7, 9])
    regdb = evaluate(dist, q_ids, g_ids, protocol="regdb")
    collapsed = evaluate(dist, q_ids, g_ids, protocol=COLLAPSED_NO_FILTER)
    # query 7: image-level first hit 4, collapsed (9 7) rank 2; query 9: rank 1 in both
    np.testing.assert_array_equal(regdb.cmc, cmc_from_first_ranks([4, 1], 5))  # .5 .5 .5 1 1
    np.testing.assert_array_equal(collapsed.cmc, cmc_from_first_ranks([2, 1], 5))  # .5 1 1 1 1
    assert regdb.cmc[0] == collapsed.cmc[0] == 0.5
    assert regdb.cmc[1] < collapsed.cmc[1]
    assert regdb.mAP == pytest.approx(((1 / 4 + 2 / 5) / 2 + 1.0) / 2)
    # RegDB ignores cameras: ones that would trigger either filter change nothing
    with_cams = evaluate(dist, q_ids, g_ids, np.array([3, 9]), np.array([2, 2, 9, 2, 2]), "regdb")
    np.testing.assert_array_equal(with_cams.cmc, regdb.cmc)
    assert with_cams.mAP == regdb.mAP


def test_all_invalid_raises() -> None:
    with pytest.raises(ValueError, match="no valid query"):
        evaluate(ranked_distances(2, 3), np.array([8, 9]), np.array([1, 2, 3]), protocol="regdb")
    with pytest.raises(ValueError, match="no valid query"):  # every match removed by the cam2 rule
        evaluate(
            ranked_distances(1, 2), np.array([1]), np.array([1, 1]), np.array([3]), np.array([2, 2])
        )
    with pytest.raises(ValueError, match="no valid query"):
        reference_evaluate(
            ranked_distances(1, 2), np.array([5]), np.array([1, 1]), None, None, "regdb"
        )


def test_max_rank_larger_than_gallery_is_clipped() -> None:
    g_ids = np.array([3, 1, 2, 1, 3])
    res = evaluate(ranked_distances(1, 5), np.array([1]), g_ids, protocol="regdb", max_rank=20)
    assert len(res.cmc) == 5
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([2], 5))
    # the curve covers the whole gallery, so R10/R20 are its final value
    assert res.as_dict()["R20"] == res.as_dict()["R5"] == 100.0
    cmc, _, _ = reference_evaluate(
        ranked_distances(1, 5), np.array([1]), g_ids, None, None, "regdb", 20
    )
    assert len(cmc) == 5


def test_fewer_distinct_ids_than_max_rank_stays_flat() -> None:
    # 12 images of only 3 identities; the reference would return a 3-long (or ragged) curve
    g_ids = np.array([1, 1, 2, 1, 2, 3, 3, 2, 1, 3, 2, 3])
    dist = ranked_distances(3, 12)
    res = evaluate(dist, np.array([3, 2, 5]), g_ids, protocol=COLLAPSED_NO_FILTER, max_rank=10)
    # collapsed list 1 2 3: id 3 -> rank 3, id 2 -> rank 2, id 5 invalid
    assert len(res.cmc) == 10 and res.num_valid == 2
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([3, 2], 10))
    assert np.all(res.cmc[2:] == 1.0)
    cmc, _, _ = reference_evaluate(
        dist, np.array([3, 2, 5]), g_ids, None, None, COLLAPSED_NO_FILTER, 10
    )
    np.testing.assert_array_equal(res.cmc, cmc)


def test_sysu_short_filtered_list_image_level() -> None:
    # cam3 query keeps 2 of 6 images (< max_rank 6): first hit at kept position 2, curve stays at 1
    g_ids = np.array([1, 4, 2, 4, 4, 4])
    g_cams = np.array([2, 2, 1, 4, 2, 2])
    res = evaluate(
        ranked_distances(1, 6), np.array([4]), g_ids, np.array([3]), g_cams, SYSU_IMAGE, 6
    )
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([2], 6))
    assert res.mAP == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------------------------
# inputs, protocol table, result helpers


def test_input_validation_names_the_argument() -> None:
    dist = ranked_distances(2, 3)
    q, g, qc, gc = np.array([1, 2]), np.array([1, 2, 3]), np.array([3, 6]), np.array([1, 2, 4])
    with pytest.raises(ValueError, match="distmat"):
        evaluate(np.zeros(3), q, g, qc, gc)
    with pytest.raises(ValueError, match="query_ids"):
        evaluate(dist, np.array([1, 2, 3]), g, qc, gc)
    with pytest.raises(ValueError, match="gallery_ids"):
        evaluate(dist, q, np.array([1, 2]), qc, gc)
    with pytest.raises(ValueError, match="gallery_cams"):
        evaluate(dist, q, g, qc, np.array([1, 2]))
    with pytest.raises(ValueError, match="query_cams"):
        evaluate(dist, q, g, None, gc, "llcm")
    with pytest.raises(ValueError, match="query_ids"):
        evaluate(dist, np.array([1.5, 2.0]), g, qc, gc)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(dist, q, g, qc, gc, "market")
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(dist, q, g, qc, gc, max_rank=0)


def test_protocol_table_and_validation() -> None:
    assert METRIC_PROTOCOLS["sysu"].camera_pairs == ((3, 2),)
    assert METRIC_PROTOCOLS["sysu"].cmc == METRIC_PROTOCOLS["llcm"].cmc == "identity"
    assert METRIC_PROTOCOLS["llcm"].exclusion == "same_id_same_camera"
    assert METRIC_PROTOCOLS["regdb"].cmc == "image" and not METRIC_PROTOCOLS["regdb"].uses_cameras
    with pytest.raises(ValueError, match="camera_pairs"):
        MetricProtocol("bad", exclusion="none", camera_pairs=((3, 2),))
    with pytest.raises(ValueError, match="cmc"):
        MetricProtocol("bad", cmc="market")  # type: ignore[arg-type]


def test_torch_inputs_match_numpy() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    dist = rng.random((6, 15)).astype(np.float32)
    q_ids, g_ids = rng.integers(0, 4, 6), rng.integers(0, 4, 15)
    q_cams, g_cams = rng.choice([3, 6], 6), rng.integers(1, 6, 15)
    ref = evaluate(dist, q_ids, g_ids, q_cams, g_cams, "sysu")
    got = evaluate(
        *(torch.from_numpy(a) for a in (dist, q_ids, g_ids, q_cams, g_cams)), protocol="sysu"
    )
    np.testing.assert_array_equal(got.cmc, ref.cmc)
    assert (got.mAP, got.mINP) == (ref.mAP, ref.mINP)
    bf16 = torch.from_numpy(dist).to(torch.bfloat16)  # numpy has no bfloat16: upcast exactly
    got_bf16 = evaluate(bf16, q_ids, g_ids, q_cams, g_cams, "sysu")
    exp_bf16 = evaluate(bf16.float().numpy(), q_ids, g_ids, q_cams, g_cams, "sysu")
    assert got_bf16.mAP == exp_bf16.mAP


def test_result_helpers() -> None:
    res = evaluate(
        ranked_distances(1, 30), np.array([1]), np.arange(30) % 10, protocol="regdb", max_rank=5
    )
    # hits at 2, 12, 22: rank 2
    np.testing.assert_array_equal(res.cmc, cmc_from_first_ranks([2], 5))
    assert set(res.as_dict()) == {"R1", "R5", "mAP", "mINP"}  # R10/R20 unknown with max_rank 5
    with pytest.raises(ValueError, match="beyond"):
        res.rank(10)
    assert "R5 100.00%" in res.format() and "[regdb]" in str(res)
    assert not res.cmc.flags.writeable


def test_chunking_and_collapse_window_do_not_change_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(11)
    dist = rng.integers(0, 6, (37, 90)).astype(np.float32)
    q_ids, g_ids = rng.integers(0, 12, 37), rng.integers(0, 12, 90)
    q_cams, g_cams = rng.integers(1, 7, 37), rng.integers(1, 7, 90)
    for proto in ("sysu", "llcm"):
        cmc, m_ap, m_inp = reference_evaluate(dist, q_ids, g_ids, q_cams, g_cams, proto, 20)
        for window in (1, 3, 256):  # tiny windows force the widening retries
            monkeypatch.setattr(metrics, "_COLLAPSE_WINDOW", window)
            for chunk in (1, 5, None):
                res = evaluate(dist, q_ids, g_ids, q_cams, g_cams, proto, 20, chunk_rows=chunk)
                np.testing.assert_array_equal(res.cmc, cmc)
                assert abs(res.mAP - m_ap) <= 1e-12 and res.mINP == m_inp


# ---------------------------------------------------------------------------------------------
# property test: vectorised == reference loop


@st.composite
def eval_problems(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    num_q = draw(st.integers(1, 6))
    num_g = draw(st.integers(1, 24))
    num_ids = draw(st.integers(1, 7))
    if draw(st.booleans()):  # integer-valued distances: many ties
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
        dist = draw(hnp.arrays(np.int64, (num_q, num_g), elements=st.integers(0, 3))).astype(dtype)
    else:
        dist = draw(
            hnp.arrays(np.float64, (num_q, num_g), elements=st.floats(-1, 1, allow_nan=False))
        )
    ids = st.integers(0, num_ids - 1)
    cams = st.integers(1, 6)
    return (
        dist,
        draw(hnp.arrays(np.int64, num_q, elements=ids)),
        draw(hnp.arrays(np.int64, num_g, elements=ids)),
        draw(hnp.arrays(np.int64, num_q, elements=cams)),
        draw(hnp.arrays(np.int64, num_g, elements=cams)),
    )


@pytest.mark.parametrize("protocol", ["sysu", "llcm", "regdb"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    problem=eval_problems(), max_rank=st.integers(1, 30), chunk_rows=st.sampled_from([None, 1, 2])
)
def test_vectorised_equals_reference(
    protocol: str, problem: tuple[np.ndarray, ...], max_rank: int, chunk_rows: int | None
) -> None:
    try:
        expected = reference_evaluate(*problem, protocol=protocol, max_rank=max_rank)
    except ValueError:
        with pytest.raises(ValueError, match="no valid query"):
            evaluate(*problem, protocol=protocol, max_rank=max_rank, chunk_rows=chunk_rows)
        return
    res = evaluate(*problem, protocol=protocol, max_rank=max_rank, chunk_rows=chunk_rows)
    cmc, m_ap, m_inp = expected
    assert res.cmc.dtype == np.float32 == cmc.dtype
    np.testing.assert_array_equal(res.cmc, cmc)  # exact: integer counts / same float32 division
    assert abs(res.mAP - m_ap) <= 1e-12
    assert abs(res.mINP - m_inp) <= 1e-12
    assert 0.0 <= res.mAP <= 1.0 and 0.0 <= res.mINP <= 1.0


# ---------------------------------------------------------------------------------------------
# benchmark plumbing (tiny sizes)


@pytest.mark.parametrize("protocol", ["sysu", "llcm", "regdb"])
def test_eval_benchmark_small(protocol: str) -> None:
    payload = run_eval_benchmark(num_query=40, num_gallery=150, num_ids=15, protocol=protocol)
    assert payload["config"]["agree"] is True
    assert [row["impl"] for row in payload["rows"]][:2] == [
        "vectorised evaluate()",
        "reference loop",
    ]
    assert payload["speedup"] > 0 and payload["rows"][0]["seconds"] > 0


def test_write_report_and_cli(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = {
        "machine": machine_info(),
        "rows": [{"impl": "a", "seconds": 1.5}, {"impl": "b", "x": 2}],
    }
    json_path, md_path = write_report("demo", payload, tmp_path / "out")
    assert json.loads(json_path.read_text())["rows"] == payload["rows"]
    md = md_path.read_text()
    assert "| impl | seconds | x |" in md and "| b |  | 2 |" in md
    assert socket.gethostname() not in payload["machine"].values()
    with pytest.raises(ValueError, match="name"):
        write_report("../escape", payload, tmp_path)

    assert (
        bench_main(
            [
                "--num-query",
                "20",
                "--num-gallery",
                "60",
                "--num-ids",
                "10",
                "--protocol",
                "llcm",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "eval_speed_llcm_20x60.json").is_file()
    assert "speedup" in capsys.readouterr().out
