"""Incremental decoders for HTTP content encodings, used to read compressed bodies.

Decoded bytes feed the parsers only. The bytes sent to the client stay the upstream's own,
except where costtap must rewrite a stream it changed.
"""

from __future__ import annotations

import zlib
from typing import Protocol

try:  # brotli is optional: mitmproxy installs it, but costtap works without it.
    import brotli
except ImportError:  # pragma: no cover - exercised only where brotli is missing
    brotli = None


class DecodingError(Exception):
    """The body is not valid for its declared content encoding."""


class Decoder(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class IdentityDecoder:
    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""


class ZlibDecoder:
    """gzip (with concatenated members) and deflate, zlib-wrapped or raw."""

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding == "gzip"
        self._first = True
        self._header = b""
        self._decompressor = zlib.decompressobj(
            zlib.MAX_WBITS | 16 if self._gzip else zlib.MAX_WBITS
        )

    def feed(self, chunk: bytes) -> bytes:
        data = chunk
        if not self._gzip and self._first:
            # Some servers send raw deflate under "deflate". The two-byte zlib header
            # distinguishes the two forms, so the first bytes wait until both have arrived.
            self._header += chunk
            if len(self._header) < 2:
                return b""
            self._first = False
            data, self._header = self._header, b""
            if not _has_zlib_header(data):
                self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
        output = []
        try:
            while data:
                output.append(self._decompressor.decompress(data))
                data = self._decompressor.unused_data
                if data and self._gzip:
                    # A new gzip member starts after the end of the previous one.
                    self._decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
                elif data:
                    break
        except zlib.error as error:
            raise DecodingError(str(error)) from error
        return b"".join(output)

    def flush(self) -> bytes:
        if self._header:
            raise DecodingError("deflate body shorter than its two-byte header")
        try:
            return self._decompressor.flush()
        except zlib.error as error:
            raise DecodingError(str(error)) from error


class BrotliDecoder:
    def __init__(self) -> None:
        assert brotli is not None
        self._decompressor = brotli.Decompressor()

    def feed(self, chunk: bytes) -> bytes:
        try:
            return bytes(self._decompressor.process(chunk))
        except brotli.error as error:
            raise DecodingError(str(error)) from error

    def flush(self) -> bytes:
        return b""


def make_decoder(content_encoding: str | None) -> Decoder:
    """Return a decoder for a Content-Encoding header value.

    Raises DecodingError for an encoding costtap cannot read, such as zstd or a chain.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return IdentityDecoder()
    if encoding in ("gzip", "x-gzip"):
        return ZlibDecoder("gzip")
    if encoding == "deflate":
        return ZlibDecoder("deflate")
    if encoding == "br" and brotli is not None:
        return BrotliDecoder()
    raise DecodingError(f"unsupported content encoding {encoding!r}")


def _has_zlib_header(chunk: bytes) -> bool:
    first, second = chunk[0], chunk[1]
    return first & 0x0F == 8 and (first * 256 + second) % 31 == 0
