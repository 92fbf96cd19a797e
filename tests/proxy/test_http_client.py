"""The upstream HTTP client against real sockets: scripted servers say exactly what arrives.

Every scenario runs on both event loops Tollgate may use: asyncio's (tests) and
uvloop's (``tollgate serve``), whose transports differ in small ways.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.proxy.http_client import (
    READ_BUFFER_HIGH_BYTES,
    AnswerTimeout,
    ConnectError,
    ConnectionClosed,
    MalformedResponse,
    ResponseTooLarge,
    UpstreamClient,
    UpstreamResponse,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BODY = b'{"model": "m", "messages": []}'


def on_both_loops(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())
    uvloop.run(scenario())


class ScriptedServer:
    """A TCP server whose connections each run ``handler``; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ScriptedServer:
        return self if self.server is not None else await self.start()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> ScriptedServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.append(writer)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl_context)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1/chat/completions"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body; None when the client closed the connection first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def answer(body: bytes, *extra: str) -> bytes:
    headers = "".join(f"{line}\r\n" for line in extra)
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{headers}\r\n").encode() + body


async def keep_alive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with its own head and body."""
    while (request := await read_request(reader)) is not None:
        head, body = request
        writer.write(answer(head + body))
        await writer.drain()


def later(seconds: float = 5.0) -> float:
    """A deadline ``seconds`` from now on the running loop's clock."""
    return asyncio.get_running_loop().time() + seconds


async def send(upstream: UpstreamClient, url: str, headers: dict[str, str] | None = None,
               *, within_s: float = 5.0) -> UpstreamResponse:
    return await upstream.post(url, BODY, headers or {}, connect_timeout_s=5,
                               deadline_s=later(within_s))


def client(**options: Any) -> UpstreamClient:
    options.setdefault("connections_per_origin", 8)
    options.setdefault("keepalive_s", 30.0)
    return UpstreamClient(user_agent="tollgate-test", **options)


def test_requests_reuse_one_kept_alive_connection_and_carry_their_headers() -> None:
    async def scenario() -> None:
        async with ScriptedServer(keep_alive_echo) as server:
            upstream = client()
            for number in range(5):
                response = await send(upstream, server.url(), {"X-Request-Id": f"req_{number}"})
                echoed = await response.read(1 << 20)
                response.release()
                assert response.status == 200
                assert echoed.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
                assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in echoed
                assert b"Accept-Encoding: identity\r\n" in echoed
                assert b"User-Agent: tollgate-test\r\n" in echoed
                assert f"X-Request-Id: req_{number}\r\n".encode() in echoed
                assert f"Content-Length: {len(BODY)}\r\n".encode() in echoed
                assert echoed.endswith(b"\r\n\r\n" + BODY)
            assert server.connections == 1
            await upstream.close()

    on_both_loops(scenario)


def test_chunked_gzip_and_until_close_bodies_are_read_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(gzip.compress(b"x" * 100_000), "Content-Encoding: gzip"))

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")

    async def scenario() -> None:
        upstream = client()
        expected = {chunked: b"hello chunked world", gzipped: b"x" * 100_000,
                    until_close: b"all of it"}
        for handler, body in expected.items():
            async with ScriptedServer(handler) as server:
                for _ in range(2):
                    response = await send(upstream, server.url())
                    assert await response.read(1 << 20) == body
                    response.release()
                # Only an answer that ends with its connection costs a new one per request.
                assert server.connections == (2 if handler is until_close else 1)
        await upstream.close()

    on_both_loops(scenario)


def test_lines_are_read_across_packets_and_the_end_is_empty() -> None:
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: one\n\nda", b"ta: two\n", b"\ndata: no newline at the end"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def scenario() -> None:
        async with ScriptedServer(stream) as server:
            upstream = client()
            response = await send(upstream, server.url())
            lines = []
            while line := await response.readline(1024):
                lines.append(line)
            assert lines == [b"data: one\n", b"\n", b"data: two\n", b"\n",
                             b"data: no newline at the end"]
            response.release()
            await upstream.close()

    on_both_loops(scenario)


def test_limits_on_bodies_and_lines() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(b"y" * 5000))

    async def scenario() -> None:
        async with ScriptedServer(big) as server:
            upstream = client()
            response = await send(upstream, server.url())
            with pytest.raises(ResponseTooLarge):
                await response.read(4999)
            response.close()
            response = await send(upstream, server.url())
            with pytest.raises(ResponseTooLarge):
                await response.readline(1000)
            response.close()
            response = await send(upstream, server.url())
            assert await response.read_prefix(100) == b"y" * 100
            response.release()  # Not read to its end: the connection is dropped.
            assert server.connections == 3
            await upstream.close()

    on_both_loops(scenario)


def test_a_kept_alive_connection_dropped_as_it_is_picked_is_retried_once_on_a_new_one() -> None:
    async def drops_second_request(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"first"))
        await writer.drain()
        # The next request on this connection is read and dropped unanswered, as a
        # server does when its keep-alive timer fires as the request arrives.
        await read_request(reader)

    async def scenario() -> None:
        async with ScriptedServer(drops_second_request) as server:
            upstream = client()
            response = await send(upstream, server.url())
            assert await response.read(100) == b"first"
            response.release()
            response = await send(upstream, server.url())
            assert await response.read(100) == b"first"
            response.release()
            assert server.connections == 2
            await upstream.close()

    on_both_loops(scenario)


def test_a_new_connection_closed_before_an_answer_is_not_retried() -> None:
    async def drops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")

    async def scenario() -> None:
        upstream = client()
        async with ScriptedServer(drops) as server:
            with pytest.raises(ConnectionClosed, match="before an answer"):
                await send(upstream, server.url())
            assert server.connections == 1
        async with ScriptedServer(cut) as server:
            response = await send(upstream, server.url())
            with pytest.raises(ConnectionClosed, match="before the answer ended"):
                await response.read(1000)
            response.close()
        await upstream.close()

    on_both_loops(scenario)


def test_garbage_refused_connections_and_unknown_codings_are_errors() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")

    async def brotli(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"\x1b\x00", "Content-Encoding: br"))

    async def scenario() -> None:
        upstream = client()
        for handler in (garbage, brotli):
            async with ScriptedServer(handler) as server:
                with pytest.raises(MalformedResponse):
                    await send(upstream, server.url())
        async with ScriptedServer(keep_alive_echo) as server:
            port = server.port
        with pytest.raises(ConnectError):
            await send(upstream, f"http://127.0.0.1:{port}/v1")
        await upstream.close()

    on_both_loops(scenario)


def test_headers_that_could_split_the_request_are_refused_before_sending() -> None:
    async def scenario() -> None:
        async with ScriptedServer(keep_alive_echo) as server:
            upstream = client()
            for headers in ({"X-Request-Id": "a\r\nX-Evil: 1"}, {"Bad Name": "x"},
                            {"Content-Length": "1"}, {"Host": "elsewhere"}):
                with pytest.raises(ValueError):
                    await send(upstream, server.url(), headers)
            assert server.connections == 0
            await upstream.close()

    on_both_loops(scenario)


def test_an_abandoned_request_closes_its_connection() -> None:
    async def scenario() -> None:
        closed = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            assert await reader.read() == b""  # Only returns when the client closes.
            closed.set()

        async with ScriptedServer(silent) as server:
            upstream = client()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await send(upstream, server.url())
            async with asyncio.timeout(5):
                await closed.wait()
            await upstream.close()

    on_both_loops(scenario)


def test_callers_beyond_the_connection_limit_wait_for_a_free_connection() -> None:
    async def scenario() -> None:
        go = asyncio.Event()
        arrived = 0
        two_arrived = asyncio.Event()

        async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal arrived
            while await read_request(reader) is not None:
                arrived += 1
                if arrived == 2:
                    two_arrived.set()
                await go.wait()
                writer.write(answer(b"ok"))

        async with ScriptedServer(held) as server:
            upstream = client(connections_per_origin=2)

            async def call() -> bytes:
                response = await send(upstream, server.url())
                body = await response.read(100)
                response.release()
                return body

            calls = [asyncio.ensure_future(call()) for _ in range(5)]
            async with asyncio.timeout(5):
                await two_arrived.wait()
            assert (server.connections, arrived) == (2, 2)
            go.set()
            async with asyncio.timeout(5):
                assert await asyncio.gather(*calls) == [b"ok"] * 5
            assert server.connections == 2
            await upstream.close()

    on_both_loops(scenario)


def test_a_reader_that_falls_behind_pauses_the_socket_and_loses_nothing() -> None:
    lines = [b"data: %06d %s\n" % (number, b"z" * 100) for number in range(10_000)]

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        writer.write(b"".join(lines))
        await writer.drain()

    async def scenario() -> None:
        async with ScriptedServer(flood) as server:
            upstream = client()
            response = await send(upstream, server.url())
            connection = response._connection
            # The protocol has no event for "paused": look at it on every turn of the loop.
            async with asyncio.timeout(5):
                while not connection.reading_paused:  # noqa: ASYNC110
                    await asyncio.sleep(0)
            assert len(connection.buffer) > READ_BUFFER_HIGH_BYTES
            received = []
            while line := await response.readline(1024):
                received.append(line)
            assert received == lines
            response.release()
            await upstream.close()

    on_both_loops(scenario)


def self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    trusting = ssl.create_default_context(cafile=str(cert_path))
    return server, trusting


def test_https_with_a_trusted_certificate_and_refused_without(tmp_path: Path) -> None:
    server_context, trusting = self_signed(tmp_path)

    async def scenario() -> None:
        server = await ScriptedServer(keep_alive_echo).start(server_context)
        async with server:
            upstream = client(ssl_context=trusting)
            for _ in range(2):
                response = await send(upstream, server.url("https"))
                assert (await response.read(1 << 20)).endswith(BODY)
                response.release()
            assert server.connections == 1
            await upstream.close()
            # The system's trust store does not know our certificate.
            with pytest.raises(ConnectError):
                await send(client(), server.url("https"))

    on_both_loops(scenario)


def test_the_deadline_bounds_the_answer_and_the_idle_limit_bounds_each_silence() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Five lines 50 ms apart (250 ms in all), then silence."""
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for number in range(5):
            writer.write(b"line %d\n" % number)
            await writer.drain()
            await asyncio.sleep(0.05)  # The pace of the scripted upstream, not a wait.
        await reader.read()

    async def scenario() -> None:
        async with ScriptedServer(trickle) as server:
            upstream = client()
            # Silences of 50 ms never reach a 150 ms idle limit; the answer's total
            # 250 ms does not matter; the silence after the fifth line does.
            response = await send(upstream, server.url())
            response.limit_time(later(), 0.15)
            lines = [await response.readline(100) for _ in range(5)]
            assert lines == [b"line %d\n" % number for number in range(5)]
            with pytest.raises(AnswerTimeout) as stalled:
                await response.readline(100)
            assert stalled.value.idle
            response.close()
            # A deadline, unlike the idle limit, is not moved by data arriving.
            response = await send(upstream, server.url(), within_s=0.12)
            with pytest.raises(AnswerTimeout) as late:
                while await response.readline(100):
                    pass
            assert not late.value.idle
            response.close()
            await upstream.close()

    on_both_loops(scenario)


def test_waiting_for_a_free_connection_is_bounded_by_the_deadline() -> None:
    async def scenario() -> None:
        arrived, release = asyncio.Event(), asyncio.Event()

        async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            arrived.set()
            await release.wait()
            writer.write(answer(b"ok"))

        async with ScriptedServer(held) as server:
            upstream = client(connections_per_origin=1)
            first = asyncio.ensure_future(send(upstream, server.url()))
            async with asyncio.timeout(5):
                await arrived.wait()  # The only connection is busy from here.
            with pytest.raises(AnswerTimeout, match="no connection free"):
                await send(upstream, server.url(), within_s=0.05)
            release.set()
            response = await first
            assert await response.read(10) == b"ok"
            response.release()
            await upstream.close()

    on_both_loops(scenario)


def test_informational_answers_are_skipped_for_the_real_one() -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            await writer.drain()
            writer.write(answer(b"the answer", "X-Final: yes"))

    async def scenario() -> None:
        async with ScriptedServer(hints) as server:
            upstream = client()
            for _ in range(2):
                response = await send(upstream, server.url())
                assert response.status == 200
                assert response.headers.get("x-final") == "yes"
                assert "link" not in response.headers
                assert await response.read(100) == b"the answer"
                response.release()
            assert server.connections == 1
            await upstream.close()

    on_both_loops(scenario)


@pytest.mark.parametrize("with_the_answer", [True, False])
def test_a_connection_that_speaks_out_of_turn_is_dropped_not_reused(
    with_the_answer: bool,
) -> None:
    """Bytes after a complete answer (in its packet, or to an idle connection) are no answer
    to anything: the answer read stays the first one, and the connection is not reused."""
    late = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"

    async def scenario() -> None:
        released, dropped = asyncio.Event(), asyncio.Event()

        async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await read_request(reader) is None:
                return
            if server.connections > 1:
                writer.write(answer(b"second"))
                await read_request(reader)
                return
            if with_the_answer:
                writer.write(answer(b"first") + late)
            else:
                writer.write(answer(b"first"))
                await released.wait()
                writer.write(late)
            await writer.drain()
            assert await reader.read() == b""  # Returns once the client closed it.
            dropped.set()

        server = ScriptedServer(chatty)
        async with server:
            upstream = client()
            response = await send(upstream, server.url())
            assert response.status == 200
            assert await response.read(100) == b"first"
            response.release()
            released.set()
            async with asyncio.timeout(5):
                await dropped.wait()
            response = await send(upstream, server.url())
            assert await response.read(100) == b"second"
            response.release()
            assert server.connections == 2
            await upstream.close()

    on_both_loops(scenario)
