"""Option-string grammar (ch-reference §1.2-1.4) and value types (ch-reference §1.5),
exercised through the public option parsers."""

from __future__ import annotations

from typing import Any

import pytest
from _helpers import expect
from vmkit import ConfigError, ParseError
from vmkit.config import (
    ConsoleConfig,
    CpuAffinity,
    CpusConfig,
    CpuTopology,
    DiskConfig,
    MemoryConfig,
    NetConfig,
    NumaConfig,
    NumaDistance,
    PlatformConfig,
    RngConfig,
    VsockConfig,
)

MEM_DEFAULT = 536870912  # ref §2.1 DEFAULT_MEMORY_MB


def mem_err(text: str, message: str) -> None:
    expect(lambda: MemoryConfig.parse(text), "ParseMemory", "Error parsing --memory: " + message)


# ---------------------------------------------------------------------------
# §1.2 rule 1: empty / whitespace-only input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "\u2003"])
def test_empty_or_whitespace_input_sets_nothing(text: str) -> None:
    m = MemoryConfig.parse(text)
    assert m.size == MEM_DEFAULT
    assert m.thp is True


@pytest.mark.parametrize("text", ["  size=1G  ", "\tsize=1G\n", "\u2003size=1G\u2003"])
def test_whitespace_around_whole_string_is_fine(text: str) -> None:
    # §1.2 rule 7: "Whitespace around the whole string is fine" (Rust trim: Unicode whitespace)
    assert MemoryConfig.parse(text).size == 1073741824


# ---------------------------------------------------------------------------
# §1.2 rule 2: splitting, brackets and quotes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('path="/a,b"', "/a,b"),  # comma inside quotes is literal
        ("path=[a,b]", "[a,b]"),  # comma inside brackets is literal, brackets kept (rule 8)
        ('path=a"b"c', "abc"),  # quotes are dropped
        ('path="a""b"', "ab"),  # "" toggles twice
        ('"path"=/x', "/x"),  # quotes dropped in names as well
        ('path=""', None),  # value empty after quote removal -> absent (§1.3)
        ("path=[[x]]", "[[x]]"),
        ('path=["a,b"]', "[a,b]"),  # quotes work inside brackets
        ("path=a=b=c", "a=b=c"),  # split at the first '='
    ],
)
def test_split_and_quote_rules(text: str, path: str | None) -> None:
    assert DiskConfig.parse(text).path == path


def test_quotes_cannot_keep_leading_or_trailing_spaces() -> None:
    # §1.2 rule 4: value trimmed after quote removal
    assert DiskConfig.parse('path="  /x y  "').path == "/x y"
    assert RngConfig.parse("src=   /dev/random  ").src == "/dev/random"


def test_quoted_comma_in_string_list_is_split_by_string_list() -> None:
    # quotes are dropped by the splitter, StringList then splits on ',' (§1.2, §1.5 StringList)
    assert PlatformConfig.parse('oem_strings=["a,b",c]').oem_strings == ["a", "b", "c"]


@pytest.mark.parametrize(
    "text",
    [
        "size=[1",
        "size=1]",
        "size=]1[",
        "size=[[1]",
        'size="1',
        'size=1,mergeable="on',
        'size="["',  # quotes do not protect brackets
        'size=["]"]',
        "  size=[1  ",  # the ORIGINAL untrimmed input is reported
        "size=1,thp=on]",
    ],
)
def test_unbalanced_brackets_or_quotes_are_invalid_syntax(text: str) -> None:
    mem_err(text, "invalid syntax:" + text)


def test_invalid_syntax_reported_for_other_options_with_original_input() -> None:
    expect(
        lambda: DiskConfig.parse(' path="[" '),
        "ParseDisk",
        'Error parsing --disk: invalid syntax: path="[" ',
    )
    expect(
        lambda: PlatformConfig.parse('oem_strings=["]"]'),
        "ParsePlatform",
        'Error parsing --platform: invalid syntax:oem_strings=["]"]',
    )


# ---------------------------------------------------------------------------
# §1.2 rules 3-7: matching, duplicates, empty items, whitespace around names
# ---------------------------------------------------------------------------


def test_value_may_contain_equals() -> None:
    mem_err("size=1=2", "unable to convert 1=2 for size")


def test_unknown_option() -> None:
    mem_err("size=1G,foo=1", "unknown option: foo")
    mem_err("foo=1,bar=2", "unknown option: foo")  # stops at the first error


def test_unknown_option_names_are_case_sensitive() -> None:
    mem_err("SIZE=1G", "unknown option: SIZE")


def test_unknown_option_reported_before_conversion_errors() -> None:
    # all items are matched before any conversion happens (§1.2 then §1.3)
    mem_err("size=x,foo=1", "unknown option: foo")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("size", "invalid syntax:size"),
        ('"si"ze', "invalid syntax:size"),  # item after quote removal
        ("size=1G,thp", "invalid syntax:thp"),
        ("size,foo=1", "invalid syntax:size"),
        ("size=1G,foo", "unknown option: foo"),
    ],
)
def test_value_requiring_option_without_equals(text: str, message: str) -> None:
    mem_err(text, message)


def test_toggle_keys_are_value_requiring() -> None:
    # val §1: readonly is a Toggle (registered with a value), not a valueless key
    expect(
        lambda: DiskConfig.parse("path=/x,readonly"),
        "ParseDisk",
        "Error parsing --disk: invalid syntax:readonly",
    )


@pytest.mark.parametrize("text", ["tty=foo", "tty=", "tty"])
def test_valueless_option_is_set_with_or_without_value(text: str) -> None:
    assert ConsoleConfig.parse(text).mode == "Tty"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("size=1K,size=2K", 2048),
        ("size=2K,size=1K", 1024),
        ("size=x,size=1K", 1024),  # the overwritten value is never converted
        ("size=1K,size=", MEM_DEFAULT),  # the last one wins even when it is empty -> absent
    ],
)
def test_duplicate_keys_last_wins(text: str, size: int) -> None:
    assert MemoryConfig.parse(text).size == size


@pytest.mark.parametrize("text", ["size=", "size=  ", 'size=""', "size=,thp=on"])
def test_empty_value_behaves_as_absent(text: str) -> None:
    assert MemoryConfig.parse(text).size == MEM_DEFAULT


def test_empty_value_of_required_key_is_missing() -> None:
    expect(
        lambda: VsockConfig.parse("socket=,cid=3"),
        "ParseVsockSockMissing",
        "Error parsing --vsock: socket missing",
    )


@pytest.mark.parametrize(
    "text", ["size=1G,", ",size=1G", "size=1G,,thp=on", "=x", "size=1G,=1", ","]
)
def test_empty_items_are_unknown_option_with_trailing_space(text: str) -> None:
    mem_err(text, "unknown option: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("size=1G, mergeable=on", "unknown option:  mergeable"),
        ("size = 1G", "unknown option: size "),
        ("size=1G,\tthp=on", "unknown option: \tthp"),
    ],
)
def test_whitespace_around_names_is_significant(text: str, message: str) -> None:
    mem_err(text, message)


def test_whitespace_around_values_is_trimmed() -> None:
    assert MemoryConfig.parse("size= 1G ,thp=  off").size == 1073741824
    assert MemoryConfig.parse("size= 1G ,thp=  off").thp is False


# ---------------------------------------------------------------------------
# §1.5 Toggle
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("on", True),
        ("off", False),
        ("true", True),
        ("false", False),
        ("ON", True),
        ("OFF", False),
        ("True", True),
        ("False", False),
        ("FALSE", False),
        ("TrUe", True),
        ('"on"', True),
    ],
)
def test_toggle_values(value: str, expected: bool) -> None:
    assert MemoryConfig.parse(f"mergeable={value}").mergeable is expected
    assert DiskConfig.parse(f"readonly={value}").readonly is expected


@pytest.mark.parametrize("value", ["yes", "no", "1", "0", "enable", "o n", "onn"])
def test_toggle_rejects(value: str) -> None:
    mem_err(f"mergeable={value}", f"unable to convert {value} for mergeable")


def test_toggle_empty_is_absent_so_default_applies() -> None:
    assert MemoryConfig.parse("thp=").thp is True


# ---------------------------------------------------------------------------
# §1.5 ByteSized (verified examples table)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1024", 1024),
        ("1K", 1024),
        ("2M", 2097152),
        ("4G", 4294967296),
        ("0K", 0),
        ("+5", 5),
        ("1KM", 1048576),
        ("1MK", 1024),
        ("1GG", 1073741824),
        ("1GMK", 1024),
        ("0", 0),
        ("007K", 7168),
        ("18446744073709551615", 18446744073709551615),
        ("17179869183G", 17179869183 << 30),  # largest G value that does not overflow
        ("  2M  ", 2097152),
    ],
)
def test_byte_sized_values(value: str, expected: int) -> None:
    assert MemoryConfig.parse(f"size={value}").size == expected


@pytest.mark.parametrize(
    "value",
    [
        "1k",
        "1m",
        "1T",
        "0x10",
        "-1",
        "2 M",
        "K",
        "xyzK",
        "18446744073709551616",
        "1.5G",
        "G1",
        "1_000",
    ],
)
def test_byte_sized_rejects(value: str) -> None:
    mem_err(f"size={value}", f"unable to convert {value} for size")


@pytest.mark.parametrize(
    "value", ["17179869184G", "17592186044416M", "18446744073709551615K", "18446744073709551615G"]
)
def test_byte_sized_overflow_is_rejected_not_wrapped(value: str) -> None:
    # ref preamble + §1.5: v37 wraps to 0, vmkit reports the conversion error
    mem_err(f"size={value}", f"unable to convert {value} for size")


@pytest.mark.parametrize(
    ("text", "attr", "expected"),
    [
        ("hotplug_size=1G", "hotplug_size", 1073741824),
        ("hotplugged_size=2M", "hotplugged_size", 2097152),
        ("hugepage_size=2M", "hugepage_size", 2097152),
    ],
)
def test_other_byte_sized_memory_keys(text: str, attr: str, expected: int) -> None:
    assert getattr(MemoryConfig.parse(text), attr) == expected


def test_byte_sized_overflow_on_other_keys() -> None:
    mem_err("hotplug_size=17179869184G", "unable to convert 17179869184G for hotplug_size")


# ---------------------------------------------------------------------------
# §1.5 IntegerList (numa cpus u8, pci_segments u16, platform iommu_segments u16, net fd i32)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[1,3,5]", [1, 3, 5]),
        ("[0,2-4,7]", [0, 2, 3, 4, 7]),
        ("[0-3]", [0, 1, 2, 3]),
        ("[[1]]", [1]),
        ("3", [3]),  # brackets are optional
        ("[3,1,1]", [3, 1, 1]),  # no sort, no dedup
        ("[+1,007]", [1, 7]),
        ("[255]", [255]),
        ("[254-255]", [254, 255]),
    ],
)
def test_integer_list_values(value: str, expected: list[int]) -> None:
    assert NumaConfig.parse(f"cpus={value}").cpus == expected


@pytest.mark.parametrize(
    "value",
    [
        "[5-3]",
        "[5-5]",
        "[1-2-3]",
        "[]",
        "[1,]",
        "[1-]",
        "[-1]",
        "[1, 2]",
        "[0x1]",
        "[a]",
        "[,1]",
        "[1--2]",
    ],
)
def test_integer_list_rejects(value: str) -> None:
    expect(
        lambda: NumaConfig.parse(f"cpus={value}"),
        "ParseNuma",
        f"Error parsing --numa: unable to convert {value} for cpus",
    )


@pytest.mark.parametrize("value", ["[256]", "[0,256]", "[250-256]", "[18446744073709551615]"])
def test_numa_cpus_narrowing_overflow_is_rejected(value: str) -> None:
    # ref preamble / §1.5: v37 truncates `as u8`; vmkit rejects
    expect(
        lambda: NumaConfig.parse(f"cpus={value}"),
        "ParseNuma",
        f"Error parsing --numa: unable to convert {value} for cpus",
    )


def test_numa_pci_segments_u16() -> None:
    assert NumaConfig.parse("pci_segments=[65535]").pci_segments == [65535]
    expect(
        lambda: NumaConfig.parse("pci_segments=[65536]"),
        "ParseNuma",
        "Error parsing --numa: unable to convert [65536] for pci_segments",
    )


def test_platform_iommu_segments_u16() -> None:
    assert PlatformConfig.parse("iommu_segments=[0,65535]").iommu_segments == [0, 65535]
    expect(
        lambda: PlatformConfig.parse("iommu_segments=[65536]"),
        "ParsePlatform",
        "Error parsing --platform: unable to convert [65536] for iommu_segments",
    )


def test_net_fd_i32() -> None:
    assert NetConfig.parse("fd=[3,2147483647]").fds == [3, 2147483647]
    expect(
        lambda: NetConfig.parse("fd=[2147483648]"),
        "ParseNetwork",
        "Error parsing --net: unable to convert [2147483648] for fd",
    )


# ---------------------------------------------------------------------------
# §1.5 Tuple (key@value lists): cpus affinity (u8 @ Vec<usize>), numa distances (u64 @ u64)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[0@[0,2],1@[1,3]]", [(0, [0, 2]), (1, [1, 3])]),
        ("[0@0-3]", [(0, [0, 1, 2, 3])]),
        ("[0@5]", [(0, [5])]),
        ("[ 0@[1] ]", [(0, [1])]),  # only the body's outer whitespace goes
        ("[255@[1000]]", [(255, [1000])]),
        ("[1@[2],1@[3]]", [(1, [2]), (1, [3])]),
        ("[0@ [1]]", [(0, [1])]),  # an IntegerList value is trimmed
    ],
)
def test_affinity_values(value: str, expected: list[tuple[int, list[int]]]) -> None:
    c = CpusConfig.parse(f"affinity={value}")
    assert c.affinity == [CpuAffinity(vcpu=v, host_cpus=h) for v, h in expected]


@pytest.mark.parametrize(
    "value",
    [
        "0@[0]",  # must start with [ and end with ]
        "[]",  # one empty element
        "[0@[1], 1@[2]]",  # key " 1" is not trimmed
        "[0@[1]@2]",  # 3 parts
        "[0]",  # no @
        "[256@[1]]",  # u8 key
        "[a@[1]]",
        "[0@[]]",
        "[0@[5-3]]",
    ],
)
def test_affinity_rejects(value: str) -> None:
    expect(
        lambda: CpusConfig.parse(f"affinity={value}"),
        "ParseCpus",
        f"Error parsing --cpus: unable to convert {value} for affinity",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[0@25,1@20]", [(0, 25), (1, 20)]),
        ("[ 5@42 ]", [(5, 42)]),
        ("[4294967295@255]", [(4294967295, 255)]),
        ("[+1@010]", [(1, 10)]),
    ],
)
def test_numa_distances_values(value: str, expected: list[tuple[int, int]]) -> None:
    n = NumaConfig.parse(f"distances={value}")
    assert n.distances == [NumaDistance(destination=d, distance=x) for d, x in expected]


@pytest.mark.parametrize(
    "value",
    [
        "0@25",
        "[0@ 25]",  # InvalidInteger (§5.1 #28)
        "[0 @25]",  # key "0 " (§5.1 #29)
        "[0@]",
        "[@1]",
        "[0@[1]]",  # u64 value, not a list
        '["0@"@42]',  # quotes dropped -> [0@@42], 3 parts (§5.1 #37)
        "[0@1, 1@2]",
        "[4294967296@20]",  # destination > u32: vmkit rejects (ref preamble)
        "[0@256]",  # distance > u8: vmkit rejects
    ],
)
def test_numa_distances_rejects(value: str) -> None:
    raw = value.replace('"', "")  # the stored value has its quotes dropped (§1.2)
    expect(
        lambda: NumaConfig.parse(f"distances={value}"),
        "ParseNuma",
        f"Error parsing --numa: unable to convert {raw} for distances",
    )


# ---------------------------------------------------------------------------
# §1.5 StringList
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[foo,bar,baz]", ["foo", "bar", "baz"]),
        ("foo", ["foo"]),
        ("[]", [""]),
        ("[a,,b]", ["a", "", "b"]),
        ("[ a , b ]", [" a ", " b "]),
        ("[[x]]", ["x"]),
    ],
)
def test_string_list(value: str, expected: list[str]) -> None:
    assert PlatformConfig.parse(f"oem_strings={value}").oem_strings == expected
    assert NumaConfig.parse(f"memory_zones={value}").memory_zones == expected


def test_string_list_used_by_cpu_features() -> None:
    assert CpusConfig.parse("features=[amx]").features.amx is True
    assert CpusConfig.parse('features=["amx"]').features.amx is True
    assert CpusConfig.parse("features=amx").features.amx is True


# ---------------------------------------------------------------------------
# §1.5 Rust integers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("2", 2), ("+2", 2), ("002", 2), ("255", 255), ("0", 0)]
)
def test_u8_values(value: str, expected: int) -> None:
    assert CpusConfig.parse(f"boot={value},max=255").boot_vcpus == expected


@pytest.mark.parametrize("value", ["256", "-1", "0x2", "2_0", "1.0", "two", "++1"])
def test_u8_rejects(value: str) -> None:
    expect(
        lambda: CpusConfig.parse(f"boot={value}"),
        "ParseCpus",
        f"Error parsing --cpus: unable to convert {value} for boot",
    )


@pytest.mark.parametrize(
    ("cls", "kind", "flag", "key", "ok", "bad", "attr", "prefix"),
    [
        (DiskConfig, "ParseDisk", "disk", "queue_size", "65535", "65536", "queue_size", ""),
        (DiskConfig, "ParseDisk", "disk", "pci_segment", "65535", "65536", "pci_segment", ""),
        (
            VsockConfig,
            "ParseVsock",
            "vsock",
            "cid",
            "4294967295",
            "4294967296",
            "cid",
            "socket=/s,",
        ),
        (NetConfig, "ParseNetwork", "net", "mtu", "65535", "65536", "mtu", ""),
        (
            NumaConfig,
            "ParseNuma",
            "numa",
            "guest_numa_id",
            "4294967295",
            "4294967296",
            "guest_numa_id",
            "",
        ),
        (
            DiskConfig,
            "ParseDisk",
            "disk",
            "num_queues",
            "18446744073709551615",
            "18446744073709551616",
            "num_queues",
            "",
        ),
    ],
)
def test_integer_widths(
    cls: Any, kind: str, flag: str, key: str, ok: str, bad: str, attr: str, prefix: str
) -> None:
    assert getattr(cls.parse(f"{prefix}{key}={ok}"), attr) == int(ok)
    expect(
        lambda: cls.parse(f"{prefix}{key}={bad}"),
        kind,
        f"Error parsing --{flag}: unable to convert {bad} for {key}",
    )


# ---------------------------------------------------------------------------
# §1.5 IPv4, MAC, enums, topology
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1.2.3.4", "0.0.0.0", "255.255.255.255", "10.0.0.1"])
def test_ipv4_values(value: str) -> None:
    assert NetConfig.parse(f"ip={value}").ip == value
    assert NetConfig.parse(f"mask={value}").mask == value


@pytest.mark.parametrize(
    "value", ["01.2.3.4", "1.2.3", "1.2.3.4.5", "256.1.1.1", "a.b.c.d", "1.2.3.-4"]
)
def test_ipv4_rejects(value: str) -> None:
    expect(
        lambda: NetConfig.parse(f"ip={value}"),
        "ParseNetwork",
        f"Error parsing --net: unable to convert {value} for ip",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("de:ad:be:ef:12:34", "de:ad:be:ef:12:34"),
        ("DE:AD:BE:EF:12:34", "de:ad:be:ef:12:34"),  # displayed in lowercase
        ("00:00:00:00:00:00", "00:00:00:00:00:00"),
        ("Ff:fF:01:02:03:04", "ff:ff:01:02:03:04"),
    ],
)
def test_mac_values(value: str, expected: str) -> None:
    assert NetConfig.parse(f"mac={value}").mac == expected
    assert NetConfig.parse(f"host_mac={value}").host_mac == expected


@pytest.mark.parametrize(
    "value",
    [
        "de:ad:be:ef:12",
        "de:ad:be:ef:12:34:56",
        "d:ad:be:ef:12:34",
        "dea:d:be:ef:12:34",
        "gg:ad:be:ef:12:34",
        "de-ad-be-ef-12-34",
        "deadbeef1234",
        "de:ad:be:ef:12:",
    ],
)
def test_mac_rejects(value: str) -> None:
    expect(
        lambda: NetConfig.parse(f"mac={value}"),
        "ParseNetwork",
        f"Error parsing --net: unable to convert {value} for mac",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("acpi", "Acpi"), ("ACPI", "Acpi"), ("virtio-mem", "VirtioMem"), ("Virtio-Mem", "VirtioMem")],
)
def test_hotplug_method(value: str, expected: str) -> None:
    assert MemoryConfig.parse(f"hotplug_method={value}").hotplug_method == expected


@pytest.mark.parametrize("value", ["virtio_mem", "virtiomem", "VirtioMem", "none"])
def test_hotplug_method_rejects(value: str) -> None:
    mem_err(f"hotplug_method={value}", f"unable to convert {value} for hotplug_method")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("client", "Client"), ("CLIENT", "Client"), ("server", "Server"), ("Server", "Server")],
)
def test_vhost_mode(value: str, expected: str) -> None:
    assert NetConfig.parse(f"vhost_mode={value}").vhost_mode == expected


def test_vhost_mode_rejects() -> None:
    expect(
        lambda: NetConfig.parse("vhost_mode=both"),
        "ParseNetwork",
        "Error parsing --net: unable to convert both for vhost_mode",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2:2:1:2", (2, 2, 1, 2)),
        ("1:2:3:4", (1, 2, 3, 4)),
        ("0:1:1:1", (0, 1, 1, 1)),
        ("255:1:1:1", (255, 1, 1, 1)),
    ],
)
def test_topology(value: str, expected: tuple[int, int, int, int]) -> None:
    t = CpusConfig.parse(f"topology={value}").topology
    assert t == CpuTopology(
        threads_per_core=expected[0],
        cores_per_die=expected[1],
        dies_per_package=expected[2],
        packages=expected[3],
    )


@pytest.mark.parametrize(
    "value", ["2:2:1", "2:2:1:2:1", "256:1:1:1", "a:1:1:1", "1:1:1:", "-1:1:1:1", "1.1.1.1"]
)
def test_topology_rejects(value: str) -> None:
    expect(
        lambda: CpusConfig.parse(f"topology={value}"),
        "ParseCpus",
        f"Error parsing --cpus: unable to convert {value} for topology",
    )


def test_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        MemoryConfig.parse("size=x")
    with pytest.raises(ValueError):  # ConfigError derives from ValueError
        MemoryConfig.parse("size=x")
    with pytest.raises(ParseError):
        MemoryConfig.parse("foo")
