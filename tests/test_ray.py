"""vmkit.ray: VMs as Ray actors across a multi-node cluster on this machine.

The cluster (``vmkit._raycluster``): a head and two worker nodes, each a real
``ray start`` on its own loopback address (127.0.0.10-12) with one CPU and
four ``vmkit_kvm`` slots, every process below one keeper process that stops
them all in the fixture's finaliser. The Ray driver is a process of its own
(``RayDriver``) that runs the bodies in tests/_raycases.py: the pytest process
never imports Ray, whose threads and descriptors would outlive
``ray.shutdown()`` and upset the other tests' counts. The node-death test
kills a worker node for good, so it runs last (file order).
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmkit._raycluster import LocalCluster, NodeSpec, process_running
from vmkit.pytest_plugin import kvm_missing

NO_RAY = "Ray is not installed (pip install 'vmkit[ray]')"
HAVE_RAY = importlib.util.find_spec("ray") is not None
HEAD, WORKER1, WORKER2 = "127.0.0.10", "127.0.0.11", "127.0.0.12"
SLOTS = 4  # as in _raycases
#: Ray's failure detector, fast: a dead node is noticed within ~1.5 s.
FAST_DETECTOR = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "0",
}


def test_import_vmkit_does_not_import_ray() -> None:
    code = "import sys, vmkit, vmkit.vm, vmkit.client; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_without_ray_says_how_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        "try:\n"
        "    import vmkit.ray\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'vmkit[ray]'" in out.stdout


class RayDriver:
    """The Ray driver: a process of its own running tests/_raycases.py."""

    def __init__(self) -> None:
        read, self._write = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("_raycases.py")), str(self._write)],
                stdin=subprocess.PIPE,
                text=True,
                pass_fds=(self._write,),
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(self._write)
        self._answers = os.fdopen(read)

    def call(self, name: str, *args: Any, timeout: float = 180.0) -> Any:
        """``_raycases.name(*args)`` there; a failure there fails the test here."""
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps([name, list(args)]) + "\n")
        self._process.stdin.flush()
        ready, _, _ = select.select([self._answers], [], [], timeout)
        if not ready:
            pytest.fail(f"the Ray driver did not answer {name} within {timeout} s")
        line = self._answers.readline()
        if not line:
            pytest.fail(f"the Ray driver exited during {name} (status {self._process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            pytest.fail(f"in the Ray driver:\n{answer['error']}", pytrace=False)
        return answer["value"]

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._answers.close()


@pytest.fixture(scope="module")
def driver() -> Iterator[RayDriver]:
    if not HAVE_RAY:
        pytest.skip(NO_RAY)
    ray_driver = RayDriver()
    try:
        yield ray_driver
    finally:
        ray_driver.close()


@pytest.fixture(scope="module")
def cluster(driver: RayDriver) -> Iterator[LocalCluster]:
    why = kvm_missing()
    if why is not None:
        pytest.skip(why)
    nodes = [NodeSpec(ip, 1, (("vmkit_kvm", float(SLOTS)),)) for ip in (HEAD, WORKER1, WORKER2)]
    local = LocalCluster(nodes, env=FAST_DETECTOR)
    seen: set[int] = set()
    try:
        local.start()
        driver.call("connect", local.address, local.keeper_pid)
        yield local
        seen.update(local.processes())
        driver.call("disconnect")
    finally:
        local.stop()
    left = [pid for pid in seen if process_running(pid)]
    assert not left, f"cluster processes left running: {left}"
    assert not local.temp_dir.exists()


def test_restart_policy_refuses_bad_values(driver: RayDriver) -> None:
    driver.call("restart_policy_refuses_bad_values")


def test_pool_refuses_bad_arguments(driver: RayDriver) -> None:
    driver.call("pool_refuses_bad_arguments")


def test_resources_command(driver: RayDriver) -> None:
    driver.call("resources_command", kvm_missing() is None)


@pytest.mark.vmkit_kvm
def test_pool_spreads_vms_runs_their_workload_and_streams_serial(
    driver: RayDriver, cluster: LocalCluster
) -> None:
    driver.call("pool_spreads_vms_runs_their_workload_and_streams_serial")


@pytest.mark.vmkit_kvm
def test_pool_refuses_more_vms_than_the_cluster_has_slots(
    driver: RayDriver, cluster: LocalCluster
) -> None:
    driver.call("pool_refuses_more_vms_than_the_cluster_has_slots")


@pytest.mark.vmkit_kvm
def test_vm_that_fails_to_start(driver: RayDriver, cluster: LocalCluster) -> None:
    driver.call("vm_that_fails_to_start")


@pytest.mark.vmkit_kvm
def test_interrupted_driver_leaves_no_vm(driver: RayDriver, cluster: LocalCluster) -> None:
    driver.call("interrupted_driver_leaves_no_vm")


@pytest.mark.vmkit_kvm
def test_killed_driver_leaves_no_vm(driver: RayDriver, cluster: LocalCluster) -> None:
    """A driver killed outright (no finally runs): Ray ends its actors, and
    each VMM ends with its actor."""
    driver.call("killed_driver_leaves_no_vm", cluster.address)


@pytest.mark.vmkit_kvm
def test_restart_policy_when_an_actor_dies(driver: RayDriver, cluster: LocalCluster) -> None:
    driver.call("restart_policy_when_an_actor_dies")


@pytest.mark.vmkit_kvm
def test_node_death_restarts_its_vms_on_the_other_nodes(
    driver: RayDriver, cluster: LocalCluster
) -> None:
    print(driver.call("node_death_restarts_its_vms_on_the_other_nodes"))


def test_this_process_never_imported_ray() -> None:
    assert "ray" not in sys.modules
