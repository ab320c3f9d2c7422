"""Slurm JWTs: minted from the cluster's HS256 key (``AuthAltParameters=jwt_key=``) or read
from an environment variable (or from the file its ``<NAME>_FILE`` twin names, read at
every use, so a token renewed on disk is taken at once).

A Slurm token is a plain HS256 JWT with the payload ``{"exp", "iat", "sun"}`` (``sun``: the
Slurm user name). Minted tokens are cached per user and replaced well before they expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

from core.settings import SettingsError, secret_from_env


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint_jwt(key: bytes, user: str, lifespan_s: int, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps({"exp": issued + lifespan_s, "iat": issued, "sun": user},
                              separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


class TokenSource:
    """Gives the token to send for a Slurm user name."""

    def __init__(self, *, key_file: str | None, env_var: str | None, lifespan_s: int) -> None:
        self._key_file = key_file
        self._env_var = env_var
        self._lifespan = lifespan_s
        self._cache: dict[str, tuple[str, float]] = {}

    def token_for(self, user: str) -> str:
        if self._key_file is None:
            try:
                token = secret_from_env(self._env_var or "")
            except SettingsError as exc:
                raise RuntimeError(f"no Slurm token: {exc}") from None
            if not token:
                raise RuntimeError(f"environment variable {self._env_var} (or "
                                   f"{self._env_var}_FILE) holds no Slurm token")
            return token
        cached = self._cache.get(user)
        now = time.time()
        # Renewed once a third of its life is left, so a token never expires in flight.
        if cached is not None and cached[1] - now > self._lifespan / 3:
            return cached[0]
        key = Path(self._key_file).read_bytes()
        token = mint_jwt(key, user, self._lifespan, now)
        self._cache[user] = (token, now + self._lifespan)
        return token
