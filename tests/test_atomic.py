"""A crash while a result file is written loses nothing: the file is the old one or the
new one, never torn (metrics.jsonl rewritten on resume, summary.json, data.json)."""

from __future__ import annotations

import json
import os

import pytest

from drdfl_flwr.atomic import append_line, write_atomically
from drdfl_flwr.results import ResultsWriter


class CrashError(RuntimeError):
    pass


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomically(path, '{"old": 1}')

    def crash(src, dst):
        raise CrashError

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CrashError):
        write_atomically(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"old": 1}


def test_a_resume_that_crashes_while_rewriting_keeps_the_history(tmp_path, monkeypatch):
    """On resume the writer rewrites metrics.jsonl without its torn last line; before,
    it truncated the file in place, so a crash there lost every round."""
    config = {"method": "local"}
    writer = ResultsWriter(tmp_path, config, run_key="k")
    for r in (1, 2):
        writer.log_round({"round": r, "mean": {}, "std": {}, "seconds": 1.0})
    append_line(tmp_path / "metrics.jsonl", '{"round": 3, "mea')  # the crash's torn line
    before = (tmp_path / "metrics.jsonl").read_text()

    def crash(src, dst):
        raise CrashError

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CrashError):
        ResultsWriter(tmp_path, config, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    monkeypatch.undo()
    resumed = ResultsWriter(tmp_path, config, resume=True)
    assert resumed.completed_rounds == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
