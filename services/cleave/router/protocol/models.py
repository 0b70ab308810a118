"""``/v1/models``: the served model, with vLLM's extra fields ``root`` and ``max_model_len``."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from cleave.router.protocol.common import OpenAIBaseModel


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "cleave"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
