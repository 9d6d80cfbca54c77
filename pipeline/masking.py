"""Secrets kept out of everything hvae prints or logs.

No config key holds a credential (they belong in the environment: ``AWS_*``, ``MLFLOW_TRACKING_TOKEN``,
``RAY_AUTH_TOKEN``), but a value may carry one: a URI's password (``http://user:pw@host``) or a
query parameter such as ``s3://bucket?access_key=…&secret_key=…``. ``mask`` replaces those,
and the whole value of any ``key=value`` whose key looks secret (``*token*``, ``*password*``,
``*secret*``, ``*key*``), with ``***``: in the printed job entrypoint and overrides, the
printed config, the MLflow params and the recorded ``config.yaml``. (A masked value cannot
come back: ``hvae resume`` then asks for it again as an override.)
"""
from __future__ import annotations

import re

MASK = "***"
_SECRET_NAME = r"[\w.-]*(?:token|password|passwd|secret|key)[\w.-]*"
_USERINFO = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^/\s:@]+:)[^@\s/]+(?=@)")
_QUERY = re.compile(rf"(?P<head>[?&;]{_SECRET_NAME}=)[^&;\s'\"]+", re.I)
_ASSIGNMENT = re.compile(rf"^(?P<head>{_SECRET_NAME}=).+$", re.I)


def mask(text: str) -> str:
    """``text`` (a value, an override, a command line, a YAML document) with secrets replaced."""
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _QUERY.sub(lambda m: m["head"] + MASK, text)


def mask_override(item: str) -> str:
    """One ``key=value`` override: all of the value when the key looks secret, else ``mask``."""
    return _ASSIGNMENT.sub(lambda m: m["head"] + MASK, item) if _ASSIGNMENT.match(item) else mask(item)


def mask_values(values: dict) -> dict:
    """A nested mapping (a config dump) with every string value masked."""
    return {k: mask_values(v) if isinstance(v, dict) else mask(v) if isinstance(v, str) else v
            for k, v in values.items()}


def masked(text: str) -> bool:
    return MASK in text
