"""The maximum a request can be billed, read from the request alone.

Hard budgets count each call in flight at its ceiling, so concurrent calls cannot overspend
together (see `costtap.tracker.budgets`). A ceiling must never be below what the provider
bills, so this module returns one only for requests whose bill it can bound:

- Text input: every token of the tokenizers costtap meters covers at least one byte of
  text. So a request carrying only text is billed for no more input tokens than its body
  has bytes, plus the framing and tool prompt the provider adds around it.
- Output: the request's own output cap (which includes reasoning tokens), times the number
  of choices asked for.

Media, files, stored context (cached content, previous responses) and tools the provider
runs itself bill input the body does not carry, so such requests have no ceiling.
"""

from __future__ import annotations

from typing import Any

from costtap.providers.base import Units

# Tokens a provider adds to a request besides its text: message markers and the reply
# primer, a few per message. The JSON around each message outweighs them in bytes, so this
# allowance is a margin on top.
FRAMING_ALLOWANCE_TOKENS = 64
# The system prompt a provider adds to describe function tools: a few hundred tokens.
TOOLS_ALLOWANCE_TOKENS = 1024

# Keys that bring billed input the body does not carry as text, or output other than text.
_UNBOUNDED_KEYS = frozenset(
    {
        "audio",
        "cachedContent",
        "cached_content",
        "codeExecution",
        "code_execution",
        "computerUse",
        "computer_use",
        "container",
        "conversation",
        "dataSources",
        "data_sources",
        "enterpriseWebSearch",
        "enterprise_web_search",
        "file",
        "fileData",
        "fileUri",
        "file_data",
        "file_id",
        "file_uri",
        "file_url",
        "googleMaps",
        "googleSearch",
        "googleSearchRetrieval",
        "google_maps",
        "google_search",
        "google_search_retrieval",
        "image",
        "image_url",
        "inlineData",
        "inline_data",
        "input_audio",
        "mcp_servers",
        "prediction",
        "previous_response_id",
        "retrieval",
        "source",
        "speechConfig",
        "speech_config",
        "urlContext",
        "url_context",
        "video",
        "web_search_options",
    }
)
# `type` values of text, function tools and JSON schemas. Any other type (an image part, a
# file, a built-in tool) makes the request unbounded.
_TEXT_TYPES = frozenset(
    {
        "any",
        "array",
        "auto",
        "boolean",
        "custom",
        "disabled",
        "enabled",
        "ephemeral",
        "function",
        "function_call",
        "function_call_output",
        "input_text",
        "integer",
        "json_object",
        "json_schema",
        "message",
        "none",
        "null",
        "number",
        "object",
        "output_text",
        "reasoning",
        "redacted_thinking",
        "required",
        "string",
        "text",
        "thinking",
        "tool",
        "tool_result",
        "tool_use",
    }
)
_TOOL_KEYS = ("tools", "functions", "functionDeclarations", "function_declarations")
_MAX_DEPTH = 64


def text_request_ceiling(
    body: bytes, payload: dict[str, Any], max_output_tokens: int, choices: int = 1
) -> Units | None:
    """Return the maximum a text-only request can be billed, or None when it has no bound.

    `max_output_tokens` is the request's output cap (0 when it set none, which leaves the
    request unbounded unless it produces no output, as embeddings do).
    """
    if not _carries_only_text(payload, 0):
        return None
    allowance = FRAMING_ALLOWANCE_TOKENS
    if any(payload.get(key) for key in _TOOL_KEYS):
        allowance += TOOLS_ALLOWANCE_TOKENS
    input_tokens = len(body) + allowance
    # Prompt caching that charges for writes bills them above the input rate, so a request
    # that marks cache points is bounded as if all its input were written to the cache. A
    # byte search finds the key without a second walk, and a string equal to it only raises
    # the bound.
    cache_writes = input_tokens if b'"cache_control"' in body else 0
    return Units(
        input_tokens=input_tokens,
        cache_write_tokens=cache_writes,
        output_tokens=max_output_tokens * max(choices, 1),
    )


def _carries_only_text(value: Any, depth: int) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, list):
        return all(_carries_only_text(item, depth + 1) for item in value)
    if not isinstance(value, dict):
        return True
    for key, item in value.items():
        if key in _UNBOUNDED_KEYS:
            return False
        if key == "type" and isinstance(item, str) and item.lower() not in _TEXT_TYPES:
            return False
        # A prompt object names a prompt stored at the provider (its text is not here).
        if key == "prompt" and isinstance(item, dict):
            return False
        if key in ("responseModalities", "response_modalities") and any(
            str(modality).upper() != "TEXT" for modality in _as_list(item)
        ):
            return False
        if not _carries_only_text(item, depth + 1):
            return False
    return True


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
