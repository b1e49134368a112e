"""Seeds a DataverseSimulator: a DOT sign program (signs, work orders, tasks) and Dynamics 365 Sales records."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sandbox.dataverse_sim import DataverseSimulator

# Routes with a rough start point (lat, lon) and bearing across Virginia, and their length in miles.
ROUTES: list[tuple[str, float, float, float, float]] = [
    ("I-64", 38.0293, -78.4767, 95.0, 180.0),
    ("I-81", 36.6190, -81.9900, 40.0, 320.0),
    ("I-95", 36.5600, -77.4700, 0.0, 180.0),
    ("I-66", 38.9160, -77.1740, 265.0, 75.0),
    ("US-29", 36.5900, -79.4200, 10.0, 190.0),
    ("US-250", 38.0700, -79.0700, 90.0, 120.0),
    ("US-460", 37.2300, -80.4100, 80.0, 200.0),
    ("VA-7", 39.1100, -77.5600, 70.0, 60.0),
    ("VA-28", 38.7500, -77.4500, 10.0, 35.0),
    ("SR-123", 38.6500, -77.2500, 20.0, 25.0),
]

# MUTCD codes grouped by the sign_type value map (flows/dot-signs.yaml).
MUTCD: dict[int, list[str]] = {
    100000000: ["R1-1", "R1-2", "R2-1", "R3-1", "R3-2", "R4-1", "R5-1", "R6-1"],  # Regulatory
    100000001: ["W1-1", "W1-2", "W1-4", "W2-1", "W3-1", "W4-2", "W11-2", "W14-1"],  # Warning
    100000002: ["D1-1", "D1-2", "D2-1", "D3-1", "D9-2", "D11-1"],  # Guide
    100000003: ["M5-1", "M5-2", "M6-1", "M6-3", "M6-4"],  # Directional (arrow auxiliaries)
    100000004: ["M1-1", "M1-4", "M1-5", "M1-6", "M2-1"],  # Route marker
}
SIGN_TYPE_WEIGHTS = [40, 30, 15, 7, 8]
CONDITION_WEIGHTS = {100000000: 60, 100000001: 25, 100000002: 10, 100000003: 4, 100000004: 1}
WORK_DESCRIPTIONS = {
    100000000: "Install new {code} sign on {route} at MP {mp:.3f}.",
    100000001: "Replace faded {code} sign on {route} at MP {mp:.3f}.",
    100000002: "Repair bent post of {code} sign on {route} at MP {mp:.3f}.",
    100000003: "Remove obsolete {code} sign on {route} at MP {mp:.3f}.",
    100000004: "Inspect retroreflectivity of {code} on {route} at MP {mp:.3f}.",
}
TASK_PLANS: dict[int, list[tuple[str, int]]] = {
    100000000: [("Install post", 100000001), ("Mount sign", 100000002), ("Verify", 100000003)],
    100000001: [("Remove old sign", 100000000), ("Mount sign", 100000002), ("Clean", 100000004),
                ("Verify", 100000003)],
    100000002: [("Install post", 100000001), ("Mount sign", 100000002), ("Verify", 100000003)],
    100000003: [("Remove old sign", 100000000), ("Verify", 100000003)],
    100000004: [("Verify", 100000003)],
}
UNMAPPED_SIGN_TYPE = 100000009
"""A sign type present in Dataverse but absent from the sign_type value map (exercises UNMAPPED_CHOICE)."""


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _weighted(rng: random.Random, weights: dict[int, int]) -> int:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _position(route: tuple[str, float, float, float, float], milepost: float) -> tuple[float, float]:
    _, lat0, lon0, bearing, _length = route
    miles_per_deg_lat = 69.0
    miles_per_deg_lon = 69.0 * math.cos(math.radians(lat0))
    rad = math.radians(bearing)
    lat = lat0 + milepost * math.cos(rad) / miles_per_deg_lat
    lon = lon0 + milepost * math.sin(rad) / miles_per_deg_lon
    return round(lat, 6), round(lon, 6)


def _sign(rng: random.Random, n: int, now: datetime) -> dict[str, Any]:
    sign_type = rng.choices(list(MUTCD), weights=SIGN_TYPE_WEIGHTS)[0]
    code = rng.choice(MUTCD[sign_type])
    route = rng.choice(ROUTES)
    milepost = round(rng.uniform(0.0, route[4]), 3)
    lat, lon = _position(route, milepost)
    installed = date(2004, 1, 1) + timedelta(days=rng.randrange(0, 22 * 365))
    inspected = now - timedelta(days=rng.randrange(1, 900), minutes=rng.randrange(0, 1440))
    created = now - timedelta(days=rng.randrange(30, 400))
    return {
        "dot_signassetid": _guid(rng),
        "dot_name": f"{code} {route[0]} MP {milepost:.3f}",
        "dot_assettag": f"SGN-{n:06d}",
        "dot_mutcdcode": code,
        "dot_signtype": sign_type,
        "dot_condition": _weighted(rng, CONDITION_WEIGHTS),
        "dot_route": route[0],
        "dot_milepost": milepost,
        "dot_mountheightft": round(rng.uniform(7.0, 9.0) if sign_type != 100000002 else rng.uniform(7.0, 17.0), 1),
        "dot_installdate": installed.isoformat(),
        "dot_retroreflectivity": round(rng.uniform(35.0, 450.0), 1),
        "dot_lastinspectedon": _iso(inspected),
        "dot_latitude": lat,
        "dot_longitude": lon,
        "dot_arcgisglobalid": None,
        "createdon": _iso(created),
        "modifiedon": _iso(created + timedelta(days=rng.randrange(0, 25))),
    }


def seed_dataverse(sim: DataverseSimulator, *, signs: int = 2000, work_orders: int = 500,
                   seed: int = 7) -> dict[str, Any]:
    """Fill `sim` (directly, no webhooks) with `signs` good signs plus two bad ones and `work_orders` WOs.

    Every work order references a good sign, has 1-4 tasks and one field assignment (crew CREW-01..12, location
    copied from the sign). The two deliberately bad signs are: dot_signtype 100000009 (not in the value map)
    and an empty dot_mutcdcode (a required field). Returns counts and the ids of the bad records.
    """
    if signs < 1 or work_orders < 0:
        raise ValueError("signs must be >= 1 and work_orders >= 0")
    rng = random.Random(seed)
    now = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
    sign_rows: list[dict[str, Any]] = []
    for n in range(1, signs + 1):
        row = _sign(rng, n, now)
        sim.insert("dot_signassets", row)
        sign_rows.append(row)

    bad_type = _sign(rng, signs + 1, now)
    bad_type["dot_signtype"] = UNMAPPED_SIGN_TYPE
    bad_type["dot_name"] = f"UNMAPPED TYPE {bad_type['dot_mutcdcode']}"
    bad_type_id = sim.insert("dot_signassets", bad_type)
    bad_code = _sign(rng, signs + 2, now)
    bad_code["dot_mutcdcode"] = None  # Dataverse stores empty text as null
    bad_code["dot_name"] = "MISSING MUTCD CODE"
    bad_code_id = sim.insert("dot_signassets", bad_code)

    tasks = assignments = 0
    for n in range(1, work_orders + 1):
        sign = rng.choice(sign_rows)
        work_type = _weighted(rng, {100000000: 10, 100000001: 40, 100000002: 25, 100000003: 5, 100000004: 20})
        status = _weighted(rng, {100000000: 80, 100000001: 15, 100000002: 5})
        priority = _weighted(rng, {100000000: 15, 100000001: 60, 100000002: 20, 100000003: 5})
        due = (now + timedelta(days=rng.randrange(3, 60))).date()
        wo_name = f"WO-2026-{n:05d}"
        wo_id = sim.insert("dot_workorders", {
            "dot_workorderid": _guid(rng),
            "dot_name": wo_name,
            "dot_worktype": work_type,
            "dot_priority": priority,
            "dot_status": status,
            "dot_description": WORK_DESCRIPTIONS[work_type].format(
                code=sign["dot_mutcdcode"], route=sign["dot_route"], mp=sign["dot_milepost"]),
            "dot_duedate": due.isoformat(),
            "dot_completionnotes": None,
            "dot_signassetid": sign["dot_signassetid"],
            "dot_latitude": sign["dot_latitude"],
            "dot_longitude": sign["dot_longitude"],
            "createdon": _iso(now - timedelta(days=rng.randrange(1, 30))),
        })
        plan = TASK_PLANS[work_type][: rng.randint(1, 4)]
        for seq, (task_name, task_type) in enumerate(plan, start=1):
            sim.insert("dot_workordertasks", {
                "dot_workordertaskid": _guid(rng),
                "dot_name": f"{wo_name} #{seq} {task_name}",
                "dot_sequence": seq,
                "dot_tasktype": task_type,
                "dot_status": 100000001 if status == 100000002 else 100000000,
                "dot_workorderid": wo_id,
            })
            tasks += 1
        crew = f"CREW-{rng.randint(1, 12):02d}"
        start = datetime.combine(due - timedelta(days=rng.randrange(0, 3)), datetime.min.time(), UTC)
        sim.insert("dot_fieldassignments", {
            "dot_fieldassignmentid": _guid(rng),
            "dot_name": f"{wo_name} {sign['dot_mutcdcode']} {sign['dot_route']} MP {sign['dot_milepost']:.3f}",
            "dot_crew": crew,
            "dot_scheduledstart": _iso(start + timedelta(hours=rng.choice([7, 8, 9, 13]))),
            "dot_priority": priority,
            "dot_status": {100000000: 100000000, 100000001: 100000001, 100000002: 100000002}[status]
            if rng.random() > 0.1 else 100000006,
            "dot_workorderid": wo_id,
            "dot_latitude": sign["dot_latitude"],
            "dot_longitude": sign["dot_longitude"],
        })
        assignments += 1

    return {
        "dot_signassets": signs + 2,
        "good_signs": signs,
        "dot_workorders": work_orders,
        "dot_workordertasks": tasks,
        "dot_fieldassignments": assignments,
        "bad_signs": {"unmapped_sign_type": bad_type_id, "missing_mutcd_code": bad_code_id},
        "bad_sign_ids": [bad_type_id, bad_code_id],
    }


# ============================================================================================ Dynamics 365 Sales

CRM_TYPES = {3: "customer", 8: "prospect", 9: "reseller"}
"""The account relationship types the Customer 360 flows sync (customer_type value map), by category name."""
CRM_TYPE_WEIGHTS = [55, 30, 15]
_COMPANY_FIRST = ["Alder", "Blue Ridge", "Cedar", "Dominion", "Elm Street", "Fairfax", "Granite", "Harbor",
                  "Ironwood", "James River", "Keystone", "Lakeside", "Monarch", "Northfield", "Old Mill", "Piedmont",
                  "Quarry", "Riverside", "Shenandoah", "Tidewater"]
_COMPANY_SECOND = ["Logistics", "Builders", "Medical Supply", "Foods", "Engineering", "Outfitters", "Paper Co",
                   "Electric", "Analytics", "Hardware", "Textiles", "Marine"]
_COMPANY_SUFFIX = ["Inc.", "LLC", "Corp.", "Group", "Partners"]
_CITIES = [("Richmond", "23219"), ("Norfolk", "23510"), ("Roanoke", "24011"), ("Alexandria", "22314"),
           ("Charlottesville", "22902"), ("Lynchburg", "24504"), ("Harrisonburg", "22801"), ("Fredericksburg", "22401")]
_STREETS = ["Main St", "Broad St", "Market St", "Church Ave", "Jefferson St", "Water St", "Grace St", "Cary St"]
_FIRST_NAMES = ["Avery", "Blake", "Carmen", "Dana", "Elena", "Farid", "Grace", "Hiro", "Imani", "Jonas", "Kira",
                "Luis", "Maya", "Nikhil", "Olivia", "Priya", "Quinn", "Rosa", "Samuel", "Tariq"]
_LAST_NAMES = ["Adams", "Brooks", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ibrahim", "Jensen",
               "Kowalski", "Lopez", "Murphy", "Nakamura", "O'Brien", "Patel", "Quist", "Rivera", "Singh", "Turner"]
_JOB_TITLES = ["Purchasing Manager", "Accounts Payable Lead", "Operations Director", "CFO", "Buyer",
               "Facilities Manager", "Procurement Specialist", "Owner"]


def _phone(rng: random.Random) -> str:
    return f"+1 {rng.choice(['804', '757', '540', '703', '434'])} 555 {rng.randrange(0, 10000):04d}"


def seed_crm(sim: DataverseSimulator, *, accounts: int = 30, contacts_per_account: int = 2,
             seed: int = 5) -> dict[str, list[str]]:
    """Create Dynamics-originated accounts and their contacts as an office user would (validated, webhooks fire).

    Accounts are typed customer (3), prospect (8) or reseller (9) with a credit limit, payment terms 1-4, a
    billing address, phone, website and revenue; each has `contacts_per_account` contacts whose
    parentcustomerid is the account. None has a syn_salesforceid yet (they start in Dynamics). Ids and values
    depend only on `seed`. Returns ids by category: "accounts", "contacts" and the account ids per type
    ("customer", "prospect", "reseller").
    """
    if accounts < 0 or contacts_per_account < 0:
        raise ValueError("accounts and contacts_per_account must be >= 0")
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"accounts": [], "contacts": [], **{name: [] for name in CRM_TYPES.values()}}
    used_names: set[str] = set()
    for n in range(1, accounts + 1):
        name = f"{rng.choice(_COMPANY_FIRST)} {rng.choice(_COMPANY_SECOND)} {rng.choice(_COMPANY_SUFFIX)}"
        if name in used_names:
            name = f"{name} ({n})"  # account names need not be unique, but a readable demo is easier with them
        used_names.add(name)
        customer_type = rng.choices(list(CRM_TYPES), weights=CRM_TYPE_WEIGHTS)[0]
        city, postcode = rng.choice(_CITIES)
        domain = "".join(ch for ch in name.split(" ")[0].lower() if ch.isalnum()) + f"{n:03d}.example.com"
        account_id = sim.apply_change("accounts", {
            "name": name,
            "customertypecode": customer_type,
            "paymenttermscode": rng.randint(1, 4),
            "creditlimit": float(rng.choice([10_000, 25_000, 50_000, 100_000, 250_000])),
            "revenue": float(rng.randrange(500, 250_000) * 1000),
            "telephone1": _phone(rng),
            "websiteurl": f"https://www.{domain}",
            "address1_line1": f"{rng.randint(1, 9999)} {rng.choice(_STREETS)}",
            "address1_city": city,
            "address1_postalcode": postcode,
            "address1_country": "United States",
        }, key=_guid(rng))
        out["accounts"].append(account_id)
        out[CRM_TYPES[customer_type]].append(account_id)
        for _ in range(contacts_per_account):
            first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
            local = f"{first}.{last}".lower().replace("'", "")
            out["contacts"].append(sim.apply_change("contacts", {
                "firstname": first,
                "lastname": last,
                "emailaddress1": f"{local}@{domain}",
                "telephone1": _phone(rng),
                "jobtitle": rng.choice(_JOB_TITLES),
                "address1_city": city,
                "parentcustomerid": account_id,
            }, key=_guid(rng)))
    return out
