"""parse_size: the one place sizes are read, for the worker's flags and the server's validator."""

import pytest

from banyan.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        (0, 0),
        (1024, 1024),
        (2048.0, 2048),
        ("1024", 1024),
        ("  77  ", 77),
        ("10B", 10),
        ("512 MiB", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("1 GiB", 1024**3),
        ("4 GiB", 4 * 1024**3),
        ("4g", 4 * 1024**3),
        ("2 TiB", 2 * 1024**4),
        ("3 KiB", 3 * 1024),
        ("2GB", 2 * 1000**3),
        ("2 gB", 2 * 1000**3),
        ("5 kB", 5000),
        ("7MB", 7 * 1000**2),
        ("1 TB", 1000**4),
        ("2 G", 2 * 1024**3),
        ("8M", 8 * 1024**2),
        ("1.5 GiB", 3 * 1024**3 // 2),
        ("0.5 KiB", 512),
        (".5 kB", 500),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "GiB",
        "-1",
        -5,
        "1 XB",
        "1 GiBs",
        "1e9",
        "1,5 GiB",
        "twelve",
        1.5,
        float("nan"),
        float("inf"),
        None,
        True,
        [1],
        "1 2 GiB",
    ],
)
def test_parse_size_rejects_with_the_value_in_the_message(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    "bits, hint",
    [
        ("2Gb", "2 GB (powers of 1000) or 2 GiB (powers of 1024)"),
        ("2 gb", "2 GB"),
        ("4 gib", "4 GiB"),
        ("512 Mb", "512 MiB"),
        ("8b", "8 B"),
        ("1 kb", "1 KB"),
    ],
)
def test_a_lower_case_b_means_bits_and_is_refused(bits, hint):
    with pytest.raises(ValueError) as info:
        parse_size(bits)
    assert "lower-case 'b' means bits" in str(info.value) and hint in str(info.value)


def test_parse_size_rounds_fractions_down_to_whole_bytes():
    assert parse_size("1.0000001 KiB") == 1024
    assert isinstance(parse_size("1.5 MB"), int)


def test_format_size_round_trips_roughly():
    assert format_size(512) == "512 B"
    assert format_size(1024**3) == "1.0 GiB"
    assert parse_size(format_size(3 * 1024**2)) == 3 * 1024**2


def _resetting_server():
    """A socket that reads each request and closes without answering, as a
    server killed mid-request does; returns it and its list of requests."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    seen = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                key = [
                    line.split(b":", 1)[1].strip()
                    for line in request.split(b"\r\n")
                    if line.lower().startswith(b"idempotency-key:")
                ]
                seen.append((request.split(b" ", 1)[0], key[0] if key else None))

    threading.Thread(target=serve, daemon=True).start()
    return listener, seen


def test_client_repeats_only_the_posts_the_server_does_once():
    """A submission carries an Idempotency-Key, the same on every try, so it
    is retried; another POST the server may have taken is sent once."""
    from banyan.client import Client, ServerUnreachable

    listener, seen = _resetting_server()
    url = "http://127.0.0.1:%d" % listener.getsockname()[1]
    try:
        client = Client(url, attempts=3, backoff=0.01)
        with pytest.raises(ServerUnreachable) as info:
            client.create_tasks([{"command": "true"}])
        assert info.value.maybe_done
        assert [method for method, _ in seen] == [b"POST"] * 3
        assert len({key for _, key in seen}) == 1 and seen[0][1]
        del seen[:]
        with pytest.raises(ServerUnreachable):
            client.register_worker("n1", {"cores": 1})
        assert [method for method, _ in seen] == [b"POST"]  # sent once: the server may have acted
        del seen[:]
        with pytest.raises(ServerUnreachable):
            client.get("tasks")
        assert seen == [(b"GET", None)] * 3  # a read is safe to repeat
    finally:
        listener.close()
