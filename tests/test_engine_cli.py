"""`python -m offline train-experts / build` engine flags: the shard comes from JOB_COMPLETION_INDEX (a Kubernetes
Indexed Job) unless given, the engine and its shares reach the pipeline, and bad combinations are 2s naming the
flag. The pipeline itself is recorded here, not run (tests/test_engine_ray.py runs it on both engines)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from offline import pipeline
from offline.__main__ import cli
from offline.engine import LocalEngine


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "make_context", lambda config, out: SimpleNamespace(experts_dir=out))
    monkeypatch.setattr(pipeline, "step_train_experts",
                        lambda ctx, shard, num_shards, engine: calls.append((shard, num_shards, engine)) or [])
    return calls


def test_shard_is_read_from_job_completion_index(recorded, tmp_path):
    runner = CliRunner()
    args = ["train-experts", "--tiny", "--out", str(tmp_path / "s"), "--num-shards", "4"]
    assert runner.invoke(cli, args, env={"JOB_COMPLETION_INDEX": "3"}).exit_code == 0
    assert runner.invoke(cli, [*args, "--shard", "1"], env={"JOB_COMPLETION_INDEX": "3"}).exit_code == 0
    assert runner.invoke(cli, args, env={"JOB_COMPLETION_INDEX": None}).exit_code == 0
    assert [(s, n) for s, n, _ in recorded] == [(3, 4), (1, 4), (0, 4)]
    assert all(isinstance(e, LocalEngine) for _, _, e in recorded), "local stays the default engine"


@pytest.mark.parametrize("extra, message", [
    (["--engine", "spark"], "unknown engine 'spark'"),
    (["--address", "127.0.0.1:6379"], "--address needs --engine ray"),
    (["--engine", "ray", "--task-cpus", "0"], "positive CPU or GPU share"),
])
def test_bad_engine_flags_are_usage_errors(recorded, tmp_path, extra, message):
    result = CliRunner().invoke(cli, ["train-experts", "--tiny", "--out", str(tmp_path / "s"), *extra])
    assert result.exit_code == 2, result.output
    words = " ".join(w for w in result.output.split() if w not in "│╭╰")  # rich's error box wraps lines
    assert message in words, result.output
    assert recorded == []
