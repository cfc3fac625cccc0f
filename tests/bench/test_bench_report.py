"""benchmarks.report: the performance page renders from a results file, and its judging words follow the
figures (a regression in the numbers changes the sentence, not only the number)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict

import pytest

from benchmarks import prose, report

RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "2026-11-25-vm.json"


@pytest.fixture
def result() -> Dict[str, Any]:
    return json.loads(RECORDED.read_text())


def row(result: Dict[str, Any], key: str) -> Dict[str, Any]:
    (found,) = [r for r in result["rows"] if r["key"] == key]
    return found


def line_about(page: str, start: str) -> str:
    (found,) = [line for line in page.splitlines() if line.startswith(start)]
    return found


def test_the_recorded_run_renders_every_placeholder(result: Dict[str, Any]) -> None:
    page = report.render(result)
    assert "${" not in page and "$table" not in page
    assert "| section | figure |" in page


@pytest.mark.parametrize("path", sorted(RECORDED.parent.glob("*.json")), ids=lambda p: p.name)
def test_every_committed_run_renders_with_the_current_template(path: Path) -> None:
    page = report.render(json.loads(path.read_text()))  # an older run lacks peers added since: "not measured"
    assert "| section | figure |" in page and "${" not in page


def test_the_page_names_the_log_size_actually_followed(result: Dict[str, Any]) -> None:
    followed = row(result, "logs.bytes_ratio")["ours"]["detail"]["bytes"]
    assert followed != result["params"]["log_bytes"]  # this run halved it
    page = report.render(result)
    assert f"followed {followed >> 20} MiB (not the 1 GiB the run aims at" in page


def test_a_log_followed_at_its_target_size_says_so(result: Dict[str, Any]) -> None:
    detail = row(result, "logs.bytes_ratio")["ours"]["detail"]
    detail["bytes"] = detail["target_bytes"]
    assert prose.derived(result)["logs__size_note"] == "the size the run aims at"


def test_history_reads_flat_until_a_figure_grows_with_the_history(result: Dict[str, Any]) -> None:
    flat = line_about(report.render(result), "- `status ID`")
    assert flat.endswith("flat from 10,000 to 100,000 jobs")
    grown = copy.deepcopy(result)
    status = row(grown, "history.status_100000")["ours"]
    status["p50"] = row(grown, "history.status_10000")["ours"]["p50"] * 9
    line = line_about(report.render(grown), "- `status ID`")
    assert "x9.00 from 10,000" in line and line.endswith("O(n): x9.0 for x10 the history")


def test_burst_cpu_words_follow_the_measured_cpu(result: Dict[str, Any]) -> None:
    assert prose.derived(result)["burst__cores_busy"] == "the machine's 2 cores were 99% busy"
    for run in row(result, "burst.rate")["ours"]["detail"]["runs"]:
        run["cpu_s"]["machine"] /= 4
    assert prose.derived(result)["burst__cores_busy"] == "the machine's 2 cores were 25% busy"


def test_a_follow_that_does_not_slow_other_clients_is_not_called_slow(result: Dict[str, Any]) -> None:
    assert "up to 4.8x slower" in prose.derived(result)["logs__get_verdict"]
    get = row(result, "logs.get_during_follow")
    get["ours"]["max"] = get["peers"][0]["max"] * 1.1
    assert prose.derived(result)["logs__get_verdict"].startswith("another client's calls were barely slowed")


def test_before_and_after_stand_side_by_side_from_the_earlier_run(result: Dict[str, Any],
                                                                  tmp_path: Path) -> None:
    later = copy.deepcopy(result)
    later["started_at"] = "2099-01-01T00:00:00+00:00"
    row(later, "gpu.tick")["ours"]["p50"] = 0.004
    (tmp_path / "earlier.json").write_text(json.dumps(result))
    (tmp_path / "later.json").write_text(json.dumps(later))
    page = report.render(later, results=tmp_path)
    line = line_about(page, "| GPU watcher: one watch tick")
    assert "50.7 ms" in line and "4.00 ms" in line  # before, then after
    assert "no earlier full run" in report.render(result, results=tmp_path)


def test_the_first_kept_run_has_a_table_of_its_own_once_there_are_two_before(result: Dict[str, Any],
                                                                             tmp_path: Path) -> None:
    middle, later = copy.deepcopy(result), copy.deepcopy(result)
    middle["started_at"], later["started_at"] = "2098-01-01T00:00:00+00:00", "2099-01-01T00:00:00+00:00"
    row(middle, "gpu.tick")["ours"]["p50"] = 0.02
    row(later, "gpu.tick")["ours"]["p50"] = 0.004
    (tmp_path / "first.json").write_text(json.dumps(result))
    (tmp_path / "middle.json").write_text(json.dumps(middle))
    page = report.render(later, results=tmp_path)
    since_first = page.split("## Since the first recorded run")[1]
    assert f"the run of {result['started_at']}" in since_first
    assert "50.7 ms" in line_about(since_first, "| GPU watcher: one watch tick")
    (tmp_path / "middle.json").unlink()
    assert "is the first kept" in report.render(later, results=tmp_path)
