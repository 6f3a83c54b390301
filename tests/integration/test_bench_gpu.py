"""``dist-reid bench gpu``: skips cleanly without CUDA; runs parts under their limits and the
budget, and records what each did (status, seconds, figures, log) when there is one."""

from __future__ import annotations

import json
import sys

from dist_reid.bench.gpu import Part, _summarise_tests, default_parts, main, run_gpu_suite
from dist_reid.cli import main as cli_main


def test_without_cuda_every_part_is_skipped_and_the_report_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli_main(["bench", "gpu", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["part"] for r in payload["rows"]] == [p.name for p in default_parts()]
    assert {r["status"] for r in payload["rows"]} == {"skipped: no CUDA device"}
    assert payload["machine"]["torch"] and "driver" in payload["machine"]
    assert "no CUDA device" in (tmp_path / "gpu.md").read_text()
    assert sum(p.timeout_s for p in default_parts()) <= 480  # the 8-minute budget


def _python(code: str):
    return lambda folder: [sys.executable, "-c", code.replace("FOLDER", str(folder))]


def test_parts_run_under_their_limits_and_the_budget(tmp_path):
    writes = (
        "import json, pathlib; pathlib.Path(r'FOLDER', 'x.json').write_text(json.dumps({'v': 7}))"
    )
    parts = [
        Part("ok", _python(writes), 30, lambda f: json.loads((f / "x.json").read_text())),
        Part("fails", _python("import sys; print('boom'); sys.exit(3)"), 30),
        Part("slow", _python("import time; time.sleep(60)"), 60),
        Part("late", _python("pass"), 30),
    ]
    payload = run_gpu_suite(tmp_path, parts, budget_s=6.0, cuda=True)
    rows = {r["part"]: r for r in payload["rows"]}
    assert rows["ok"]["status"] == "ok" and rows["ok"]["figures"] == {"v": 7}
    assert rows["fails"]["status"] == "failed (exit 3)" and rows["fails"]["log_tail"] == ["boom"]
    assert rows["slow"]["status"].startswith("timed out after")
    assert rows["slow"]["seconds"] < 10  # cut at what was left of the 6 s, not its own 60 s
    assert rows["late"]["status"] == "skipped: budget spent"
    assert (tmp_path / "fails" / "log.txt").read_text().strip() == "boom"
    md = (tmp_path / "gpu.md").read_text()
    assert "| ok | ok |" in md and "failed (exit 3)" in md


def test_test_counts_come_from_the_junit_report(tmp_path):
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="9" failures="1" errors="0" skipped="3">'
        "</testsuite></testsuites>"
    )
    assert _summarise_tests(tmp_path) == {
        "tests": 9,
        "failures": 1,
        "errors": 0,
        "skipped": 3,
        "passed": 5,
    }


def test_unknown_part_is_named(tmp_path, capsys):
    try:
        main(["--out", str(tmp_path), "--parts", "train,warp"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unknown ['warp']" in capsys.readouterr().err
