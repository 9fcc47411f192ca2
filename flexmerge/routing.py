"""Routed inference for inputs of unknown task (Twin-Merging's router).

A small MLP maps the shared model's pooled hidden state of an input to task logits; the routed
model is the mixture of the tasks' weights under softmax(logits) (`FlexModel.mixture_state_dict`,
which at a pure Twin-Merging point is θ* + Σ_t w_t · residual_t, the reference's formula), or,
per batch, each input runs as the task of its largest weight. The router is Twin-Merging's
`SimpleMLP` (H -> 2H -> 2H -> M, batch norm, leaky ReLU, dropout 0.5), trained with its settings
(cross-entropy, lr 5e-4, 50 epochs, batches of 1024; Adam, as the HF Trainer's AdamW without
weight decay) on features of user calibration data (input, task).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexmerge.errors import ConfigError


class RouterMLP(torch.nn.Module):
    """Twin-Merging's SimpleMLP: H -> hidden -> hidden -> M with batch norm, leaky ReLU, dropout."""

    def __init__(self, features: int, num_tasks: int, hidden: int | None = None, dropout: float = 0.5):
        super().__init__()
        hidden = hidden or 2 * features
        self.fc1, self.bn1 = torch.nn.Linear(features, hidden), torch.nn.BatchNorm1d(hidden)
        self.fc3, self.bn3 = torch.nn.Linear(hidden, hidden), torch.nn.BatchNorm1d(hidden)
        self.fc4 = torch.nn.Linear(hidden, num_tasks)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.nn.functional.leaky_relu(self.bn1(self.fc1(x.float()))))
        x = self.dropout(torch.nn.functional.leaky_relu(self.bn3(self.fc3(x))))
        return self.fc4(x)

    @property
    def shape(self) -> dict[str, int]:
        return {"features": self.fc1.in_features, "hidden": self.fc1.out_features, "tasks": self.fc4.out_features}


def fit_router(features: torch.Tensor, labels: Sequence[int] | torch.Tensor, num_tasks: int, *,
               epochs: int = 50, lr: float = 5e-4, batch_size: int = 1024, seed: int = 0,
               hidden: int | None = None) -> RouterMLP:
    """A router trained on (N, H) features and their task indices (every task needs examples)."""
    y = torch.as_tensor(labels, dtype=torch.long)
    if features.dim() != 2 or len(features) != len(y) or len(y) < 2:
        raise ConfigError(f"router calibration needs (N, H) features and N task labels, N >= 2; got features "
                          f"{tuple(features.shape)} and {len(y)} labels")
    missing = sorted(set(range(num_tasks)) - set(y.tolist()))
    if missing or int(y.min()) < 0 or int(y.max()) >= num_tasks:
        raise ConfigError(f"router calibration data must cover every task 0..{num_tasks - 1} and no other; "
                          f"missing: {missing}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    router = RouterMLP(features.shape[1], num_tasks, hidden)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    x = features.float()
    router.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for idx in order.split(batch_size):
            if len(idx) < 2:  # batch norm needs two rows
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(router(x[idx]), y[idx]).backward()
            opt.step()
    return router.eval()


@torch.no_grad()
def route_weights(router: RouterMLP, features: torch.Tensor) -> torch.Tensor:
    """(N, M) mixture weights: softmax of the router's logits, as Twin-Merging combines residuals."""
    return torch.softmax(router.eval()(features.float()), -1)


def router_tensors(router: RouterMLP) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in router.state_dict().items()}


def router_from_tensors(tensors: dict[str, torch.Tensor], shape: dict[str, int]) -> RouterMLP:
    router = RouterMLP(shape["features"], shape["tasks"], shape["hidden"])
    router.load_state_dict(tensors, strict=True)
    return router.eval()
