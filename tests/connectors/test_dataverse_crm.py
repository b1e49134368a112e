"""Dynamics 365 Sales accounts and contacts through DataverseClient against the simulator (Customer 360 tables)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
import yaml

from sandbox.dataverse import DataverseSimulator, crm_schema, seed_crm
from sandbox.server import TestCA as SandboxCA
from shared.connectors.dataverse import DataverseClient, parse_remote_execution_context
from shared.core.errors import RejectedError
from shared.core.ports import Bind, WriteOp
from shared.mapping.spec import load_spec
from shared.ops import mapped_columns, register_dataverse_webhook
from tests.connectors.test_dataverse import DataverseEnv, Factory, Wire, dataverse_with_hooks
from tests.served import Receiver, Recorder, tls_context

FLOWS = Path(__file__).resolve().parents[2] / "flows" / "customer-360.yaml"
SF_ACCOUNT = "001Dn00000AbCdEIAZ"
SF_ACCOUNT_2 = "001Dn00000XyZ12IAB"
SF_CONTACT = "003Dn00000QrStUIA1"
SECRET = "crm-hook-secret-51c2"


@dataclass
class Crm:
    sim: DataverseSimulator
    client: DataverseClient
    http: httpx.AsyncClient
    wire: Wire
    factory: Factory
    receiver: Receiver
    hook_url: str

    async def raw_get(self, path: str, *, annotations: bool = False) -> httpx.Response:
        """A GET straight to the Web API (what Dataverse itself answers, before the connector maps it)."""
        token = await self.factory.provider().get_token()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if annotations:
            headers["Prefer"] = 'odata.include-annotations="*"'
        return await self.http.get(f"{self.factory.env.url}/api/data/v9.2/{path}", headers=headers)

    async def raw_post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        token = await self.factory.provider().get_token()
        return await self.http.post(f"{self.factory.env.url}/api/data/v9.2/{path}", json=body,
                                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})


@pytest.fixture(scope="module")
def crm_env(sandbox_ca: SandboxCA) -> Iterator[tuple[DataverseEnv, Receiver, str]]:
    with dataverse_with_hooks(sandbox_ca) as env:
        yield env


@asynccontextmanager
async def open_crm(served: tuple[DataverseEnv, Receiver, str]) -> AsyncIterator[Crm]:
    """A reset simulator and receiver, and a connector over a recorded TLS client, for one test."""
    env, receiver, url = served
    env.sim.reset()
    receiver.posts.clear()
    wire = Wire()
    async with httpx.AsyncClient(verify=tls_context(env.ca), timeout=5.0, event_hooks={"request": [wire.hook]}) as http:
        factory = Factory(env, http, Recorder())
        yield Crm(env.sim, factory.client(), http, wire, factory, receiver, url)
        for provider in factory.providers:
            provider.close()


@pytest.fixture
async def crm(crm_env: tuple[DataverseEnv, Receiver, str]) -> AsyncIterator[Crm]:
    async with open_crm(crm_env) as session:
        yield session


def account_op(op_id: str, sf_id: str, **values: Any) -> WriteOp:
    """What the engine sends for crm_accounts_from_salesforce: an upsert through the syn_salesforceid key."""
    return WriteOp(op_id, "upsert", "accounts", match={"syn_salesforceid": sf_id},
                   values={"name": "Contoso Pharmaceuticals", "customertypecode": 3, **values})


def filters(wire: Wire, contains: str) -> list[str]:
    """The decoded $filter of every request whose URL contains `contains`."""
    out = []
    for url in wire.urls(contains):
        out += parse_qs(urlsplit(url).query).get("$filter", [])
    return out


def batch_bodies(wire: Wire) -> str:
    return "".join(r.content.decode() for r in wire.requests if r.url.path.endswith("$batch"))


# ============================================================================================ schema


def test_crm_schema_covers_every_dataverse_column_of_customer_360() -> None:
    schema = crm_schema()
    spec = yaml.safe_load(FLOWS.read_text())
    for flow in spec["flows"]:
        for side in ("source", "target"):
            if flow[side]["system"] != "dataverse":
                continue
            table = schema[flow[side]["table"]]
            assert flow[side]["key_field"] == table.primary_id
            for fm in flow["fields"]:
                assert fm[side] in table.columns, (flow["name"], fm[side])
            for lookup in flow.get("lookups", []):
                if side == "target":
                    assert table.nav_index()[lookup["target"]] == ("parentcustomerid", lookup["bind_entity_set"])
                else:
                    assert table.columns.get(lookup["source"]) == "lookup", (flow["name"], lookup["source"])
            assert ("syn_salesforceid",) in table.alternate_keys
            assert table.max_length["syn_salesforceid"] == 18
    accounts, contacts = schema["accounts"], schema["contacts"]
    terms = {int(e["dataverse"]): e["label"] for e in spec["value_maps"]["payment_terms"]}
    assert accounts.choices["paymenttermscode"].options == terms
    types = {int(e["dataverse"]): e["label"] for e in spec["value_maps"]["customer_type"]}
    assert types.items() <= accounts.choices["customertypecode"].options.items()
    assert accounts.choices["customertypecode"].options[11] == "Vendor"  # out of the flows' scope, still valid
    assert (accounts.logical_name, accounts.primary_name, accounts.max_length["name"]) == ("account", "name", 160)
    assert (contacts.logical_name, contacts.primary_name) == ("contact", "fullname")
    assert contacts.nav_index() == {"parentcustomerid_account": ("parentcustomerid", "accounts"),
                                    "parentcustomerid_contact": ("parentcustomerid", "contacts")}
    assert "fullname" in contacts.computed
    assert contacts.required == {"lastname"}
    assert accounts.change_tracking
    assert contacts.change_tracking


async def test_default_simulator_serves_the_dot_and_the_sales_tables(crm: Crm) -> None:
    assert {"dot_signassets", "annotations", "accounts", "contacts"} <= set(crm.sim.schema)
    assert await crm.client.logical_name_for("accounts") == "account"
    assert await crm.client.primary_id_for("contacts") == "contactid"
    meta = (await crm.raw_get("EntityDefinitions(LogicalName='account')")).json()
    assert (meta["IsCustomEntity"], meta["ChangeTrackingEnabled"]) == (False, True)
    assert (await crm.raw_get("EntityDefinitions(LogicalName='dot_signasset')")).json()["IsCustomEntity"] is True
    lookup = (await crm.raw_get("EntityDefinitions(LogicalName='contact')/Attributes(LogicalName='parentcustomerid')"
                                )).json()
    assert sorted(lookup["Targets"]) == ["account", "contact"]
    assert await crm.client.choice_options("account", "paymenttermscode") == {
        1: "Net 30", 2: "2% 10 Net 30", 3: "Net 45", 4: "Net 60"}


# ============================================================================================ writes


async def test_upsert_by_salesforce_id_twice_makes_one_account(crm: Crm) -> None:
    [first] = await crm.client.write([account_op("1", SF_ACCOUNT, telephone1="+1 804 555 0100")])
    [second] = await crm.client.write([account_op("2", SF_ACCOUNT, telephone1="+1 804 555 0199", revenue=1.5e6)])
    assert first.ok, first.error
    assert second.ok, second.error
    assert (first.created, second.created) == (True, False)
    assert second.key == first.key
    [account] = crm.sim.all("accounts")
    assert account["accountid"] == first.key
    assert (account["syn_salesforceid"], account["telephone1"], account["revenue"]) == (
        SF_ACCOUNT, "+1 804 555 0199", 1.5e6)
    # The key travels in the URL (alternate-key upsert), never in the body.
    body = batch_bodies(crm.wire)
    assert f"PATCH /api/data/v9.2/accounts(syn_salesforceid='{SF_ACCOUNT}')" in body
    assert '"syn_salesforceid"' not in body


async def test_upsert_by_salesforce_id_makes_one_contact_and_binds_its_account(crm: Crm) -> None:
    [account] = await crm.client.write([account_op("a", SF_ACCOUNT)])
    op = WriteOp("c", "upsert", "contacts", match={"syn_salesforceid": SF_CONTACT},
                 values={"firstname": "Yvonne", "lastname": "McKay", "emailaddress1": "ymckay@example.com"},
                 binds={"parentcustomerid_account": Bind("accounts", str(account.key))})
    [first] = await crm.client.write([op])
    [again] = await crm.client.write([op])
    assert first.ok, first.error
    assert again.ok, again.error
    assert (first.created, again.created, again.key) == (True, False, first.key)
    assert len(crm.sim.all("contacts")) == 1
    assert f'"parentcustomerid_account@odata.bind":"/accounts({account.key})"' in batch_bodies(crm.wire)

    record = (await crm.client.fetch("contacts", [str(first.key)]))[str(first.key)]
    assert record.values["parentcustomerid"] == account.key  # _parentcustomerid_value -> parentcustomerid
    assert "_parentcustomerid_value" not in record.values
    assert record.values["fullname"] == "Yvonne McKay"
    assert record.values["syn_salesforceid"] == SF_CONTACT

    raw = (await crm.raw_get(f"contacts({first.key})", annotations=True)).json()
    assert raw["_parentcustomerid_value"] == account.key
    assert raw["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "account"
    assert raw["_parentcustomerid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] == (
        "parentcustomerid_account")


async def test_the_customer_lookup_can_point_at_a_contact_and_reads_back_typed(crm: Crm) -> None:
    [parent] = await crm.client.write([WriteOp("p", "upsert", "contacts", key=str(uuid.uuid4()),
                                               values={"lastname": "Parent"})])
    [child] = await crm.client.write([WriteOp(
        "c", "upsert", "contacts", key=str(uuid.uuid4()), values={"lastname": "Child"},
        binds={"parentcustomerid_contact": Bind("contacts", str(parent.key))})])
    assert child.ok, child.error
    raw = (await crm.raw_get(f"contacts({child.key})", annotations=True)).json()
    assert raw["_parentcustomerid_value"] == parent.key
    assert raw["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    # An edit in the UI sets the lookup by GUID alone: the table holding that GUID types it.
    grandchild = crm.sim.apply_change("contacts", {"lastname": "Grandchild", "parentcustomerid": child.key})
    raw = (await crm.raw_get(f"contacts({grandchild})", annotations=True)).json()
    assert raw["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    # The typed navigation property must match the table of the record it binds.
    [wrong] = await crm.client.write([WriteOp(
        "w", "upsert", "contacts", key=str(uuid.uuid4()), values={"lastname": "Wrong"},
        binds={"parentcustomerid_account": Bind("contacts", str(parent.key))})])
    assert not wrong.ok
    assert isinstance(wrong.error, RejectedError)
    assert "parentcustomerid_account" in wrong.error.detail
    # A bind to an account that does not exist fails that op only, with Dataverse's message.
    missing = str(uuid.uuid4())
    [dangling] = await crm.client.write([WriteOp(
        "d", "upsert", "contacts", key=str(uuid.uuid4()), values={"lastname": "Dangling"},
        binds={"parentcustomerid_account": Bind("accounts", missing)})])
    assert not dangling.ok
    assert f"account With Id = {missing} Does Not Exist" in str(dangling.error)


async def test_fullname_is_computed_from_first_and_last_name(crm: Crm) -> None:
    key = str(uuid.uuid4())
    [created] = await crm.client.write([WriteOp("c", "upsert", "contacts", key=key,
                                                values={"firstname": "Ann", "lastname": "Lee",
                                                        "fullname": "Somebody Else"})])
    assert created.ok, created.error
    assert crm.sim.get("contacts", key)["fullname"] == "Ann Lee"  # a written fullname is ignored
    await crm.client.write([WriteOp("u", "update", "contacts", key=key, values={"firstname": "Anna"})])
    assert (await crm.client.fetch("contacts", [key]))[key].values["fullname"] == "Anna Lee"
    await crm.client.write([WriteOp("n", "update", "contacts", key=key, values={"firstname": None})])
    assert crm.sim.get("contacts", key)["fullname"] == "Lee"
    [no_last] = await crm.client.write([WriteOp("x", "upsert", "contacts", key=str(uuid.uuid4()),
                                                values={"firstname": "Solo"})])
    assert not no_last.ok
    assert "required attribute 'lastname'" in str(no_last.error)


async def test_a_payment_term_outside_the_options_is_refused_with_the_dataverse_error(crm: Crm) -> None:
    [bad] = await crm.client.write([account_op("bad", SF_ACCOUNT, paymenttermscode=5)])
    assert not bad.ok
    assert isinstance(bad.error, RejectedError)
    assert not bad.error.retriable
    assert "HTTP 400 0x8004431A" in bad.error.detail
    assert "The value 5 of 'paymenttermscode' on record of type 'account' is outside the valid range" in (
        bad.error.detail)
    assert "Accepted Values: 1,2,3,4" in bad.error.detail
    assert crm.sim.all("accounts") == []

    # The wire shape: HTTP 400 with {"error": {"code", "message"}} and nothing else.
    response = await crm.raw_post("accounts", {"name": "Direct", "paymenttermscode": 7})
    assert response.status_code == 400
    error = response.json()
    assert set(error) == {"error"}
    assert set(error["error"]) == {"code", "message"}
    assert error["error"]["code"] == "0x8004431A"

    [good] = await crm.client.write([account_op("good", SF_ACCOUNT, paymenttermscode=4)])
    assert good.ok, good.error


async def test_a_salesforce_id_longer_than_18_characters_is_refused(crm: Crm) -> None:
    [bad] = await crm.client.write([account_op("long", SF_ACCOUNT + "X")])
    assert not bad.ok
    assert "exceeded the maximum allowed length of '18'" in str(bad.error)


# ============================================================================================ select


async def _accounts(crm: Crm, *rows: dict[str, Any]) -> list[str]:
    return [crm.sim.apply_change("accounts", {"customertypecode": 3, **row}) for row in rows]


async def test_select_with_a_list_matches_any_of_its_values(crm: Crm) -> None:
    a, b, c, d = await _accounts(
        crm, {"name": "O'Brien Supply", "customertypecode": 3, "creditlimit": 10000.0},
        {"name": "Contoso", "customertypecode": 9, "creditlimit": 50000.0},
        {"name": "Fabrikam", "customertypecode": 11, "creditlimit": 10000.0},
        {"name": "Nameless Co", "customertypecode": 8})

    in_scope = await crm.client.select("accounts", equals={"customertypecode": [3, 8, 9]})
    assert {r.key for r in in_scope} == {a, b, d}
    quoted = await crm.client.select("accounts", equals={"name": ["O'Brien Supply", "Contoso"]})
    assert {r.key for r in quoted} == {a, b}
    assert ("Microsoft.Dynamics.CRM.In(PropertyName='name',PropertyValues=['O''Brien Supply','Contoso'])"
            in filters(crm.wire, "/accounts?"))
    combined = await crm.client.select("accounts", equals={"customertypecode": (3, 11), "creditlimit": 10000.0})
    assert {r.key for r in combined} == {a, c}
    money = await crm.client.select("accounts", equals={"creditlimit": [50000.0, None]})
    assert {r.key for r in money} == {b, d}  # floats go as typed literals in an or chain; None is a null
    assert "(creditlimit eq 50000.0 or creditlimit eq null)" in filters(crm.wire, "/accounts?")
    # A value that tries to close its literal stays a value.
    assert await crm.client.select("accounts", equals={"name": ["x') or (name ne 'y"]}) == []


async def test_select_with_an_empty_list_returns_nothing_without_a_request(crm: Crm) -> None:
    await _accounts(crm, {"name": "Contoso"})
    fresh = crm.factory.client()  # nothing cached: not even a metadata read may happen
    before = len(crm.wire.requests)
    assert await fresh.select("accounts", equals={"customertypecode": 3, "name": []}) == []
    assert await fresh.select("accounts", equals={"name": ()}) == []
    assert len(crm.wire.requests) == before
    assert [r.values["name"] for r in await fresh.select("accounts", equals={"name": ["Contoso"]})] == ["Contoso"]
    assert len(crm.wire.requests) > before  # the same client does call when there is something to match


async def test_select_contacts_of_several_accounts_by_the_customer_lookup(crm: Crm) -> None:
    a, b, c = await _accounts(crm, {"name": "A"}, {"name": "B"}, {"name": "C"})
    contacts = {parent: crm.sim.apply_change("contacts", {"lastname": f"Of {parent[:4]}", "parentcustomerid": parent})
                for parent in (a, b, c)}
    rows = await crm.client.select("contacts", equals={"_parentcustomerid_value": [a.upper(), c]})
    assert {r.key for r in rows} == {contacts[a], contacts[c]}
    assert {r.values["parentcustomerid"] for r in rows} == {a, c}
    with pytest.raises(RejectedError, match="must be a GUID"):
        await crm.client.select("contacts", equals={"_parentcustomerid_value": [a, "not-a-guid"]})


# ============================================================================================ changes and webhooks


async def test_changes_since_tracks_accounts_and_contacts(crm: Crm) -> None:
    ids = seed_crm(crm.sim, accounts=3, contacts_per_account=2, seed=11)
    checkpoints: dict[str, str] = {}
    for table, key in (("accounts", "accounts"), ("contacts", "contacts")):
        seen: set[str] = set()
        async for records, checkpoint in crm.client.changes_since(table, None):
            seen |= {r.key for r in records}
            checkpoints[table] = checkpoint
        assert seen == set(ids[key])

    account, contact = ids["accounts"][0], ids["contacts"][-1]
    crm.sim.apply_change("accounts", {"creditlimit": 75000.0}, key=account)
    crm.sim.apply_change("contacts", key=contact, delete=True)
    account_changes = [r async for page, _ in crm.client.changes_since("accounts", checkpoints["accounts"])
                       for r in page]
    assert [(r.key, r.values["creditlimit"]) for r in account_changes] == [(account, 75000.0)]
    contact_changes = [r async for page, _ in crm.client.changes_since("contacts", checkpoints["contacts"])
                       for r in page]
    assert [(r.key, r.deleted) for r in contact_changes] == [(contact, True)]


async def test_registration_covers_accounts_and_contacts_and_seeded_records_fire_like_ui_creates(crm: Crm) -> None:
    flowset = load_spec(FLOWS)
    report = await register_dataverse_webhook(crm.client, flowset, endpoint_url=crm.hook_url, auth="header",
                                              secret=SECRET)
    steps = sorted(i.name for i in report.items if i.kind == "step")
    assert steps == sorted(f"Syncline: {m} of {t}" for t in ("account", "contact")
                           for m in ("Create", "Update", "Delete"))
    assert report.counts()["created"] == 1 + 6 + 6

    ids = seed_crm(crm.sim, accounts=2, contacts_per_account=1, seed=3)
    await crm.sim.flush_webhooks()
    assert not crm.sim.webhook_failures
    # Deliveries run in parallel, so they arrive in any order: find each by its record id.
    bodies = {b["PrimaryEntityId"]: b for b in crm.receiver.bodies()}
    assert set(bodies) == set(ids["accounts"] + ids["contacts"])
    assert {(b["MessageName"], b["PrimaryEntityName"]) for k, b in bodies.items() if k in ids["contacts"]} == {
        ("Create", "contact")}
    assert {(b["MessageName"], b["PrimaryEntityName"]) for k, b in bodies.items() if k in ids["accounts"]} == {
        ("Create", "account")}
    assert all(h["x-syncline-key"] == SECRET for h, _ in crm.receiver.posts)
    # A seeded record is a user's edit in Dynamics, not one of Syncline's own writes.
    assert {b["InitiatingUserId"] for b in bodies.values()} == {crm.sim.office_user_id}

    contact_body = bodies[ids["contacts"][0]]
    contact = parse_remote_execution_context(contact_body)
    assert contact.record.values["parentcustomerid"] == ids["accounts"][0]
    post_image = {a["key"] for a in contact_body["PostEntityImages"][0]["value"]["Attributes"]}
    assert post_image <= set(mapped_columns(flowset, "contacts"))
    assert "parentcustomerid" in post_image
    account = parse_remote_execution_context(bodies[ids["accounts"][0]])
    assert account.record.values["customertypecode"] in (3, 8, 9)
    assert isinstance(account.record.values["creditlimit"], float)

    # Update steps are filtered on mapped columns: a change to one of them is delivered.
    crm.receiver.posts.clear()
    crm.sim.apply_change("contacts", {"jobtitle": "CFO"}, key=ids["contacts"][0])
    await crm.sim.flush_webhooks()
    [update] = crm.receiver.bodies()
    assert (update["MessageName"], update["PrimaryEntityName"]) == ("Update", "contact")


# ============================================================================================ seed


def _stable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    skip = {"createdon", "modifiedon", "versionnumber"}
    return sorted(({k: v for k, v in r.items() if k not in skip} for r in rows), key=lambda r: sorted(r.items()))


def test_seed_crm_is_deterministic_and_builds_dynamics_originated_accounts() -> None:
    first, second, other = DataverseSimulator(), DataverseSimulator(), DataverseSimulator()
    try:
        ids = seed_crm(first, accounts=12, contacts_per_account=3, seed=5)
        assert seed_crm(second, accounts=12, contacts_per_account=3, seed=5) == ids
        assert _stable(first.all("accounts")) == _stable(second.all("accounts"))
        assert _stable(first.all("contacts")) == _stable(second.all("contacts"))
        assert seed_crm(other, accounts=12, contacts_per_account=3, seed=6)["accounts"] != ids["accounts"]

        assert (len(ids["accounts"]), len(ids["contacts"])) == (12, 36)
        assert sorted(ids["customer"] + ids["prospect"] + ids["reseller"]) == sorted(ids["accounts"])
        accounts = {a["accountid"]: a for a in first.all("accounts")}
        for type_code, category in ((3, "customer"), (8, "prospect"), (9, "reseller")):
            assert all(accounts[k]["customertypecode"] == type_code for k in ids[category])
        for a in accounts.values():
            assert a["paymenttermscode"] in (1, 2, 3, 4)
            assert a["creditlimit"] > 0
            assert a["revenue"] > 0
            assert a["websiteurl"].startswith("https://")
            assert all(a[c] for c in ("name", "telephone1", "address1_line1", "address1_city", "address1_postalcode",
                                      "address1_country"))
            assert a.get("syn_salesforceid") is None  # born in Dynamics: not in Salesforce yet
            assert a["createdby"] == first.office_user_id
        contacts = first.all("contacts")
        per_account = {k: sum(c["parentcustomerid"] == k for c in contacts) for k in accounts}
        assert set(per_account.values()) == {3}
        for c in contacts:
            assert c["fullname"] == f"{c['firstname']} {c['lastname']}"
            assert unquote(c["emailaddress1"]).split("@")[1] in accounts[c["parentcustomerid"]]["websiteurl"]
    finally:
        for sim in (first, second, other):
            sim.close()
