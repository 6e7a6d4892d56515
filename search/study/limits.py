"""When a study run stops: a number of complete trials, a deadline, a run of failures."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLimits:
    n_trials: int  # complete trials the study should reach
    deadline: float | None  # time.time() after which no trial starts
    max_consecutive_failures: int

    @classmethod
    def from_options(
        cls, n_trials: int, max_failures: int, until: str | None, timeout: str | None, now: float
    ) -> RunLimits:
        """`--until HH:MM` or `--timeout 8h` (not both) as a deadline; raises ValueError with the fix."""
        if until and timeout:
            raise ValueError("give --until or --timeout, not both")
        deadline = parse_until(until, now) if until else now + parse_duration(timeout) if timeout else None
        return cls(n_trials, deadline, max_failures)


def parse_duration(text: str) -> float:
    """'8h', '90m', '1h30m', '3600s' or plain seconds -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not parts or not any(parts.groups()):
        raise ValueError(f"--timeout {text!r} is not a duration; write e.g. 8h, 90m, 1h30m or 3600s")
    h, m, s = (float(x) if x else 0.0 for x in parts.groups())
    return h * 3600 + m * 60 + s


def parse_until(text: str, now: float) -> float:
    """'07:00' -> the next time the local clock reads 07:00 (today or tomorrow)."""
    try:
        hour, minute = (int(x) for x in text.split(":"))
        target = dt.datetime.fromtimestamp(now).replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError:
        raise ValueError(f"--until {text!r} is not a clock time; write HH:MM, e.g. 07:00") from None
    if target.timestamp() <= now:
        target += dt.timedelta(days=1)
    return target.timestamp()
