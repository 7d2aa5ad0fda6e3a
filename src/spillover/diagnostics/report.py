"""Showing the doctor's findings: coloured lines on a terminal (plain text otherwise), or a JSON document."""

from __future__ import annotations

import dataclasses
import sys
from typing import IO, Any

from spillover.diagnostics.checks import Check, Level
from spillover.diagnostics.facts import Facts
from spillover.placement.report import plan_to_json

STYLES = {Level.PASS: "green", Level.WARN: "yellow", Level.ERROR: "bold red"}


def summary(checks: list[Check]) -> dict[str, int]:
    return {level.value.lower(): sum(c.level is level for c in checks) for level in Level}


def print_report(checks: list[Check], file: IO[str] | None = None) -> None:
    """One line per check, `LEVEL  name  message`, and `hint: ...` under each problem."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
    width = max(len(c.name) for c in checks) if checks else 0
    for c in checks:
        line = Text()
        line.append(f"{c.level.value:<5}", style=STYLES[c.level])
        line.append(f"  {c.name:<{width}}  {c.message}")  # Text: brackets in messages are not markup
        console.print(line)
        if c.hint:
            console.print(Text(f"       {'':<{width}}  hint: {c.hint}", style="dim"))
    counts = summary(checks)
    verdict = Text(f"\n{counts['error']} error(s), {counts['warn']} warning(s), {counts['pass']} passed")
    verdict.stylize(STYLES[Level.ERROR] if counts["error"] else STYLES[Level.PASS])
    console.print(verdict)


def report_json(checks: list[Check], facts: Facts) -> dict[str, Any]:
    """{"checks": [{level, name, message, hint}], "summary": {...}, "facts": {...}}."""
    return {
        "checks": [{**dataclasses.asdict(c), "level": c.level.value} for c in checks],
        "summary": summary(checks),
        "facts": facts_to_json(facts),
    }


def facts_to_json(facts: Facts) -> dict[str, Any]:
    model = facts.model
    return {
        "software": dataclasses.asdict(facts.software),
        "cpu": {**dataclasses.asdict(facts.cpu), "flags": sorted(facts.cpu.flags)},
        "inventory": dataclasses.asdict(facts.inventory),
        "hf_cache": dataclasses.asdict(facts.hf),
        "env": dict(facts.env),
        "nccl_available": facts.nccl_available,
        "peer_access": {f"cuda:{i}->cuda:{j}": v for (i, j), v in sorted(facts.peer_access.items())},
        "gpu_links": {f"cuda:{i}<->cuda:{j}": v for (i, j), v in sorted(facts.gpu_links.items()) if i < j},
        "apple": dataclasses.asdict(facts.apple) if facts.apple else None,
        "model": None
        if model is None
        else {
            "requested": model.requested,
            "error": model.error,
            "default_path": model.default_path,
            "plan": plan_to_json(model.plan) if model.plan else None,
        },
        "calibration": dataclasses.asdict(facts.calibration) if facts.calibration else None,
        "bench_ran": facts.bench_ran,
    }
