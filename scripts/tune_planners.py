"""Score planner settings on a suite's VALIDATION split (never test), as docs/planners.md reports.

Usage: python3 scripts/tune_planners.py SUITE METHODS PLANNER[:key=value,...] ...
e.g.   python3 scripts/tune_planners.py digits task_arithmetic,ties greedy output:norm=block,byte_power=0.5
Prints, per planner setting and method, mean normalized accuracy at 1, 1.25, 1.5, 2, 3x and the
1x-3x area (`flexmerge.curve.curve_area`).
"""

from __future__ import annotations

import sys

from flexmerge.curve import sweep
from flexmerge.planning import DATA_PLANNERS
from flexmerge.suites import get_suite, get_zoo
from flexmerge.taskvec import load_tasks

SIZES = [1, 1.25, 1.5, 2, 3]


def parse(spec: str) -> tuple[str, dict[str, object]]:
    """'output:norm=block,byte_power=0.5' -> ('output', {'norm': 'block', 'byte_power': 0.5})."""
    planner, _, rest = spec.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=", 1)
        try:
            options[key] = float(value) if "." in value else int(value)
        except ValueError:
            options[key] = value
    return planner, options


def main(argv: list[str]) -> None:
    suite = get_suite(argv[0])
    zoo = get_zoo(suite)
    tasks = load_tasks(zoo.base, zoo.models, **suite.load_options())
    evaluate = suite.evaluator(zoo, "val")
    calibration = None
    for spec in argv[2:]:
        planner, options = parse(spec)
        if planner in DATA_PLANNERS and calibration is None:
            calibration = suite.calibration(zoo)
        result = sweep(tasks, evaluate, methods=argv[1].split(","), sizes=SIZES, planners=[planner],
                       calibration=calibration, cost=options)
        areas = result.areas()
        for curve, points in result.curves().items():
            print(f"{spec:40s} {curve:28s}", " ".join(f"{p['normalized']:.3f}" for p in points),
                  f"area {areas[curve]:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
