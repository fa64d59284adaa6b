"""Tests for pipo_jax.train.metrics: JSONL records and TensorBoard event files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from pipo_jax.train.metrics import JSONL_FILE, MetricWriter, read_jsonl


def read_events(log_dir: Path) -> list[event_pb2.Event]:
    """Parses every TFRecord-framed event file in ``log_dir`` (no TensorFlow needed).

    Each record is: uint64 length, uint32 length CRC, payload, uint32 payload CRC.
    """
    events = []
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            pos += 12
            event = event_pb2.Event()
            event.ParseFromString(data[pos:pos + length])
            events.append(event)
            pos += length + 4
    return events


def scalar_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(log_dir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path, prefix="sft") as writer:
        writer.write_scalars(0, {"loss_backbone": jnp.asarray(2.5), "lr": np.float32(0.125)})
        writer.write_scalars(20, {"loss_backbone": 1.5, "accepted": np.int64(3), "ok": True})
        writer.write_scalars(40, {"loss_backbone": float("nan"), "grad_norm": jnp.inf})
    assert read_jsonl(tmp_path / JSONL_FILE) == [
        {"step": 0, "loss_backbone": 2.5, "lr": 0.125},
        {"step": 20, "loss_backbone": 1.5, "accepted": 3.0, "ok": 1.0},
        {"step": 40, "loss_backbone": None, "grad_norm": None},
    ]
    # The file itself is strict JSON: no NaN/Infinity tokens.
    assert "NaN" not in (tmp_path / JSONL_FILE).read_text()
    scalars = scalar_events(tmp_path)
    assert scalars["sft/lr"] == [(0, 0.125)]
    steps, values = zip(*scalars["sft/loss_backbone"], strict=True)
    assert steps == (0, 20, 40) and values[:2] == (2.5, 1.5) and math.isnan(values[2])
    assert scalars["sft/grad_norm"] == [(40, math.inf)]


def test_text_and_unprefixed_tags(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_text(1, "sample", "12+34=<think>46")
        # Every write is on disk at once, while the writer is still open.
        assert scalar_events(tmp_path) == {"loss": [(1, 1.0)]}
    tags = {v.tag for e in read_events(tmp_path) for v in e.summary.value}
    assert any(tag.startswith("sample") for tag in tags), tags


def test_reopen_appends_and_survives_torn_line(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write_scalars(1, {"loss": 1.0})
    with (tmp_path / JSONL_FILE).open("a") as f:
        f.write('{"step": 2, "lo')  # a write cut short by a crash
    with MetricWriter(tmp_path) as writer:
        writer.write_scalars(2, {"loss": 0.5})
    with pytest.warns(UserWarning, match="unparsable"):
        records = read_jsonl(tmp_path)
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    # Each writer gets its own event file, even when reopened within the same second.
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert sorted(scalar_events(tmp_path)["loss"]) == [(1, 1.0), (2, 0.5)]


def test_rejects_misuse(tmp_path):
    writer = MetricWriter(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        writer.write_scalars(0, {"step": 1.0})
    with pytest.raises(ValueError, match="scalar"):
        writer.write_scalars(0, {"loss": np.ones(2)})
    writer.flush()
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_scalars(1, {"loss": 1.0})
    # The rejected writes left no partial record behind.
    assert read_jsonl(tmp_path) == []


def test_compare_runs_finds_any_changed_value(tmp_path):
    """``benchmarks.compare_runs``, the bit-identity proof of a refactor: equal logs pass
    (wall-clock values aside), one changed loss fails."""
    from benchmarks.compare_runs import compare_stage

    runs = {"a": (1.25, 10.0), "b": (1.25, 99.0), "c": (1.2500001, 10.0)}
    for run, (loss, speed) in runs.items():
        stage = tmp_path / run / "sft"
        stage.mkdir(parents=True)
        (stage / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss": 2.0, "tokens_per_second": speed}) + "\n"
            + json.dumps({"step": 2, "loss": loss, "tokens_per_second": speed}) + "\n")
    same = compare_stage(tmp_path / "a" / "sft", tmp_path / "b" / "sft")
    assert same["identical"] and same["values"] == 4
    changed = compare_stage(tmp_path / "a" / "sft", tmp_path / "c" / "sft")
    assert not changed["identical"]
    assert changed["differences"] == [{"step": 2, "key": "loss", "before": 1.25,
                                       "after": 1.2500001}]
