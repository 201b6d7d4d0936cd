"""The CLI's own HTTP/2 client for unary calls (hsu._kernel.h2unary).

HPACK against RFC 7541's Appendix C byte strings; calls against a real kernel
process on its unix control socket (flow control both ways, several calls on
one connection, errors as the CLI words them, the same output as grpcio's
path); and the frames a real gRPC server seldom sends (CONTINUATION, padding,
PING, GOAWAY) from a socket peer that writes them byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import hsu_env, run_hsu, write_deployment
from hsu._kernel import h2unary
from hsu._kernel.cli import EXIT
from hsu._kernel.h2unary import Decoder, RpcError
from hsu.core.v1 import core_pb2

# -- HPACK ---------------------------------------------------------------------------

#: RFC 7541 C.4: three requests, Huffman-coded, one decoder
C4 = [
    (
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        [(":method", "GET"), (":scheme", "http"), (":path", "/"),
         (":authority", "www.example.com")],
        [(":authority", "www.example.com")],
        57,
    ),
    (
        "8286 84be 5886 a8eb 1064 9cbf",
        [(":method", "GET"), (":scheme", "http"), (":path", "/"),
         (":authority", "www.example.com"), ("cache-control", "no-cache")],
        [("cache-control", "no-cache"), (":authority", "www.example.com")],
        110,
    ),
    (
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
         (":authority", "www.example.com"), ("custom-key", "custom-value")],
        [("custom-key", "custom-value"), ("cache-control", "no-cache"),
         (":authority", "www.example.com")],
        164,
    ),
]  # fmt: skip

DATE1 = "Mon, 21 Oct 2013 20:13:21 GMT"
DATE2 = "Mon, 21 Oct 2013 20:13:22 GMT"
COOKIE = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
#: RFC 7541 C.6: three responses, Huffman-coded, a 256-byte table (evictions)
C6 = [
    (
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6"
        " 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        [(":status", "302"), ("cache-control", "private"), ("date", DATE1),
         ("location", "https://www.example.com")],
        [("location", "https://www.example.com"), ("date", DATE1),
         ("cache-control", "private"), (":status", "302")],
        222,
    ),
    (
        "4883 640e ffc1 c0bf",
        [(":status", "307"), ("cache-control", "private"), ("date", DATE1),
         ("location", "https://www.example.com")],
        [(":status", "307"), ("location", "https://www.example.com"), ("date", DATE1),
         ("cache-control", "private")],
        222,
    ),
    (
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab"
        " 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f"
        " 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        [(":status", "200"), ("cache-control", "private"), ("date", DATE2),
         ("location", "https://www.example.com"), ("content-encoding", "gzip"),
         ("set-cookie", COOKIE)],
        [("set-cookie", COOKIE), ("content-encoding", "gzip"), ("date", DATE2)],
        215,
    ),
]  # fmt: skip


def _b(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in pairs]


@pytest.mark.parametrize(("examples", "size"), [(C4, 4096), (C6, 256)], ids=["C.4", "C.6"])
def test_hpack_decodes_the_rfc_7541_huffman_examples(examples, size):
    decoder = Decoder(max_size=size)
    for hex_block, fields, table, table_size in examples:
        assert decoder.decode(bytes.fromhex(hex_block.replace(" ", ""))) == _b(fields)
        assert decoder.table == _b(table)
        assert decoder.size == table_size


def test_hpack_integers_of_rfc_7541_c1():
    assert h2unary.encode_int(10, 5) == bytes([0b01010])
    assert h2unary.encode_int(1337, 5) == bytes([0b11111, 0b10011010, 0b00001010])
    assert h2unary.encode_int(42, 8) == bytes([42])
    for value, bits in ((10, 5), (1337, 5), (42, 8), (2**31 - 1, 7), (127, 7)):
        assert h2unary.decode_int(h2unary.encode_int(value, bits), 0, bits)[0] == value


def test_huffman_codes_are_the_rfc_7541_appendix_b_ones():
    codes = {sym: code for code, sym in h2unary.huffman_codes().items()}
    # code with its leading 1 bit: ' ' 010100 (6), '0' 00000 (5), 'a' 00011 (5),
    # 0 1111111111000 (13), EOS thirty ones
    assert codes[ord(" ")] == 0b1_010100
    assert codes[ord("0")] == 0b1_00000
    assert codes[ord("a")] == 0b1_00011
    assert codes[0] == 0b1_1111111111000
    assert codes[256] == (1 << 31) - 1
    assert len(codes) == 257


@pytest.mark.parametrize(
    ("block", "why"),
    [
        ("be", "no table entry 62"),  # the dynamic table is empty
        ("80", "no table entry 0"),
        ("3fe21f", "table size 4097"),  # an update over our SETTINGS_HEADER_TABLE_SIZE
        ("82 20", "table size update after a header field"),
        ("0081ff 00", "Huffman padding"),  # eight ones: padding too long
        ("008100 00", "Huffman padding"),  # '0' + three zero bits: not EOS's prefix
        ("0084ffffffff 00", "EOS"),  # a whole EOS in the string
        ("00 85 6162", "truncated string"),
        ("3fe1", "truncated"),  # an integer whose continuation is missing
    ],
)
def test_hpack_rejects_what_it_cannot_decode(block, why):
    with pytest.raises(RpcError, match=why) as err:
        Decoder().decode(bytes.fromhex(block.replace(" ", "")))
    assert err.value.code == "INTERNAL"


def test_a_table_size_update_evicts_and_a_zero_one_empties_the_table():
    decoder = Decoder()
    decoder.decode(bytes.fromhex(C4[0][0].replace(" ", "")))
    assert decoder.size == 57
    assert decoder.decode(bytes.fromhex("20 82")) == [(b":method", b"GET")]
    assert decoder.table == [] and decoder.limit == 0
    with pytest.raises(RpcError, match="no table entry 62"):
        decoder.decode(bytes.fromhex("be"))


# -- against a real kernel -------------------------------------------------------------

DEPLOYMENT = """\
name: h2unary
units:
  sleeper:
    kind: managed
    command: [sleep, "1e6"]
    start: at-start
"""

PING = "/hsu.core.v1.Core/Ping"


@pytest.fixture
def kernel(kernel_process, tmp_path):
    k = kernel_process(write_deployment(tmp_path / "d.yaml", DEPLOYMENT))
    k.wait_ready()
    return k


def socket_of(k) -> str:
    return k.address.removeprefix("unix:")


@pytest.mark.integration
@pytest.mark.parametrize("window", [h2unary.DEFAULT_WINDOW, h2unary.WINDOW])
def test_a_reply_larger_than_every_window_arrives_whole(kernel, window):
    """300 KB each way: over the 64 KiB the server may send before a
    WINDOW_UPDATE and over what it lets us send before it grants more."""
    payload = os.urandom(300_000)
    request = core_pb2.PingRequest(payload=payload).SerializeToString()
    (raw,) = h2unary.call(socket_of(kernel), [(PING, request)], 30, window=window)
    assert core_pb2.PingResponse.FromString(raw).payload == payload


@pytest.mark.integration
def test_several_calls_on_one_connection_answer_in_order(kernel):
    calls = [
        (PING, core_pb2.PingRequest(payload=bytes([i]) * (i * 40_000)).SerializeToString())
        for i in range(1, 5)
    ]
    replies = h2unary.call(socket_of(kernel), calls, 30, window=h2unary.DEFAULT_WINDOW)
    got = [core_pb2.PingResponse.FromString(r).payload for r in replies]
    assert got == [bytes([i]) * (i * 40_000) for i in range(1, 5)]


@pytest.mark.integration
def test_an_error_status_comes_back_with_its_message(kernel):
    with pytest.raises(RpcError) as err:
        h2unary.call(socket_of(kernel), [("/hsu.core.v1.Core/NoSuchMethod", b"")], 10)
    assert err.value.code == "UNIMPLEMENTED"
    out = run_hsu("endpoints", "no.such.Interface", "--control", kernel.address)
    assert out.returncode == EXIT["error"]
    assert out.stderr == (
        f"hsu: error: kernel at {kernel.address}: NOT_FOUND:"
        " no unit serves interface 'no.such.Interface'\n"
    )


GRPCIO = (
    "import sys\n"
    "from hsu._kernel import cli\n"
    "cli._local_socket = lambda address, args: None  # grpcio's path, as before\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


def _status(k, via_grpcio: bool) -> subprocess.CompletedProcess[str]:
    argv = ["status", "--json", "--control", k.address]
    head = [sys.executable, "-c", GRPCIO] if via_grpcio else [sys.executable, "-m", "hsu"]
    return subprocess.run([*head, *argv], capture_output=True, text=True, env=hsu_env(), timeout=60)


@pytest.mark.integration
def test_status_and_the_listings_say_what_grpcios_path_says(kernel):
    mine, theirs = (_status(kernel, via) for via in (False, True))
    assert mine.returncode == theirs.returncode == EXIT["ok"], mine.stderr + theirs.stderr
    a, b = json.loads(mine.stdout), json.loads(theirs.stdout)
    assert a["status"] == b["status"] and a["instances"] == b["instances"]
    assert a["status"]["state"] == "running" and len(a["instances"]) == 1
    (instance,) = a["instances"]
    assert set(a["usage"][instance["instance_id"]]) == set(b["usage"][instance["instance_id"]])
    assert {"uptime", "rss", "cpu"} <= set(a["usage"][instance["instance_id"]])
    for argv in (["plugins", "--json"], ["endpoints", "no.such.Interface"]):
        one = run_hsu(*argv, "--control", kernel.address)
        two = subprocess.run(
            [sys.executable, "-c", GRPCIO, *argv, "--control", kernel.address],
            capture_output=True,
            text=True,
            env=hsu_env(),
            timeout=60,
        )
        assert (one.returncode, one.stdout, one.stderr) == (
            two.returncode,
            two.stdout,
            two.stderr,
        )
    for head in ([sys.executable, "-m", "hsu"], [sys.executable, "-c", GRPCIO]):
        ping = subprocess.run(
            [*head, "ping", "--control", kernel.address],
            capture_output=True,
            text=True,
            env=hsu_env(),
            timeout=60,
        )
        assert ping.returncode == 0, ping.stderr
        assert ping.stdout.startswith(f"pong from {kernel.address} in ")


@pytest.mark.parametrize("how", ["no file", "no listener"])
def test_no_socket_or_no_kernel_behind_it_is_unreachable(tmp_path, how):
    path = tmp_path / "k.sock"
    if how == "no listener":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))  # bound, never listening: connect is refused
    address = f"unix:{path}"
    for command in ("ping", "status"):
        out = run_hsu(command, "--control", address)
        assert out.returncode == EXIT["unreachable"]
        assert out.stderr == (
            f"hsu: error: no kernel answers at {address}: is `hsu run` running?\n"
        )


# -- frames a real server seldom sends, written byte for byte ------------------------------


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + sid.to_bytes(4, "big")
    return head + payload


@contextlib.contextmanager
def peer(tmp_path: Path, reply: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """A unix socket that reads the client's preface and first frames, then
    writes ``reply`` and keeps what the client sends after it."""
    path = str(tmp_path / f"peer{len(list(tmp_path.glob('peer*')))}.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                received.append(conn.recv(65536))
                conn.sendall(reply)
                while chunk := conn.recv(65536):
                    received.append(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, received
    finally:
        server.close()
        thread.join(10)


def grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


SETTINGS_FRAME = frame(4, 0, 0, b"")


def test_continuation_padding_and_ping_are_handled(tmp_path):
    reply = core_pb2.PingResponse(payload=b"pong").SerializeToString()
    head = bytes.fromhex("88")  # :status 200 (static)
    ctype = h2unary.encode_headers([("content-type", "application/grpc")])
    data = grpc_message(reply)
    padded = bytes((3,)) + data + b"\0\0\0"
    trailer = b"\x40\x0bgrpc-status\x010"  # indexed: grpc-status 0 enters the table
    stream = (
        SETTINGS_FRAME
        + frame(6, 0, 0, b"12345678")  # PING: must come back with ACK
        + frame(1, 0, 1, head)  # HEADERS without END_HEADERS
        + frame(9, 4, 1, ctype)  # CONTINUATION with END_HEADERS
        + frame(0, 0x8, 1, padded)  # DATA, PADDED
        + frame(1, 0x5, 1, trailer)  # trailers, END_STREAM | END_HEADERS
    )
    with peer(tmp_path, stream) as (path, received):
        (raw,) = h2unary.call(path, [(PING, b"")], 5)
    assert core_pb2.PingResponse.FromString(raw).payload == b"pong"
    sent = b"".join(received)
    assert frame(6, 1, 0, b"12345678") in sent  # the PING's ACK
    assert frame(4, 1, 0, b"") in sent  # the SETTINGS' ACK


def failure(tmp_path: Path, reply: bytes, timeout: float = 5) -> RpcError:
    """The error of a call to a peer that writes ``reply``."""
    with peer(tmp_path, reply) as (path, _):
        try:
            h2unary.call(path, [(PING, b"")], timeout)
        except RpcError as exc:
            return exc
    raise AssertionError("the call did not fail")


def test_a_percent_encoded_message_in_a_trailers_only_reply(tmp_path):
    block = b"\x88" + h2unary.encode_headers(
        [("grpc-status", "7"), ("grpc-message", "uid%3A65534 %E2%80%94 no")]
    )
    err = failure(tmp_path, SETTINGS_FRAME + frame(1, 0x5, 1, block))
    assert (err.code, err.details) == ("PERMISSION_DENIED", "uid:65534 \u2014 no")


def test_goaway_and_what_is_not_supported_are_clear_errors(tmp_path):
    err = failure(tmp_path, SETTINGS_FRAME + frame(7, 0, 0, struct.pack(">II", 0, 0) + b"bye"))
    assert err.code == "UNAVAILABLE" and "GOAWAY" in err.details
    err = failure(tmp_path, SETTINGS_FRAME + frame(5, 4, 1, struct.pack(">I", 2) + b"\x82"))
    assert err.code == "INTERNAL" and "PUSH_PROMISE" in err.details
    err = failure(tmp_path, b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert err.code == "INTERNAL" and "frame" in err.details


def test_a_peer_that_never_answers_runs_into_the_deadline(tmp_path):
    err = failure(tmp_path, b"", timeout=0.3)
    assert (err.code, err.details) == ("DEADLINE_EXCEEDED", "Deadline Exceeded")


@pytest.mark.integration
def test_send_then_read_is_call_in_two_halves(kernel):
    """``h2unary.send``: the calls go out, the replies are read later, in order."""
    calls = [
        (PING, core_pb2.PingRequest(payload=bytes([i]) * 10).SerializeToString()) for i in range(3)
    ]
    pending = h2unary.send(socket_of(kernel), calls, 30)
    replies = [core_pb2.PingResponse.FromString(raw).payload for raw in pending()]
    assert replies == [bytes([i]) * 10 for i in range(3)]


@pytest.mark.parametrize("names", [["hsu_instance_cpu_percent", "hsu_instances"], ["x" * 300], []])
def test_hsu_status_writes_its_metrics_request_out_as_protobuf_would(names):
    from hsu._kernel.cli import metrics_request

    expected = core_pb2.MetricsRequest(families=names, local=True).SerializeToString()
    assert metrics_request(names) == expected
