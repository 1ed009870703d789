"""The review queue as a budget, not a backlog.

A flagged inspection is *offered* for review (inspections.queued = 1) when it comes from a
source the plant reviews (the camera; API calls only if configured), passes the sampling
rate, and the budget has room: fewer than cap_per_hour offered in the last hour, fewer than
cap_per_shift in this shift, and fewer than `burst` in the last burst * 3600 / cap_per_hour
seconds, so a cap of 60 an hour hands the operator about one part a minute instead of sixty
in the first minute and none for the rest of the hour. The decision is taken in the same
write transaction that commits the inspection, so two inspections can never both take the
last place.

The queue is what was offered, is not reviewed yet and is younger than max_age_s: the most
uncertain part first (lowest p_best), then the newest. Older parts leave the queue on their
own (they stay in history); where the plant opts in (send_unreviewed_to_hq), each one that
leaves unreviewed is sent to HQ as an "unreviewed" record, which HQ stores and never trains on.
Reviews of inspections from sources outside hq_sources stay on the appliance.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from models.common import is_number, is_whole, section_values, to_iso
from models.errors import ConfigError

SOURCES = ("camera", "api")


@dataclass(frozen=True)
class ReviewPolicy:
    sample_rate: float = 1.0            # share of flagged parts that may be offered
    cap_per_hour: int | None = None     # parts offered in any hour at most (None = no cap)
    cap_per_shift: int | None = None    # parts offered in one shift at most (None = no cap)
    shift_hours: float = 8.0            # shifts start at local midnight and every shift_hours after
    burst: int = 3                      # at most this many offered in burst * 3600 / cap_per_hour s
    max_age_s: float | None = None      # older parts leave the queue (None = they wait)
    sources: tuple[str, ...] = ("camera",)     # inspections from these sources may be offered
    hq_sources: tuple[str, ...] = ("camera",)  # reviews of these sources are sent to HQ
    send_unreviewed_to_hq: bool = False

    def __post_init__(self):
        if not is_number(self.sample_rate) or not 0 <= self.sample_rate <= 1:
            raise ConfigError(f"review: sample_rate must be a number from 0 to 1, not {self.sample_rate!r}")
        for name in ("cap_per_hour", "cap_per_shift"):
            value = getattr(self, name)
            if value is not None and (not is_whole(value) or value < 1):
                raise ConfigError(f"review: {name} must be a whole number of at least 1 (or left out for "
                                  f"no cap), not {value!r}; e.g. {name}: 60")
        if not is_whole(self.burst) or self.burst < 1:
            raise ConfigError(f"review: burst must be a whole number of at least 1, not {self.burst!r}")
        if not is_number(self.shift_hours) or not 0 < self.shift_hours <= 24 or 24 % self.shift_hours:
            raise ConfigError(f"review: shift_hours must divide the day (e.g. 8 or 12), not {self.shift_hours!r}")
        if self.max_age_s is not None and (not is_number(self.max_age_s) or self.max_age_s <= 0):
            raise ConfigError(f"review: max_age_s must be a positive number of seconds (or left out), "
                              f"not {self.max_age_s!r}; e.g. max_age_s: 120")
        for name in ("sources", "hq_sources"):
            unknown = set(getattr(self, name)) - set(SOURCES)
            if unknown:
                raise ConfigError(f"review: {name} may hold {' and '.join(SOURCES)}, not {sorted(unknown)}")
        if not isinstance(self.send_unreviewed_to_hq, bool):
            raise ConfigError(f"review: send_unreviewed_to_hq must be true or false, not "
                              f"{self.send_unreviewed_to_hq!r}")


def policy_from_dict(data, where: str = "config", base: ReviewPolicy = ReviewPolicy()) -> ReviewPolicy:
    """The `review:` mapping of a config; keys it leaves out keep base's values."""
    values = section_values(data, "review", ReviewPolicy.__dataclass_fields__, "{cap_per_hour: 60}", where)
    for name in ("sources", "hq_sources"):
        if name in values:
            if not isinstance(values[name], list):
                raise ConfigError(f"{where}: review: {name} must be a list, e.g. {name}: [camera]")
            values[name] = tuple(values[name])
    return replace(base, **values)


def shift_start(now: datetime, shift_hours: float) -> datetime:
    """The start of the shift `now` falls in, in local time (shifts start at local midnight)."""
    local = now.astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    into_day = (local - midnight).total_seconds()
    return midnight + timedelta(seconds=into_day - into_day % (shift_hours * 3600))


# An inspection waiting in the review queue (i: the inspections row; parameter: fresh_since's time).
WAITING_SQL = "queued = 1 AND ts >= ? AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.inspection_id = i.id)"


def offered_since(db, since: datetime) -> int:
    return db.execute("SELECT count(*) FROM inspections WHERE queued = 1 AND ts >= ?",
                      [to_iso(since)]).fetchone()[0]


class ReviewBudget:
    """Decides which flagged inspections are offered for review, and reports the budget used."""

    def __init__(self, policy: ReviewPolicy, rng: random.Random | None = None):
        self.policy, self.rng = policy, rng or random.Random()

    def offer(self, db, now: datetime, source: str, flagged: bool) -> bool:
        """Whether a new inspection joins the queue; call inside its write transaction."""
        p = self.policy
        if not flagged or source not in p.sources or self.rng.random() >= p.sample_rate:
            return False
        if p.cap_per_hour is not None:
            if offered_since(db, now - timedelta(hours=1)) >= p.cap_per_hour:
                return False
            if offered_since(db, now - timedelta(seconds=p.burst * 3600 / p.cap_per_hour)) >= p.burst:
                return False
        if p.cap_per_shift is not None and offered_since(db, shift_start(now, p.shift_hours)) >= p.cap_per_shift:
            return False
        return True

    def fresh_since(self, now: datetime) -> str:
        """The ISO time before which an offered part has left the queue."""
        if self.policy.max_age_s is None:
            return ""
        return to_iso(now - timedelta(seconds=self.policy.max_age_s))

    def used(self, db, now: datetime) -> dict:
        """What the Status screen shows: parts offered this hour and this shift, and the caps."""
        p = self.policy
        return {"offered_last_hour": offered_since(db, now - timedelta(hours=1)), "cap_per_hour": p.cap_per_hour,
                "offered_this_shift": offered_since(db, shift_start(now, p.shift_hours)),
                "cap_per_shift": p.cap_per_shift, "max_age_s": p.max_age_s, "sample_rate": p.sample_rate}


def clock_now(clock=time.time) -> datetime:
    return datetime.fromtimestamp(clock(), tz=timezone.utc)
