"""Reading request JSON the way clients send it: unknown keys ignored, ``null`` = absent,
numbers given as numeric strings accepted, anything else of the wrong type a clear 400."""

from __future__ import annotations

import json
import math
from typing import Any

from nkat_runtime.errors import InvalidRequestError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


class Fields:
    """Typed, lenient access to one JSON object; every getter takes aliases, first present wins."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        self.body = body

    def has(self, *names: str) -> bool:
        return any(self.body.get(n) is not None for n in names)

    def raw(self, *names: str) -> tuple[str, Any] | None:
        for n in names:
            v = self.body.get(n)
            if v is not None:
                return n, v
        return None

    def number(self, *names: str, default: float | None = None) -> float | None:
        found = self.raw(*names)
        if found is None:
            return default
        name, v = found
        if isinstance(v, bool):
            raise InvalidRequestError(f"'{name}' must be a number, not a boolean", name)
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise InvalidRequestError(f"'{name}' must be a number, got {v[:40]!r}", name) from None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidRequestError(f"'{name}' must be a finite number", name)
        return float(v)

    def integer(self, *names: str, default: int | None = None) -> int | None:
        found = self.raw(*names)
        value = self.number(*names)
        if value is None:
            return default
        if value != int(value):
            raise InvalidRequestError(f"'{found[0] if found else names[0]}' must be an integer", names[0])
        return int(value)

    def boolean(self, *names: str, default: bool = False) -> bool:
        found = self.raw(*names)
        if found is None:
            return default
        name, v = found
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        raise InvalidRequestError(f"'{name}' must be true or false", name)

    def string(self, *names: str, default: str = "") -> str:
        found = self.raw(*names)
        if found is None:
            return default
        name, v = found
        if not isinstance(v, str):
            raise InvalidRequestError(f"'{name}' must be a string", name)
        return v

    def string_list(self, *names: str, parse_json: bool = False) -> list[str]:
        """A list of strings (``null`` entries skipped); a lone string is a one-item list, or with
        ``parse_json`` a JSON-encoded list (SillyTavern sends DRY breakers that way)."""
        found = self.raw(*names)
        if found is None:
            return []
        name, v = found
        if isinstance(v, str):
            if parse_json and v.strip().startswith("["):
                try:
                    v = json.loads(v)
                except ValueError:
                    raise InvalidRequestError(f"'{name}' is not a valid JSON list", name) from None
            else:
                return [v]
        if not isinstance(v, list) or not all(x is None or isinstance(x, str) for x in v):
            raise InvalidRequestError(f"'{name}' must be a list of strings", name)
        return [x for x in v if x is not None]

    def int_list(self, *names: str) -> list[int] | None:
        found = self.raw(*names)
        if found is None:
            return None
        name, v = found
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise InvalidRequestError(f"'{name}' must be a list of integers", name)
        return list(v)


def clamp(value: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, value))
