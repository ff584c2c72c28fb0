"""How a run sizes its Ray pools from the config and the cluster's resources (pure: no cluster needed)."""

import pytest

from pipeline.config import ComputeConfig, ConfigError, parse_config
from pipeline.ray_pipeline import plan_resources


def test_cpu_only_cluster_runs_one_cpu_replica_with_every_core():
    plan = plan_resources(ComputeConfig(), {"CPU": 2.0})
    assert (plan.replicas, plan.max_replicas, plan.gpus_per_replica) == (1, 1, 0)
    assert plan.cpu_threads == 2 and plan.tokenizers == 1
    assert plan.describe() == "1 model replica (CPU, 2 threads each), up to 1 tokenizer"


def test_gpu_cluster_gets_one_replica_per_gpu_and_the_spare_cores_tokenize():
    plan = plan_resources(ComputeConfig(), {"CPU": 16.0, "GPU": 4.0})
    assert (plan.replicas, plan.max_replicas, plan.gpus_per_replica, plan.cpu_threads) == (4, 4, 1, None)
    assert plan.describe() == "4 model replicas (1 GPU each, 2 fragments at once), up to 11 tokenizers"
    assert plan.tokenizers == 11  # 16 CPUs - 4 replicas - the read and write tasks' half CPU
    assert plan_resources(ComputeConfig(gpus_per_replica=0.5), {"CPU": 16.0, "GPU": 2.0}).replicas == 4


def test_autoscaling_pool_keeps_asking_for_gpus_before_any_gpu_node_is_up():
    waiting = plan_resources(ComputeConfig(max_replicas=8), {"CPU": 4.0})
    assert (waiting.replicas, waiting.max_replicas, waiting.gpus_per_replica) == (1, 8, 1)
    assert waiting.describe().startswith("1-8 model replicas (1 GPU each, 2 fragments at once)")
    grown = plan_resources(ComputeConfig(max_replicas=8), {"CPU": 32.0, "GPU": 3.0})
    assert (grown.replicas, grown.max_replicas) == (3, 8)
    capped = plan_resources(ComputeConfig(max_replicas=2), {"CPU": 32.0, "GPU": 4.0})
    assert (capped.replicas, capped.max_replicas) == (2, 2)
    cpu_pool = plan_resources(ComputeConfig(max_replicas=3, gpus_per_replica=0), {"CPU": 8.0})
    assert (cpu_pool.replicas, cpu_pool.max_replicas, cpu_pool.gpus_per_replica) == (1, 3, 0)


def test_explicit_tokenizers_and_object_store_limit():
    compute = parse_config({"input": {"uri": "x"}, "output": {"uri": "y"},
                            "compute": {"tokenizers": 3, "object_store_memory": "2GiB"}}).compute
    plan = plan_resources(compute, {"CPU": 64.0, "GPU": 8.0})
    assert plan.tokenizers == 3 and plan.object_store_memory == 2 * 2**30


@pytest.mark.parametrize("compute, message", [
    ({"replicas": 4, "max_replicas": 2}, "max_replicas (2) is below compute.replicas (4)"),
    ({"tokenizers": 0}, "compute.tokenizers: must be 'auto' or a number ≥ 1"),
    ({"object_store_memory": "lots"}, "compute.object_store_memory"),
])
def test_bad_compute_settings_are_config_errors(compute, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"input": {"uri": "x"}, "output": {"uri": "y"}, "compute": compute})
