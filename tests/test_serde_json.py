"""API action bodies read by serde_json in Rust (``_native.parse_api_body``).

The texts and positions are checked against the real cloud-hypervisor in
test_api_vs_ch.py; here: any input gives the struct's fields or a
ConfigError carrying serde_json's text (nothing else escapes), valid JSON
reads as Python's json module reads it, and the texts that depend on the
serde and serde_json versions are v37's.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmkit import _native
from vmkit.errors import ConfigError

#: v37's structs and their fields (vmm/src/api/mod.rs)
STRUCTS = {
    "VmResizeData": ["desired_vcpus", "desired_ram", "desired_balloon"],
    "VmResizeZoneData": ["id", "desired_ram"],
    "VmRemoveDeviceData": ["id"],
    "VmSnapshotConfig": ["destination_url"],
    "VmReceiveMigrationData": ["receiver_url"],
    "VmSendMigrationData": ["destination_url", "local"],
}
ALL_FIELDS = {name for fields in STRUCTS.values() for name in fields}


def parse(name: str, body: bytes) -> dict[str, object]:
    result: dict[str, object] = _native.parse_api_body(name, body)  # type: ignore[call-overload]
    return result


def error(name: str, body: bytes) -> str:
    with pytest.raises(ConfigError) as info:
        parse(name, body)
    assert info.value.kind == "InvalidJson"
    return str(info.value)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(sorted(STRUCTS)),
    st.binary(max_size=200) | _values.map(lambda v: json.dumps(v).encode()),
)
def test_any_input_is_the_structs_fields_or_a_config_error(name: str, body: bytes) -> None:
    try:
        result = parse(name, body)
    except ConfigError as e:
        assert e.kind == "InvalidJson"
        assert " at line " in str(e)
    else:
        assert list(result) == STRUCTS[name]


@settings(max_examples=300, deadline=None)
@given(
    st.text(),
    st.booleans(),
    st.dictionaries(st.text().filter(lambda k: k not in ALL_FIELDS), _values, max_size=3),
    st.booleans(),
)
def test_valid_json_reads_as_json_reads_it(
    url: str, local: bool, extra: dict[str, object], ascii_only: bool
) -> None:
    fields = {"destination_url": url, "local": local}
    body = json.dumps({**extra, **fields}, ensure_ascii=ascii_only)
    assert parse("VmSendMigrationData", body.encode()) == fields
    assert parse("VmSendMigrationData", json.dumps([url, local]).encode()) == fields


@settings(max_examples=300, deadline=None)
@given(
    st.none() | st.integers(0, 255),
    st.none() | st.integers(0, 2**64 - 1),
    st.none() | st.integers(0, 2**64 - 1),
    st.text(),
    st.integers(0, 2**64 - 1),
)
def test_integer_fields_take_their_whole_range(
    vcpus: int | None, ram: int | None, balloon: int | None, zone: str, zone_ram: int
) -> None:
    resize = {"desired_vcpus": vcpus, "desired_ram": ram, "desired_balloon": balloon}
    assert parse("VmResizeData", json.dumps(resize).encode()) == resize
    assert parse("VmResizeData", json.dumps([vcpus, ram, balloon]).encode()) == resize
    resize_zone = {"id": zone, "desired_ram": zone_ram}
    assert parse("VmResizeZoneData", json.dumps(resize_zone).encode()) == resize_zone


def test_absent_fields_take_v37s_defaults() -> None:
    assert parse("VmResizeData", b"{}") == dict.fromkeys(STRUCTS["VmResizeData"])
    assert parse("VmSendMigrationData", b'{"destination_url":"u"}') == {
        "destination_url": "u",
        "local": False,
    }
    assert error("VmResizeZoneData", b'{"id":"z"}') == (
        "missing field `desired_ram` at line 1 column 10"
    )


def test_deep_nesting_in_ignored_fields_needs_no_recursion() -> None:
    body = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b',"id":"a"}'
    assert parse("VmRemoveDeviceData", body) == {"id": "a"}


@pytest.mark.parametrize(
    ("number", "text"),
    [
        ("1e5", "100000"),
        ("0.1", "0.1"),
        ("-0.0", "-0"),
        ("1.5", "1.5"),
        ("1e-7", "0.0000001"),
        ("18446744073709551616", "18446744073709552000"),
    ],
)
def test_floats_in_errors_are_written_as_v37_writes_them(number: str, text: str) -> None:
    # serde 1.0.198 and later write `100000.0`, serde_json 1.0.154 `1.8446744073709552e19`
    body = b'{"desired_ram":%s}' % number.encode()
    assert error("VmResizeData", body) == (
        f"invalid type: floating point `{text}`, expected u64 at line 1 column {len(body) - 1}"
    )


def test_bad_strings_are_placed_as_v37s_serde_json_places_them() -> None:
    # serde_json 1.0.154 says column 9: it checks UTF-8 as it reads, v37's at the closing quote
    assert error("VmRemoveDeviceData", b'{"id":"a\xff"}') == (
        "invalid unicode code point at line 1 column 10"
    )
    assert error("VmRemoveDeviceData", b'{"id":"\\u12"}') == "invalid escape at line 1 column 12"


def test_an_unknown_struct_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match='unknown API body struct "VmInfo"') as info:
        parse("VmInfo", b"{}")
    assert not isinstance(info.value, ConfigError)
