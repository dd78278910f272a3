"""Check results, the verdict, and their two renderings: a table for people, JSON for machines.

The JSON layout is documented in docs/VALIDATE.md; SCHEMA changes whenever a field changes meaning.
"""
from __future__ import annotations

import enum
import json
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

from dllama.errors import DllamaError

SCHEMA = "dllama-validate/2"
TABLE_WIDTH = 100  # columns; a cell too long for its column wraps onto the next line, never cut
ORIGINAL_CHECKS = "--hf SOURCE or --reference REF.npz"


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

    @property
    def not_run(self) -> list[str]:
        return [c.name for c in self.checks if c.status == Status.SKIP]

    @property
    def structure_only(self) -> bool:
        """Nothing was compared with the original model: a pass says the files are well-formed, not right."""
        return not self.inputs.get("hf") and not self.inputs.get("reference")

    def get(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "verdict": self.verdict, "inputs": self.inputs,
                "counts": {s.value: sum(c.status == s for c in self.checks) for s in Status},
                "checks": [c.to_json() for c in self.checks],
                "not_run": self.not_run, "structure_only": self.structure_only}

    def json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False)

    def table(self) -> str:
        rows = [("check", "result", "measured", "threshold")]
        rows += [(c.name, c.status.value.upper(), c.measured, c.threshold) for c in self.checks]
        widths = _column_widths(rows)
        lines = [line for r in rows for line in _row_lines(r, widths)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"{c.status.value.upper()} {c.name}: {c.reason}" for c in self.checks
                 if c.reason and c.status in (Status.FAIL, Status.WARN)]
        counts = ", ".join(f"{n} {s}" for s, n in self.to_json()["counts"].items() if n)
        summary = [f"verdict: {self.verdict.upper()} ({counts})"]
        if self.not_run:
            summary.append(f"not run: {', '.join(self.not_run)}" + (f" (give {ORIGINAL_CHECKS})"
                                                                    if self.structure_only else ""))
            summary += [f"  {c.name}: {c.reason}" for c in self.checks if c.status == Status.SKIP and c.reason
                        and not (self.structure_only and ("--hf" in c.reason or "--reference" in c.reason))]
        if self.structure_only and self.ok:
            summary.append(f"this pass proves the structure only: without {ORIGINAL_CHECKS} nothing was compared "
                           "with the original model's weights, tokenizer or logits")
        wrapped = [textwrap.fill(line, TABLE_WIDTH, subsequent_indent="  ", break_long_words=False,
                                 break_on_hyphens=False) for line in notes + [""] + summary]
        return "\n".join(lines + ([""] if notes else []) + wrapped)


def _column_widths(rows: list[tuple[str, ...]]) -> list[int]:
    """check and result as wide as they need; measured and threshold share what is left of TABLE_WIDTH."""
    natural = [max(len(r[i]) for r in rows) for i in range(4)]
    left = TABLE_WIDTH - natural[0] - natural[1] - 3 * 2
    if natural[2] + natural[3] <= left:
        return natural
    threshold = min(natural[3], max(left // 2, left - natural[2]))
    return natural[:2] + [left - threshold, threshold]


def _row_lines(row: tuple[str, ...], widths: list[int]) -> list[str]:
    """One table row; a long cell wraps at spaces onto more lines, so no number is cut."""
    cells = [textwrap.wrap(v.replace("\n", " "), w, break_long_words=False, break_on_hyphens=False) or [""]
             for v, w in zip(row, widths)]
    height = max(len(c) for c in cells)
    return ["  ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)).rstrip()
            for i in range(height)]


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
