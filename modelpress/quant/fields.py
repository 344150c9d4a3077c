"""Pydantic field type for "any registered weight format", so configs hold typed formats."""
from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, SerializeAsAny

from ..core.config import tagged
from .formats import FORMATS, WeightFormat

FormatField = Annotated[SerializeAsAny[WeightFormat], BeforeValidator(tagged(FORMATS, "type"))]
