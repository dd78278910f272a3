"""Check results, the verdict, and their two renderings: a table for people, JSON for machines.

The JSON layout is documented in docs/VALIDATE.md; SCHEMA changes whenever a field changes meaning.
"""
from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

from dllama.errors import DllamaError

SCHEMA = "dllama-validate/2"


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"  # worth knowing, does not fail the verdict
    SKIP = "skip"  # could not run (missing --hf/--reference, or an earlier failure); says why


class InputError(DllamaError, ValueError):
    """An input cannot be read at all (missing, not a .m/.t, unusable --reference): exit code 2."""


@dataclass
class CheckResult:
    name: str         # stable identifier, e.g. "model.file_size" (docs/VALIDATE.md lists them)
    status: Status
    measured: str     # what was measured, short, for the table
    threshold: str    # what passing needs, short, for the table
    reason: str = ""  # plain language: what is wrong and how to fix it (fail/warn/skip)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "measured": self.measured,
                "threshold": self.threshold, "reason": self.reason, "details": _jsonable(self.details)}


def passed(name: str, measured: str, threshold: str, **details) -> CheckResult:
    return CheckResult(name, Status.PASS, measured, threshold, "", details)


def failed(name: str, measured: str, threshold: str, reason: str, **details) -> CheckResult:
    return CheckResult(name, Status.FAIL, measured, threshold, reason, details)


def warned(name: str, measured: str, threshold: str, reason: str, **details) -> CheckResult:
    return CheckResult(name, Status.WARN, measured, threshold, reason, details)


def skipped(name: str, reason: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, "-", "-", reason)


@dataclass
class Report:
    inputs: dict[str, str | None]
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == Status.FAIL for c in self.checks)

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else "fail"

    def get(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "verdict": self.verdict, "inputs": self.inputs,
                "counts": {s.value: sum(c.status == s for c in self.checks) for s in Status},
                "checks": [c.to_json() for c in self.checks]}

    def json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False)

    def table(self) -> str:
        rows = [("check", "result", "measured", "threshold")]
        rows += [(c.name, c.status.value.upper(), c.measured, c.threshold) for c in self.checks]
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(4)]
        lines = ["  ".join(_cell(v, w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"{c.status.value.upper()} {c.name}: {c.reason}" for c in self.checks
                 if c.reason and c.status in (Status.FAIL, Status.WARN, Status.SKIP)]
        counts = ", ".join(f"{n} {s}" for s, n in self.to_json()["counts"].items() if n)
        summary = f"verdict: {self.verdict.upper()} ({counts})"
        return "\n".join(lines + ([""] + notes if notes else []) + ["", summary])


def _cell(value: str, width: int) -> str:
    value = value.replace("\n", " ")
    return value.ljust(width) if len(value) <= width else value[:width - 1] + "…"


def _jsonable(value):
    """numpy scalars/arrays and non-finite floats -> plain JSON values (NaN/Inf become strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name.lower()
    return value
