"""A reason is the unit of every explanation escort gives.

Codes are stable (tests, JSON output and scripts rely on them); messages are one
plain sentence; ``fix`` says what would make the check pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    message: str
    fix: str = ""
    severity: Severity = "error"

    def as_json(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.fix:
            out["fix"] = self.fix
        if self.severity != "error":
            out["severity"] = self.severity
        return out
