"""Merge paths: the ordered points from M× down to the smallest size, and cuts at a size."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmerge._atomic import write_text_atomic
from flexmerge.errors import ConfigError, SizeError

Group = tuple[int, ...]
SIZE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Assignment:
    """For every block, its groups of task indices (sorted; every task in exactly one group)."""

    groups: tuple[tuple[Group, ...], ...]

    @classmethod
    def unmerged(cls, num_blocks: int, num_tasks: int) -> "Assignment":
        return cls(tuple(tuple((t,) for t in range(num_tasks)) for _ in range(num_blocks)))

    def group_sizes(self) -> list[list[int]]:
        return [[len(g) for g in block] for block in self.groups]

    def group_of(self, block: int, task: int) -> int:
        for i, g in enumerate(self.groups[block]):
            if task in g:
                return i
        raise KeyError((block, task))


@dataclass(frozen=True)
class MergeStep:
    """Fuse groups `left` and `right` of block `block`; `size` is the size after the step."""

    block: int
    left: Group
    right: Group
    similarity: float
    size: float


@dataclass
class MergePath:
    """Points 0..P of a plan: point 0 is M× (nothing merged); each later point merges more.

    A greedy/ordered planner records steps (point p = after p steps); the clustering baselines
    record one assignment per k (k = M .. 1 groups per block).
    """

    planner: str
    options: dict[str, Any]
    method: dict[str, Any]
    task_names: list[str]
    block_names: list[str]
    sizes: list[float]
    steps: list[MergeStep] | None = None
    assignments: list[Assignment] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return len(self.sizes)

    @property
    def min_size(self) -> float:
        return min(self.sizes)

    def assignment(self, point: int) -> Assignment:
        if not 0 <= point < self.num_points:
            raise ConfigError(f"point {point} is outside the path (0..{self.num_points - 1})")
        if self.assignments is not None:
            return self.assignments[point]
        groups = [{(t,) for t in range(len(self.task_names))} for _ in self.block_names]
        for step in (self.steps or [])[:point]:
            groups[step.block] -= {step.left, step.right}
            groups[step.block].add(tuple(sorted(step.left + step.right)))
        return Assignment(tuple(tuple(sorted(g)) for g in groups))

    def point_at(self, size: float) -> int:
        """The point with the largest size not above `size` (fewest merges among equals).

        Sizes count everything a point stores but the frozen parameters, the tasks' own included,
        so point 0 (every fine-tune) is exactly M. 1 <= size <= M: a size above M or not finite is
        an error, not Mx."""
        m = len(self.task_names)
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size):
            raise SizeError(f"size {size!r} is not a finite number; give a size between 1 and {m} (M)")
        if size > self.sizes[0] + SIZE_TOLERANCE:
            raise SizeError(f"size {size:.10g}x is above {self.sizes[0]:.10g}x, the size of the {m} unmerged models; "
                            f"give a size between 1 and {m}")
        fits = [p for p, s in enumerate(self.sizes) if s <= size + SIZE_TOLERANCE]
        if not fits:
            raise SizeError(
                f"size {size:g}x is below the smallest size {self.min_size:.4f}x that method "
                f"{self.method.get('name')!r} reaches on this path (masks, residuals, θ0 copies and the tasks' "
                "own parameters count)"
            )
        best = max(self.sizes[p] for p in fits)
        return min(p for p in fits if self.sizes[p] == best)

    def next_size_up(self, point: int) -> float | None:
        """The smallest size on the path above `point`'s: what a cut at `point` stopped short of."""
        above = [s for s in self.sizes if s > self.sizes[point] + SIZE_TOLERANCE]
        return min(above) if above else None

    def cut(self, size: float) -> Assignment:
        return self.assignment(self.point_at(size))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": PATH_FORMAT,
            "planner": self.planner,
            "options": self.options,
            "method": self.method,
            "tasks": self.task_names,
            "blocks": self.block_names,
            "sizes": self.sizes,
            "min_size": self.min_size,
            "timings_s": self.timings,
        }
        if self.steps is not None:
            d["steps"] = [
                {"block": self.block_names[s.block], "left": [self.task_names[t] for t in s.left],
                 "right": [self.task_names[t] for t in s.right], "similarity": s.similarity, "size": s.size}
                for s in self.steps
            ]
        if self.assignments is not None:
            d["assignments"] = [[[list(g) for g in block] for block in a.groups] for a in self.assignments]
        return d

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the path as JSON; `overwrite` replaces only an earlier path file, never another file."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1, allow_nan=False), overwrite=overwrite,
                          replaceable=is_path_file, what="a flexmerge path file")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MergePath":
        if d.get("format") in OLD_PATH_FORMATS:
            raise ConfigError("this path file was planned by an earlier flexmerge, whose sizes left out the "
                              "tasks' own parameters; plan it again (flexmerge plan ...)")
        if d.get("format") != PATH_FORMAT:
            raise ConfigError(f"not a flexmerge path file (format {d.get('format')!r})")
        tasks, blocks = d["tasks"], d["blocks"]
        steps = assignments = None
        if "steps" in d:
            t_index, b_index = {n: i for i, n in enumerate(tasks)}, {n: i for i, n in enumerate(blocks)}
            steps = [MergeStep(b_index[s["block"]], tuple(t_index[t] for t in s["left"]),
                               tuple(t_index[t] for t in s["right"]), s["similarity"], s["size"])
                     for s in d["steps"]]
        if "assignments" in d:
            assignments = [Assignment(tuple(tuple(tuple(g) for g in blk) for blk in a)) for a in d["assignments"]]
        return cls(d["planner"], d["options"], d["method"], tasks, blocks, d["sizes"], steps, assignments,
                   d.get("timings_s", {}))

    @classmethod
    def load(cls, path: str | Path) -> "MergePath":
        try:
            d = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable flexmerge path file ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: not a flexmerge path file")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"{path}: malformed flexmerge path file ({e!r})") from None


# /2: sizes count the tasks' own parameters and use the whole-fine-tune unit (size.py)
PATH_FORMAT = "flexmerge-path/2"
OLD_PATH_FORMATS = ("flexmerge-path/1",)


def is_path_file(path: Path) -> bool:
    """A regular file holding a saved merge path (what `plan --overwrite` may replace)."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size > (256 << 20):
        return False
    try:
        return json.loads(path.read_bytes()).get("format") in (PATH_FORMAT, *OLD_PATH_FORMATS)
    except (ValueError, AttributeError, OSError):
        return False
