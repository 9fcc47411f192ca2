from __future__ import annotations

import torch
from pydantic import Field

from flexmerge.methods.base import MethodParams, WeightSpaceMethod, register


class PassthroughParams(MethodParams):
    scale: float | None = Field(None, description="multiply the model's weights by this (None: copy them as they "
                                "are); per tensor through tensor_params, as mergekit's filtered `scale`")


@register
class Passthrough(WeightSpaceMethod):
    """mergekit's `passthrough` of one model: its weights as they are, or times `scale`
    (`entry.tensor * scale` in mergekit), per tensor. There is nothing to merge, so it takes
    exactly one task (the model, which may be the base itself) and exists at 1x only."""

    name = "passthrough"
    summary = "one model's weights, each tensor times an optional scale (mergekit's passthrough of one model)"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/passthrough.py"
    Params = PassthroughParams
    single = True
    elementwise = True

    def merge_models(self, models: torch.Tensor) -> torch.Tensor:
        return models[0] if self.p.scale is None else models[0] * self.p.scale
