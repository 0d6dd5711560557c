"""vmkit._serde_json: request bodies read as serde_json reads them.

The texts and positions are checked against the real cloud-hypervisor in
test_api_vs_ch.py; here: any input gives a value or a JsonError (nothing
else escapes), and valid JSON reads as Python's json module reads it.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from vmkit._serde_json import JsonError, read_struct, rust_float

FIELDS: dict[str, tuple[str, object]] = {
    "id": ("string", ...),
    "size": ("u64?", None),
    "local": ("bool", False),
}

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
@given(st.binary(max_size=200) | _values.map(lambda v: json.dumps(v).encode()))
def test_any_input_is_a_value_or_a_json_error(body: bytes) -> None:
    try:
        read_struct(body, "Struct", FIELDS)
    except JsonError as e:
        assert " at line " in str(e)


@settings(max_examples=300, deadline=None)
@given(
    st.text(),
    st.none() | st.integers(0, 2**64 - 1),
    st.booleans(),
    st.dictionaries(st.text().filter(lambda k: k not in FIELDS), _values, max_size=3),
    st.booleans(),
)
def test_valid_json_reads_as_json_reads_it(
    id: str, size: int | None, local: bool, extra: dict[str, object], ascii_only: bool
) -> None:
    body = json.dumps({**extra, "id": id, "size": size, "local": local}, ensure_ascii=ascii_only)
    assert read_struct(body.encode(), "Struct", FIELDS) == {"id": id, "size": size, "local": local}
    array = json.dumps([id, size, local]).encode()
    assert read_struct(array, "Struct", FIELDS) == {"id": id, "size": size, "local": local}


def test_deep_nesting_in_ignored_fields_needs_no_recursion() -> None:
    body = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b',"id":"a"}'
    assert read_struct(body, "Struct", FIELDS)["id"] == "a"


def test_rust_float() -> None:
    assert [rust_float(v) for v in (1e5, 0.1, -0.0, 1.5, 1e-7, 2.0**64)] == [
        "100000", "0.1", "-0", "1.5", "0.0000001", "18446744073709552000",
    ]  # fmt: skip
