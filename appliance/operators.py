"""Operator PINs: the operators table of the appliance store.

A PIN is kept only as its scrypt hash with a per-operator salt. MAX_PIN_FAILURES wrong PINs in a
row lock the operator out for LOCKOUT_SECONDS. Reads and writes go through the Store that owns
the table (Store.set_operator_pin, keep_only_operators, check_operator_pin): every write still
runs on its one writer thread.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from typing import Callable

from models.errors import StoreError

MAX_PIN_FAILURES, LOCKOUT_SECONDS = 5, 300
MIN_PIN_LENGTH = 4


def _hash_pin(pin: str, salt: bytes) -> str:
    return hashlib.scrypt(str(pin).encode(), salt=salt, n=2 ** 14, r=8, p=1, dklen=32).hex()


class OperatorPins:
    """query(sql, params) reads rows; execute(*(sql, params)) runs statements in one committed
    write transaction (the Store's _query and _execute)."""

    def __init__(self, query: Callable[..., list[dict]], execute: Callable[..., None]):
        self._query, self._execute = query, execute

    def set_pin(self, name: str, pin: str) -> None:
        """Add the operator or give them a new PIN; either way they start unlocked."""
        if not name or len(str(pin)) < MIN_PIN_LENGTH:
            raise StoreError(f"an operator needs a name and a PIN of at least {MIN_PIN_LENGTH} characters")
        salt = secrets.token_bytes(16)
        self._execute(("INSERT INTO operators (name, pin_hash, salt, failed_attempts, locked_until) "
                       "VALUES (?, ?, ?, 0, 0) ON CONFLICT(name) DO UPDATE SET pin_hash = excluded.pin_hash, "
                       "salt = excluded.salt, failed_attempts = 0, locked_until = 0",
                       [name, _hash_pin(pin, salt), salt.hex()]))

    def keep_only(self, names) -> None:
        """Remove every operator not in `names`: taking someone out of the config revokes their PIN."""
        self._execute(("DELETE FROM operators WHERE name NOT IN (SELECT value FROM json_each(?))",
                       [json.dumps(sorted(names))]))

    def check(self, name: str, pin: str, now: float) -> bool:
        """True if the PIN is right; `now` is in seconds (time.time). StoreError while the
        operator is locked out."""
        rows = self._query("SELECT * FROM operators WHERE name = ?", [name])
        if not rows:
            _hash_pin(pin, b"\0" * 16)        # same cost as a real check: no probing for names
            return False
        op = rows[0]
        if op["locked_until"] > now:
            minutes = math.ceil((op["locked_until"] - now) / 60)
            raise StoreError(f"{name} is locked for {minutes} more minute{'s' if minutes > 1 else ''} after "
                             f"{MAX_PIN_FAILURES} wrong PINs; another operator can log in meanwhile")
        ok = hmac.compare_digest(_hash_pin(pin, bytes.fromhex(op["salt"])), op["pin_hash"])
        if ok:
            self._execute(("UPDATE operators SET failed_attempts = 0 WHERE name = ?", [name]))
        else:
            self._execute(("UPDATE operators SET failed_attempts = failed_attempts + 1 WHERE name = ?", [name]),
                          ("UPDATE operators SET failed_attempts = 0, locked_until = ? "
                           "WHERE name = ? AND failed_attempts >= ?", [now + LOCKOUT_SECONDS, name, MAX_PIN_FAILURES]))
        return ok
