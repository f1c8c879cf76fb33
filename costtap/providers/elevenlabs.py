"""ElevenLabs: which calls are metered and how their usage is read.

Wire facts this module relies on (ElevenLabs API reference):

- Text to speech (`/v1/text-to-speech/{voice_id}`, with `/stream`, `/with-timestamps` or
  `/stream/with-timestamps`) bills the characters of the request's `text`. The response is
  audio, or JSON with base64 audio and timestamps, and carries no usage in its body.
- The `character-cost` response header gives the credits charged, where it is present.
- A request without `model_id` uses `eleven_multilingual_v2`, the API's documented default.
- Speech to text (`/v1/speech-to-text`) bills audio seconds: `audio_duration_secs` of the
  response, else the end time of the last word.
- Sound generation and speech to speech bill credits; `duration_seconds` of a sound
  generation request is the length asked for.

Pure code: no mitmproxy, no I/O, and no parser method raises on malformed input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from costtap.providers.base import MeterResult, RequestInfo, ResponseParser, Route, Units
from costtap.providers.common import (
    IgnoredBodyParser,
    JsonResponseParser,
    as_dict,
    as_list,
    as_number,
    as_str,
    load_json_object,
    multipart_field,
    query_parameters,
)

ELEVENLABS = "elevenlabs"

TEXT_TO_SPEECH = "text-to-speech"
SPEECH_TO_TEXT = "speech-to-text"
SOUND_GENERATION = "sound-generation"
SPEECH_TO_SPEECH = "speech-to-speech"

DEFAULT_TTS_MODEL = "eleven_multilingual_v2"
DEFAULT_STT_MODEL = "scribe_v1"

_TTS_PATH = re.compile(r"^/v1/text-to-speech/[^/]+(?:/stream)?(?:/with-timestamps)?/?$")
_STS_PATH = re.compile(r"^/v1/speech-to-speech/[^/]+(?:/stream)?/?$")


class ElevenLabsProvider:
    name: str = ELEVENLABS
    # api.elevenlabs.io and its regional hosts such as api.us.elevenlabs.io.
    host_patterns: tuple[str, ...] = (r"api(?:\.[a-z0-9-]+)*\.elevenlabs\.io",)

    def match(self, host: str, method: str, path: str) -> Route | None:
        path_only = path.split("?", 1)[0]
        if method == "GET":
            return Route(ELEVENLABS, path_only.removeprefix("/v1/").split("/", 1)[0], free=True)
        if method != "POST":
            return None
        if _TTS_PATH.match(path_only):
            return Route(ELEVENLABS, TEXT_TO_SPEECH)
        if path_only.rstrip("/") == "/v1/speech-to-text":
            return Route(ELEVENLABS, SPEECH_TO_TEXT)
        if path_only.rstrip("/") == "/v1/sound-generation":
            return Route(ELEVENLABS, SOUND_GENERATION)
        if _STS_PATH.match(path_only):
            return Route(ELEVENLABS, SPEECH_TO_SPEECH)
        return None

    def read_request(self, route: Route, body: bytes, headers: Mapping[str, str]) -> RequestInfo:
        if route.endpoint == TEXT_TO_SPEECH:
            payload = load_json_object(body) or {}
            text = payload.get("text")
            chars = Units(chars=len(text) if isinstance(text, str) else 0)
            # The characters of the text are what is recorded, so they are the ceiling too.
            return RequestInfo(
                model=as_str(payload.get("model_id")) or DEFAULT_TTS_MODEL,
                estimate=chars,
                ceiling=chars,
            )
        if route.endpoint == SOUND_GENERATION:
            payload = load_json_object(body) or {}
            duration = Units(seconds=as_number(payload.get("duration_seconds")))
            return RequestInfo(
                model=as_str(payload.get("model_id")), estimate=duration, ceiling=duration
            )
        if route.endpoint == SPEECH_TO_TEXT:
            return RequestInfo(model=multipart_field(body, "model_id") or DEFAULT_STT_MODEL)
        return RequestInfo(model=multipart_field(body, "model_id"))

    def response_parser(
        self, route: Route, request: RequestInfo, headers: Mapping[str, str]
    ) -> ResponseParser:
        credits = _character_cost(headers)
        if route.endpoint == SPEECH_TO_TEXT:
            return SpeechToTextParser(request, credits)
        if route.endpoint == TEXT_TO_SPEECH:
            units = Units(chars=request.estimate.chars, credits=credits)
            return IgnoredBodyParser(MeterResult(request.model, units, True))
        units = Units(seconds=request.estimate.seconds, credits=credits)
        if credits:
            return IgnoredBodyParser(MeterResult(request.model, units, True))
        reason = "no character-cost header"
        return IgnoredBodyParser(MeterResult(request.model, units, False, reason))

    def deny_body(self, message: str) -> bytes:
        return json.dumps({"detail": {"status": "quota_exceeded", "message": message}}).encode()

    def client_filter(self, route: Route) -> None:
        return None


def _character_cost(headers: Mapping[str, str]) -> float:
    try:
        return max(0.0, float(headers.get("character-cost", "0")))
    except ValueError:
        return 0.0


class SpeechToTextParser(JsonResponseParser):
    def __init__(self, request: RequestInfo, credits: float) -> None:
        super().__init__(request)
        self._credits = credits

    def read(self, payload: dict[str, Any]) -> MeterResult:
        seconds = as_number(payload.get("audio_duration_secs"))
        if not seconds:
            words = as_list(payload.get("words"))
            seconds = as_number(as_dict(words[-1]).get("end")) if words else 0.0
        units = Units(seconds=seconds, credits=self._credits)
        if seconds:
            return MeterResult(self.request.model, units, True)
        return MeterResult(self.request.model, units, False, "response carries no duration")


STREAM_INPUT = "text-to-speech.stream-input"
_STREAM_INPUT_PATH = re.compile(r"^/v1/text-to-speech/[^/]+/(?:multi-)?stream-input/?$")


def match_stream_input(host: str, path: str) -> Route | None:
    """Route a WebSocket upgrade to text to speech stream input; the model is a query parameter."""
    path_only, _, query = path.partition("?")
    if not _STREAM_INPUT_PATH.match(path_only):
        return None
    parameters = query_parameters(query)
    return Route(
        ELEVENLABS, STREAM_INPUT, path_model=parameters.get("model_id") or DEFAULT_TTS_MODEL
    )


class StreamInputMeter:
    """Text to speech over a WebSocket: the characters of the text messages the client sends.

    The connection opens with a message whose text is a single space. The API requires it
    and does not bill it. A message with empty text closes the input. Usage is recorded
    once, when the connection ends.
    """

    def __init__(self, route: Route) -> None:
        self._model = route.path_model
        self._chars = 0
        self._first_text = True

    def client_message(self, content: bytes, is_text: bool) -> list[MeterResult]:
        message = load_json_object(content) if is_text else None
        text = as_str(as_dict(message).get("text")) if message is not None else None
        if text is None:
            return []
        if self._first_text and text == " ":
            self._first_text = False
            return []
        self._first_text = False
        self._chars += len(text)
        return []

    def server_message(self, content: bytes, is_text: bool) -> list[MeterResult]:
        return []

    def finish(self) -> list[MeterResult]:
        if not self._chars:
            return []
        return [MeterResult(self._model, Units(chars=self._chars), True)]
