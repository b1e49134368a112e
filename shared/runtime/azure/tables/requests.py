"""`TableRequestCounter`: counts the HTTP requests a Table client sends, by table and kind."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Final

from azure.core.pipeline import PipelineRequest

_ENTITY_PATH = re.compile(r"/([A-Za-z][A-Za-z0-9]*)\((.*)\)$")
_KIND_BY_METHOD: Final = {"PUT": "upsert", "MERGE": "merge", "PATCH": "merge", "DELETE": "delete"}


class TableRequestCounter:
    """Counts the HTTP requests a Table client sends, by (table, kind), retries included.

    It is the client's `raw_request_hook` (azure-core's CustomHookPolicy, which runs after the retry policy, so
    once per attempt: the Tables SDK takes no `per_retry_policies`).

    Kinds: `read` (point read), `query` (filtered or listing GET), `insert`, `upsert` / `merge` (PUT / MERGE on
    an entity: replace or conditional update), `delete`, `transaction` (one `$batch`, counted once; `ops` counts
    its operations) and `table` (table creation). Tests and benchmarks read `counts`, `total` and `ops`.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.ops: Counter[str] = Counter()
        """Entity operations carried inside transactions, per table."""

    @property
    def total(self) -> int:
        """Every request sent so far."""
        return sum(self.counts.values())

    def by_kind(self) -> dict[str, int]:
        """Totals per kind (all tables)."""
        out: Counter[str] = Counter()
        for (_, kind), count in self.counts.items():
            out[kind] += count
        return dict(out)

    def by_table(self) -> dict[str, int]:
        """Totals per table (as named on the wire, prefix included; `$batch` ones by the table they write)."""
        out: Counter[str] = Counter()
        for (table, _), count in self.counts.items():
            out[table] += count
        return dict(out)

    def reset(self) -> None:
        self.counts.clear()
        self.ops.clear()

    def __call__(self, request: PipelineRequest[Any]) -> None:
        table, kind = self.classify(request.http_request)
        self.counts[(table, kind)] += 1

    def classify(self, http: Any) -> tuple[str, str]:
        """(table, kind) of one outgoing request."""
        path = str(http.url).split("?", 1)[0]
        method = str(http.method).upper()
        if path.endswith("/$batch"):
            table, ops = _batch_contents(http)
            self.ops[table] += ops
            return table, "transaction"
        if path.endswith("/Tables") or "/Tables(" in path:
            return "", "table"
        match = _ENTITY_PATH.search(path)
        if match is None:
            return path.rsplit("/", 1)[-1], "insert" if method == "POST" else "query"
        table, address = match.groups()
        if method == "GET":
            return table, "read" if address else "query"
        if method == "POST":
            return table, "insert"
        return table, _KIND_BY_METHOD.get(method, method.lower())


def _batch_contents(http: Any) -> tuple[str, int]:
    """The table a `$batch` request writes and how many operations it carries (from the SDK's multipart parts)."""
    try:
        changeset = http.multipart_mixed_info[0][0]
        parts = changeset.multipart_mixed_info[0]
        first = str(parts[0].url).split("?", 1)[0]
        match = _ENTITY_PATH.search(first)
        table = match.group(1) if match else first.rsplit("/", 1)[-1]
        return table, len(parts)
    except (AttributeError, IndexError, TypeError):
        return "$batch", 0

