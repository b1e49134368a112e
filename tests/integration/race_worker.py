"""One racing writer: `python -m tests.integration.race_worker START FLOW SYSTEM TABLE KEY` reads the record, waits
until the epoch time START, runs the engine on it (again while the record is busy elsewhere) and prints the
outcomes as one JSON line. Settings come from the environment, as for the function app."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from shared.bootstrap import build_services
from shared.core.controller import envelopes_for
from shared.settings import Settings

BUSY_RETRIES = 100


async def race(start: float, flow: str, system: str, table: str, key: str) -> list[dict[str, object]]:
    services = build_services(Settings())
    try:
        record = (await services.sources[system].fetch(table, [key]))[key]
        envelopes = [e for e in envelopes_for(services.flowset, system, table, [record], origin="webhook")
                     if e.flow == flow]
        await services.state.get_checkpoint("warm-up")  # open the state store before the start line
        await asyncio.sleep(max(0.0, start - time.time()))
        history: list[dict[str, object]] = []
        for _ in range(BUSY_RETRIES):
            [outcome] = await services.engine.process(envelopes)
            history.append({"status": outcome.status, "created": outcome.created, "target_key": outcome.target_key,
                            "reason": outcome.error.reason if outcome.error else None,
                            "detail": outcome.error.detail[:300] if outcome.error else None})
            if outcome.error is None or outcome.error.reason != "RECORD_BUSY":
                break
            await asyncio.sleep(0.2)
        return history
    finally:
        await services.aclose()


def main() -> None:
    start, flow, system, table, key = sys.argv[1:6]
    print(json.dumps(asyncio.run(race(float(start), flow, system, table, key))))


if __name__ == "__main__":
    main()
