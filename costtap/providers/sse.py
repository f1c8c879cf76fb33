"""Incremental Server-Sent Events splitter.

Events end at a blank line; lines end with CRLF, LF or CR. The splitter keeps the unfinished
tail between calls, so chunk boundaries may fall anywhere, even inside a CRLF pair.
"""

from __future__ import annotations

from dataclasses import dataclass

# An event larger than this is dropped rather than buffered without bound. Provider events
# carry a few kilobytes of text; audio deltas can reach a few hundred kilobytes.
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class SseEvent:
    event: str
    data: str


class SseSplitter:
    """Split a byte stream into SSE events, one `feed` chunk at a time."""

    def __init__(self) -> None:
        self._tail = b""
        self._event_name = ""
        self._data_lines: list[str] = []
        self._event_bytes = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._tail + chunk
        events: list[SseEvent] = []
        start = 0
        while True:
            end, next_start = find_line_end(buffer, start)
            if end < 0:
                break
            self._take_line(buffer[start:end], events)
            start = next_start
        self._tail = buffer[start:]
        if len(self._tail) > MAX_EVENT_BYTES:
            self._drop_event()
        return events

    def finish(self) -> list[SseEvent]:
        """Return the last event when the stream ended without its closing blank line."""
        events: list[SseEvent] = []
        if self._tail:
            # A lone CR at the very end is a complete line ending.
            self._take_line(self._tail.rstrip(b"\r"), events)
            self._tail = b""
        self._dispatch(events)
        return events

    def _take_line(self, raw: bytes, events: list[SseEvent]) -> None:
        if not raw:
            self._dispatch(events)
            return
        self._event_bytes += len(raw)
        if self._event_bytes > MAX_EVENT_BYTES:
            self._drop_event()
            return
        line = raw.decode("utf-8", "replace")
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        elif name == "event":
            self._event_name = value

    def _dispatch(self, events: list[SseEvent]) -> None:
        if self._data_lines:
            events.append(SseEvent(self._event_name, "\n".join(self._data_lines)))
        self._event_name = ""
        self._data_lines = []
        self._event_bytes = 0

    def _drop_event(self) -> None:
        self._tail = b""
        self._event_name = ""
        self._data_lines = []
        self._event_bytes = 0


def find_line_end(buffer: bytes, start: int) -> tuple[int, int]:
    """Return (end of line, start of next line), or (-1, -1) when no full line is buffered.

    A CR as the last buffered byte is not taken yet, because an LF may follow in the next chunk.
    """
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start)
    if cr < 0 or (0 <= lf < cr):
        return (lf, lf + 1) if lf >= 0 else (-1, -1)
    if cr + 1 < len(buffer):
        return (cr, cr + 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)
    return -1, -1
