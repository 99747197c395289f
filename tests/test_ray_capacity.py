"""`metarec train --ray` checks up front that Ray can place the workers (metarec.ray.capacity).

The CLI end of it, against a real Ray instance, is in test_ray_runner.py
(`test_cli_train_ray_*`)."""

from __future__ import annotations

import pytest

from metarec.config import RayConfig
from metarec.errors import ConfigError
from metarec.ray.capacity import plan_workers, workers_that_fit


def test_workers_that_fit_counts_cpus_and_gpus():
    assert workers_that_fit(RayConfig(num_workers=3, cpus_per_worker=1), {"CPU": 2.0}) == 2
    assert workers_that_fit(RayConfig(cpus_per_worker=0.5), {"CPU": 2.0}) == 4
    assert workers_that_fit(RayConfig(cpus_per_worker=0.1), {"CPU": 0.3}) == 3  # no float round-down
    assert workers_that_fit(RayConfig(cpus_per_worker=1, gpus_per_worker=1), {"CPU": 16.0, "GPU": 2.0}) == 2
    assert workers_that_fit(RayConfig(cpus_per_worker=1, gpus_per_worker=1), {"CPU": 16.0}) == 0
    assert workers_that_fit(RayConfig(cpus_per_worker=4), {"CPU": 2.0}) == 0


def test_a_request_that_fits_is_kept():
    assert plan_workers(RayConfig(num_workers=2), {"CPU": 2.0}, local=True) == (2, None)
    assert plan_workers(RayConfig(num_workers=2), {"CPU": 8.0}, local=False) == (2, None)


def test_local_ray_lowers_num_workers_to_what_the_machine_has():
    n, notice = plan_workers(RayConfig(num_workers=3), {"CPU": 2.0}, local=True, where="this machine's local Ray")
    assert n == 2
    assert notice == ("note: this machine's local Ray has 2 CPUs, 0 GPUs: using ray.num_workers=2 instead of 3 "
                      "(--set ray.num_workers=2 silences this)")


def test_a_cluster_that_cannot_place_the_workers_fails_with_the_numbers_and_the_fix():
    with pytest.raises(ConfigError) as err:
        plan_workers(RayConfig(num_workers=3), {"CPU": 2.0}, local=False, where="the Ray cluster at auto")
    assert str(err.value) == ("ray.num_workers=3 x ray.cpus_per_worker=1 = 3 CPUs cannot be placed: the Ray cluster at auto "
                              "has 2 CPUs, 0 GPUs in all; --set ray.num_workers=2 would fit")
    with pytest.raises(ConfigError, match=r"= 4 GPUs cannot be placed: .* has 64 CPUs, 3 GPUs in all; --set ray.num_workers=3 would fit"):
        plan_workers(RayConfig(num_workers=4, gpus_per_worker=1), {"CPU": 64.0, "GPU": 3.0}, local=False)


@pytest.mark.parametrize("local", [True, False])
def test_not_even_one_worker_fails_local_or_not(local):
    with pytest.raises(ConfigError, match=r"has 2 CPUs, 0 GPUs, not enough for one worker; lower ray.cpus_per_worker"):
        plan_workers(RayConfig(num_workers=1, cpus_per_worker=4), {"CPU": 2.0}, local=local)


def test_an_autoscaling_cluster_counts_what_its_autoscaler_may_add(monkeypatch):
    """cluster/*.yaml start with 0 GPU workers (up to 8): a 3-GPU request must not fail."""
    import ray
    from ray._private.state import state

    from metarec.ray.capacity import cluster_capacity

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "memory": 1e9})
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 36.0, "GPU": 8})
    capacity = cluster_capacity()
    assert capacity["CPU"] == 36.0 and capacity["GPU"] == 8.0
    assert plan_workers(RayConfig(num_workers=3, gpus_per_worker=1), capacity, local=False) == (3, None)

    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: None)  # no autoscaler
    assert cluster_capacity()["CPU"] == 4.0 and "GPU" not in cluster_capacity()
