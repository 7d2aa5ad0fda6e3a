"""`spillover doctor`: what this machine can do, and what is wrong with it.

    spillover doctor [--json] [--bench] [-m MODEL [mapping flags]]

Prints PASS / WARN / ERROR lines (a hint under each problem) and exits 1 when any check is an ERROR.
--bench measures host->GPU, GPU memory and CPU GEMV bandwidth in a few seconds and caches them for the offload
cost model (calibration.py); -m plans the model on this machine with the mapping flags, like `spillover plan`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from spillover import calibration
from spillover.cli.common import add_mapping_args, add_model_args, hub_reachable, mmproj_arg, preflight_hub
from spillover.config import AutoDeviceMapParams
from spillover.diagnostics.checks import Check, evaluate, exit_code, ok, warn
from spillover.diagnostics.facts import Facts, ModelFacts
from spillover.diagnostics.probe import probe_facts
from spillover.diagnostics.report import print_report, report_json
from spillover.errors import ConfigError, SpilloverError
from spillover.placement.inventory import Inventory
from spillover.placement.resolve import plan_for_source

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check this machine: versions, driver, CPU, GPUs, caches, and whether a model fits",
        description="Report what this machine can do for spillover and what is wrong with it. "
        "Exits 1 when any check is an ERROR.",
    )
    add_model_args(p)
    add_mapping_args(p)
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument(
        "--bench",
        action="store_true",
        help="measure host->GPU, GPU memory and CPU GEMV bandwidth (a few seconds) and cache them",
    )
    p.set_defaults(func=run)


def plan_model(args: argparse.Namespace, inventory: Inventory) -> ModelFacts:
    """Plan -m MODEL on the inventory the report shows (as `spillover plan` would); a model that cannot be
    opened or planned becomes an error fact, not a crash."""
    from spillover.loading.source import open_source

    params_fields = ("max_seq_len", "max_batch_size", "max_num_images", "max_image_length")
    try:
        preflight_hub(args.model, args.gguf_file)
        plan = plan_for_source(
            open_source(args.model, args.gguf_file, headers_only=True, mmproj=mmproj_arg(args)),
            AutoDeviceMapParams(**{k: getattr(args, k) for k in params_fields}),
            dtype=args.dtype,
            max_memory=args.max_memory,
            isq=args.isq,
            paged=not args.no_paged_attn,
            device_layers=args.device_layers,
            inventory=inventory,
            tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
        )
    except SpilloverError as e:
        return ModelFacts(requested=args.model, error=str(e), error_in_settings=isinstance(e, ConfigError))
    return ModelFacts(requested=args.model, plan=plan)


def run_bench(facts: Facts) -> Facts:
    """Measure, cache, and put the fresh calibration into the facts."""
    device = next((g.device for g in facts.inventory.gpus), "cpu")
    cal = calibration.measure(device)
    try:
        path = calibration.save(cal)
        log.info("calibration saved to %s", path)
    except OSError as e:
        log.warning("could not save the calibration: %s", e)
    return dataclasses.replace(facts, calibration=cal, bench_ran=True)


def hub_check() -> Check:
    """Whether the Hugging Face hub answers (one probe, a few seconds at most): hub ids need it."""
    reachable, seen = hub_reachable()
    if reachable:
        return ok("hub", f"Hugging Face hub reachable ({seen})")
    return warn("hub", f"Hugging Face hub not reachable ({seen})",
                "models given as hub ids work only from the local cache; use local paths, or set HF_ENDPOINT")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    facts = probe_facts()
    if args.model is not None:
        facts = dataclasses.replace(facts, model=plan_model(args, facts.inventory))
    if args.bench:
        facts = run_bench(facts)
    checks = evaluate(facts) + [hub_check()]
    if args.json:
        print(json.dumps(report_json(checks, facts), indent=2, default=str))
        return exit_code(checks)
    print_report(checks)
    plan = facts.model.plan if facts.model else None
    if plan is not None:
        from spillover.cli.plan import print_plan

        print()
        print_plan(plan)
    sys.stdout.flush()
    return exit_code(checks)
