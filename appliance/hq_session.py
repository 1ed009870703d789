"""HTTP to HQ for one sync pass: the bearer token, retries of transient failures with
exponential backoff and full jitter (honouring Retry-After), and the pass's time budget."""
from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable

import httpx

from models.errors import SyncError

log = logging.getLogger("linejudge.sync")

DEFAULT_TIMEOUT = httpx.Timeout(5.0, read=15.0)
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
USER_AGENT = "linejudge-appliance-sync/1"

@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.5             # backoff: uniform(0, min(cap_s, base_s * 2**attempt))
    cap_s: float = 30.0
    max_attempts: int = 6           # per request
    budget_s: float = 180.0         # per pass, sleeps included
    max_retry_after_s: float = 120.0


class AuthError(SyncError):
    """HQ refused the token (401/403): retrying this pass cannot help."""


class Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


class HQSession:
    """HTTP with retries, backoff and the pass's time budget."""

    def __init__(self, client: httpx.Client, base_url: str, token: str, *, policy: RetryPolicy,
                 sleep, clock, rng: random.Random, timeout):
        self.client, self.base, self.token = client, base_url.rstrip("/"), token
        self.policy, self.sleep, self.clock, self.rng, self.timeout = policy, sleep, clock, rng, timeout
        self.started = clock()
        self.requests = self.failures = 0
        self.slept = 0.0

    def remaining(self) -> float:
        return self.policy.budget_s - (self.clock() - self.started)

    def headers(self, extra: dict | None = None) -> dict:
        return {"Authorization": f"Bearer {self.token}", "User-Agent": USER_AGENT, **(extra or {})}

    def check(self, resp: httpx.Response, what: str, allow: tuple[int, ...] = ()) -> httpx.Response:
        """Return 2xx (and allowed) responses; raise Transient or SyncError for the rest."""
        if resp.is_success or resp.status_code in allow:
            return resp
        try:
            detail = resp.json().get("detail", "")
        except (ValueError, AttributeError, httpx.ResponseNotRead):
            detail = ""
        reason = f"{what}: HQ answered {resp.status_code}{': ' + str(detail) if detail else ''}"
        if resp.status_code in RETRYABLE_STATUS:
            retry_after = retry_after_seconds(resp.headers.get("retry-after")) if resp.status_code in (429, 503) else None
            raise Transient(reason, retry_after)
        if resp.status_code == 401:
            raise AuthError(reason + "; the appliance token is not accepted: check hq_token_file")
        if resp.status_code == 403:
            raise AuthError(reason + "; the token belongs to another appliance: check hq_token_file")
        raise SyncError(reason)

    def call(self, what: str, fn: Callable[[], object]):
        """fn() until it returns; transport errors and Transient are retried with backoff."""
        last = "not tried"
        for attempt in range(self.policy.max_attempts):
            if self.remaining() <= 0:
                raise SyncError(f"{what}: this pass's time budget of {self.policy.budget_s:.0f} s is spent "
                                f"(last problem: {last}); the next pass continues")
            self.requests += 1
            try:
                return fn()
            except httpx.TransportError as exc:
                last, retry_after = f"{type(exc).__name__}: {exc}".rstrip(": "), None
            except Transient as exc:
                last, retry_after = str(exc), exc.retry_after
            self.failures += 1
            if attempt + 1 >= self.policy.max_attempts:
                break
            if retry_after is not None:
                delay = min(retry_after, self.policy.max_retry_after_s)
            else:
                delay = self.rng.uniform(0, min(self.policy.cap_s, self.policy.base_s * 2 ** attempt))
            if delay > self.remaining():
                raise SyncError(f"{what}: waiting {delay:.1f} s more would exceed this pass's time budget "
                                f"(last problem: {last}); the next pass continues")
            log.info("%s failed (%s); retry in %.2f s", what, last, delay)
            self.sleep(delay)
            self.slept += delay
        raise SyncError(f"{what} failed {self.policy.max_attempts} times (last: {last}); "
                        "HQ is unreachable or overloaded, the next pass retries")

    def request(self, method: str, path: str, what: str, *, allow: tuple[int, ...] = (),
                headers: dict | None = None, **kwargs) -> httpx.Response:
        def once():
            resp = self.client.request(method, self.base + path, headers=self.headers(headers),
                                       timeout=self.timeout, **kwargs)
            return self.check(resp, what, allow)
        return self.call(what, once)
