"""Seeds a DataverseSimulator: a DOT sign program, Dynamics 365 Sales records and orders bound for SAP S/4HANA."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sandbox.dataverse.app import DataverseSimulator

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


# ============================================================================================ SAP (flows/sap.yaml)

SAP_SALES_ORG = 100000000
"""Pumps US (1710): the one sales organisation the sap value map knows."""
DISTRIBUTION_CHANNELS = (100000000,)
"""Direct sales (10): the sales area every partner has (Syncline creates partners in 1710/10/00; an order in
Dealers (20) for a partner without that sales area is refused by SAP, VP/200)."""
UNMAPPED_SALES_ORG = 100000001
"""Pumps Canada (1810): an option of syn_salesorg the sales_org value map does not have."""
UNMAPPED_PLANT = 100000002
"""Monterrey (1730): an option of syn_plant the plant value map does not have."""
UNMAPPED_UNIT = 100000003
"""Box: an option of syn_unit the unit value map does not have."""
UNMAPPED_CURRENCY = "XAU"
"""A currency code (gold) that the currency_sap value map does not have."""
SAP_ORDERS_BASE_DATE = date(2026, 4, 1)
SUBMITTED_SHARE = 0.8
_ERP_FIRST = ["Aspen", "Boulder Creek", "Canyon", "Delta", "Eagle", "Front Range", "Gunnison", "High Plains",
              "Iron Horse", "Juniper", "Kern", "Lone Pine", "Mesa", "North Fork", "Owens", "Pikes Peak", "Red Rock",
              "Sierra", "Truckee", "Yampa"]
_ERP_SECOND = ["Water District", "Irrigation Co", "Municipal Utilities", "Mining", "Chemical", "Refining",
               "Food Processing", "Fire Protection", "HVAC Services", "Wastewater Authority"]
_ERP_CITIES = [("Denver", "80202", "303"), ("Colorado Springs", "80903", "719"), ("Sacramento", "95814", "916"),
               ("Fresno", "93721", "559"), ("Salt Lake City", "84111", "801"), ("Phoenix", "85004", "602"),
               ("Albuquerque", "87102", "505"), ("Reno", "89501", "775")]
_ERP_STREETS = ["Industrial Pkwy", "Pump House Rd", "Canal St", "Mill Rd", "Foundry Ave", "Reservoir Dr"]


def seed_sap_accounts(sim: DataverseSimulator, *, accounts: int = 12, seed: int = 21) -> dict[str, list[str]]:
    """Create Dynamics accounts that are ERP customers, as an office user would (validated, webhooks fire).

    Each has an account number ACC-01001, ACC-01002..., a US address, phone, payment terms 1-4 and currency
    USD (two of them CAD); none has an SAP business partner yet. One more account is deliberately bad: its
    currency XAU is not in the currency_sap value map. Ids and values depend only on `seed`. Returns ids by
    category: "accounts" (the good ones) and "bad_currency" (the bad one, not in "accounts").
    """
    if accounts < 0:
        raise ValueError("accounts must be >= 0")
    rng = random.Random(seed)
    cad = set(rng.sample(range(1, accounts + 1), min(2, accounts)))
    out: dict[str, list[str]] = {"accounts": [], "bad_currency": []}
    used: set[str] = set()
    for n in range(1, accounts + 2):
        bad = n == accounts + 1
        name = f"{rng.choice(_ERP_FIRST)} {rng.choice(_ERP_SECOND)}"
        if name in used:
            name = f"{name} ({n})"
        used.add(name)
        city, postcode, area = rng.choice(_ERP_CITIES)
        account_id = sim.apply_change("accounts", {
            "name": name,
            "accountnumber": f"ACC-{1000 + n:05d}",
            "address1_line1": f"{rng.randint(10, 9999)} {rng.choice(_ERP_STREETS)}",
            "address1_city": city,
            "address1_postalcode": postcode,
            "address1_country": "US",
            "telephone1": f"+1 {area} 555 {rng.randrange(0, 10000):04d}",
            "paymenttermscode": rng.randint(1, 4),
            "syn_currencycode": UNMAPPED_CURRENCY if bad else "CAD" if n in cad else "USD",
        }, key=_guid(rng))
        out["bad_currency" if bad else "accounts"].append(account_id)
    return out


def _valid_products(products: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> dict[str, tuple[list[int],
                                                                                                   list[int]]]:
    # Sorted so that the result depends on the products given, not on the order the caller built them in.
    valid = {pid.lower(): (sorted(units), sorted(plants)) for pid, (units, plants) in sorted(products.items())
             if units and plants}
    if not valid:
        raise ValueError("products must name at least one product with an allowed unit and plant")
    return valid


def _checked_order_inputs(orders: int, accounts: Sequence[str],
                          products: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> dict[str, tuple[list[int],
                                                                                                    list[int]]]:
    """The arguments both order seeds take, checked; returns `_valid_products(products)`."""
    if orders < 0:
        raise ValueError("orders must be >= 0")
    if not accounts:
        raise ValueError("accounts must name at least one account")
    return _valid_products(products)


def seed_sap_orders(sim: DataverseSimulator, *, accounts: Sequence[str],
                    products: Mapping[str, tuple[Sequence[int], Sequence[int]]], orders: int = 40,
                    seed: int = 22) -> dict[str, list[str]]:
    """Create Dynamics sales orders as an office user would: header, 1-4 lines, then submit (webhooks fire).

    `products` maps a productid to the syn_unit and syn_plant option values its lines may use (the caller
    derives them from SAP's material master, so every line is one SAP accepts). Each order is for one of
    `accounts`, in sales org Pumps US with a random distribution channel, the account's currency (USD when it
    has none) and a requested delivery date; lines use the product's price when it has one. About 80% of
    `orders` are then submitted (statecode 1, what sends them to SAP); the rest stay Active drafts. Three more
    orders are deliberately bad, all submitted: sales org Pumps Canada (unmapped), a line in plant Monterrey
    (unmapped), a line in unit Box (unmapped). Ids depend only on `seed` and the arguments. Returns ids by
    category: "submitted" (good ones only), "draft", "bad_sales_org", "bad_plant", "bad_unit" and "lines"
    (every line of every order).
    """
    valid = _checked_order_inputs(orders, accounts, products)
    product_ids = list(valid)
    rng = random.Random(seed)
    submit = set(rng.sample(range(orders), round(orders * SUBMITTED_SHARE)))
    bad_kinds = ("bad_sales_org", "bad_plant", "bad_unit")
    out: dict[str, list[str]] = {k: [] for k in ("submitted", "draft", *bad_kinds, "lines")}
    for n in range(orders + len(bad_kinds)):
        kind = bad_kinds[n - orders] if n >= orders else None
        account_id = rng.choice(list(accounts))
        account = sim.get("accounts", account_id) or {}
        order_id = sim.apply_change("salesorders", {
            "name": f"{account.get('name') or 'Order'} - pumps and valves {n + 1:03d}",
            "customerid": account_id,
            "syn_salesorg": UNMAPPED_SALES_ORG if kind == "bad_sales_org" else SAP_SALES_ORG,
            "syn_distributionchannel": rng.choice(DISTRIBUTION_CHANNELS),
            "syn_currencycode": account.get("syn_currencycode") or "USD",
            "requestdeliveryby": (SAP_ORDERS_BASE_DATE + timedelta(days=rng.randrange(7, 60))).isoformat(),
        }, key=_guid(rng))
        for i in range(rng.randint(1, 4)):
            product_id = rng.choice(product_ids)
            units, plants = valid[product_id]
            product = sim.get("products", product_id) or {}
            price = product.get("price") or round(rng.uniform(80.0, 6000.0), 2)
            line = {
                "salesorderid": order_id,
                "productid": product_id,
                "productdescription": product.get("name"),
                "quantity": float(rng.randint(1, 20)),
                "priceperunit": float(price),
                "syn_unit": rng.choice(units),
                "syn_plant": rng.choice(plants),
            }
            if i == 0 and kind == "bad_plant":
                line["syn_plant"] = UNMAPPED_PLANT
            if i == 0 and kind == "bad_unit":
                line["syn_unit"] = UNMAPPED_UNIT
            out["lines"].append(sim.apply_change("salesorderdetails", line, key=_guid(rng)))
        if kind is not None or n in submit:
            sim.apply_change("salesorders", {"statecode": 1}, key=order_id)
        out[kind or ("submitted" if n in submit else "draft")].append(order_id)
    return out


def bulk_sap_orders(sim: DataverseSimulator, *, accounts: Sequence[str],
                    products: Mapping[str, tuple[Sequence[int], Sequence[int]]], orders: int = 10_000,
                    seed: int = 23) -> list[str]:
    """Put `orders` submitted sales orders with 1-3 valid lines each straight into the simulator (benchmarks).

    Like `DataverseSimulator.insert`: no validation and no webhooks, but the platform's derived columns
    (order number, line numbers, amounts, totals, statuscode In Progress) are there. Returns the order ids.
    """
    valid = _checked_order_inputs(orders, accounts, products)
    product_ids = list(valid)
    account_ids = [a.lower() for a in accounts]
    currency = {a: (sim.get("accounts", a) or {}).get("syn_currencycode") or "USD" for a in account_ids}
    names = {p: (sim.get("products", p) or {}).get("name") for p in product_ids}
    prices = {p: (sim.get("products", p) or {}).get("price") for p in product_ids}
    rng = random.Random(seed)
    headers: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    for n in range(orders):
        account_id = rng.choice(account_ids)
        order_id = _guid(rng)
        headers.append({
            "salesorderid": order_id,
            "name": f"Bulk order {n + 1:06d}",
            "customerid": account_id,
            "statecode": 1,
            "statuscode": 3,
            "syn_salesorg": SAP_SALES_ORG,
            "syn_distributionchannel": rng.choice(DISTRIBUTION_CHANNELS),
            "syn_currencycode": currency[account_id],
            "requestdeliveryby": (SAP_ORDERS_BASE_DATE + timedelta(days=rng.randrange(7, 60))).isoformat(),
        })
        for _ in range(rng.randint(1, 3)):
            product_id = rng.choice(product_ids)
            units, plants = valid[product_id]
            lines.append({
                "salesorderdetailid": _guid(rng),
                "salesorderid": order_id,
                "productid": product_id,
                "productdescription": names[product_id],
                "quantity": float(rng.randint(1, 20)),
                "priceperunit": float(prices[product_id] or round(rng.uniform(80.0, 6000.0), 2)),
                "syn_unit": rng.choice(units),
                "syn_plant": rng.choice(plants),
            })
    ids = sim.insert_many("salesorders", headers)
    sim.insert_many("salesorderdetails", lines)  # each order's total is rolled up once, after all its lines
    return ids
