"""gpujobd.daemon.properties: `--property NAME=VALUE` parsed strictly into what StartTransientUnit takes."""

from __future__ import annotations

from typing import Iterable, List

import pytest

from gpujobd.daemon.properties import (
    MAX_CPU_INDEX,
    PARSERS,
    UINT64_MAX,
    Encoded,
    as_dict,
    parse_properties,
    split_assignment,
)
from gpujobd.shared.config import Config
from gpujobd.shared.errors import InvalidArgument

ALL = tuple(PARSERS)  # an allowlist naming every property that has a parser
KIB, MIB, GIB, TIB, PIB, EIB = (1 << (10 * n) for n in range(1, 7))


def parse(name: str, text: str, allowed: Iterable[str] = ALL) -> List[Encoded]:
    return parse_properties({name: text}, allowed)


def one(name: str, text: str) -> Encoded:
    (encoded,) = parse(name, text)
    return encoded


def refused(name: str, text: str, allowed: Iterable[str] = ALL) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse(name, text, allowed)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------------
# Sizes: MemoryMax, MemoryHigh, MemoryLow, MemorySwapMax.


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0),
    ("100", 100),
    ("1K", KIB),
    ("512M", 512 * MIB),
    ("4G", 4 * GIB),
    ("1.5G", 3 * GIB // 2),
    ("2T", 2 * TIB),
    ("1P", PIB),
    ("3E", 3 * EIB),
    ("infinity", UINT64_MAX),
    (" 4G ", 4 * GIB),  # surrounding blanks are stripped
])
@pytest.mark.parametrize("name", ["MemoryMax", "MemoryHigh", "MemoryLow", "MemorySwapMax"])
def test_sizes_take_binary_suffixes_and_infinity(name: str, text: str, expected: int) -> None:
    assert one(name, text) == (name, "t", expected)


@pytest.mark.parametrize("text", ["50%", "lots", "", "4GB", "4 G", "-1", "1e9", "G", "4g", "Infinity"])
def test_sizes_refuse_anything_else(text: str) -> None:
    message = refused("MemoryMax", text)
    assert f"--property MemoryMax={text}: expected a size in bytes" in message
    assert "'infinity'" in message


@pytest.mark.parametrize("text", ["16E", "99999E", "18446744073709551616"])
def test_sizes_refuse_values_that_do_not_fit_uint64(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse("MemoryMax", text)


# ---------------------------------------------------------------------------------------------------
# CPUQuota -> CPUQuotaPerSecUSec.


@pytest.mark.parametrize(("text", "usec"), [
    ("150%", 1_500_000),
    ("100%", 1_000_000),
    ("50%", 500_000),
    ("0.5%", 5_000),
    ("33.3%", 333_000),
    ("800%", 8_000_000),
])
def test_cpu_quota_is_sent_as_usec_per_second(text: str, usec: int) -> None:
    assert one("CPUQuota", text) == ("CPUQuotaPerSecUSec", "t", usec)


@pytest.mark.parametrize("text", ["150", "1.5", "abc%", "%", "-50%", "150 %", "1e2%", "infinity"])
def test_cpu_quota_refuses_anything_but_a_percentage(text: str) -> None:
    assert "expected a percentage of one CPU" in refused("CPUQuota", text)


@pytest.mark.parametrize("text", ["0%", "0.00001%"])
def test_cpu_quota_refuses_zero(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse("CPUQuota", text)


@pytest.mark.parametrize(("text", "usec"), [("1.13%", 11_300), ("0.57%", 5_700), ("2.01%", 20_100)])
def test_cpu_quota_is_exact_for_two_decimals(text: str, usec: int) -> None:
    assert one("CPUQuota", text) == ("CPUQuotaPerSecUSec", "t", usec)


# ---------------------------------------------------------------------------------------------------
# Weights and TasksMax.


@pytest.mark.parametrize("name", ["CPUWeight", "IOWeight"])
@pytest.mark.parametrize("value", [1, 100, 10_000])
def test_weights_take_1_to_10000(name: str, value: int) -> None:
    assert one(name, str(value)) == (name, "t", value)


@pytest.mark.parametrize("name", ["CPUWeight", "IOWeight"])
@pytest.mark.parametrize("text", ["0", "10001", "-1", "1.5", "abc", "", "50%"])
def test_weights_refuse_everything_else(name: str, text: str) -> None:
    assert f"--property {name}={text}: expected an integer from 1 to 10000" in refused(name, text)


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("512", 512), ("infinity", UINT64_MAX)])
def test_tasks_max(text: str, expected: int) -> None:
    assert one("TasksMax", text) == ("TasksMax", "t", expected)


@pytest.mark.parametrize("text", ["0", "-1", "10%", "many", "", "1.5"])
def test_tasks_max_refuses_everything_else(text: str) -> None:
    assert "expected a positive integer or 'infinity'" in refused("TasksMax", text)


# ---------------------------------------------------------------------------------------------------
# CPU sets: AllowedCPUs, AllowedMemoryNodes.


@pytest.mark.parametrize(("text", "mask"), [
    ("0-3,8", b"\x0f\x01"),
    ("0", b"\x01"),
    ("7", b"\x80"),
    ("8", b"\x00\x01"),
    ("1,3,5", b"\x2a"),
    ("0 2", b"\x05"),  # blanks separate too, as in systemd
    ("3,0-1,3", b"\x0b"),  # overlaps and repeats are merged
    ("0-15", b"\xff\xff"),
])
@pytest.mark.parametrize("name", ["AllowedCPUs", "AllowedMemoryNodes"])
def test_cpu_sets_become_little_endian_bitmasks(name: str, text: str, mask: bytes) -> None:
    assert one(name, text) == (name, "ay", mask)


def test_cpu_set_up_to_the_highest_index() -> None:
    name, signature, mask = one("AllowedCPUs", f"0-{MAX_CPU_INDEX}")
    assert (name, signature) == ("AllowedCPUs", "ay")
    assert mask == b"\xff" * ((MAX_CPU_INDEX + 1) // 8)
    assert one("AllowedCPUs", str(MAX_CPU_INDEX))[2] == b"\x00" * (MAX_CPU_INDEX // 8) + b"\x80"


@pytest.mark.parametrize("text", ["3-1", str(MAX_CPU_INDEX + 1), "0-99999999", "4294967296"])
def test_cpu_sets_refuse_reversed_ranges_and_huge_indexes(text: str) -> None:
    message = refused("AllowedCPUs", text)
    assert f"--property AllowedCPUs={text}: expected a CPU list like 0-3,8" in message
    assert str(MAX_CPU_INDEX) in message


@pytest.mark.parametrize("text", ["a", "-1", "1-a", "0-3;8", "one"])
def test_cpu_sets_refuse_what_is_not_a_list(text: str) -> None:
    assert "expected a CPU list like 0-3,8" in refused("AllowedCPUs", text)


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_cpu_sets_refuse_an_empty_list(text: str) -> None:
    assert "expected a non-empty CPU list" in refused("AllowedCPUs", text)


def test_cpu_sets_refuse_an_open_range() -> None:
    with pytest.raises(InvalidArgument):
        parse("AllowedCPUs", "1-")


# ---------------------------------------------------------------------------------------------------
# The allowlist, and reporting every problem at once.


def test_a_property_outside_the_allowlist_is_refused_naming_the_allowed_ones() -> None:
    message = refused("CPUShares", "100", allowed=("MemoryMax", "CPUQuota"))
    assert message == "--property CPUShares: not allowed here; allowed: CPUQuota, MemoryMax"


def test_a_parsable_property_the_admin_did_not_allow_is_refused() -> None:
    message = refused("MemoryLow", "1G", allowed=Config().jobs.allowed_properties)
    assert message.startswith("--property MemoryLow: not allowed here; allowed: ")
    assert "MemoryMax" in message and "TasksMax" in message


def test_allowlist_names_without_a_parser_are_not_offered() -> None:
    message = refused("DeviceAllow", "/dev/nvidia0 rw", allowed=("DeviceAllow", "MemoryMax"))
    assert message == "--property DeviceAllow: not allowed here; allowed: MemoryMax"


def test_an_empty_allowlist_allows_nothing() -> None:
    assert refused("MemoryMax", "4G", allowed=()).endswith("allowed: none")
    assert parse_properties({}, ()) == []


def test_every_default_allowed_property_has_a_parser() -> None:
    assert set(Config().jobs.allowed_properties) <= set(PARSERS)


def test_several_properties_are_encoded_in_order() -> None:
    given = {"MemoryMax": "4G", "CPUQuota": "200%", "AllowedCPUs": "0-3"}
    assert parse_properties(given, ALL) == [
        ("MemoryMax", "t", 4 * GIB),
        ("CPUQuotaPerSecUSec", "t", 2_000_000),
        ("AllowedCPUs", "ay", b"\x0f"),
    ]


def test_several_problems_are_reported_at_once() -> None:
    given = {"MemoryMax": "lots", "CPUQuota": "150", "Bogus": "1", "TasksMax": "64",
             "AllowedCPUs": "3-1"}
    with pytest.raises(InvalidArgument) as caught:
        parse_properties(given, ALL)
    message = str(caught.value)
    expected = ["--property MemoryMax=lots: expected a size", "--property CPUQuota=150: expected a "
                "percentage", "--property Bogus: not allowed here", "--property AllowedCPUs=3-1: expected "
                "a CPU list"]
    positions = [message.find(fragment) for fragment in expected]
    assert -1 not in positions, message
    assert positions == sorted(positions), "problems are reported in the order given"
    assert "--property TasksMax" not in message, "a valid property is not a problem"


# ---------------------------------------------------------------------------------------------------
# NAME=VALUE on the command line.


@pytest.mark.parametrize(("text", "pair"), [
    ("MemoryMax=4G", ("MemoryMax", "4G")),
    ("A=b=c", ("A", "b=c")),
    ("TasksMax=", ("TasksMax", "")),
])
def test_split_assignment(text: str, pair: tuple) -> None:
    assert split_assignment(text) == pair


@pytest.mark.parametrize("text", ["MemoryMax", "=4G", ""])
def test_split_assignment_refuses_what_is_not_name_equals_value(text: str) -> None:
    with pytest.raises(InvalidArgument, match="expected NAME=VALUE"):
        split_assignment(text)


def test_as_dict_keeps_the_last_of_a_repeated_name() -> None:
    assert as_dict(["MemoryMax=4G", "CPUQuota=50%", "MemoryMax=8G"]) == {"MemoryMax": "8G",
                                                                        "CPUQuota": "50%"}
