"""Masked least squares in closed form, streamed over calibration batches.

For a linear layer y = W x + b, accumulate G = X̃ᵀX̃ and C = X̃ᵀY with X̃ = [X, 1] (float64) over
batches; memory is O(in² + in·out), never O(samples). Each output row may read only the inputs its
mask allows (a's private outputs never read b's private inputs); rows sharing one mask are solved
together from the normal equations restricted to the allowed columns:
    W_S = (G_SS + ε·mean(diag G_SS)·I)⁻¹ C_S,
a ridge ε relative to the mean input energy (default 1e-6) that only matters for (near-)constant
or duplicated inputs; the bias column is never penalized.
"""

from __future__ import annotations

import torch

DEFAULT_RIDGE = 1e-6


class NormalEquations:
    def __init__(self, n_in: int, n_out: int):
        self.gram = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64)
        self.cross = torch.zeros(n_in + 1, n_out, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        self.gram += x.T @ x
        self.cross += x.T @ y.reshape(-1, y.shape[-1]).double()
        self.count += x.shape[0]

    def solve(self, allowed: torch.Tensor | None = None, ridge: float = DEFAULT_RIDGE
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) minimizing Σ‖y − W x − b‖² with W[o, i] = 0 wherever allowed[o, i] is False."""
        n_in, n_out = self.gram.shape[0] - 1, self.cross.shape[1]
        if self.count == 0:
            raise ValueError("least squares needs at least one calibration sample")
        if allowed is None:
            allowed = torch.ones(n_out, n_in, dtype=torch.bool)
        weight = torch.zeros(n_out, n_in, dtype=torch.float64)
        bias = torch.zeros(n_out, dtype=torch.float64)
        masks, rows_of = torch.unique(allowed, dim=0, return_inverse=True)
        for k, mask in enumerate(masks):
            rows = (rows_of == k).nonzero().squeeze(1)
            cols = torch.cat([mask.nonzero().squeeze(1), torch.tensor([n_in])])
            g = self.gram[cols][:, cols]
            energy = g.diagonal()[:-1].mean() if len(cols) > 1 else torch.tensor(1.0, dtype=torch.float64)
            reg = torch.full((len(cols),), ridge * float(energy), dtype=torch.float64)
            reg[-1] = 0.0
            sol = torch.linalg.solve(g + torch.diag(reg), self.cross[cols][:, rows])  # (|cols|, |rows|)
            weight[rows[:, None], cols[None, :-1]] = sol[:-1].T
            bias[rows] = sol[-1]
        return weight, bias
