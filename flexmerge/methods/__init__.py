"""Merging algorithms, one module each, registered by name."""

from flexmerge.methods import (  # noqa: F401
    arcee_fusion,
    average,
    breadcrumbs,
    consensus,
    dare,
    della,
    emr,
    iso_c,
    iso_cts,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    pcb,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    twin,
)
from flexmerge.methods.base import (
    GroupResult,
    MergeMethod,
    MethodSpec,
    available_methods,
    get_method,
    parse_params,
    register,
)
from flexmerge.methods.generalized import GTAConfig

__all__ = ["GTAConfig", "GroupResult", "MergeMethod", "MethodSpec", "available_methods", "get_method",
           "parse_params", "register"]
