"""The choice domain of one field as a system publishes it (option set, coded-value domain, picklist, enum)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChoiceDomain:
    """The values a field accepts, each with the label the system shows, and where the domain was read from."""

    values: dict[Any, str]
    """Value as records carry it (an int option value, a coded-value code, a picklist or enum member name) -> label."""
    source: str
    """What the domain is, for the report: e.g. "option set dot_signasset_dot_signtype", "domain SignType"."""
    inactive: dict[Any, str] = field(default_factory=dict)
    """Values the system still knows but no longer offers (a deactivated Salesforce picklist value)."""
