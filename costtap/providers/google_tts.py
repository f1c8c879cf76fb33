"""Google Cloud Text-to-Speech: `text:synthesize` bills the characters of its input.

Wire facts (Cloud Text-to-Speech REST reference, v1 and v1beta1): the request's `input`
holds one of `text`, `ssml` or `markup`, and billing counts its characters, SSML tags
included. The response (`audioContent`, base64) carries no usage. The voice name, such as
`en-US-Standard-D`, decides the price tier and is recorded as the model.

Pure code: no mitmproxy, no I/O, and no parser method raises on malformed input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from costtap.providers.base import MeterResult, RequestInfo, ResponseParser, Route, Units
from costtap.providers.common import (
    IgnoredBodyParser,
    as_dict,
    as_str,
    google_error_body,
    load_json_object,
)

GOOGLE_TTS = "google-tts"
SYNTHESIZE = "text:synthesize"

_SYNTHESIZE_PATH = re.compile(r"^/v1(?:beta1)?/text:synthesize/?$")


class GoogleTTSProvider:
    name: str = GOOGLE_TTS
    host_patterns: tuple[str, ...] = (r"texttospeech\.googleapis\.com",)

    def match(self, host: str, method: str, path: str) -> Route | None:
        path_only = path.split("?", 1)[0]
        if method == "POST" and _SYNTHESIZE_PATH.match(path_only):
            return Route(GOOGLE_TTS, SYNTHESIZE)
        if method == "GET":
            return Route(GOOGLE_TTS, "voices", free=True)
        return None

    def read_request(self, route: Route, body: bytes, headers: Mapping[str, str]) -> RequestInfo:
        payload = load_json_object(body) or {}
        source = as_dict(payload.get("input"))
        text = (
            as_str(source.get("text")) or as_str(source.get("ssml")) or as_str(source.get("markup"))
        )
        voice = as_dict(payload.get("voice"))
        chars = Units(chars=len(text) if text else 0)
        # The characters of the input are what is recorded, so they are the ceiling too.
        return RequestInfo(
            model=as_str(voice.get("name")) or as_str(voice.get("model")),
            estimate=chars,
            ceiling=chars,
        )

    def response_parser(
        self, route: Route, request: RequestInfo, headers: Mapping[str, str]
    ) -> ResponseParser:
        return IgnoredBodyParser(
            MeterResult(request.model, Units(chars=request.estimate.chars), True)
        )

    def deny_body(self, message: str) -> bytes:
        return google_error_body(message)

    def client_filter(self, route: Route) -> None:
        return None
