"""Storage URLs (`s3://bucket/prefix`): recognised and split, their form checked; nothing is sent and no storage
library imported. A leaf beside errors.py: the config checks a URL's form up front with it, and
checkpoint/remote.py, which talks to the store, checks credentials where the store is first used."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["SCHEME", "is_url", "split_url"]

SCHEME = "s3://"


def is_url(path: Any) -> bool:
    return str(path).startswith(SCHEME)


def split_url(key: str, url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix, or a one-line ConfigError naming `key`."""
    bucket, _, prefix = str(url)[len(SCHEME):].partition("/") if is_url(url) else ("", "", "")
    if not bucket or len(bucket) < 3 or not all(c.isalnum() or c in ".-" for c in bucket):
        raise ConfigError(f"{key}={url}: expected s3://BUCKET/PREFIX (a bucket name of 3 to 63 letters, digits, "
                          "dots and dashes)")
    return bucket, prefix.strip("/")
