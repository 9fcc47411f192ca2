"""How a merge path is planned: the options and their defaults, in one value.

`PlanOptions` is what the API (`plan`, `merge`, `merge_to_disk`), the sweep, the CLI flags and a
YAML file's fields all mean by "plan options"; each of them builds one with `PlanOptions.of`, so
a default lives here and nowhere else. Which block partition a plan runs on (granularity,
patterns) is the partition's business, not the planner's (`flexmerge.blocks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flexmerge.errors import ConfigError
from flexmerge.planning.activations import DEFAULT_RANK

MODES = ("constituent", "merged")
# Settings of the cost planners (`flexmerge.planning.costs`): the normalization of a pair's cost,
# the power of the bytes a fusion saves, the rank of the output planner's activation metrics.
COST_DEFAULTS: dict[str, Any] = {"norm": "block", "byte_power": 1.0, "rank": DEFAULT_RANK}


@dataclass(frozen=True)
class PlanOptions:
    """`planner`: a name in `flexmerge.planning.PLANNERS`. `linkage`: how a greedy order scores a
    pair of groups from their members' similarities (min | avg | max). `mode`: similarity of the
    constituent task vectors, or of the vector the method would merge (`merged`, scored by
    `measure`). `seed`: of the random order and of the channel planner's k-means. `cost`: settings
    of the cost planners (keys of COST_DEFAULTS; others ignore them)."""

    planner: str = "greedy"
    linkage: str = "min"
    mode: str = "constituent"
    measure: str = "cosine"
    seed: int = 0
    cost: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, options: PlanOptions | None = None, **fields: Any) -> PlanOptions:
        """`options` (default: the defaults) with `fields` replaced; None values keep the default,
        as an unset CLI flag does. An unknown field is an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown plan option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        given = {k: v for k, v in fields.items() if v is not None}
        if "cost" in given:
            given["cost"] = dict(given["cost"])
        return dataclasses.replace(options or cls(), **given)

    def cost_settings(self) -> dict[str, Any]:
        """The cost planners' settings, defaults filled in."""
        return dict(COST_DEFAULTS, **self.cost)

    def recorded(self, granularity: str) -> dict[str, Any]:
        """What a path records of how it was planned (its `options`; a cost planner adds its settings)."""
        return {"linkage": self.linkage, "mode": self.mode, "measure": self.measure, "seed": self.seed,
                "granularity": granularity}
