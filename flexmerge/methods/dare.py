from __future__ import annotations

from pydantic import Field

from flexmerge.methods.base import register
from flexmerge.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams


class DareParams(TaskArithmeticParams):
    dare: float = Field(0.5, ge=0.0, lt=1.0, description="drop rate p (the DARE paper uses 0.9 on LLMs)")


@register
class Dare(TaskArithmetic):
    """DARE (Yu et al., 2024) followed by Task Arithmetic.

    DARE itself is a preprocessing that any method accepts (`dare=p`); this entry is the usual
    DARE + Task Arithmetic pairing under one name.
    """

    name = "dare"
    summary = "drop entries with rate p, rescale by 1/(1-p), then Task Arithmetic"
    reference = "https://arxiv.org/abs/2311.03099"
    Params = DareParams
