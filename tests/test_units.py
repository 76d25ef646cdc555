"""parse_size: the one place sizes are read, for the worker's flags and the server's validator."""

import pytest

from banyan.units import format_size, parse_size


@pytest.mark.parametrize("text, expected", [
    (0, 0),
    (1024, 1024),
    (2048.0, 2048),
    ("1024", 1024),
    ("  77  ", 77),
    ("10B", 10),
    ("512 MiB", 512 * 1024 ** 2),
    ("512MiB", 512 * 1024 ** 2),
    ("1 GiB", 1024 ** 3),
    ("4 gib", 4 * 1024 ** 3),
    ("2 TiB", 2 * 1024 ** 4),
    ("3 KiB", 3 * 1024),
    ("2GB", 2 * 1000 ** 3),
    ("2 gb", 2 * 1000 ** 3),
    ("5 kB", 5000),
    ("7MB", 7 * 1000 ** 2),
    ("1 TB", 1000 ** 4),
    ("2 G", 2 * 1024 ** 3),
    ("8M", 8 * 1024 ** 2),
    ("1.5 GiB", 3 * 1024 ** 3 // 2),
    ("0.5 KiB", 512),
    (".5 kB", 500),
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [
    "", "   ", "GiB", "-1", -5, "1 XB", "1 GiBs", "1e9", "1,5 GiB", "twelve",
    1.5, float("nan"), float("inf"), None, True, [1], "1 2 GiB",
])
def test_parse_size_rejects_with_the_value_in_the_message(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    assert repr(bad) in str(info.value)


def test_parse_size_rounds_fractions_down_to_whole_bytes():
    assert parse_size("1.0000001 KiB") == 1024
    assert isinstance(parse_size("1.5 MB"), int)


def test_format_size_round_trips_roughly():
    assert format_size(512) == "512 B"
    assert format_size(1024 ** 3) == "1.0 GiB"
    assert parse_size(format_size(3 * 1024 ** 2)) == 3 * 1024 ** 2
