"""Shared fixtures: one real local Ray cluster for the session, the packaged model, sample data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The S3 tests talk to moto on 127.0.0.1 only; set before Ray starts so its workers inherit them
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["STRATA_CACHE"] = tempfile.mkdtemp(prefix="strata-cache-")  # models fetched from S3 land here

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "corpus"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from pipeline.ray_pipeline import ensure_ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_info():
    from pipeline.config import ModelConfig
    from pipeline.model import resolve_model

    return resolve_model(ModelConfig())


@pytest.fixture
def corpus_copy(tmp_path) -> Path:
    """A private copy of the sample corpus, so a test may add or break shards."""
    target = tmp_path / "corpus"
    shutil.copytree(CORPUS, target)
    return target


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path
