"""The base of request bodies: validation whose cost and error list stay bounded by the API's
limits, not by what a client sends.

pydantic reports every invalid element of a list and every unknown field, and FastAPI turns each
report into a Python dict before any handler runs: a 1.6 MB body of 800,000 integers held the event
loop for 5 s and took 113 MB to say "inputs[0]: Input should be a valid string" (issue 30). So:
unknown fields are one error naming the first few (`StrictBody`), and list fields stop at their
first invalid element (`Field(fail_fast=True)`, pydantic >= 2.8), which every API's list fields use.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["StrictBody"]

SHOWN_FIELDS = 5


class StrictBody(BaseModel):
    """A JSON object body with only the declared fields: an unknown one (a typo such as "input") is
    an error, and a hundred thousand unknown ones are still one error."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _declared_fields_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                shown = ", ".join(repr(str(k)[:64]) for k in unknown[:SHOWN_FIELDS])
                more = f" and {len(unknown) - SHOWN_FIELDS} more" if len(unknown) > SHOWN_FIELDS else ""
                takes = ", ".join(repr(k) for k in cls.model_fields)
                # one error of its own type, so an API may word it its way (`fields`: the first few)
                raise PydanticCustomError("unknown_fields", "unknown field {shown}{more}; the body takes {takes}",
                                          {"shown": shown, "more": more, "takes": takes,
                                           "fields": ", ".join(str(k)[:64] for k in unknown[:SHOWN_FIELDS]) + more})
        return data
