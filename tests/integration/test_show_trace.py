"""The demo's trace step prints the first dead-lettered record's trace, its reason and where it is."""

from __future__ import annotations

import io

from rich.console import Console

from sandbox.demo.show_trace import show_trace
from shared.ops import initial_load


async def test_show_trace_traces_the_first_dead_letter(seeded):
    box, summary, services = seeded
    await initial_load(services)
    await services.controller.run_cycle(poll=False)
    [first, *_] = await services.queue.peek_dead_letters(1)
    key = str(first.application_properties["key"])
    assert key in summary["bad_signs"].values()
    out = io.StringIO()

    figures = await show_trace(Console(file=out, width=200), services, box)

    assert figures["traced"] == f"dataverse {key}"
    assert figures["hops"] >= 2
    text = out.getvalue()
    assert f"syncline trace dataverse {key}" in text
    assert f"trace of dataverse {key}: dataverse {key}; flows sign_assets_to_field;" in text
    assert f"  dead_letter: message {first.message_id} (sign_assets_to_field, dataverse {key})" in text
    assert f"reason {first.dead_letter_reason}: " in text
    assert "links:\n  none" in text


async def test_show_trace_without_dead_letters_says_so(seeded):
    box, _, services = seeded
    out = io.StringIO()

    figures = await show_trace(Console(file=out, width=200), services, box)

    assert figures == {"traced": None, "hops": 0}
    assert out.getvalue() == "trace: no dead-lettered record to trace\n"
