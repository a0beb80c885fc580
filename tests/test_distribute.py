"""Scale-out: tf.distribute strategies on CPU, sharding, chief-only writes, resume, tf.data service.

The strategies run in fresh processes: ``MirroredStrategy`` needs the CPU split into logical devices
before TensorFlow starts (tests/run_with_cpus.py), and ``MultiWorkerMirroredStrategy`` needs one
process per worker, talking over 127.0.0.1. Every process has a time limit and ends by itself.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_dataset
from toolkit.config.recipes import RecipeError, build_config
from toolkit.train.distribute import evaluation_length, padded, read_tf_config, shard

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 420  # per process; a hung collective fails the test instead of hanging CI


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("n,count", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4)])
def test_shards_partition_the_data_and_evaluation_shards_line_up(n, count):
    shards = [shard(n, i, count) for i in range(count)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    for multiple in (1, 4, 8):
        length = evaluation_length(n, count, multiple)
        assert length % multiple == 0 and length >= max(len(s) for s in shards) and length > 0
        weights_total = 0.0
        for part in shards:
            indices, weights = padded(part, length)
            assert len(indices) == length  # every worker: the same number of evaluation steps
            np.testing.assert_array_equal(indices[: len(part)], part)
            weights_total += weights.sum()
            assert set(weights[len(part):]) <= {0.0}
        assert weights_total == n  # every real item counted once


def test_tf_config_errors_say_what_to_set(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable.*TF_CONFIG unset"):
        read_tf_config()
    monkeypatch.setenv("TF_CONFIG", "{cluster")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_tf_config()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ValueError, match="task.index 3 is outside cluster.worker"):
        read_tf_config()
    good = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(good))
    assert read_tf_config() == good


def test_strategy_and_data_service_settings_are_checked(tmp_path):
    with pytest.raises(RecipeError, match=r"strategy='mirror'; allowed: auto, default, mirrored, multi-worker"):
        build_config(None, {"data": "d", "strategy": "mirror"})
    with pytest.raises(RecipeError, match=r"grpc://host:port. Received: data_service='localhost'"):
        build_config(None, {"data": "d", "data_service": "localhost"})
    from toolkit.api import train

    with pytest.raises(ValueError, match="multi-worker needs --out"):
        train(build_config(None, {"data": str(tmp_path), "strategy": "multi-worker"}))


# ----------------------------------------------------------------------------- processes


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[int]:
    deadline = time.time() + LIMIT_S
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a worker did not finish within {LIMIT_S} s; logs: {[str(p) for p in logs]}\n"
                        + "\n".join(p.read_text()[-3000:] for p in logs))
    return codes


def _start_workers(args: list[str], tmp: Path, tag: str, count: int = 2) -> tuple[list[subprocess.Popen], list[Path]]:
    """``count`` processes running ``toolkit ARGS`` as one MultiWorkerMirroredStrategy cluster on loopback."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(count)]}
    procs, logs = [], []
    for index in range(count):
        log = tmp / f"{tag}-worker{index}.log"
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "toolkit.cli.main", *args], cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT, env=_env(TF_CONFIG=tf_config)))
        logs.append(log)
    return procs, logs


def _run_workers(args: list[str], tmp: Path, tag: str) -> list[str]:
    procs, logs = _start_workers(args, tmp, tag)
    codes = _finish(procs, logs)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    return texts


def _run_mirrored(args: list[str], tmp: Path, tag: str) -> str:
    log = tmp / f"{tag}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "run_with_cpus.py"), "2", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=_env())
    assert _finish([proc], [log]) == [0], log.read_text()[-3000:]
    return log.read_text()


# A small real subset of hymenoptera: 40 training images per class, the whole validation split (153).
SUBSET_RECIPE = """
image_size = 128
batch_size = 8
head_epochs = 12
freeze = "stage7"
finetune_epochs = 2
cache_views = 2
seed = 0
"""


@pytest.fixture(scope="module")
def hymenoptera_subset(tmp_path_factory) -> tuple[Path, Path]:
    root = shared_dataset("hymenoptera")
    folder = tmp_path_factory.mktemp("hymenoptera-subset")
    manifest = folder / "subset.csv"  # absolute paths into ../shared: nothing is copied
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for label in ("ants", "bees"):
            for path in sorted((root / "train" / label).iterdir())[:40]:
                writer.writerow([str(path), label, "train"])
            for path in sorted((root / "val" / label).iterdir()):
                writer.writerow([str(path), label, "val"])
    recipe = folder / "subset.toml"
    recipe.write_text(SUBSET_RECIPE)
    return manifest, recipe


@pytest.fixture(scope="module")
def one_process_accuracy(hymenoptera_subset, tmp_path_factory) -> float:
    from toolkit.api import train

    manifest, recipe = hymenoptera_subset
    out = tmp_path_factory.mktemp("one-process") / "run"
    result = train(build_config(recipe, {"data": str(manifest), "strategy": "default"}), out=out, verbose=0)
    assert result.metrics["strategy"]["replicas"] == 1
    return result.metrics["val_accuracy"]


def _subset_finetune_args(subset: tuple[Path, Path], out: Path, strategy: str) -> list[str]:
    manifest, recipe = subset
    return ["finetune", "--data", str(manifest), "--recipe", str(recipe), "--out", str(out), "--strategy", strategy]


def _assert_same_accuracy(metrics: dict, one_process: float, label: str) -> None:
    """The bar for distribution: the same validation accuracy as one process, within 2 points."""
    print(f"validation accuracy: one process {one_process:.4f}, {label} {metrics['val_accuracy']:.4f}")
    assert abs(metrics["val_accuracy"] - one_process) <= 0.02, (metrics["val_accuracy"], one_process)


@pytest.mark.slow
@pytest.mark.shared_data
def test_mirrored_over_two_cpu_devices_matches_one_process(hymenoptera_subset, one_process_accuracy, tmp_path):
    out = tmp_path / "mirrored"
    log = _run_mirrored(_subset_finetune_args(hymenoptera_subset, out, "mirrored"), tmp_path, "mirrored")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == {"kind": "mirrored", "replicas": 2, "workers": 1, "global_batch": 16}
    assert "2 replicas in sync" in log and "learning rates x 2" in log
    assert metrics["finetune_best_epoch"] >= 1  # stage 2 ran on images under the strategy
    _assert_same_accuracy(metrics, one_process_accuracy, "mirrored")


@pytest.mark.slow
@pytest.mark.shared_data
def test_two_workers_on_loopback_match_one_process_and_only_the_chief_writes(hymenoptera_subset, one_process_accuracy, tmp_path):
    out = tmp_path / "multi"
    logs = _run_workers(_subset_finetune_args(hymenoptera_subset, out, "multi-worker"), tmp_path, "multi")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == {"kind": "multi-worker", "replicas": 2, "workers": 2, "global_batch": 16}
    assert "worker 0 of 2 (chief)" in logs[0] and "worker 1 of 2;" in logs[1]
    # Each worker cached the features of its own shard; only the chief's is in the run folder.
    assert [p.name for p in (out / "cache").iterdir()] == ["features-0of2.npz"]
    cached = np.load(out / "cache" / "features-0of2.npz")
    assert len(cached["val_y"]) == len(shard(153, 0, 2))
    assert not list(out.glob(".tmp-*"))
    _assert_same_accuracy(metrics, one_process_accuracy, "2 workers")


@pytest.mark.slow
def test_two_workers_resume_after_both_are_killed(sample_data, tmp_path):
    run = tmp_path / "run"
    args = ["finetune", "--data", str(sample_data), "--out", str(run), "--image-size", "64", "--batch-size", "8",
            "--head-epochs", "3", "--freeze", "stage7", "--finetune-epochs", "4", "--cache-views", "2", "--finetune-lr", "0.0001",
            "--strategy", "multi-worker"]
    procs, logs = _start_workers(args, tmp_path, "first")
    state_file = run / "state.json"
    deadline = time.time() + LIMIT_S
    killed_after = None
    while time.time() < deadline and all(p.poll() is None for p in procs):
        try:
            done = json.loads(state_file.read_text()).get("finetune", {}).get("epochs_done", 0)
        except (FileNotFoundError, json.JSONDecodeError):
            done = 0
        if done >= 2:
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()
            killed_after = done
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    assert killed_after is not None, "the run finished or stalled before it could be killed:\n" + logs[0].read_text()[-3000:]
    assert not (run / "model.keras").exists()

    texts = _run_workers(["finetune", "--resume", str(run)], tmp_path, "resumed")
    assert all("resuming after epoch" in t for t in texts), texts[1][-3000:]
    # The other worker restored the same checkpoint: both end with the same model, hence the same accuracy.
    finals = [next(line for line in t.splitlines() if line.startswith("validation accuracy:")) for t in texts]
    assert finals[0] == finals[1], finals
    state = json.loads(state_file.read_text())
    epochs = [row["epoch"] for row in state["finetune"]["history"]]
    assert epochs == sorted(set(epochs)) and epochs[0] == 1 and len(epochs) >= killed_after
    assert state["finished"] and (run / "model.keras").is_file()


# ----------------------------------------------------------------------------- tf.data service


@pytest.mark.slow
def test_training_images_can_come_from_a_tf_data_service_on_loopback(sample_data, tmp_path):
    from toolkit.api import train
    from toolkit.data.datasets import load_splits
    from toolkit.data.pipeline import make_dataset
    from toolkit.train import distribute

    dispatcher = distribute.start_dispatcher(0)
    worker = distribute.start_worker(dispatcher.target, 0)
    splits = load_splits(str(sample_data), 0.2, 0)
    local = make_dataset(splits.train, 64, 16, training=True, seed=1)
    remote = distribute.offload(local, dispatcher.target)
    labels, shapes = [], set()
    for images, batch_labels in remote:
        labels += batch_labels.numpy().tolist()
        shapes.add(tuple(images.shape[1:]))
        assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 255.0
    assert sorted(labels) == sorted(splits.train.labels)  # one epoch: every image exactly once
    assert shapes == {(64, 64, 3)}
    assert worker._num_tasks() >= 1  # the epoch was produced by the service's worker (private counter)

    config = build_config(None, {"data": str(sample_data), "image_size": 64, "batch_size": 16, "head_epochs": 8,
                                 "freeze": "all", "cache_features": "off", "data_service": dispatcher.target})
    result = train(config, out=tmp_path / "run", verbose=0)
    assert result.metrics["val_accuracy"] >= 0.7
    recipe = (tmp_path / "run" / "recipe.toml").read_text()
    assert f'data_service = "{dispatcher.target}"' in recipe


def test_data_service_command_starts_a_dispatcher(tmp_path):
    port = _free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli.main", "data-service", "dispatcher", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        assert f"grpc://localhost:{port}" in line and "--data-service" in line
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # it is listening
    finally:
        proc.kill()
        proc.wait()
