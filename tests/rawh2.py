"""A raw HTTP/2 client for frames grpcio's client never sends (exact `grpc-timeout` strings, rapid reset, a window
that never opens). HPACK: literal fields without indexing or Huffman (RFC 7541 section 6.2.2); the server's header
blocks are not decoded (answers are read from DATA)."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
INITIAL_WINDOW_SIZE = 0x4


def _integer(value: int, prefix: int) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([value])
    out, value = [limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def header_block(fields: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman."""
    block = b""
    for name, value in fields:
        block += b"\x00" + _integer(len(name), 7) + name.encode() + _integer(len(value), 7) + value.encode()
    return block


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass
class Stream:
    data: bytes = b""
    ended: bool = False
    reset: int | None = None


@dataclass
class RawH2:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    streams: dict[int, Stream] = field(default_factory=dict)
    goaway: int | None = None  # the error code of the server's GOAWAY
    closed: bool = False

    @classmethod
    async def open(cls, port: int, settings: tuple[tuple[int, int], ...] = ()) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = b"".join(struct.pack(">HI", ident, value) for ident, value in settings)
        writer.write(PREFACE + frame(SETTINGS, 0, 0, payload))
        return cls(reader, writer)

    def call(self, stream: int, path: str, message: bytes, *, timeout: str | None = None) -> None:
        """A unary call on `stream`: HEADERS, then the message and END_STREAM."""
        self.start(stream, path, timeout=timeout)
        self.writer.write(frame(DATA, END_STREAM, stream, grpc_message(message)))

    def start(self, stream: int, path: str, *, timeout: str | None = None, end_stream: bool = False) -> None:
        """A call's HEADERS on `stream`, nothing after them (`end_stream`: a call that half-closes with no message)."""
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "verifier"),
                  ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
        if timeout is not None:
            fields.append(("grpc-timeout", timeout))
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        self.writer.write(frame(HEADERS, flags, stream, header_block(fields)))
        self.streams[stream] = Stream()

    def reset(self, stream: int, code: int = 0x8) -> None:
        self.writer.write(frame(RST_STREAM, 0, stream, struct.pack(">I", code)))

    async def read(self, done, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        """Reads frames until `done(self)`, the connection ends or `timeout` seconds pass (acknowledging the server's
        SETTINGS and PINGs)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self):
            try:
                head = await asyncio.wait_for(self.reader.readexactly(9), max(deadline - loop.time(), 0.001))
                payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
            except asyncio.IncompleteReadError:
                self.closed = True
                return
            except TimeoutError:
                return
            kind, flags, stream = head[3], head[4], struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
            state = self.streams.setdefault(stream, Stream()) if stream else None
            if kind == SETTINGS and not flags & ACK:
                self.writer.write(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.writer.write(frame(PING, ACK, 0, payload))
            elif kind == GOAWAY:
                self.goaway = struct.unpack(">I", payload[4:8])[0]
            elif kind == RST_STREAM and state is not None:
                state.reset = struct.unpack(">I", payload)[0]
            elif kind in (DATA, HEADERS) and state is not None:
                if kind == DATA:
                    state.data += payload
                state.ended = state.ended or bool(flags & END_STREAM)

    def close(self) -> None:
        self.writer.close()
