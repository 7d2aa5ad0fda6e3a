"""`spillover plan`: print the device map the engine would use, without loading any weights.

    spillover plan -m MODEL [--max-seq-len N] [--max-batch-size N] [-n MAP] [--max-memory DEV=SIZE] [--isq 4|8]
                   [--json] [--gpu SIZE ...] [--cpu SIZE] [--unified]

--gpu/--cpu/--unified describe a hypothetical machine ("would this fit on 2 x 24 GiB?"); without them the
plan is for this machine. Exit status 0 when it fits, PlacementError's exit code (1) when it does not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from spillover.cli.common import add_mapping_args, add_model_args, mmproj_arg, preflight_hub, warn_context
from spillover.config import AutoDeviceMapParams, parse_bytes
from spillover.errors import PlacementError
from spillover.placement.inventory import Inventory, hypothetical_inventory, probe_inventory
from spillover.placement.planner import Plan, failure_message
from spillover.placement.report import plan_table, plan_to_json
from spillover.placement.resolve import plan_for_source


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show where each part of a model would go (no weights are loaded)",
        description="Show the device map, memory per device and a verdict, without loading weights.",
    )
    add_model_args(p)
    add_mapping_args(p)
    g = p.add_argument_group("hypothetical hardware")
    g.add_argument(
        "--gpu", action="append", default=[], metavar="SIZE", help="a GPU of SIZE (repeat, in ordinal order)"
    )
    g.add_argument(
        "--cpu", default=None, metavar="SIZE", help="CPU memory available (default: this machine's)"
    )
    g.add_argument(
        "--unified", action="store_true", help="the GPUs share the CPU's RAM (Apple, Jetson, GB10)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def inventory_from_args(args: argparse.Namespace) -> Inventory:
    if args.gpu or args.cpu is not None or args.unified:
        cpu = parse_bytes(args.cpu) if args.cpu is not None else None
        return hypothetical_inventory([parse_bytes(s) for s in args.gpu], cpu, args.unified)
    return probe_inventory()


def build_plan(args: argparse.Namespace) -> Plan:
    """Everything `plan` does short of printing: source headers, inventory, budgets, placement."""
    from spillover.loading.source import open_source

    preflight_hub(args.model, args.gguf_file)
    params = AutoDeviceMapParams(
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        max_num_images=args.max_num_images,
        max_image_length=args.max_image_length,
    )
    source = open_source(args.model, args.gguf_file, headers_only=True, mmproj=mmproj_arg(args))
    warn_context(args, source.config)
    return plan_for_source(
        source,
        params,
        dtype=args.dtype,
        max_memory=args.max_memory,
        isq=args.isq,
        paged=not args.no_paged_attn,
        device_layers=args.device_layers,
        inventory=inventory_from_args(args),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
        n_cpu_moe=getattr(args, "n_cpu_moe", None),
    )


def print_plan(plan: Plan) -> None:
    from rich.console import Console

    width = max(shutil.get_terminal_size((120, 24)).columns, 120)
    console = Console(file=sys.stdout, width=width, highlight=False)
    console.print(plan_table(plan))
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(("[green]" if plan.fits else "[red]") + f"verdict: {plan.verdict}[/]")
    for hint in plan.hints:
        console.print(f"  - {hint}")


def run(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(plan_to_json(plan), indent=2))
    else:
        print_plan(plan)
    if plan.fits:
        return 0
    if not args.json:
        print(f"error: {failure_message(plan)}", file=sys.stderr)
    return PlacementError.exit_code
