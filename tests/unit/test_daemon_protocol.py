"""vmmd.daemon.protocol: request validation and framing, fed hand-built lines."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd.daemon.protocol import MAX_REQUEST, OPS, ProtocolError, encode, error, ok, parse_request


def test_valid_requests_round_trip():
    for request in ({"op": "ping"}, {"op": "list"}, {"op": "show", "name": "g0"},
                    {"op": "start", "name": "a.b-c_1", "attach": True},
                    {"op": "start", "definition": {"path": "/x.toml", "text": "firmware = 'x'"}},
                    {"op": "stop", "name": "g", "force": False, "timeout": 2.5},
                    {"op": "log", "name": "g", "lines": 100}, {"op": "console", "name": "g", "replay": False}):
        line = encode(request)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert parse_request(line) == request


@pytest.mark.parametrize("line, errno, words", [
    (b"{", "EINVAL", "not a JSON object"),
    (b"\xff\xfe", "EINVAL", "not a JSON object"),
    (b"[]", "EINVAL", "must be a JSON object"),
    (b'{"op":"format-disk"}', "EOPNOTSUPP", "unknown op"),
    (b'{"name":"x"}', "EOPNOTSUPP", "unknown op"),
    (b'{"op":"show"}', "EINVAL", "needs field 'name'"),
    (b'{"op":"show","name":5}', "EINVAL", "must be str"),
    (b'{"op":"stop","name":"g","force":1}', "EINVAL", "must be bool"),
    (b'{"op":"stop","name":"g","timeout":true}', "EINVAL", "must not be a boolean"),
    (b'{"op":"list","owner":0}', "EINVAL", "does not take field 'owner'"),
    (b'{"op":"show","name":"../../etc/passwd"}', "EINVAL", "not valid"),
    (b'{"op":"show","name":""}', "EINVAL", "not valid"),
    (b'{"op":"start"}', "EINVAL", "exactly one of"),
    (b'{"op":"start","name":"a","definition":{"path":"p","text":"t"}}', "EINVAL", "exactly one of"),
    (b'{"op":"start","definition":{"path":"p"}}', "EINVAL", "'definition' must be"),
    (b'{"op":[]}', "EOPNOTSUPP", "unknown op"),
    (b'{"op":{}}', "EOPNOTSUPP", "unknown op"),
    (b'{"op":"list","x":' + b"[" * 20000 + b"]" * 20000 + b"}", "EINVAL", "nested too deeply"),
    (b'{"op":"log","name":"g","lines":' + b"9" * 5000 + b"}", "EINVAL", "not a JSON object"),
    (b'{"op":"start","definition":{"path":"/tmp/\\ud800.toml","text":"x"}}', "EINVAL", "lone surrogate"),
    (b'{"op":"start","definition":{"path":"/tmp/a\\u0000b","text":"x"}}', "EINVAL", "a NUL"),
])
def test_bad_requests_name_the_problem(line, errno, words):
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.errno == errno
    assert words in info.value.message


def test_oversized_request_is_refused():
    line = encode({"op": "ping"})[:-1] + b" " * MAX_REQUEST
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.errno == "EMSGSIZE"


def test_replies():
    assert json.loads(encode(ok(x=1))) == {"ok": True, "x": 1}
    assert json.loads(encode(error("EPERM", "no"))) == {"ok": False, "errno": "EPERM", "error": "no"}


@given(st.binary(max_size=512))
def test_any_bytes_parse_or_raise_protocol_error(data):
    try:
        request = parse_request(data)
    except ProtocolError as err:
        assert err.errno in ("EINVAL", "EOPNOTSUPP", "EMSGSIZE")
    else:
        assert request["op"] in OPS


def test_a_socket_path_that_is_not_a_socket_says_so(tmp_path):
    import socket as socket_mod

    from vmmd.daemon.protocol import Client, DaemonError

    stale = tmp_path / "stale.sock"
    listener = socket_mod.socket(socket_mod.AF_UNIX)
    listener.bind(str(stale))
    listener.close()  # a socket file nobody listens on
    with pytest.raises(DaemonError, match="not listening") as err:
        Client(str(stale), 2)
    assert err.value.errno == "ECONNREFUSED"
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(DaemonError, match="is not a socket"):
        Client(str(regular), 2)
