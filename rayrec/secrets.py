"""Keeping secrets out of what rayrec shows and stores.

Secrets come from the environment. When one turns up anyway, in a URI's userinfo
(``http://user:password@host``), a secret-looking query parameter (``?token=...``), or a
value that looks like an API key pasted where a name belongs, it is masked wherever rayrec
prints or writes it: error messages, MLflow params, ``resolved.yaml``, checkpoints, the
submit summary. ``split_credentials`` moves a tracking URI's user and password into
MLflow's own variables (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
#: Names of variables, parameters and query keys that hold secrets (OPENAI_APIKEY, DB_PASS, X-Auth-Token, ...).
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|PWD|CREDENTIAL|AUTH|SIGNATURE|(^|[^A-Z])SIG([^A-Z]|$)", re.I)
_KEY_LIKE = re.compile(r"(sk|pk|rk|hf|ghp|gho|github_pat|xox[abp]|glpat|AKIA|ASIA)[-_A-Za-z0-9]{8,}|"
                       r"[A-Za-z0-9_\-+=.]{24,}")


def secret_name(name: str) -> bool:
    """Whether a variable or parameter name says it holds a secret."""
    return bool(SECRET_NAME.search(name))


def looks_like_key(value: Any) -> bool:
    """A string that is probably a credential: a known key prefix, or a long run of token characters
    with letters and digits (not a path, URI or sentence)."""
    if not isinstance(value, str) or any(c in value for c in " /\\:"):
        return False
    v = value.strip()
    return bool(_KEY_LIKE.fullmatch(v)) and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)


def redact_uri(uri: str) -> str:
    """``http://bob:pw@host/x?token=t&a=1`` -> ``http://bob:***@host/x?token=***&a=1``; other text unchanged."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    netloc, query = parts.netloc, parts.query
    if password is not None:
        netloc = f"{parts.username or ''}:{MASK}@{netloc.rpartition('@')[2]}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(secret_name(k) for k, _ in pairs):
        query = urlencode([(k, MASK if secret_name(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def mask(value: Any) -> Any:
    """A config value as it may be stored or shown: URIs redacted, values of secret-named keys replaced
    (``api_key_env``-style keys name a variable and stay), containers walked. Values are not guessed
    at otherwise, so a resolved config still reproduces its run."""
    if isinstance(value, dict):
        return {k: (MASK if isinstance(v, str) and v and secret_name(str(k)) and not _names_a_var(k) else mask(v))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask(v) for v in value)
    return redact_uri(value) if isinstance(value, str) else value


def shown(value: Any) -> Any:
    """A value echoed in an error message: as ``mask``, and hidden when it looks like a key."""
    return "<hidden: looks like a key>" if looks_like_key(value) else mask(value)


def _names_a_var(key: Any) -> bool:
    """Keys like ``api_key_env`` or ``auth_token_env`` hold the *name* of a variable, not a secret."""
    return str(key).endswith(("_env", "_envs"))


def mask_text(text: str) -> str:
    """Every URI inside free text redacted (error messages, log lines)."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+", lambda m: redact_uri(m.group(0)), text)


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """A tracking URI without its user and password, and MLflow's variables that carry them instead."""
    try:
        parts = urlsplit(uri)
        user, password = parts.username, parts.password
    except ValueError:
        return uri, {}
    if user is None and password is None:
        return uri, {}
    host = parts.netloc.rpartition("@")[2]
    env = {"MLFLOW_TRACKING_USERNAME": user or ""}
    if password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = password
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), env
