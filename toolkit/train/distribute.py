"""Scale-out with ``tf.distribute``: the same command on one CPU, N GPUs or N machines.

``--strategy``:

* ``auto``: ``MirroredStrategy`` over the visible GPUs when there are two or
  more, else the default (single-device) strategy;
* ``default``: one device;
* ``mirrored``: ``MirroredStrategy`` over every visible GPU, or over the
  logical CPU devices when there is no GPU (how the tests run it);
* ``multi-worker``: ``MultiWorkerMirroredStrategy`` configured by the standard
  ``TF_CONFIG`` environment variable, one process per machine.

The batch size of a recipe is *per replica*: the global batch is
``batch_size x replicas`` and both learning rates are scaled by ``replicas``
(the linear scaling rule of Goyal et al. 2017). Each worker reads only its own
shard of the files (:func:`shard`), before any decoding.

Keras 3 and ``MultiWorkerMirroredStrategy``: ``Model.fit`` reduces nested
structures and scalar logs with ``Strategy.reduce``, which the collective
strategy does not accept (keras-team/keras#20585, tensorflow/tensorflow#72388).
:class:`_KerasMultiWorkerStrategy` subclasses the strategy so that its
``reduce`` maps over structures and reduces scalars over replicas; nothing of
TensorFlow or Keras is patched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import numpy as np
import tensorflow as tf

from toolkit.config.settings import STRATEGIES
from toolkit.data.pipeline import finish

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Scale:
    """A strategy and where this process stands in it."""

    strategy: tf.distribute.Strategy
    kind: str  # "default", "mirrored" or "multi-worker"
    replicas: int
    workers: int = 1
    worker_index: int = 0
    is_chief: bool = True

    @property
    def distributed(self) -> bool:
        return self.replicas > 1 or self.workers > 1

    @property
    def local_replicas(self) -> int:
        return self.replicas // self.workers

    def global_batch(self, per_replica: int) -> int:
        return per_replica * self.replicas

    def scale_lr(self, lr: float) -> float:
        """Linear scaling: the global batch grows with the replicas, so does the learning rate."""
        return lr * self.replicas

    def describe(self) -> str:
        if not self.distributed:
            return "default strategy (one device)"
        devices = ", ".join(self.strategy.extended.worker_devices)
        where = f"worker {self.worker_index} of {self.workers}{' (chief)' if self.is_chief else ''}; " if self.workers > 1 else ""
        return f"{self.kind}: {self.replicas} replicas in sync; {where}local devices {devices}"

    def distribute(self, build: Callable[[int, int], tf.data.Dataset]):
        """A dataset for ``fit`` under the strategy.

        ``build(shard_index, shard_count)`` returns this input pipeline's
        dataset, batched per replica. Without distribution it is called once
        with (0, 1) and returned as it is.
        """
        if not self.distributed:
            return build(0, 1)
        options = tf.data.Options()
        # The pipelines shard themselves (by file, before decoding); tf.distribute must not shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF

        def fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            return build(context.input_pipeline_id, context.num_input_pipelines).with_options(options)

        return self.strategy.distribute_datasets_from_function(fn)


def shard(n: int, index: int, count: int) -> np.ndarray:
    """Indices of shard ``index`` of ``count`` over ``n`` items: every count-th, from ``index``."""
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}). Received: index={index!r}")
    return np.arange(index, n, count)


def evaluation_length(n: int, count: int, multiple: int) -> int:
    """Items per shard for evaluation: the longest shard, rounded up to a multiple of the local batch.

    Every worker then runs the same number of evaluation steps (a worker with fewer would leave the
    others waiting in a collective), and no replica ever gets an empty batch (which TensorFlow fills
    with a dummy tensor that breaks 4-D inputs, such as cached feature maps).
    """
    longest = -(-n // count)
    return max(-(-longest // multiple) * multiple, multiple)


def padded(indices: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` padded to ``length`` with weight-0 repeats, and the weights (1 for real items).

    Weighted metrics then count every real item exactly once.
    """
    missing = length - len(indices)
    if missing < 0:
        raise ValueError(f"cannot pad {len(indices)} items to {length}")
    filler = indices[:1] if len(indices) else np.zeros(1, int)
    out = np.concatenate([indices, np.repeat(filler, missing)]).astype(int)
    return out, np.concatenate([np.ones(len(indices), np.float32), np.zeros(missing, np.float32)])


def read_tf_config() -> dict:
    """``TF_CONFIG``, checked: a cluster with workers and this process's task."""
    raw = os.environ.get("TF_CONFIG", "")
    fix = ('set it on every machine, e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
           '"task": {"type": "worker", "index": 0}}\' (see docs/guide/scaling.md)')
    if not raw:
        raise ValueError(f"--strategy multi-worker needs the TF_CONFIG environment variable. Received: TF_CONFIG unset; {fix}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON ({exc}). Received: TF_CONFIG={raw!r}; {fix}") from None
    cluster, task = config.get("cluster", {}), config.get("task", {})
    members = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if not members or task.get("type") not in ("worker", "chief") or not isinstance(task.get("index"), int):
        raise ValueError(f"TF_CONFIG needs cluster.worker (and optionally cluster.chief) and task.type/task.index. "
                         f"Received: TF_CONFIG={raw!r}; {fix}")
    if task["index"] >= len(cluster.get(task["type"], [])):
        raise ValueError(f"TF_CONFIG task.index {task['index']} is outside cluster.{task['type']} "
                         f"({len(cluster.get(task['type'], []))} entries). Received: TF_CONFIG={raw!r}")
    return config


def resolve(name: str) -> Scale:
    """Create the strategy named by ``--strategy``; call it before TensorFlow runs anything else."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy. Received: strategy={name!r}; allowed: {', '.join(STRATEGIES)}")
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return Scale(tf.distribute.get_strategy(), "default", 1)
    if name == "mirrored":
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return Scale(strategy, "mirrored", strategy.num_replicas_in_sync)
    config = read_tf_config()
    strategy = _KerasMultiWorkerStrategy()
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    cluster = config["cluster"]
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    # The chief is task "chief", or worker 0 when the cluster has none (Keras' rule).
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)
    index = task_id + (1 if task_type == "worker" and "chief" in cluster else 0)
    return Scale(strategy, "multi-worker", strategy.num_replicas_in_sync, workers, index, is_chief)


class _KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3's ``fit`` gives it.

    Keras reduces the first batch (a tuple) to build the model, and every
    step's logs (scalars) with ``axis=0``; the base class accepts neither.
    """

    def reduce(self, reduce_op, value, axis):
        def one(v):
            local = self.experimental_local_results(v)[0]
            return super(_KerasMultiWorkerStrategy, self).reduce(reduce_op, v, None if local.shape.rank == 0 else axis)

        return tf.nest.map_structure(one, value)


def use_logical_cpus(count: int) -> None:
    """Split the CPU into ``count`` logical devices, for ``--strategy mirrored`` without GPUs.

    Must run before TensorFlow initialises its devices (first thing in a process).
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


# ----------------------------------------------------------------------------- tf.data service

DATA_SERVICE_MODE = "distributed_epoch"  # each element of an epoch is produced once, by one of the service's workers


def offload(dataset: tf.data.Dataset, address: str) -> tf.data.Dataset:
    """Run ``dataset``'s preprocessing on tf.data service workers (``grpc://host:port`` of the dispatcher).

    The service workers read the same file paths, so they need the data on a
    shared filesystem. Each epoch is one job; the elements come back in no fixed order.
    """
    return finish(dataset.apply(tf.data.experimental.service.distribute(DATA_SERVICE_MODE, service=address)))


CONNECT_TIMEOUT_S = 10.0  # to reach a dispatcher before anything waits on it (TensorFlow itself retries forever)


def check_reachable(address: str, flag: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a dispatcher ``grpc://host:port`` that accepts no connection within ``timeout`` seconds."""
    import socket

    from toolkit.core.errors import UserError

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(port)
    except ValueError:
        raise UserError(f"{flag} must be grpc://HOST:PORT with a port in 1-65535. Received: {address!r}") from None
    try:
        with socket.create_connection((host.strip("[]") or "localhost", number), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {address}: no tf.data service dispatcher answers there ({exc.strerror or exc}, "
                        f"waited {timeout:g} s). Start one with `toolkit data-service dispatcher --port {number}`, "
                        "or check the host and port.") from None


def start_dispatcher(port: int, work_dir: str = "") -> tf.data.experimental.service.DispatchServer:
    config = tf.data.experimental.service.DispatcherConfig(port=port, work_dir=work_dir or None,
                                                           fault_tolerant_mode=bool(work_dir))
    server = tf.data.experimental.service.DispatchServer(config)
    logger.info("tf.data service dispatcher at %s", server.target)
    return server


def start_worker(dispatcher: str, port: int, host: str = "localhost") -> tf.data.experimental.service.WorkerServer:
    check_reachable(dispatcher, "--dispatcher")
    address = dispatcher.split("://", 1)[-1]
    config = tf.data.experimental.service.WorkerConfig(dispatcher_address=address, worker_address=f"{host}:%port%",
                                                       port=port)
    server = tf.data.experimental.service.WorkerServer(config)
    logger.info("tf.data service worker on port %s for dispatcher %s", port or "(any)", address)
    return server
