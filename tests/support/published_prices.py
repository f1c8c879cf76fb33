"""Costs of the recorded corpus cases, calculated by hand from published prices.

Each entry gives the rates it uses, where they were read and when. Rates are list prices
in USD per million tokens (or per the unit named) before any free allowance. Token prices
were read from each provider's pricing page as collected in the genai-prices 0.2.3
snapshot, read on 2026-12-04; the other sources are named per entry.
"""

from __future__ import annotations

M = 1_000_000

# case id -> (cost in USD, how it was calculated)
HAND_COSTS: dict[str, tuple[float, str]] = {
    # OpenAI, openai.com/api/pricing via genai-prices 0.2.3 (2026-12-04).
    "openai/chat-nonstream-gpt4o-basic": (
        24 * 2.50 / M + 8 * 10.00 / M,
        "gpt-4o: $2.50 in, $10 out",
    ),
    "openai/responses-nonstream-gpt4o": (
        14 * 2.50 / M + 8 * 10.00 / M,
        "gpt-4o: $2.50 in, $10 out",
    ),
    "openai/chat-nonstream-o3mini-reasoning": (
        7 * 1.10 / M + 87 * 4.40 / M,
        "o3-mini: $1.10 in, $4.40 out",
    ),
    "openai/chat-stream-usage-gpt4": (12 * 30.00 / M + 5 * 60.00 / M, "gpt-4: $30 in, $60 out"),
    "openai/chat-stream-usage-toolcall": (
        53 * 0.15 / M + 15 * 0.60 / M,
        "gpt-4o-mini: $0.15 in, $0.60 out",
    ),
    "openai/completions-legacy-nonstream": (
        14 * 1.50 / M + 16 * 2.00 / M,
        "gpt-3.5-turbo-instruct: $1.50 in, $2 out",
    ),
    "openai/embeddings-base64": (4 * 0.02 / M, "text-embedding-3-small: $0.02 in"),
    # 8 uncached tokens at $4, 4012 cached at $0.40, 4 or 5 output at $20.
    "openai/chat-nonstream-cache-read": (
        8 * 4.00 / M + 4012 * 0.40 / M + 4 * 20.00 / M,
        "gpt-5.6-sol",
    ),
    "openai/responses-nonstream-cache-read": (
        8 * 4.00 / M + 4012 * 0.40 / M + 5 * 20.00 / M,
        "gpt-5.6-sol",
    ),
    "openai/responses-nonstream-gzip-gpt55": (
        11 * 5.00 / M + 5 * 30.00 / M,
        "gpt-5.5: $5 in, $30 out",
    ),
    "openai/responses-stream-gpt55": (11 * 5.00 / M + 5 * 30.00 / M, "gpt-5.5: $5 in, $30 out"),
    # 9463 input of which 8320 cached: 1143 at $1.25 and 8320 at $0.125; 582 out at $10.
    "openai/responses-stream-websearch-cached": (
        1143 * 1.25 / M + 8320 * 0.125 / M + 582 * 10.00 / M,
        "gpt-5: $1.25 in, $0.125 cached, $10 out",
    ),
    # whisper-1: $0.006 a minute = $0.36 an hour, on the 37 billed seconds.
    "openai/transcription-whisper1-verbose": (37 * 0.36 / 3600, "whisper-1: $0.36 per hour"),
    "openai-spec/audio-speech-sse": (
        14 * 0.60 / M + 101 * 12.00 / M,
        "gpt-4o-mini-tts: $0.60 in, $12 out",
    ),
    # gpt-image-1: $5 text input, $40 output. The 40 image-input tokens ($10) are counted
    # at the text rate, because the recorded units do not split them out.
    "openai-spec/images-gpt-image-1": (
        50 * 5.00 / M + 50 * 40.00 / M,
        "gpt-image-1: $5 in, $40 out",
    ),
    # All 14 input tokens are audio: $6 (gpt-4o-transcribe) or $3 (mini); output $10 or $5.
    "openai-spec/transcription-gpt4o-tokens": (14 * 6.00 / M + 45 * 10.00 / M, "gpt-4o-transcribe"),
    "openai-spec/transcription-stream-gpt4o-mini": (
        14 * 3.00 / M + 45 * 5.00 / M,
        "gpt-4o-mini-transcribe",
    ),
    # gpt-4o-audio-preview: text $2.50 in, $10 out; audio $40 in, $80 out
    # (aitoolrank.net/model/openai--gpt-4o-audio-preview, 2026-03-23).
    # Input: 19 text + 2 audio tokens; output: 69 text + 300 audio tokens.
    "openai/chat-nonstream-audio-in-out": (
        19 * 2.50 / M + 2 * 40.00 / M + 69 * 10.00 / M + 300 * 80.00 / M,
        "gpt-4o-audio-preview with audio rates",
    ),
    # DALL-E 3 at 1024x1024, standard quality: $0.04 an image
    # (developers.openai.com/api/docs/models/dall-e-2, comparison table, 2026).
    "openai/images-dalle3-no-usage": (2 * 0.04, "dall-e-3: $0.04 per image"),
    # Azure OpenAI, azure.microsoft.com pricing via genai-prices 0.2.3 (2026-12-04).
    "azure-openai/chat-nonstream-gpt41mini": (
        16 * 0.40 / M + 22 * 1.60 / M,
        "gpt-4.1-mini: $0.40 in, $1.60 out",
    ),
    "azure-openai/responses-stream-azure-text-chunks": (
        11 * 1.25 / M + 11 * 10.00 / M,
        "gpt-5.1: $1.25 in, $10 out",
    ),
    # Gemini, ai.google.dev/pricing via genai-prices 0.2.3 (2026-12-04). Thinking tokens are
    # output; gemini-2.5-pro's $1.25/$10 tier applies to prompts up to 200k tokens.
    "gemini/generate-nonstream-thinking": (
        9 * 0.30 / M + 43 * 2.50 / M,
        "gemini-2.5-flash: $0.30 in, $2.50 out",
    ),
    # 3520 input of which 3512 cached: 8 at $0.30 and 3512 at $0.03; 44 out at $2.50.
    "gemini/generate-nonstream-cached": (
        8 * 0.30 / M + 3512 * 0.03 / M + 44 * 2.50 / M,
        "gemini-2.5-flash: $0.30 in, $0.03 cached, $2.50 out",
    ),
    "gemini/cachedcontents-create": (3512 * 0.30 / M, "gemini-2.5-flash: $0.30 in"),
    "gemini/generate-nonstream-websearch-tooluse": (
        136 * 1.25 / M + 414 * 10.00 / M,
        "gemini-2.5-pro, short prompt tier",
    ),
    "gemini/sse-stream-thinking": (
        34 * 1.25 / M + 1256 * 10.00 / M,
        "gemini-2.5-pro, short prompt tier",
    ),
    "gemini/jsonarray-stream-gzip-thinking": (
        11 * 0.75 / M + 293 * 3.75 / M,
        "gemini-3.6-flash: $0.75 in, $3.75 out",
    ),
    "gemini/sse-stream-basic-prompt-changes": (
        13 * 0.10 / M + 8 * 0.40 / M,
        "gemini-2.0-flash: $0.10 in, $0.40 out",
    ),
    "vertex/generate-nonstream-global": (
        13 * 0.10 / M + 8 * 0.40 / M,
        "gemini-2.0-flash: $0.10 in, $0.40 out",
    ),
    "vertex/predict-embeddings": (4 * 0.15 / M, "gemini-embedding-001: $0.15 in"),
    # Anthropic, anthropic.com/pricing via genai-prices 0.2.3 (2026-12-04).
    "anthropic/messages-stream-gzip-thinking": (
        46 * 1.00 / M + 133 * 5.00 / M,
        "claude-haiku-4-5: $1 in, $5 out",
    ),
    "anthropic/messages-stream-sonnet45": (
        17 * 3.00 / M + 10 * 15.00 / M,
        "claude-sonnet-4-5: $3 in, $15 out",
    ),
    "anthropic/messages-stream-thinking": (
        43 * 3.00 / M + 282 * 15.00 / M,
        "claude-sonnet-4: $3 in, $15 out",
    ),
    # ElevenLabs API pricing as summarised at developer.puter.com/tutorials/elevenlabs-api-pricing
    # (June 2026): Multilingual v2/v3 $0.10 per 1,000 characters, Scribe $0.22 an hour.
    "elevenlabs/tts-convert-sdk": (
        13 * 0.10 / 1000,
        "eleven_multilingual_v2: $0.10 per 1k characters",
    ),
    "elevenlabs/tts-eleven_v3-live": (12 * 0.10 / 1000, "eleven_v3: $0.10 per 1k characters"),
    "elevenlabs/stt-scribe-live-with-duration": (
        2.50775 * 0.22 / 3600,
        "scribe_v1: $0.22 per hour",
    ),
    # WebSocket cases. gpt-realtime: $4 text in, $16 text out, $64 audio out; the output
    # is 9 text and 15 audio tokens.
    "openai/realtime-ws-text-in-audio-out": (
        16 * 4.00 / M + 9 * 16.00 / M + 15 * 64.00 / M,
        "gpt-realtime",
    ),
    # The test opens the stream with model_id eleven_flash_v2_5: $0.05 per 1,000 characters.
    "elevenlabs/ws-stream-input-spec-example": (
        12 * 0.05 / 1000,
        "eleven_flash_v2_5: $0.05 per 1k characters",
    ),
    # Google Cloud TTS Standard voices: $4 per million characters
    # (bicov.pro/blog/new-google-cloud-text-to-speech-pricing, June 2024).
    "gcp-tts/synthesize-text": (22 * 4.00 / M, "en-US-Standard-D: $4 per million characters"),
}
