"""Collect every credential a test run handed out and every byte the gateway wrote, then look
for the one in the other.

The scan looks for each secret raw, percent-encoded at any depth, and (in database files)
UTF-16; a gateway key also by its secret part alone, which is what makes it usable.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

from tests.rig.gateway import GatewayProcess


def key_secret_part(key: str) -> str | None:
    """``sg_<id>_<secret>`` -> ``<secret>``."""
    parts = key.split("_", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "sg" else None


def decodings(text: str) -> list[str]:
    """``text`` and its percent-decodings, until they stop changing (double encoding included)."""
    out = [text]
    for _ in range(3):
        nxt = unquote(out[-1])
        if nxt == out[-1]:
            break
        out.append(nxt)
    return out


class SecretScan:
    """Secrets by name, client-visible answers, and the gateways whose outputs are scanned."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.answers: list[bytes] = []
        self.gateways: list[GatewayProcess] = []

    def add_secret(self, name: str, value: str) -> None:
        self.secrets[name] = value

    def add_key(self, name: str, key: str) -> None:
        """A gateway key: the key, and its secret part on its own."""
        self.add_secret(name, key)
        secret = key_secret_part(key)
        if secret:
            self.add_secret(f"{name} (secret part)", secret)

    def mint(self, gw: GatewayProcess, user: str, **kw: Any) -> str:
        """``keys create`` on ``gw``; the new key joins the secrets."""
        key = str(gw.create_key(user, **kw)["key"])
        self.add_key(f"gateway key of {user}@{gw.name}", key)
        return key

    def record(self, data: bytes) -> None:
        """Bytes a client was answered with."""
        self.answers.append(data)

    def record_httpx(self, response: httpx.Response, body: bytes | None = None) -> None:
        """An httpx answer: its headers and its body (``body`` for a stream read by hand)."""
        head = "\r\n".join(f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in response.headers.raw)
        if body is None:
            try:
                body = response.content
            except httpx.ResponseNotRead:
                body = b""
        self.answers.append(head.encode("latin-1") + b"\r\n\r\n" + body)

    def leaks(self, haystack: str | bytes) -> list[str]:
        """Names of the secrets found in ``haystack``."""
        raw = haystack if isinstance(haystack, bytes) else haystack.encode("utf-8", "replace")
        texts = decodings(raw.decode("latin-1"))
        found = []
        for name, secret in self.secrets.items():
            if any(secret in t for t in texts) or secret.encode("utf-16-le") in raw:
                found.append(name)
        return found

    def places(self) -> Iterator[tuple[str, bytes]]:
        """(where, what) for every answer, gateway log and database."""
        for i, answer in enumerate(self.answers):
            yield f"answer #{i}", answer
        for gw in self.gateways:
            yield f"{gw.name} log", gw.log_path.read_bytes() if gw.log_path.exists() else b""
            yield from database_contents(gw)

    def metrics_pages(self) -> tuple[dict[str, str], dict[str, str]]:
        """The /metrics text of every running gateway, and the error of each that could not be read."""
        pages: dict[str, str] = {}
        errors: dict[str, str] = {}
        for gw in self.gateways:
            if gw.running:
                try:
                    pages[gw.name] = gw.metrics_text()
                except httpx.HTTPError as e:
                    errors[gw.name] = str(e).splitlines()[0]
        return pages, errors


def database_contents(gw: GatewayProcess) -> Iterator[tuple[str, bytes]]:
    """Every row of every table (and, for SQLite, the raw files with their journal)."""
    if gw.db_url.startswith("sqlite"):
        for suffix in ("", "-wal", "-journal"):
            path = Path(f"{gw.db_path}{suffix}")
            if path.exists():
                yield f"{gw.name} {path.name}", path.read_bytes()
        if gw.db_path.exists():
            con = sqlite3.connect(f"file:{gw.db_path}?mode=ro", uri=True)
            try:
                tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                for t in tables:
                    yield f"{gw.name} table {t}", repr(con.execute(f'SELECT * FROM "{t}"').fetchall()).encode()
            finally:
                con.close()
        return
    import psycopg

    with psycopg.connect(gw.db_url.replace("postgresql+psycopg://", "postgresql://", 1)) as pg:
        tables = [r[0] for r in pg.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").fetchall()]
        for t in tables:
            yield f"{gw.name} table {t}", repr(pg.execute(f'SELECT * FROM "{t}"').fetchall()).encode()
