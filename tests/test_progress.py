"""Progress off a terminal: plain lines at a set rate (counts, elapsed, time left, what the work
reports), from training loops and sweeps, and nothing for work done within one interval."""

from __future__ import annotations

import io
import re

import pytest
import torch

from flexmerge._progress import Progress, clock


@pytest.fixture
def shown(monkeypatch):
    monkeypatch.delenv("FLEXMERGE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("FLEXMERGE_PROGRESS_INTERVAL", "0")


def test_plain_lines_count_time_and_fields(shown):
    out = io.StringIO()
    with Progress("fine-tuning a (task 1 of 2)", 4, "steps", stream=out) as bar:
        for step in range(4):
            bar.update(loss=1.0 / (step + 1))
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # one per update at interval 0, and the closing one
    assert re.fullmatch(r"fine-tuning a \(task 1 of 2\): 2/4 steps, loss 0\.5, 0:00 elapsed, ~0:00 left", lines[1])
    assert lines[-1].endswith("done") and "4/4 steps" in lines[-1]


def test_work_within_one_interval_prints_nothing(monkeypatch):
    monkeypatch.delenv("FLEXMERGE_NO_PROGRESS", raising=False)
    out = io.StringIO()
    with Progress("quick", 3, stream=out, interval=60) as bar:
        for _ in range(3):
            bar.update()
    assert out.getvalue() == ""


def test_silenced(monkeypatch):
    monkeypatch.setenv("FLEXMERGE_NO_PROGRESS", "1")
    out = io.StringIO()
    with Progress("x", 2, stream=out, interval=0) as bar:
        bar.update()
    assert out.getvalue() == ""


def test_clock():
    assert clock(7) == "0:07" and clock(125) == "2:05" and clock(3725) == "1:02:05"


def test_training_reports_its_steps_and_loss(shown, capsys):
    from flexmerge.suites.training import train

    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    head = torch.nn.Linear(3, 2)
    train(lambda i: head(x[i]), head.parameters(), y, epochs=2, batch_size=10, lr=0.1, seed=0,
          desc="fine-tuning t (task 2 of 8)")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fine-tuning t (task 2 of 8): 1/4 steps, loss ")
    assert err[-1].startswith("fine-tuning t (task 2 of 8): 4/4 steps, loss ") and err[-1].endswith("done")


def test_a_sweep_reports_points_done_of_total_and_what_it_evaluates(shown, capsys, zoo):
    import flexmerge
    from flexmerge.curve import sweep

    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    sweep(tasks, lambda task, sd: 1.0, methods=["task_arithmetic", "ties"], sizes=[1, 2, 4])
    err = capsys.readouterr().err.splitlines()
    points = [line for line in err if line.startswith("sweep: ")]
    assert any(re.match(r"sweep: \d/7 points, now ties/greedy at 2x, \d:\d\d elapsed, ~\d:\d\d left", line)
               for line in points), points
    assert points[-1].startswith("sweep: 7/7 points") and points[-1].endswith("done")
