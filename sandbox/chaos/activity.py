"""Users at work between drains: office and field edits in the sign program, F&O and SAP activity."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from sandbox import demo
from sandbox.demo.scenario import _tiny_jpeg


def _pick(rng: random.Random, rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return rng.sample(rows, min(max(n, 0), len(rows)))


def office_activity(box: demo.Sandbox, rng: random.Random, n: int, rnd: int, activity: Counter[str]) -> None:
    """Office users in Dynamics: sign edits, new work orders with tasks and assignments, closed work orders."""
    signs = [s for s in box.dv.all("dot_signassets") if s.get("dot_arcgisglobalid")]
    for sign in _pick(rng, signs, n // 4):
        route = str(sign["dot_route"]).split(" ")[0]
        box.dv.apply_change("dot_signassets", {"dot_route": f"{route} R{rnd}"}, key=sign["dot_signassetid"])
        activity["office sign edits"] += 1
    # Closing work orders that existed before this round (the cascade closes their tasks on both sides).
    open_wos = [w for w in box.dv.all("dot_workorders") if w.get("dot_status") == 100000000
                and w.get("dot_arcgisglobalid")]
    for row in _pick(rng, open_wos, n // 25):
        box.dv.apply_change("dot_workorders", {"dot_status": 100000003}, key=row["dot_workorderid"])
        activity["office closed work orders"] += 1
    for k in range(max(1, n // 30)):
        sign = rng.choice(signs)
        demo.raise_knockdown(box, sign, f"WO-C{rnd:02d}-{k:05d}")
        activity["office new work orders"] += 1
        activity["office new work-order tasks"] += 2
        activity["office new field assignments"] += 1


def field_activity(box: demo.Sandbox, rng: random.Random, n: int, rnd: int, activity: Counter[str]) -> None:
    """Crews in ArcGIS: condition updates, completed and closed work orders (cascades), assignments, Survey123."""
    ag = box.ag
    signs = [s for s in ag.all("SignAssets") if s.get("DV_ID")]
    for feature in _pick(rng, signs, n // 3):
        ag.field_edit("SignAssets", feature["GlobalID"],
                      {"CONDITION": rng.choice(["GOOD", "FAIR", "POOR", "DAMAGED"]),
                       "RETRO_READING": round(rng.uniform(40, 400), 1),
                       "LAST_INSPECTED": int(datetime(2026, 11, 20, 15, rnd % 60, tzinfo=UTC).timestamp() * 1000)},
                      user="crew07")
        activity["field sign condition updates"] += 1
    open_wos = [w for w in ag.all("WorkOrders") if w.get("STATUS") in ("OPEN", "IN_PROGRESS") and w.get("DV_ID")]
    for wo in _pick(rng, open_wos, n // 12):
        status = rng.choice(["COMPLETED", "CLOSED"])
        ag.field_edit("WorkOrders", wo["GlobalID"], {"STATUS": status, "COMPLETION_NOTES": "Replaced and verified"},
                      user="crew02")
        activity["field work orders completed or closed"] += 1
    assignments = [a for a in ag.all("Assignments") if a.get("status") in (0, 1) and a.get("DV_ID")]
    for asg in _pick(rng, assignments, n // 12):
        ag.field_edit("Assignments", asg["GlobalID"], {"status": 2}, user="crew05")
        activity["field assignment status changes"] += 1
    photo = _tiny_jpeg()
    for sign in _pick(rng, signs, n // 6):
        ag.survey123_submit({"INSPECTION_DATE": int(datetime(2026, 11, 21, 10, tzinfo=UTC).timestamp() * 1000),
                             "INSPECTOR": rng.choice(["J. Alvarez", "K. Osei", "M. Chen"]),
                             "CONDITION": rng.choice(["GOOD", "FAIR", "POOR"]),
                             "RETRO_READING": round(rng.uniform(40, 400), 1),
                             "NOTES": f"Chaos round {rnd}", "ASSET_GUID": sign["GlobalID"]},
                            geometry=sign.get("@geometry") or sign.get("geometry"),
                            attachments=[("photo.jpg", "image/jpeg", photo)])
        activity["Survey123 inspections"] += 1
    if rnd == 0:
        ag.survey123_submit({"INSPECTION_DATE": int(datetime(2026, 11, 21, 11, tzinfo=UTC).timestamp() * 1000),
                             "INSPECTOR": None, "CONDITION": "POOR", "NOTES": "inspector left blank",
                             "ASSET_GUID": signs[0]["GlobalID"]}, geometry=signs[0].get("@geometry"), attachments=[])
        activity["Survey123 inspections (deliberately bad)"] += 1


def fno_activity(box: demo.Sandbox, rng: random.Random, n: int, rnd: int, activity: Counter[str]) -> None:
    """Finance renames customers in F&O (business events to Salesforce)."""
    from sandbox.fno import UNMAPPED_CURRENCY

    customers = [c for c in box.fno.all("CustomersV3") if c["SalesCurrencyCode"] != UNMAPPED_CURRENCY]
    for customer in _pick(rng, customers, n):
        base = str(customer["OrganizationName"]).split(" #")[0]
        box.fno.apply_change("CustomersV3", (customer["dataAreaId"], customer["CustomerAccount"]),
                             {"OrganizationName": f"{base} #{rnd}"})
        activity["F&O customer renames"] += 1


def sap_activity(box: demo.Sandbox, rng: random.Random, rnd: int, activity: Counter[str]) -> None:
    """SAP stock and price changes."""
    for material in list(box.sap.customizing.materials)[:3]:
        box.sap.set_stock(material, "1710", float(rng.randrange(10, 500)))
        activity["SAP stock changes"] += 1
    first = next(iter(box.sap.customizing.materials))
    box.sap.set_price(first, 1000.0 + rnd)
    activity["SAP price changes"] += 1
