"""The Ray adapter: the plain steps of `stages.py` wired into one streaming Ray Data dataset.

    from_arrow(the shards to read, in blocks of a few hundred small shards or one big one)
      → read (CPU tasks; a shard streamed and cut into fragments, one payload per fragment)
      → tokenize (CPU actor pool; tokenizer loaded once per actor)
      → embed (actor pool of model replicas; GPU when present; one fragment per call)
      → write + commit (CPU tasks)

and, before it in an incremental version, one task per changed shard that diffs it against the
previous version (`run_diffs`).

Ray Data owns scheduling and backpressure; this module only decides resources and converts
between Arrow rows and payload dicts. Everything Ray-specific in strata lives here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import warnings
import functools
import inspect
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
from ray import exceptions as ray_errors
from ray.exceptions import RayError  # noqa: F401 - what a run that Ray gives up on raises

from pipeline.config import ComputeConfig
from pipeline.cluster import use_ray_token_if_present
from pipeline.errors import StrataError, Terminated, causes, one_line, root_cause
from pipeline.sources import Shard
from pipeline.spec import Simulation
from pipeline.incremental import DiffTask, diff_shard
from pipeline.lease import LeaseLost
from pipeline.manifest import CommitRecord, FailureRecord
from pipeline.model import local_model_path
from pipeline.stages import Embed, JobSpec, Tokenize, cannot_start, read_shard, write_fragment

# Logical CPUs reserved per step. Kept below one so that on a 2-core machine the replica, a
# tokenizer and the I/O tasks are all scheduled at once instead of waiting on each other.
IO_TASK_CPUS = 0.25  # read and write tasks mostly wait on storage
TOKENIZER_CPUS = 0.5
DIFF_TASK_CPUS = 0.5  # reads and hashes a whole shard
# A dead actor (killed for memory, a native crash, a lost node) is restarted and its fragment
# retried this many times; after that the runner judges the fragment (see runner._after_worker_deaths).
ACTOR_RETRIES = 2
# What Ray raises when a process or node went away rather than when strata's code failed: the
# runner starts a new pass over what is not committed yet (a lost node costs only its fragments).
LOST_WORKER = (ray_errors.ActorDiedError, ray_errors.ActorUnavailableError, ray_errors.WorkerCrashedError,
               ray_errors.NodeDiedError, ray_errors.ObjectLostError, ray_errors.OwnerDiedError,
               ray_errors.OutOfMemoryError, ray_errors.LocalRayletDiedError)
SHARDS_PER_BLOCK = 256  # small shards read by one task, one after the other
BLOCK_BYTES = 64 << 20  # input bytes of a block of small shards


class StepCannotStart(StrataError):
    """A tokenizer or model replica cannot be built on a worker: the run stops with the cause."""


@dataclass(frozen=True)
class Resources:
    replicas: int  # the pool's size, or its minimum when it autoscales
    max_replicas: int
    gpus_per_replica: float
    cpus_per_replica: float
    tokenizers: int  # the tokenizer pool's maximum (it starts at one)
    cpu_threads: int | None  # torch threads of a CPU replica
    fragments_per_replica: int  # fragments a replica works on at once (2: one on the device, one on the host)
    object_store_memory: int | None  # bytes of data in flight; None = Ray Data's default

    def describe(self) -> str:
        pool = str(self.replicas) if self.max_replicas == self.replicas else f"{self.replicas}-{self.max_replicas}"
        device = f"{self.gpus_per_replica:g} GPU" if self.gpus_per_replica else \
            f"CPU, {self.cpu_threads} threads" if self.cpu_threads else "a simulated device"
        device += " each" + (f", {self.fragments_per_replica} fragments at once" if self.fragments_per_replica > 1 else "")
        replicas = "model replica" + ("" if self.max_replicas == 1 else "s")
        tokenizers = "tokenizer" + ("" if self.tokenizers == 1 else "s")
        return f"{pool} {replicas} ({device}), up to {self.tokenizers} {tokenizers}"


def ensure_ray() -> None:
    """Join the cluster this process is asked to join (`RAY_ADDRESS`, which a Ray Job's driver
    has), else start a local Ray instance of its own. Never a cluster found by chance: a head
    started with `ray start` and killed leaves its address behind, and joining that would fail
    every run on the machine."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        _check_reachable(address)
        if address != "local":  # a cluster started where ~/.ray/auth_token exists wants that token
            use_ray_token_if_present()
        on_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with a bare sys.exit
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        except SystemExit as exc:  # a SIGTERM while ray.init had its own handler in place
            if exc.code == signal.SIGTERM:
                raise Terminated() from None
            raise
        except Exception as exc:  # noqa: BLE001 - a cluster that does not answer, a node that cannot start
            where = "start a local Ray instance" if address == "local" else \
                f"connect to the Ray cluster at {address} (from RAY_ADDRESS)"
            raise StrataError(f"cannot {where}: {root_cause(exc)}") from None
        finally:
            if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
                signal.signal(signal.SIGTERM, on_sigterm)
    _raylet_messages_off()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # One fragment per block: without this Ray Data merges a task's outputs up to 128 MiB,
    # so a shard's fragments would travel, embed and commit as one lump instead of streaming
    context.target_max_block_size = 1
    data_logger = logging.getLogger("ray.data")
    data_logger.setLevel(logging.ERROR)
    for handler in data_logger.handlers:  # its errors still reach the session's ray-data.log; on the
        if type(handler).__name__ != "SessionFileHandler":  # terminal, strata says what happened in a line
            handler.setLevel(logging.CRITICAL)
    # bounded actor restarts still go through map_batches' remote args (pyproject pins ray < 2.64)
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)


def _raylet_messages_off() -> None:
    """Ray prints what the cluster pushes to the driver (a task retried, a node marked dead, a
    worker killed for memory) on stdout, in colour, over several lines, and from a thread of its
    own: even after strata's last line. strata says itself what each such event means for the run
    (a failure record with its cause, a lost node and the fragments redone); the raylets' logs
    keep Ray's text. (A private hook of Ray's driver, `ray._private.worker.print_to_stdstream`:
    left alone where it is missing.)"""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "strata", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") != "raylet":
            original(data, ignore_prefix)

    print_to_stdstream.strata = True
    worker.print_to_stdstream = print_to_stdstream


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A `host:port` address must answer within seconds: ray.init waits for a dead one for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "local", "auto" (Ray finds the address itself), ray:// client URLs
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise StrataError(f"cannot connect to the Ray cluster at {address} (from RAY_ADDRESS): "
                          f"{exc.strerror or one_line(exc)}; unset RAY_ADDRESS to run on a local Ray instance of "
                          "strata's own") from None


def cluster_resources() -> dict[str, float]:
    return ray.cluster_resources()


def alive_nodes() -> dict[str, str]:
    """The cluster's live nodes: node id → IP address (`ray.nodes()`, which keeps dead ones too)."""
    return {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in ray.nodes() if node.get("Alive")}


def lost_worker(exc: BaseException) -> bool:
    """Did Ray stop because a worker process or a node went away (not because strata's code
    raised)? Looks through the chain of causes: Ray Data wraps what a task or actor raised."""
    return any(isinstance(inner, LOST_WORKER) for inner in causes(exc))


def plan_resources(compute: ComputeConfig, available: dict[str, float], simulation: Simulation | None = None) -> Resources:
    """Replica and tokenizer pools from the config and what the cluster offers now (`ray.cluster_resources()`).

    Without GPUs a fixed pool runs on CPU. An autoscaling pool (`max_replicas`) keeps asking for
    GPUs even when none are up yet: its pending replicas are what makes the autoscaler add GPU nodes.
    A replica on a device works on two fragments at once, so that while one fragment's vectors
    are read back and written out, the next one's micro-batches already keep the device busy; a
    CPU replica works on one (two would only share the same cores). A simulated device
    (benchmarks) is a device that needs no GPU and says how many fragments it takes at once.
    """
    cpus, gpus = float(available.get("CPU", 1)), float(available.get("GPU", 0))
    gpus_per_replica = compute.gpus_per_replica
    if simulation or (gpus == 0 and compute.max_replicas is None):
        gpus_per_replica = 0
    replicas = compute.replicas
    if replicas == "auto":
        replicas = max(1, int(gpus // gpus_per_replica)) if gpus_per_replica else 1
    if compute.max_replicas is not None:
        replicas = min(replicas, compute.max_replicas)
    max_replicas = compute.max_replicas or replicas
    cpu_only = gpus_per_replica == 0 and simulation is None
    spare_cores = int(cpus - replicas - 2 * IO_TASK_CPUS)
    tokenizers = compute.tokenizers
    if tokenizers == "auto":  # a CPU replica's torch already uses every core: one tokenizer keeps ahead of it
        tokenizers = 1 if cpu_only else max(1, spare_cores)
    return Resources(
        replicas=replicas, max_replicas=max_replicas, gpus_per_replica=gpus_per_replica, cpus_per_replica=1,
        tokenizers=tokenizers, cpu_threads=max(1, int(cpus // replicas)) if cpu_only else None,
        fragments_per_replica=1 if cpu_only else simulation.concurrent_fragments if simulation else 2,
        object_store_memory=compute.object_store_memory,
    )


def input_blocks(work: pa.Table) -> list[pa.Table]:
    """Slices of the work table (a shard per row) as Ray Data's input blocks: small shards
    grouped up to `SHARDS_PER_BLOCK` or `BLOCK_BYTES` of input, a big shard on its own, so that
    Ray Data holds one work item per block rather than per shard."""
    n = work.num_rows
    if n == 0:
        return []
    offset = np.cumsum(work["size"].to_numpy())  # input bytes up to and including each shard
    offset //= BLOCK_BYTES
    new = np.empty(n, bool)  # a shard starts a block where the bytes before it cross a BLOCK_BYTES line
    new[0], new[1:] = True, offset[:-1] != np.concatenate(([0], offset[:-2]))
    del offset
    new[::SHARDS_PER_BLOCK] = True
    new |= work["size"].to_numpy() >= BLOCK_BYTES  # a big shard starts a block of its own
    starts = np.flatnonzero(new).tolist() + [n]
    return [work.slice(a, b - a) for a, b in zip(starts, starts[1:])]


def run_shards(work: pa.Table, job: JobSpec, resources: Resources) -> Iterator[tuple[CommitRecord | FailureRecord, int]]:
    """Read, embed and write the shards of `work` (`sources.SHARD_SCHEMA` plus `skip`: the
    starting rows of fragments already committed); yields each fragment's commit (or failure)
    record as it lands, with its shard's size in bytes."""
    if resources.object_store_memory is not None:
        options = ray.data.DataContext.get_current().execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=resources.object_store_memory)
    ds = ray.data.from_arrow(input_blocks(work))
    # read and write tasks retry a worker death as often as actors restart, never without end (Ray
    # Data's default for tasks): a shard or fragment that kills its worker every time then stops
    # the pass, and the driver turns it into a failure record from its attempt markers
    ds = ds.map_batches(_read_step, batch_size=None, batch_format="pyarrow", fn_kwargs={"job": job},
                        num_cpus=IO_TASK_CPUS, max_retries=ACTOR_RETRIES)
    tokenize = functools.partial(_tokenizer_on_this_node, job)
    embed = functools.partial(Embed, job.embed, job.input.keep_fields, job.output_uri, job.storage, job.lease_token)
    ds = ds.map_batches(_actor_step(tokenize, "Tokenize"), batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=resources.tokenizers),
                        num_cpus=TOKENIZER_CPUS, max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
    ds = ds.map_batches(_actor_step(embed, "Embed"), batch_size=1, batch_format="pyarrow",
                        compute=_replica_pool(resources),
                        num_gpus=resources.gpus_per_replica,
                        num_cpus=resources.cpus_per_replica, max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
    ds = ds.map_batches(_write_step, batch_size=1, batch_format="pyarrow", fn_kwargs={"job": job},
                        num_cpus=IO_TASK_CPUS, max_retries=ACTOR_RETRIES)
    # prefetch_batches=0: hand each record over as soon as its fragment is committed (with
    # prefetching, Ray Data holds a block back until the next one arrives: progress lags a fragment)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for row in batch.to_pylist():
            kind = CommitRecord if row["kind"] == "commit" else FailureRecord
            record = kind(**json.loads(row["record"]))
            if row["kind"] == "fatal":
                raise StepCannotStart(record.reason)
            if row["kind"] == "lost":
                raise LeaseLost(record.reason)
            yield record, row["shard_size"]


def _replica_pool(resources: Resources) -> ray.data.ActorPoolStrategy:
    """The model replicas' pool; a replica takes `fragments_per_replica` calls at once, on threads
    (Ray Data's threaded actors: `max_concurrent_calls_per_actor`, `enable_true_multi_threading`).
    A Ray Data older than those options runs one call at a time."""
    pool = {"min_size": resources.replicas, "max_size": resources.max_replicas}
    concurrent = resources.fragments_per_replica
    if concurrent > 1 and "enable_true_multi_threading" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
        pool |= {"max_concurrent_calls_per_actor": concurrent, "enable_true_multi_threading": True}
    return ray.data.ActorPoolStrategy(**pool)


def run_diffs(tasks: list[DiffTask], job: JobSpec) -> Iterator[dict]:
    """Diff each changed shard against the previous version, one task per shard (a task holds
    one shard's hash index); yields each shard's counts as it finishes."""
    diff = ray.remote(num_cpus=DIFF_TASK_CPUS, max_retries=ACTOR_RETRIES)(diff_shard)
    source_of = {diff.remote(task, job.input, job.output_uri, job.storage, job.keep_schema): task.source
                 for task in tasks}
    pending = list(source_of)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            yield ray.get(done[0])
        except RayError as exc:  # its worker died every time (killed for memory?): this shard fails
            yield {"source": source_of[done[0]], "error": f"comparing it died: {one_line(exc)}"}


def _one(batch: pa.Table) -> dict:
    return batch.to_pylist()[0]


def _table(payload: dict) -> pa.Table:
    return pa.Table.from_pylist([payload])


def _read_step(batch: pa.Table, job: JobSpec) -> Iterator[pa.Table]:
    for row in batch.to_pylist():
        skip = frozenset(row.pop("skip") or ())
        shard = Shard(**{**row, "path": row["path"].decode("utf-8", "surrogateescape")})
        for payload in read_shard(shard, job, skip):
            yield _table(payload)


def _actor_step(make_step, name: str):
    """An actor class that builds its step once (tokenizer, model replica) and applies it per fragment.

    A step that cannot be built (weights that do not load, a corrupt tokenizer file, no GPU
    memory) must not raise from the constructor: Ray would restart the actor again and again and
    end the run with pages of its own traceback. The actor stays up instead and hands each
    fragment back marked `fatal` with the cause, and the driver stops the run with that one line.

    (Ray Data logs "constructor arguments in the object store" for every actor pool; that is
    ray-project/ray#57733, not something these actors pass.)
    """
    what = {"Tokenize": "the tokenizer", "Embed": "a model replica"}[name]

    class Step:
        def __init__(self):
            self.broken = ""
            try:
                self.step = make_step()
            except Exception as exc:  # noqa: BLE001 - see above
                self.broken = f"{root_cause(exc)} (on {socket.gethostname()})"

        def __call__(self, batch: pa.Table) -> pa.Table:
            payload = _one(batch)
            if self.broken:  # a fragment that failed upstream passes through, as every step lets it
                return _table(payload if payload["error"] else cannot_start(payload, what, self.broken))
            return _table(self.step(payload))

    Step.__name__ = Step.__qualname__ = name
    return Step


def _tokenizer_on_this_node(job: JobSpec) -> Tokenize:
    model = dataclasses.replace(job.embed.model, path=local_model_path(job.embed.model, job.storage))
    return Tokenize(model, model.max_length, job.stride, job.embed.token_details,
                    job.input.words_field is not None, job.output_uri, job.storage)


def _write_step(batch: pa.Table, job: JobSpec) -> pa.Table:
    payload = _one(batch)
    try:
        record = write_fragment(payload, job)
    except LeaseLost as exc:  # the run lost its output to another run: the driver stops with this line
        payload = {**payload, "lease_lost": True, "error": str(exc)}
        record = FailureRecord(json.loads(payload["fragment"])["id"], "", str(exc), None)
    kind = "commit" if isinstance(record, CommitRecord) else "lost" if payload["lease_lost"] else \
        "fatal" if payload["fatal"] else "failure"
    size = json.loads(payload["fragment"])["shard"]["size"]
    return pa.table({"kind": [kind], "record": [json.dumps(asdict(record))], "shard_size": [size]})
