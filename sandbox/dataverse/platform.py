"""The platform's own tables: webhook registration (service endpoints, steps, images) and their codes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from sandbox.dataverse.schema import ChoiceColumn, LookupColumn, TableSchema

SDK_MESSAGES = ("Create", "Update", "Delete")
"""The SDK messages the simulator knows (and preloads in `sdkmessages`)."""
CONTRACT_WEBHOOK = 8
AUTH_WEBHOOK_KEY, AUTH_HTTP_HEADER, AUTH_HTTP_QUERY_STRING = 4, 5, 6
IMAGE_PRE, IMAGE_POST, IMAGE_BOTH = 0, 1, 2
IMAGE_MESSAGE_PROPERTY = {"Create": "Id", "Update": "Target", "Delete": "Target"}
"""The request property an image is taken from, per message (what the Plug-in Registration tool sets)."""


def _choices(name: str, options: Mapping[int, str]) -> ChoiceColumn:
    return ChoiceColumn(dict(options), option_set_name=name)


def system_schema() -> dict[str, TableSchema]:
    """The platform tables behind webhook registration: service endpoints, SDK messages, filters, steps, images."""
    tables = [
        TableSchema(
            "serviceendpoints", "serviceendpoint", "serviceendpointid", "name",
            columns={"name": "string", "description": "memo", "url": "string", "authvalue": "string",
                     "namespaceaddress": "string", "path": "string", "solutionnamespace": "string"},
            choices={
                "contract": _choices("serviceendpoint_contract", {
                    1: "OneWay", 2: "Queue", 3: "Rest", 4: "TwoWay", 5: "Topic", 6: "Queue (Persistent)",
                    7: "Event Hub", 8: "Webhook", 9: "Event Grid", 10: "Managed Data Lake", 11: "Container Storage"}),
                "authtype": _choices("serviceendpoint_authtype", {
                    1: "ACS", 2: "SAS Key", 3: "SAS Token", 4: "Webhook Key", 5: "Http Header", 6: "Http Query String",
                    7: "Connection String", 8: "Access Key"}),
                "connectionmode": _choices("serviceendpoint_connectionmode", {1: "Normal", 2: "Federated"}),
                "messageformat": _choices("serviceendpoint_messageformat", {1: ".NETBinary", 2: "JSON", 3: "XML"}),
                "userclaim": _choices("serviceendpoint_userclaim", {1: "None", 2: "UserId"}),
            },
            required=frozenset({"name", "contract"}),
            max_length={"name": 256, "description": 2000, "url": 2000, "authvalue": 2048},
            change_tracking=False, system=True, unreadable=frozenset({"authvalue"}),
            defaults={"connectionmode": 1, "messageformat": 2, "userclaim": 1},
        ),
        TableSchema(
            "sdkmessages", "sdkmessage", "sdkmessageid", "name",
            columns={"name": "string", "categoryname": "string"},
            required=frozenset({"name"}), max_length={"name": 256},
            change_tracking=False, system=True,
        ),
        TableSchema(
            "sdkmessagefilters", "sdkmessagefilter", "sdkmessagefilterid", "name",
            columns={"name": "string", "primaryobjecttypecode": "string", "secondaryobjecttypecode": "string",
                     "iscustomprocessingstepallowed": "bool"},
            lookups={"sdkmessageid": LookupColumn({"sdkmessageid": "sdkmessages"})},
            required=frozenset({"sdkmessageid", "primaryobjecttypecode"}),
            change_tracking=False, system=True,
        ),
        TableSchema(
            "sdkmessageprocessingsteps", "sdkmessageprocessingstep", "sdkmessageprocessingstepid", "name",
            columns={"name": "string", "description": "memo", "rank": "int", "asyncautodelete": "bool",
                     "filteringattributes": "memo", "configuration": "memo"},
            lookups={"sdkmessageid": LookupColumn({"sdkmessageid": "sdkmessages"}),
                     "sdkmessagefilterid": LookupColumn({"sdkmessagefilterid": "sdkmessagefilters"}),
                     "eventhandler": LookupColumn({"eventhandler_serviceendpoint": "serviceendpoints"})},
            choices={
                "mode": _choices("sdkmessageprocessingstep_mode", {0: "Synchronous", 1: "Asynchronous"}),
                "stage": _choices("sdkmessageprocessingstep_stage", {
                    10: "Initial Pre-operation (For internal use only)", 20: "Pre-operation",
                    30: "Main Operation (For internal use only)", 40: "Post-operation"}),
                "supporteddeployment": _choices("sdkmessageprocessingstep_supporteddeployment", {
                    0: "Server Only", 1: "Microsoft Dynamics 365 Client for Outlook Only", 2: "Both"}),
                "statecode": _choices("sdkmessageprocessingstep_statecode", {0: "Enabled", 1: "Disabled"}),
                "statuscode": _choices("sdkmessageprocessingstep_statuscode", {1: "Enabled", 2: "Disabled"}),
            },
            required=frozenset({"name", "mode", "stage", "rank", "sdkmessageid", "eventhandler"}),
            max_length={"name": 256, "description": 256, "filteringattributes": 100000},
            change_tracking=False, system=True,
            defaults={"rank": 1, "asyncautodelete": False, "supporteddeployment": 0, "statecode": 0, "statuscode": 1},
        ),
        TableSchema(
            "sdkmessageprocessingstepimages", "sdkmessageprocessingstepimage", "sdkmessageprocessingstepimageid",
            "name",
            columns={"name": "string", "description": "memo", "entityalias": "string",
                     "messagepropertyname": "string", "attributes": "memo", "relatedattributename": "string"},
            lookups={"sdkmessageprocessingstepid": LookupColumn(
                {"sdkmessageprocessingstepid": "sdkmessageprocessingsteps"})},
            choices={"imagetype": _choices("sdkmessageprocessingstepimage_imagetype",
                                           {IMAGE_PRE: "PreImage", IMAGE_POST: "PostImage", IMAGE_BOTH: "Both"})},
            required=frozenset({"name", "entityalias", "imagetype", "messagepropertyname",
                                "sdkmessageprocessingstepid"}),
            max_length={"name": 256, "entityalias": 256, "messagepropertyname": 256, "attributes": 100000},
            change_tracking=False, system=True,
        ),
    ]
    return {t.entity_set: t for t in tables}


def parse_settings(authvalue: str) -> list[tuple[str, str]]:
    """`<settings><setting name="k" value="v" /></settings>` (HttpHeader / HttpQueryString auth) -> pairs."""
    try:
        root = ET.fromstring(authvalue)
    except ET.ParseError as exc:
        raise ValueError(f"authvalue is not a <settings> document: {exc}") from exc
    if root.tag != "settings":
        raise ValueError("authvalue must be a <settings> document")
    pairs = []
    for node in root.findall("setting"):
        name = node.get("name")
        if not name:
            raise ValueError("every <setting> needs a name")
        pairs.append((name, node.get("value") or ""))
    return pairs


@dataclass
class WebhookRegistration:
    """A registered service endpoint (webhook)."""

    url: str
    headers: dict[str, str]
    tables: set[str] | None


@dataclass
class WebhookFailure:
    """A webhook that was not accepted (after the one retry the service makes on 502/503/504)."""

    url: str
    message_name: str
    entity: str
    key: str
    status: int | None
    error: str
