"""The HTTP/1.1 client that talks to upstream providers: pooled keep-alive connections.

Why not aiohttp's ``ClientSession``: the upstream call is the proxy's hottest path,
and aiohttp's client spends ~260 µs of CPU per small request at concurrency 64
(~340 µs at concurrency 1) on machinery this path does not use (cookies,
redirects, proxies, traces, multipart payloads, per-request timer objects).
This client does one thing, POST a JSON body and read the answer, on an
``asyncio.Protocol`` with the ``httptools`` (llhttp) parser: ~80-90 µs per
request in the same probe, and ~0.3 ms less latency per call.

What it does: one pool of idle connections per origin (scheme, host, port),
reused last-in first-out and dropped after ``keepalive_s`` or when the server's
``Keep-Alive: timeout`` says so; at most ``connections_per_origin`` open per
origin (callers wait for one beyond that); TLS with the system's trust store;
``Accept-Encoding: identity`` (gzip and deflate are still decoded when a server
sends them anyway); bodies read whole (bounded) or line by line, with reading
paused while the reader falls behind. What it does not do: redirects, proxies,
cookies, HTTP/2, ``Expect: 100-continue``, streaming request bodies.

Retry: a request is sent again, once, on a new connection when a *reused*
keep-alive connection closes before any byte of the answer arrived: the server
dropped an idle connection as we picked it, so the request was never applied
(browsers do the same for any method). Nothing else is retried here; routes
fall back one level up.

Time: every request has a deadline (on the loop's clock) for its whole answer, and
a stream may add an idle limit (nothing received for that long). One timer per
connection watches both, re-armed only when it fires: a stream's events cost no
timer each (an ``asyncio.timeout`` around every read cost ~8 µs per event).

Errors (every failure of this module is one of these)::

    HttpClientError
    ├── ConnectError        no connection could be opened (DNS, refused, TLS, connect timeout)
    ├── ConnectionClosed    the server closed or reset the connection before the answer ended
    ├── MalformedResponse   not an HTTP/1.x answer we can read (or an unknown content coding)
    ├── ResponseTooLarge    a body or a line beyond the reader's limit
    └── AnswerTimeout       the deadline passed, or the idle limit, before the answer ended
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

# Reading from a connection pauses while this much of its answer waits unread.
READ_BUFFER_HIGH_BYTES = 256 * 1024
# More response header bytes than this is not an upstream we want to talk to.
RESPONSE_HEADERS_MAX_BYTES = 64 * 1024
# Requests to URLs not seen before are parsed once; the catalog names few of them.
TARGETS_CACHED_MAX = 1024
# Seconds subtracted from a server's announced keep-alive timeout, so we never
# pick a connection the server is about to close.
KEEPALIVE_MARGIN_S = 1.0

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers this client writes itself; a caller's copy would contradict them.
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                          "accept-encoding"})
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Header names a client remembers as valid (a few per provider); values are checked
# on every request.
HEADER_NAMES_CHECKED_MAX = 1024
_KEEPALIVE_TIMEOUT = re.compile(r"timeout\s*=\s*(\d+)")


class HttpClientError(Exception):
    """Base of every failure this client reports."""


class ConnectError(HttpClientError):
    """No connection to the server could be opened."""


class ConnectionClosed(HttpClientError):
    """The server closed or reset the connection before its answer ended."""


class MalformedResponse(HttpClientError):
    """The bytes received are not an answer this client can read."""


class ResponseTooLarge(HttpClientError):
    """A body or a line of the answer is larger than the reader allows."""


class AnswerTimeout(HttpClientError):
    """The answer did not come (or stopped coming) in time; ``idle`` says which limit."""

    def __init__(self, message: str, *, idle: bool) -> None:
        super().__init__(message)
        self.idle = idle


class _AfterTheAnswer(Exception):
    """Bytes after a complete answer, or to an idle connection (a server's "408" before it
    closes one, say): a server that speaks out of turn is not reused."""


@dataclass(frozen=True, slots=True)
class _Target:
    """What a URL means to the pool: which origin, and the request line's start."""

    origin: tuple[str, str, int]
    tls: bool
    host: str
    port: int
    # "POST /path HTTP/1.1\r\nHost: ...\r\n" plus the headers every request carries.
    head: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection, and the answer being read from it."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.loop = origin.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since_s = 0.0
        self.keepalive_s = origin.keepalive_s
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        # The current exchange's time limits, watched by one timer (see limit_time).
        self._timer: asyncio.TimerHandle | None = None
        self.deadline_s = math.inf
        self.idle_s: float | None = None
        self.last_data_s = 0.0
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.headers_complete = False
        self.informational = False
        self.complete = False
        self.keep_alive = False
        self.error: HttpClientError | None = None
        self.received_any = False
        self.buffer = bytearray()
        self.decoder: zlib._Decompress | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False

    def begin_exchange(self) -> None:
        """Ready a fresh or idle connection for the next request."""
        if self.reused:
            self.parser = httptools.HttpResponseParser(self)
        self._reset_exchange()

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_data_s = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__ or error.__cause__
            if isinstance(cause, _AfterTheAnswer):
                self.close()  # The answer is whole and stays readable; the connection is not.
                return
            self._fail(cause if isinstance(cause, HttpClientError)
                       else MalformedResponse(f"unreadable answer ({error})"))
        except httptools.HttpParserError as error:
            self._fail(MalformedResponse(f"unreadable answer ({error})"))
        if (len(self.buffer) > READ_BUFFER_HIGH_BYTES and not self.reading_paused
                and self.transport is not None and not self.closed):
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # Close our side too: an answer never continues after the server's EOF.

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stop_timer()
        self.origin.forget(self)
        if not self.complete and self.error is None:
            if self.headers_complete and self._ends_at_close():
                self.complete = True  # A body without length or chunks ends with the connection.
            else:
                self.error = ConnectionClosed(
                    "connection closed before the answer ended" if self.received_any
                    else "connection closed before an answer")
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _AfterTheAnswer

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > RESPONSE_HEADERS_MAX_BYTES:
            raise MalformedResponse("answer headers too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self.headers.get(key)
        self.headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Informational (100 Continue, 103 Early Hints): the answer itself follows.
            self.informational = True
            self.headers = {}
            self.header_bytes = 0
            return
        self.status = status
        coding = self.headers.get("content-encoding", "identity").strip().lower()
        if coding == "gzip":
            self.decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self.decoder = zlib.decompressobj()
        elif coding not in ("identity", ""):
            raise MalformedResponse(f"unsupported content-encoding {coding!r}")
        announced = _KEEPALIVE_TIMEOUT.search(self.headers.get("keep-alive", ""))
        if announced is not None:
            self.keepalive_s = min(self.origin.keepalive_s,
                                   max(0.0, int(announced.group(1)) - KEEPALIVE_MARGIN_S))
        self.headers_complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.decoder is not None:
            try:
                body = self.decoder.decompress(body)
            except zlib.error as error:
                raise MalformedResponse(f"undecodable body ({error})") from None
        self.buffer += body
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- for the pool and the response ----------------------------------------

    def _ends_at_close(self) -> bool:
        return ("content-length" not in self.headers
                and "chunked" not in self.headers.get("transfer-encoding", "").lower())

    def limit_time(self, deadline_s: float, idle_s: float | None) -> None:
        """Fail the exchange at ``deadline_s``, or after ``idle_s`` without a byte."""
        self.deadline_s = deadline_s
        self.idle_s = idle_s
        self.last_data_s = self.loop.time()
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        when = self.deadline_s
        if self.idle_s is not None:
            when = min(when, self.last_data_s + self.idle_s)
        self._timer = self.loop.call_at(when, self._check_time)

    def _check_time(self) -> None:
        self._timer = None
        now_s = self.loop.time()
        if now_s >= self.deadline_s:
            self._fail(AnswerTimeout("no answer in time", idle=False))
        elif self.idle_s is not None and now_s - self.last_data_s >= self.idle_s:
            self._fail(AnswerTimeout(f"nothing received for {self.idle_s:g} s", idle=True))
        else:
            self._arm()  # Data arrived since the timer was set: watch from the latest byte.

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: HttpClientError) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something arrives: data, the end of the answer, or an error."""
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if self._write_paused and not self.closed:
            self._drained = self.loop.create_future()
            await self._drained

    @property
    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and self.error is None and not self.closed
                and not self.buffer)

    def close(self) -> None:
        self.stop_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.origin.forget(self)


class _Origin:
    """The connections to one scheme://host:port."""

    def __init__(self, target: _Target, client: UpstreamClient) -> None:
        self.target = target
        self.client = client
        self.loop = client.loop
        self.keepalive_s = client.keepalive_s
        self.limit = client.connections_per_origin
        self.idle: list[_Connection] = []
        self.connections: set[_Connection] = set()
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, connect_timeout_s: float, deadline_s: float, *,
                      fresh: bool = False) -> _Connection:
        now_s = self.loop.time()
        while self.idle and not fresh:
            connection = self.idle.pop()
            if not connection.closed and now_s - connection.idle_since_s < connection.keepalive_s:
                connection.reused = True
                return connection
            connection.close()
        while len(self.connections) >= self.limit:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline_s):
                    await waiter
            except TimeoutError:
                raise AnswerTimeout("no connection free in time", idle=False) from None
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
            if self.idle and not fresh:
                return await self.acquire(connect_timeout_s, deadline_s)
        return await self._connect(min(connect_timeout_s, deadline_s - self.loop.time()))

    async def _connect(self, connect_timeout_s: float) -> _Connection:
        target = self.target
        connection = _Connection(self)
        self.connections.add(connection)
        try:
            async with asyncio.timeout(connect_timeout_s):
                await self.loop.create_connection(
                    lambda: connection, target.host, target.port,
                    ssl=self.client.ssl_context if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
        except TimeoutError:
            self.forget(connection)
            raise ConnectError("connect timed out") from None
        except (OSError, ssl.SSLError) as error:
            self.forget(connection)
            raise ConnectError(f"cannot connect ({type(error).__name__})") from None
        except BaseException:
            self.forget(connection)
            connection.close()
            raise
        return connection

    def release(self, connection: _Connection) -> None:
        connection.stop_timer()
        if not connection.reusable:
            connection.close()
            return
        now_s = self.loop.time()
        connection.idle_since_s = now_s
        self.idle.append(connection)
        # The oldest idle connections are the first to expire: drop them as we pass.
        while self.idle and now_s - self.idle[0].idle_since_s >= self.idle[0].keepalive_s:
            self.idle.pop(0).close()
        self._wake_one()

    def forget(self, connection: _Connection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            if connection in self.idle:
                self.idle.remove(connection)
            self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()


class UpstreamResponse:
    """An answer whose status and headers are here; its body is read from the connection."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = connection.status
        # Header names in lower case; repeated headers joined with ", ".
        self.headers = connection.headers

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self, limit_bytes: int) -> bytes:
        """The whole body; ``ResponseTooLarge`` beyond ``limit_bytes``."""
        connection = self._connection
        while not connection.complete:
            if connection.error is not None:
                raise connection.error
            if len(connection.buffer) > limit_bytes:
                raise ResponseTooLarge(f"answer larger than {limit_bytes} bytes")
            await connection.wait()
        if len(connection.buffer) > limit_bytes:
            raise ResponseTooLarge(f"answer larger than {limit_bytes} bytes")
        body = bytes(connection.buffer)
        connection.buffer.clear()
        return body

    async def read_prefix(self, limit_bytes: int) -> bytes:
        """At most the first ``limit_bytes`` of the body (an error message, say); never raises
        for size, and returns what arrived if the connection breaks."""
        connection = self._connection
        while (not connection.complete and connection.error is None
               and len(connection.buffer) < limit_bytes):
            await connection.wait()
        prefix = bytes(connection.buffer[:limit_bytes])
        del connection.buffer[:limit_bytes]
        return prefix

    async def readline(self, limit_bytes: int) -> bytes:
        """The next line with its ``\\n``; at the end, what is left (``b""`` when nothing)."""
        connection = self._connection
        buffer = connection.buffer
        scanned = 0
        while True:
            end = buffer.find(b"\n", scanned)
            if end >= 0:
                line = bytes(buffer[:end + 1])
                del buffer[:end + 1]
                return line
            scanned = len(buffer)
            if scanned > limit_bytes:
                raise ResponseTooLarge(f"line longer than {limit_bytes} bytes")
            if connection.complete:
                rest = bytes(buffer)
                buffer.clear()
                return rest
            if connection.error is not None:
                raise connection.error
            await connection.wait()

    def limit_time(self, deadline_s: float, idle_s: float | None) -> None:
        """From now on: the rest of the answer by ``deadline_s`` (loop clock), and no
        silence longer than ``idle_s`` (None: no idle limit)."""
        self._connection.limit_time(deadline_s, idle_s)

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool if it can be reused."""
        self._connection.origin.release(self._connection)

    def close(self) -> None:
        """Drop the connection (an unread answer, or a request being cancelled upstream)."""
        self._connection.close()


class UpstreamClient:
    """POSTs JSON to upstream providers over pooled keep-alive connections."""

    def __init__(self, *, connections_per_origin: int, keepalive_s: float,
                 user_agent: str, ssl_context: ssl.SSLContext | None = None) -> None:
        assert connections_per_origin >= 1 and keepalive_s >= 0
        self.loop = asyncio.get_running_loop()
        self.connections_per_origin = connections_per_origin
        self.keepalive_s = keepalive_s
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._common_headers = f"User-Agent: {user_agent}\r\nAccept-Encoding: identity\r\n"
        self._targets: dict[str, _Target] = {}
        self._names_checked: set[str] = set()
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._closed = False

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], *,
                   connect_timeout_s: float, deadline_s: float) -> UpstreamResponse:
        """Send the request; return once the answer's status and headers are in.

        ``deadline_s`` (loop clock) bounds everything from here to the answer's last
        byte, unless the response's ``limit_time`` changes it. If the caller is
        cancelled, the connection is closed, which is how an upstream learns the
        request was abandoned.
        """
        if self._closed:
            raise ConnectError("the client is closed")
        target = self._target(url)
        origin = self._origins.get(target.origin)
        if origin is None:
            origin = self._origins[target.origin] = _Origin(target, self)
        request = b"".join((target.head, self._encode_headers(headers),
                            b"Content-Length: %d\r\n\r\n" % len(body), body))
        connection = await origin.acquire(connect_timeout_s, deadline_s)
        try:
            try:
                await self._exchange(connection, request, deadline_s)
            except ConnectionClosed:
                if not connection.reused or connection.received_any:
                    raise
                # A kept-alive connection the server dropped as we picked it: the request
                # never reached it, so send it once more on a new connection.
                connection = await origin.acquire(connect_timeout_s, deadline_s, fresh=True)
                await self._exchange(connection, request, deadline_s)
        except BaseException:
            connection.close()
            raise
        return UpstreamResponse(connection)

    @staticmethod
    async def _exchange(connection: _Connection, request: bytes, deadline_s: float) -> None:
        if connection.closed:
            raise ConnectionClosed("connection closed before an answer")
        connection.begin_exchange()
        connection.limit_time(deadline_s, None)
        await connection.send(request)
        while not connection.headers_complete:
            if connection.error is not None:
                raise connection.error
            await connection.wait()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is not None:
            return target
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
        if parts.username or parts.password:
            raise ValueError("credentials in an upstream URL are not supported")
        port = parts.port or _DEFAULT_PORTS[scheme]
        host = parts.hostname
        host_header = f"[{host}]" if ":" in host else host
        if port != _DEFAULT_PORTS[scheme]:
            host_header = f"{host_header}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n"
                f"{self._common_headers}").encode()
        target = _Target((scheme, host, port), scheme == "https", host, port, head)
        if len(self._targets) >= TARGETS_CACHED_MAX:
            self._targets.clear()
        self._targets[url] = target
        return target

    def _encode_headers(self, headers: Mapping[str, str]) -> bytes:
        lines = []
        for name, value in headers.items():
            if name not in self._names_checked:
                if not _HEADER_NAME.fullmatch(name):
                    raise ValueError(f"header {name!r} cannot be sent")
                if name.lower() in _OWN_HEADERS:
                    raise ValueError(f"header {name!r} is the client's own")
                if len(self._names_checked) < HEADER_NAMES_CHECKED_MAX:
                    self._names_checked.add(name)
            # Substring tests, not a regex: this runs for every header of every request.
            if "\r" in value or "\n" in value or "\x00" in value:
                raise ValueError(f"header {name!r} cannot be sent")
            lines.append(f"{name}: {value}\r\n")
        return "".join(lines).encode()

    async def close(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()
