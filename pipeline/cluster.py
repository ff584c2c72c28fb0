"""strata runs as Ray jobs: submit a config to a cluster's job server, follow, list, show, stop.

A thin adapter over Ray's Job Submission API (`ray.job_submission`, the REST service of the
head's dashboard, port 8265). A submitted job is `strata run` on the cluster: the config travels
in the job's runtime environment (its `working_dir`), and with `ship_code` so does this package
(`py_modules`), for images that hold the dependencies but not this version of strata. All state
of a run lives in its output location, so a stopped or retried job resumes where it stopped.

Every strata job carries metadata (`strata`, `config`, `output`) so that `strata jobs` lists
only strata's jobs and `submit` refuses to start a second job on an output a running one writes.
A head that is still starting turns submissions away until its job agent is up: `submit` asks
again for a while, and takes no other refusal for an answer to wait out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import yaml

from pipeline import __version__
from pipeline.config import StrataConfig
from pipeline.errors import StrataError, one_line

JOB_CONFIG = "strata-job.yaml"  # the config's name inside the job's working_dir
JOB_LAUNCHER = "strata-job.sh"  # beside it: finds the Python that has strata on the head (job_entrypoint.sh)
ENTRYPOINT = f"sh {JOB_LAUNCHER}"
ACTIVE = ("PENDING", "RUNNING")
CONNECT_TIMEOUT_S = 5.0  # Ray's client has no timeout: an unroutable address would hang for minutes
STOP_TIMEOUT_S = 120.0
POLL_S = 0.5
# Until the head's job agent has registered, its job server answers submissions with this (HTTP
# 500, after waiting 10 s itself); on a busy machine that lasts well past `ray start --head`.
NOT_READY = "No available agent to submit job"
LAUNCHER = Path(__file__).with_name("job_entrypoint.sh")
SUBMIT_RETRY_S = 60.0  # how long submit keeps asking a head that is not ready
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 8.0  # the wait between tries doubles from the first to the most


class JobError(StrataError):
    """The job server cannot be reached, refused a request, or the job did not succeed."""


@dataclass(frozen=True)
class JobSummary:
    job_id: str
    status: str
    output: str
    config: str
    message: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    entrypoint: str

    @property
    def seconds(self) -> float | None:
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time


def job_server_url(address: str | None) -> str:
    """`--address`, else Ray's own variables (`RAY_API_SERVER_ADDRESS`, then `RAY_ADDRESS` when it
    is an http URL: for `ray.init` it usually names the GCS instead), as an http URL."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or (ray_address if "http" in ray_address else None)
    if not address:
        raise JobError("no Ray job server given: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobError(f"--address {address}: expected the head's job server as http://HOST:8265 "
                       "(ray:// is Ray Client and HOST:6379 is the GCS, neither takes jobs)")
    return address.rstrip("/")


def connect(address: str | None):
    """A client for the job server, or one line saying why not, within CONNECT_TIMEOUT_S."""
    url = job_server_url(address)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise JobError(f"cannot reach the Ray job server at {url}: {reason}; check the address, and that the "
                       "head runs the dashboard (ray start --head --dashboard-host=0.0.0.0, with ray[default])") from None
    use_ray_token_if_present()
    from ray.job_submission import JobSubmissionClient

    # "Uploading package ...", "WebSocket closed ...", "Creating a file package ...": not for users
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with _without_address_variables():  # Ray lets them override the address it is given
            return JobSubmissionClient(url)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError or AuthenticationError
        raise JobError(_server_refusal(url, exc)) from None


@contextlib.contextmanager
def _without_address_variables():
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def use_ray_token_if_present() -> None:
    """Recent Ray clusters want a token by default; find it where `ray start` does
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) unless RAY_AUTH_MODE says otherwise.
    Both ways into a cluster use it: the job server (`submit`, `jobs`) and `ray.init` (`run` with
    RAY_ADDRESS)."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray release without token authentication
        return
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "token authentication is enabled" warning is for cluster owners
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)


def _server_refusal(url: str, exc: Exception) -> str:
    text = str(exc)
    if "Authentication" in type(exc).__name__ or "authentication token" in text:
        return (f"the Ray job server at {url} wants an authentication token: set RAY_AUTH_TOKEN, or put the "
                "cluster's token in ~/.ray/auth_token (ray get-auth-token on the head)")
    if "Jobs API is not supported" in text or "Version check" in text:
        return f"{url} answers, but not as a Ray job server; check the address (the head's dashboard port, 8265)"
    return f"the Ray job server at {url} refused the request: {_answer(exc)}"


def _answer(exc: Exception) -> str:
    """What the job server answered, in one line: `HTTP 500: <its text>`. Ray's client appends a
    period to the text, and most refusals carry a Python traceback, which the last line sums up."""
    found = re.fullmatch(r"Request failed with status code (\d+): (.*)\.", str(exc).strip(), re.S)
    if not found:
        return one_line(exc)
    lines = [line.strip() for line in found.group(2).splitlines() if line.strip(" .")]
    return f"HTTP {found.group(1)}: {lines[-1] if lines else 'no text'}"


def for_cluster(config: StrataConfig) -> StrataConfig:
    """Local paths made absolute: the job runs in a working_dir of its own, not in this folder."""
    updates = {"input": config.input.model_copy(update={"uri": _absolute(config.input.uri)}),
               "output": config.output.model_copy(update={"uri": _absolute(config.output.uri)})}
    if config.model.name_or_path != "default":
        updates["model"] = config.model.model_copy(update={"name_or_path": _absolute(config.model.name_or_path)})
    return config.model_copy(update=updates)


def _absolute(uri: str) -> str:
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().absolute()) + ("/" if uri.endswith("/") else "")


def local_paths(config: StrataConfig) -> list[str]:
    """Config keys that name local paths: every node of the cluster must see them (a shared disk)."""
    keys = [("input.uri", config.input.uri), ("output.uri", config.output.uri)]
    if config.model.name_or_path != "default":
        keys.append(("model.name_or_path", config.model.name_or_path))
    return [key for key, uri in keys if "://" not in uri]


def submit(client, config: StrataConfig, name: str, ship_code: bool = False) -> str:
    """Submit `strata run` of this config (see `for_cluster`) as a job named after `name`; returns
    its id. Refuses while another strata job on this cluster writes the same output."""
    busy = [job for job in list_jobs(client) if job.status in ACTIVE and job.output == config.output.uri]
    if busy:
        raise JobError(f"job {busy[0].job_id} is {busy[0].status.lower()} on output {config.output.uri}; two jobs on "
                       f"one output would redo each other's fragments: wait for it, or stop it first "
                       f"(strata jobs stop {busy[0].job_id})")
    with tempfile.TemporaryDirectory(prefix="strata-job-") as folder:
        # the unredacted config: the job needs storage.options as the user wrote them
        Path(folder, JOB_CONFIG).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        Path(folder, JOB_LAUNCHER).write_text(LAUNCHER.read_text())
        runtime_env: dict = {"working_dir": folder,
                             "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        if ship_code:
            runtime_env["py_modules"] = [str(Path(__file__).parent)]
        return _submit_when_ready(client, {
            "entrypoint": ENTRYPOINT, "runtime_env": runtime_env, "submission_id": _new_job_id(name),
            "metadata": {"strata": __version__, "config": name, "output": config.output.uri}})


def _submit_when_ready(client, job: dict) -> str:
    """Submit, asking again with backoff for up to SUBMIT_RETRY_S while the head answers NOT_READY;
    any other refusal is final. Every try sends the same submission id, so a try the server carried
    out although it answered an error makes the next one fail with "already exists": that is this job."""
    url, started, wait, tries = client.get_address(), time.monotonic(), RETRY_FIRST_S, 0
    while True:
        tries += 1
        try:
            return client.submit_job(**job)
        except Exception as exc:  # noqa: BLE001 - HTTP errors of the job server arrive as RuntimeError
            if tries > 1 and "already exists" in str(exc) and _is_this_job(client, job):
                return job["submission_id"]
            if NOT_READY not in str(exc):
                raise JobError(_server_refusal(url, exc)) from None
            left = started + SUBMIT_RETRY_S - time.monotonic()
            if left <= 0:
                raise JobError(f"the Ray job server at {url} kept answering {_answer(exc)} ({tries} tries in "
                               f"{SUBMIT_RETRY_S:.0f} s): the head's job agent is not up. A head that "
                               "is still starting may need longer (submit again); on one that has run for minutes, "
                               "see dashboard_agent.log in its session logs (e.g. a port the agent could not bind)"
                               ) from None
            time.sleep(min(wait, left))
            wait = min(wait * 2, RETRY_MAX_S)


def _is_this_job(client, job: dict) -> bool:
    try:
        found = client.get_job_info(job["submission_id"])
    except Exception:  # noqa: BLE001 - then it is not a job we can claim
        return False
    return found.entrypoint == job["entrypoint"] and (found.metadata or {}).get("output") == job["metadata"]["output"]


def _new_job_id(name: str) -> str:
    """Readable and unique: `strata-<config>-<UTC time>-<random>`; Ray ids allow [A-Za-z0-9_-]."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "run"
    return f"strata-{safe}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def list_jobs(client) -> list[JobSummary]:
    """strata's jobs on this cluster, newest first."""
    jobs = [_summary(job) for job in client.list_jobs() if "strata" in (job.metadata or {})]
    return sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)


def show(client, job_id: str) -> JobSummary:
    try:
        return _summary(client.get_job_info(job_id))
    except RuntimeError as exc:
        raise JobError(f"no job {job_id} on {client.get_address()}: {one_line(exc)}") from None


def _summary(job) -> JobSummary:
    metadata = job.metadata or {}
    return JobSummary(job.submission_id or job.job_id or "?", str(job.status), metadata.get("output", ""),
                      metadata.get("config", ""), job.message or "", _seconds(job.start_time),
                      _seconds(job.end_time), job.entrypoint)


def _seconds(milliseconds: int | None) -> float | None:
    return milliseconds / 1000 if milliseconds else None


def stop(client, job_id: str, timeout: float = STOP_TIMEOUT_S) -> JobSummary:
    """Ask the job to stop and wait until it has: a resubmitted run must not overlap the old one."""
    show(client, job_id)  # a clear error for an unknown id
    client.stop_job(job_id)
    return wait(client, job_id, timeout)


def wait(client, job_id: str, timeout: float | None = None) -> JobSummary:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = show(client, job_id)
        if job.status not in ACTIVE:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(f"job {job_id} is still {job.status.lower()} after {timeout:.0f} s")
        time.sleep(POLL_S)


def follow(client, job_id: str, write: Callable[[str], None]) -> JobSummary:
    """Stream the job's log until it ends; returns its final state."""
    show(client, job_id)  # a clear error for an unknown id
    try:
        for chunk in _tail(client, job_id):
            write(chunk)
    except Exception as exc:  # noqa: BLE001 - a dropped websocket, a head that went away
        raise JobError(f"lost the log stream of job {job_id}: {one_line(exc)}; the job goes on "
                       f"(strata jobs logs {job_id} --follow picks it up again)") from None
    return wait(client, job_id)


def _tail(client, job_id: str) -> Iterator[str]:
    """Ray's log tail is an async generator; hand its chunks over one by one."""
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(stream.aclose())
        loop.close()


def logs(client, job_id: str) -> str:
    show(client, job_id)
    return client.get_job_logs(job_id)
