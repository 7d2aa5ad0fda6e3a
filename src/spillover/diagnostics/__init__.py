"""`spillover doctor`: what this machine can do for spillover, and what is wrong with it.

probe.py reads the machine into `Facts` (facts.py); checks.py turns facts into PASS / WARN / ERROR `Check`s
with pure functions; report.py prints them or builds the JSON document. Tests fake `Facts`, not the probes.
"""

from __future__ import annotations

from spillover.diagnostics.checks import Check, Level, evaluate, exit_code
from spillover.diagnostics.facts import Facts

__all__ = ["Check", "Facts", "Level", "evaluate", "exit_code"]
