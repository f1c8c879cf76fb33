"""The apps file as `costtap check-config` and `costtap run` read it.

Every error names the file, the line and the field.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.costtap_process import costtap_command

VALID = """\
default_app: shared
require_proxy_auth: false
apps:
  - name: video
    match:
      proxy_user: video
      proxy_token: ${VIDEO_TOKEN}
      client_cidrs: [10.1.0.0/16]
    user:
      - header: X-User-Id
        strip: true
      - body: user
    project:
      - value: p-7
"""

# (file text, line, field and reason expected after "FILE:")
INVALID = [
    ("apps: [\n  - name: a\n", "2: invalid YAML: expected the node content, but found '-'"),
    ("- name: a\n", "1: the apps file must be a mapping"),
    ("aps: []\n", "1: aps: unknown field; check its spelling"),
    ("apps:\n  - match: {}\n", "2: apps.0.name: Field required"),
    ("apps:\n  - name: 'has space'\n", "2: apps.0.name: String should match pattern"),
    (
        "apps:\n  - name: a\n    match:\n      proxy_user: a\n      proxy_token: plain-secret\n",
        "5: apps.0.match.proxy_token: proxy_token must be an ${ENV_VAR} reference",
    ),
    (
        "apps:\n  - name: a\n    match:\n      proxy_user: a\n"
        "      proxy_token: ${UNSET_TOKEN_VARIABLE}\n",
        "5: apps.0.match.proxy_token: environment variable UNSET_TOKEN_VARIABLE is not set",
    ),
    (
        "apps:\n  - name: a\n    match:\n      proxy_token: ${VIDEO_TOKEN}\n",
        "3: apps.0.match: proxy_user and proxy_token must be given together",
    ),
    (
        "apps:\n  - name: a\n    match:\n      client_cidrs: [10.0.0.0/33]\n",
        "4: apps.0.match.client_cidrs: invalid CIDR '10.0.0.0/33'",
    ),
    (
        "apps:\n  - name: a\n    user:\n      - header: X-User\n        query: uid\n",
        "4: apps.0.user.0: each source needs exactly one of",
    ),
    (
        "apps:\n  - name: a\n    user:\n      - query: uid\n        strip: true\n",
        "4: apps.0.user.0: strip: true applies to header sources only",
    ),
    (
        "apps:\n  - name: a\n    user:\n      - header: 'X User'\n",
        "4: apps.0.user.0: invalid header name 'X User'",
    ),
    ("apps:\n  - name: a\n  - name: a\n", "1: (top level): app name 'a' is used twice"),
    (
        "apps:\n  - name: a\n    tracker_unreachable: maybe\n",
        "3: apps.0.tracker_unreachable: Input should be 'allow' or 'deny'",
    ),
    ("require_proxy_auth: perhaps\n", "1: require_proxy_auth: Input should be a valid boolean"),
]


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "VIDEO_TOKEN": "s3cret-token-value"}
    environment.pop("UNSET_TOKEN_VARIABLE", None)
    return subprocess.run(
        costtap_command("check-config", "--apps", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    INVALID,
    ids=[expected.split(":")[0] + ":" + expected.split(": ")[1][:30] for _, expected in INVALID],
)
def test_invalid_file_names_line_and_reason(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "costtap.yaml"
    path.write_text(text)

    result = check_config(path)

    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"costtap: {path}:{expected}"), line
    assert "Traceback" not in result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = check_config(tmp_path / "absent.yaml")

    assert result.returncode == 2
    path = tmp_path / "absent.yaml"
    assert (
        result.stderr.strip()
        == f"costtap: {path}: cannot read the apps file: No such file or directory"
    )


def test_valid_file_prints_settings_without_secret(tmp_path: Path) -> None:
    path = tmp_path / "costtap.yaml"
    path.write_text(VALID)

    result = check_config(path)

    assert result.returncode == 0
    assert "s3cret-token-value" not in result.stdout + result.stderr
    settings = json.loads(result.stdout)
    assert settings["default_app"] == "shared"
    [app] = settings["apps"]
    assert app["match"]["proxy_token"] == "${VIDEO_TOKEN} (set, hidden)"
    assert app["user"][0] == {
        "header": "X-User-Id",
        "query": None,
        "body": None,
        "proxy_user": None,
        "client_address": None,
        "value": None,
        "strip": True,
    }
    assert result.stderr.strip() == f"costtap: {path} is valid: 1 apps"


def test_run_with_invalid_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "costtap.yaml"
    path.write_text("apps:\n  - match: {}\n")

    result = subprocess.run(
        costtap_command("run", "--apps", str(path), "--data-dir", str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1] == f"costtap: {path}:2: apps.0.name: Field required"
    )


def test_run_with_explicit_missing_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        costtap_command(
            "run", "--apps", str(tmp_path / "absent.yaml"), "--data-dir", str(tmp_path / "data")
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "absent.yaml: cannot read the apps file" in result.stderr


def test_example_file_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "costtap.yaml"

    result = check_config(example)

    assert result.returncode == 2  # its token variable is not set in this environment
    assert "VIDEO_PROXY_TOKEN is not set" in result.stderr
    environment = {**os.environ, "VIDEO_PROXY_TOKEN": "any-token"}
    with_token = subprocess.run(
        costtap_command("check-config", "--apps", str(example)),
        capture_output=True,
        text=True,
        env=environment,
    )
    assert with_token.returncode == 0, with_token.stderr
    assert [app["name"] for app in json.loads(with_token.stdout)["apps"]] == [
        "video-accessibility",
        "nightly-batch",
        "search",
    ]
