"""Bounded reader of a JSON response body that arrives in chunks.

Bodies up to `MAX_WHOLE_BYTES` are parsed whole. Larger ones (base64 audio or images) keep
only their head and tail, from which the top-level `model` and `usage` are recovered: the
providers costtap meters put `model` near the start and `usage` near the end of the body.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_WHOLE_BYTES = 32 * 1024 * 1024
HEAD_BYTES = 64 * 1024
TAIL_BYTES = 256 * 1024

_MODEL_PATTERN = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_USAGE_PATTERN = re.compile(rb'"usage"\s*:\s*\{')


class JsonBodyReader:
    """Collect a JSON body with bounded memory and parse it at the end."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._head = b""
        self._tail = b""
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._size += len(chunk)
        if not self.truncated:
            self._chunks.append(chunk)
            if self._size <= MAX_WHOLE_BYTES:
                return
            whole = b"".join(self._chunks)
            self._chunks = []
            self.truncated = True
            self._head = whole[:HEAD_BYTES]
            self._tail = whole[-TAIL_BYTES:]
            return
        self._tail = (self._tail + chunk)[-TAIL_BYTES:]

    def finish(self) -> dict[str, Any] | None:
        """Return the top-level object, or the part recovered from a large body, or None."""
        if not self.truncated:
            try:
                value = json.loads(b"".join(self._chunks))
            except (ValueError, RecursionError):
                return None
            return value if isinstance(value, dict) else None
        return self._recover_from_edges()

    def _recover_from_edges(self) -> dict[str, Any] | None:
        recovered: dict[str, Any] = {}
        if model := _MODEL_PATTERN.search(self._head):
            recovered["model"] = model.group(1).decode("utf-8", "replace")
        # The last "usage" object in the tail is the top-level one in the bodies costtap meters.
        for match in reversed(list(_USAGE_PATTERN.finditer(self._tail))):
            start = match.end() - 1
            try:
                usage, _ = json.JSONDecoder().raw_decode(
                    self._tail[start:].decode("utf-8", "replace")
                )
            except ValueError:
                continue
            recovered["usage"] = usage
            break
        return recovered or None
