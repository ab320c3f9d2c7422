"""Streaming ``multipart/form-data``: file parts are handed on chunk by chunk, never held
whole in memory (an upload may be many gigabytes)."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message

from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import BadRequest

# A body cut short (a dropped connection, a client that stopped mid-part) is refused
# before its last part replaces anything: that part ends only at its closing boundary.
INCOMPLETE = "Malformed multipart body: it ends before its closing boundary."


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def _disposition(self) -> tuple[str, dict[str, str]]:
        value = self.headers.get("content-disposition", "")
        # As bytes: given a str, the parser encodes it as latin-1, which fails on (and
        # mangles) the UTF-8 filenames browsers send.
        kind, params = parse_options_header(value.encode("utf-8"))
        return kind.decode("latin-1"), {
            k.decode("latin-1"): v.decode("utf-8", "replace") for k, v in params.items()
        }

    @property
    def filename(self) -> str | None:
        return self._disposition[1].get("filename")


def boundary_of(content_type: str) -> bytes:
    msg = Message()
    msg["content-type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        raise BadRequest("No files found in request.")
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BadRequest("No files found in request.")
    return boundary.encode("latin-1")


class MultipartReader:
    """Feeds a byte stream through python-multipart's push parser and exposes the parts
    in order. A part's ``chunks()`` must be consumed (or ``skip()``-ped) before the next."""

    def __init__(self, stream: AsyncIterator[bytes], boundary: bytes) -> None:
        self._stream = stream
        self._events: deque[tuple[str, bytes]] = deque()
        self._done = False

        def on(kind: str):
            def callback(data: bytes | None = None, start: int = 0, end: int = 0) -> None:
                self._events.append((kind, bytes(data[start:end]) if data is not None else b""))
            return callback

        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": on("begin"),
            "on_header_field": on("hfield"),
            "on_header_value": on("hvalue"),
            "on_header_end": on("hend"),
            "on_headers_finished": on("hdone"),
            "on_part_data": on("data"),
            "on_part_end": on("end"),
            "on_end": on("closed"),  # the final ``--boundary--``
        })

    async def _next(self) -> tuple[str, bytes] | None:
        while not self._events:
            if self._done:
                return None
            try:
                chunk = await anext(self._stream)
            except StopAsyncIteration:
                self._done = True
                self._parser.finalize()
                continue
            try:
                self._parser.write(chunk)
            except Exception as exc:  # the parser's own error types vary by version
                raise BadRequest(f"Malformed multipart body: {exc}") from None
        return self._events.popleft()

    async def parts(self) -> AsyncIterator[Part]:
        begun = False
        while True:
            event = await self._next()
            if event is None:
                if begun:  # parts were sent, the closing boundary never came
                    raise BadRequest(INCOMPLETE)
                return  # no part at all: the caller's "No files found in request."
            if event[0] == "closed":
                return
            if event[0] != "begin":
                continue
            begun = True
            part = Part()
            name, value = bytearray(), bytearray()
            while (event := await self._next()) is None or event[0] != "hdone":
                if event is None:
                    raise BadRequest(INCOMPLETE)
                kind, data = event
                if kind == "hfield":
                    name += data
                elif kind == "hvalue":
                    value += data
                elif kind == "hend":
                    part.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")
                    name, value = bytearray(), bytearray()
            yield part

    async def chunks(self) -> AsyncIterator[bytes]:
        """The current part's body, until its closing boundary; a body that ends first
        raises BadRequest from this iterator, so its consumer never finishes the part."""
        while (event := await self._next()) is not None:
            kind, data = event
            if kind == "data":
                if data:
                    yield data
            elif kind == "end":
                return
        raise BadRequest(INCOMPLETE)

    async def skip(self) -> None:
        async for _ in self.chunks():
            pass
