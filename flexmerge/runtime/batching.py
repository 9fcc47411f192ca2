"""Mixed-task batches as one forward pass: a copy of a model in which every module that holds
parameters of its own is a `MixedModule`, applying each *distinct* weight set to the rows of the
tasks that read it; a weight set shared by all tasks of the batch is one call on the whole batch.

Any parameter-holding module is mixed (Linear, Embedding, LayerNorm, LlamaRMSNorm, transformers'
Conv1D, ...): the outermost module that holds parameters of its own is replaced, with its children,
and each of its inputs whose first dimension is the batch is cut into the rows of each weight set;
other inputs (position ids of one row) are shared by all rows. This assumes, as holds for the
modules of transformers models in inference, that a module treats the rows of a batch independently.
A module that declares its batch dimension elsewhere (`batch_first=False`: PyTorch's sequence-first
attention and RNNs) makes `mixed_copy` decline, and the caller runs one forward pass per task.
Outputs of different widths (heads of 2, 3, 5 labels, vocabularies a task extended) are padded
with -inf on the last dimension and cut back per row by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Groups = list[tuple[list[int], torch.nn.Module]]  # (the tasks that read it, one distinct module)


class BatchRows:
    """Where each task's rows are in the current batch, read by every MixedModule.

    The caller sorts a batch by the task order given here (`sort_key`), so each task's rows are
    one contiguous span; a group whose tasks are adjacent in that order then reads and writes a
    slice of the batch (a view, no copy) and only the other groups gather their rows."""

    def __init__(self, order: Sequence[int]):
        self.position = {t: i for i, t in enumerate(order)}
        self.spans: dict[int, tuple[int, int]] = {}
        self.batch = 0
        self._plans: dict[tuple, list[tuple[int, slice | torch.Tensor]]] = {}

    def sort_key(self, task: int) -> int:
        return self.position[task]

    def set(self, row_tasks: Sequence[int]) -> None:
        """The batch's task per row, already sorted by `sort_key`."""
        self.spans = {}
        for row, t in enumerate(row_tasks):
            start, _ = self.spans.get(t, (row, row))
            self.spans[t] = (start, row + 1)
        self.batch = len(row_tasks)
        self._plans = {}

    def plan(self, members: tuple[tuple[int, ...], ...]) -> list[tuple[int, slice | torch.Tensor]]:
        """(group index, its rows) for the groups present in the batch: a slice when the group's
        rows are contiguous, else an index tensor. Computed once per batch and grouping."""
        if members not in self._plans:
            plan = []
            for i, tasks in enumerate(members):
                spans = sorted(self.spans[t] for t in tasks if t in self.spans)
                if not spans:
                    continue
                if all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
                    plan.append((i, slice(spans[0][0], spans[-1][1])))
                else:
                    plan.append((i, torch.cat([torch.arange(a, b) for a, b in spans])))
            self._plans[members] = plan
        return self._plans[members]


class MixedModule(torch.nn.Module):
    """Stands for one module of the model: `groups` are the distinct modules the tasks read."""

    def __init__(self, rows: BatchRows, groups: Groups):
        super().__init__()
        self.rows = rows
        self.members = tuple(tuple(tasks) for tasks, _ in groups)
        self.choices = torch.nn.ModuleList([m for _, m in groups])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan = self.rows.plan(self.members)
        if len(plan) == 1:  # one weight set for every row of the batch: one call
            return self.choices[plan[0][0]](*args, **kwargs)
        batch = self.rows.batch
        outputs = []
        for i, rows in plan:
            n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
            if kwargs:
                y = self.choices[i](*(_rows_of(a, rows, batch) for a in args),
                                    **{k: _rows_of(v, rows, batch) for k, v in kwargs.items()})
            else:  # the usual call, one tensor: no dict to build
                y = self.choices[i](*(_rows_of(a, rows, batch) for a in args))
            outputs.append((rows, n, y))
        return _gather(outputs, batch)


def _rows_of(value: Any, rows: slice | torch.Tensor, batch: int) -> Any:
    """The group's rows of an input whose first dimension is the batch; any other input as is."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return value
    return value[rows] if isinstance(rows, slice) else value.index_select(0, rows)


def _gather(outputs: list[tuple[slice | torch.Tensor, int, Any]], batch: int) -> Any:
    """The groups' outputs as one batch: a tensor, or a tuple of tensors (None kept)."""
    first = outputs[0][2]
    if isinstance(first, torch.Tensor):
        return _scatter_rows([(rows, _per_row(y, n)) for rows, n, y in outputs], batch)
    if isinstance(first, (tuple, list)):
        parts = []
        for k, item in enumerate(first):
            if item is None:
                parts.append(None)
            elif isinstance(item, torch.Tensor):
                parts.append(_scatter_rows([(rows, _per_row(y[k], n)) for rows, n, y in outputs], batch))
            else:
                raise TypeError(f"a mixed module returned {type(item).__name__} in a tuple; tensors only")
        return type(first)(parts)
    raise TypeError(f"a mixed module returned {type(first).__name__}; tensors or tuples of tensors only")


def _per_row(y: torch.Tensor, n: int) -> torch.Tensor:
    """A group's output for its n rows: an output computed from inputs shared by every row (one
    row of position ids) is the same for each."""
    if y.dim() > 0 and y.shape[0] == n:
        return y
    if y.dim() > 0 and y.shape[0] == 1:
        return y.expand(n, *y.shape[1:])
    raise ValueError(f"a mixed module's output has {y.shape[0] if y.dim() else 'no'} rows for a group of {n}")


def mixed_copy(modules: Sequence[torch.nn.Module],
               blank: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, BatchRows] | None:
    """(the mixed copy, its BatchRows) of the per-task `modules` (one per task, in task order, of
    one class), built on `blank()` (an empty model of that class); None when they cannot run as
    one pass (modules of different classes or structures, a module that is not batch-first, or
    a model that holds parameters of its own at the top). Every parameter-holding module of the
    copy is replaced, so the copy's own weights are dropped."""
    if len({type(m) for m in modules}) > 1:
        return None
    names = holders(modules[0])
    per_task = [dict(m.named_modules()) for m in modules]
    if "" in names or not all(n in p for p in per_task for n in names):
        return None
    if any(getattr(sub, "batch_first", True) is False for n in names for sub in per_task[0][n].modules()):
        return None
    groups = {name: _distinct([p[name] for p in per_task]) for name in names}
    weights = {name: sum(p.numel() for p in per_task[0][name].parameters()) for name in names}
    rows = BatchRows(task_order(groups, weights, len(modules)))
    mixed = blank().eval()
    for name in names:
        _replace(mixed, name, MixedModule(rows, groups[name]))
    return mixed, rows


def holders(model: torch.nn.Module) -> list[str]:
    """The names of the outermost modules that hold parameters of their own (a Linear, an
    RMSNorm, an attention module with a bias of its own): each is mixed with its children."""
    names: list[str] = []
    for name, module in model.named_modules():  # parents come before their children
        if any(name.startswith(h + ".") or h == "" for h in names):
            continue
        if next(module.parameters(recurse=False), None) is not None:
            names.append(name)
    return names


def task_order(groups: dict[str, list[tuple[list[int], Any]]], weights: dict[str, int], m: int) -> list[int]:
    """An order of the m tasks in which the groups of as many weights as possible are contiguous
    (read as slices of a batch sorted this way): tasks sorted by their group in each distinct
    grouping, the groupings that cover the most weights first (those are contiguous for sure)."""
    covered: dict[tuple, int] = {}
    for name, gs in groups.items():
        if len(gs) > 1:
            key = tuple(sorted(tuple(tasks) for tasks, _ in gs))
            covered[key] = covered.get(key, 0) + weights[name]
    partitions = sorted(covered, key=lambda k: -covered[k])

    def signature(task: int) -> tuple[int, ...]:
        return tuple(next(g for g, tasks in enumerate(p) if task in tasks) for p in partitions)

    return sorted(range(m), key=signature)


def _scatter_rows(parts: list[tuple[slice | torch.Tensor, torch.Tensor]], batch: int) -> torch.Tensor:
    """Rows back in batch order; outputs of different widths (heads of 2, 3, 5 labels) are padded
    with -inf on the last dim."""
    first = parts[0][1]
    widths = {y.shape[-1] for _, y in parts} if first.dim() > 1 else set()
    if len(widths) > 1:
        out = first.new_full((batch, *first.shape[1:-1], max(widths)), float("-inf"))
        for rows, y in parts:
            out[rows, ..., : y.shape[-1]] = y
        return out
    out = first.new_empty((batch, *first.shape[1:]))
    for rows, y in parts:
        if isinstance(rows, slice):
            out[rows] = y
        else:
            out.index_copy_(0, rows, y)
    return out


def _distinct(modules: list[torch.nn.Module]) -> Groups:
    """Tasks grouped by the weights their module (and its children) hold: the same stored tensors
    -> one group."""
    groups: dict[tuple, tuple[list[int], torch.nn.Module]] = {}
    for t, m in enumerate(modules):
        ident = tuple((p.data_ptr(), tuple(p.shape)) for p in m.parameters())
        groups.setdefault(ident, ([], m))[0].append(t)
    return list(groups.values())


def _replace(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
