"""URLs fit for logs, manifests and model cards: credentials and signed-query secrets removed."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>]+")


def redact(url: str) -> str:
    """The URL without credentials, fit for logs and manifests."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    query = "&".join(q for q in parts.query.split("&") if q and not q.lower().startswith(("token", "sig", "x-amz")))
    return urlunsplit(parts._replace(query=query))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted: exception messages quote the URL they failed on, whole."""
    return URL.sub(lambda found: redact(found.group(0)), text)
