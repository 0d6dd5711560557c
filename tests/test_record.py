"""The config and result classes behave as the dataclasses they replace,
and ``import vmkit`` stays cheap (what a boot does not need is not imported)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import pickle
import subprocess
import sys
from typing import ClassVar

import pytest
import vmkit
from vmkit._record import FrozenInstanceError, field, record
from vmkit.config import ConsoleConfig, CpusConfig, DiskConfig, VmConfig
from vmkit.vm import VmExit, VmInfo


@record(kw_only=True)
class Point:
    kind: ClassVar[str] = "point"
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)


@dataclasses.dataclass(kw_only=True)
class PointDataclass:
    kind: ClassVar[str] = "point"
    x: int
    y: int = 0
    tags: list[str] = dataclasses.field(default_factory=list)


@record(frozen=True)
class Pair:
    left: str
    right: int = 1


def test_fields_defaults_and_factories() -> None:
    a, b = Point(x=1), Point(x=1)
    assert (a.x, a.y, a.tags) == (1, 0, [])
    a.tags.append("t")
    assert b.tags == [], "a default factory runs once per instance"
    assert [f.name for f in dataclasses.fields(Point)] == ["x", "y", "tags"]
    assert Point.kind == "point" and "kind" not in vars(a)


def test_equality_repr_and_hash_as_dataclasses() -> None:
    assert Point(x=1, y=2) == Point(x=1, y=2)
    assert Point(x=1, y=2) != Point(x=1, y=3)
    assert Point(x=1) != PointDataclass(x=1), "another class is never equal"
    assert repr(Point(x=1, tags=["a"])) == repr(PointDataclass(x=1, tags=["a"])).replace(
        "PointDataclass", "Point"
    )
    with pytest.raises(TypeError, match="unhashable"):
        hash(Point(x=1))
    assert hash(Pair("a", 2)) == hash(Pair("a", 2))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Point(), r"Point.__init__\(\) missing 1 required keyword-only argument: 'x'"),
        (lambda: Point(x=1, z=2), r"unexpected keyword argument 'z'"),
        (lambda: Point(1), r"takes 1 positional argument but 2 were given"),
        (lambda: Pair(), r"missing 1 required argument: 'left'"),
        (lambda: Pair("a", 1, 2), r"takes 3 positional arguments but 4 were given"),
        (lambda: Pair("a", left="b"), r"multiple values for argument 'left'"),
    ],
)
def test_bad_arguments_raise_type_error(call: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()  # type: ignore[operator]


def test_frozen_records_refuse_assignment() -> None:
    pair = Pair("a")
    assert (pair.left, pair.right) == ("a", 1)
    with pytest.raises(FrozenInstanceError):
        pair.left = "b"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del pair.right  # type: ignore[misc]
    assert Pair.__match_args__ == ("left", "right")


def test_mutable_defaults_and_order_are_checked_at_definition() -> None:
    with pytest.raises(ValueError, match="mutable default"):

        @record
        class Bad:
            items: list[int] = []  # noqa: RUF012

    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):

        @record
        class BadOrder:
            a: int = 0
            b: int


def test_dataclass_functions_work_on_config_objects() -> None:
    config = VmConfig(cpus=CpusConfig(boot_vcpus=2, max_vcpus=2))
    assert dataclasses.is_dataclass(config)
    changed = dataclasses.replace(config, serial=ConsoleConfig(mode="Null"))
    assert changed.serial.mode == "Null" and changed.cpus is config.cpus
    assert dataclasses.asdict(config) == config.to_dict()
    disk = DiskConfig(path="/images/a.img")
    required = [
        f.name
        for f in dataclasses.fields(DiskConfig)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    assert required == []
    assert copy.deepcopy(disk) == disk and pickle.loads(pickle.dumps(disk)) == disk
    exit_info = VmExit("poweroff", "done")
    assert pickle.loads(pickle.dumps(exit_info)) == exit_info
    info = VmInfo(config=config, state="Running", memory_actual_size=1)
    assert info.device_tree is None


def test_signature_for_help() -> None:
    signature = inspect.signature(DiskConfig)
    assert list(signature.parameters)[:2] == ["path", "readonly"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in signature.parameters.values())
    assert signature.parameters["readonly"].default is False
    assert str(inspect.signature(VmExit)) == "(reason: 'str', message: 'str') -> 'None'"


#: Modules a boot does not need, which ``import vmkit`` once pulled in (~45 ms together).
NOT_AT_IMPORT = (
    "dataclasses",
    "inspect",
    "ast",
    "typing",
    "logging",
    "socket",
    "subprocess",
    "pathlib",
    "json",
    "re",
    "tempfile",
    "vmkit.client",
    "vmkit.cli",
    "vmkit.api",
)


def test_import_vmkit_loads_only_what_a_boot_needs() -> None:
    # -S: no site-packages hooks (some environments import pathlib, re... from .pth files).
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(vmkit.__file__ or "")))
    code = (
        "import sys, vmkit\n"
        "from vmkit import Vm, VmConfig\n"
        f"print(' '.join(m for m in {NOT_AT_IMPORT!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**os.environ, "PYTHONPATH": python_dir},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [], f"import vmkit loaded {result.stdout.strip()}"
