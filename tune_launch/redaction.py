"""Secrets never reach a printed command or a log line: one masking rule for the launcher and the ranks."""

from __future__ import annotations

import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"(?:^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?)(?:$|_)", re.I)
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{30,}|xox[bap]-[A-Za-z0-9-]{10,})")


def redact(text: str) -> str:
    """Mask values that look like tokens or keys (hf_..., sk-..., AKIA...) anywhere in a string."""
    return SECRET_VALUE.sub(lambda m: m.group(0)[:3] + "***", text)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """Environment for printing: secret-looking names and values masked."""
    return {k: ("***" if SECRET_NAME.search(k) and v else redact(v)) for k, v in env.items()}
