"""Recorded provider payloads under tests/corpus, with the values a correct meter records."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"


@dataclass(frozen=True)
class Case:
    provider_dir: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.provider_dir}/{self.name}"

    def _path(self, suffix: str) -> Path:
        return CORPUS_DIR / self.provider_dir / f"{self.name}{suffix}"

    def has(self, suffix: str) -> bool:
        return self._path(suffix).exists()

    def read(self, suffix: str) -> bytes:
        return self._path(suffix).read_bytes()

    @property
    def expected(self) -> dict[str, Any]:
        return json.loads(self.read(".expected.json"))

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.read(".meta.json"))

    @property
    def request_body(self) -> dict[str, Any]:
        return json.loads(self.read(".request.json"))

    @property
    def gzip_is_wire_encoding(self) -> bool:
        """True when the .gz file contains the bytes the server sent with Content-Encoding: gzip."""
        return "AT REST" not in self.meta.get("body_form", "")

    def response_body(self) -> bytes:
        """Return the decoded response body."""
        for suffix in (".response.json", ".response.sse", ".response.jsonl"):
            if self.has(suffix):
                return self.read(suffix)
        for suffix in (".response.json.gz", ".response.sse.gz"):
            if self.has(suffix):
                return gzip.decompress(self.read(suffix))
        raise FileNotFoundError(f"{self.id} has no response body")

    def wire_gzip(self) -> bytes | None:
        for suffix in (".response.json.gz", ".response.sse.gz"):
            if self.has(suffix) and self.gzip_is_wire_encoding:
                return self.read(suffix)
        return None


def cases(provider_dir: str, prefix: str = "") -> list[Case]:
    directory = CORPUS_DIR / provider_dir
    names = sorted(
        path.name.removesuffix(".expected.json")
        for path in directory.glob(f"{prefix}*.expected.json")
    )
    return [Case(provider_dir, name) for name in names]


def all_cases() -> list[Case]:
    """Return every case of every provider directory."""
    directories = sorted(path.name for path in CORPUS_DIR.iterdir() if path.is_dir())
    return [case for directory in directories for case in cases(directory)]
