"""What the Dataverse simulator publishes about its declarative tables: the CSDL `$metadata`, metadata ids, keys."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import quoteattr

from sandbox.dataverse.protocol import API_PREFIX, NAMESPACE, ODataError, _ApiRequest, _ApiResponse
from sandbox.dataverse.query import _SEGMENT_RE, _evaluate, _parse_key_predicate, parse_filter
from sandbox.dataverse.schema import EDM, ChoiceColumn, TableSchema
from sandbox.dataverse.state import _State

ALIAS = "mscrm"
CONTAINER = "System"
BULK_MESSAGES = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")
"""The bulk operation messages, bound to a collection of `crmbaseentity` (Microsoft's Web API action reference)."""


def entity_metadata_id(logical_name: str) -> str:
    """The table's MetadataId (stable per logical name, like an org's own)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"entity:{logical_name}"))


def key_logical_name(table: TableSchema, cols: tuple[str, ...]) -> str:
    return f"{table.logical_name}_key_{'_'.join(cols)}"


def key_metadata(table: TableSchema, cols: tuple[str, ...]) -> dict[str, Any]:
    """An `EntityKeyMetadata` of one alternate key (index built: Active)."""
    name = key_logical_name(table, cols)
    return {
        "LogicalName": name, "SchemaName": name, "EntityLogicalName": table.logical_name,
        "KeyAttributes": list(cols), "EntityKeyIndexStatus": "Active", "IsManaged": False,
        "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"key:{table.logical_name}:{','.join(cols)}")),
        "IsCustomizable": {"Value": True, "CanBeChanged": True, "ManagedPropertyLogicalName": "iscustomizable"},
    }


def supports_bulk(table: TableSchema) -> bool:
    """Whether the bulk messages are available on the table (the platform's own tables here do not offer them)."""
    return not table.system


def csdl(schema: Mapping[str, TableSchema]) -> str:
    """The CSDL `$metadata` document: one entity type per table (key, typed properties, `_x_value` lookup properties,
    navigation properties), the bulk actions, and an entity set per table in the `System` container."""
    by_set = {t.entity_set: t for t in schema.values()}
    declared = {t.logical_name for t in schema.values()}
    referenced: set[str] = set()
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
           "<edmx:DataServices>",
           f'<Schema Namespace="{NAMESPACE}" Alias="{ALIAS}" xmlns="http://docs.oasis-open.org/odata/ns/edm">',
           '<EntityType Name="crmbaseentity" Abstract="true" />']
    for table in schema.values():
        out.append(f'<EntityType Name={quoteattr(table.logical_name)} BaseType="{ALIAS}.crmbaseentity">')
        out.append(f"<Key><PropertyRef Name={quoteattr(table.primary_id)} /></Key>")
        for col, typ in table.columns.items():
            if col in table.unreadable:
                continue
            attrs = f"Name={quoteattr(table.read_name(col))} Type={quoteattr(EDM[typ])}"
            if typ in ("string", "memo"):
                attrs += ' Unicode="false"'
            out.append(f"<Property {attrs} />")
        for col, lookup in table.lookups.items():
            for nav, target_set in lookup.navs.items():
                target = by_set[target_set].logical_name if target_set in by_set else target_set[:-1]
                referenced.add(target)
                target_id = by_set[target_set].primary_id if target_set in by_set else f"{target}id"
                out.append(f"<NavigationProperty Name={quoteattr(nav)} Type={quoteattr(f'{ALIAS}.{target}')}>"
                           f"<ReferentialConstraint Property={quoteattr(table.read_name(col))} "
                           f"ReferencedProperty={quoteattr(target_id)} /></NavigationProperty>")
        out.append("</EntityType>")
    for logical in sorted(referenced - declared):
        # Platform tables the simulator does not serve (systemuser): declared so the navigation types resolve.
        out.append(f'<EntityType Name={quoteattr(logical)} BaseType="{ALIAS}.crmbaseentity">'
                   f"<Key><PropertyRef Name={quoteattr(logical + 'id')} /></Key>"
                   f"<Property Name={quoteattr(logical + 'id')} Type=\"Edm.Guid\" /></EntityType>")
    out.append('<ComplexType Name="CreateMultipleResponse">'
               '<Property Name="Ids" Type="Collection(Edm.Guid)" Nullable="false" /></ComplexType>')
    out.append('<ComplexType Name="WhoAmIResponse"><Property Name="BusinessUnitId" Type="Edm.Guid" Nullable="false" />'
               '<Property Name="UserId" Type="Edm.Guid" Nullable="false" />'
               '<Property Name="OrganizationId" Type="Edm.Guid" Nullable="false" /></ComplexType>')
    for message in BULK_MESSAGES:
        returns = f'<ReturnType Type="{ALIAS}.CreateMultipleResponse" Nullable="false" />' \
            if message == "CreateMultiple" else ""
        out.append(f'<Action Name="{message}" IsBound="true">'
                   f'<Parameter Name="entityset" Type="Collection({ALIAS}.crmbaseentity)" Nullable="false" />'
                   f'<Parameter Name="Targets" Type="Collection({ALIAS}.crmbaseentity)" Nullable="false" />'
                   f"{returns}</Action>")
    out.append(f'<Function Name="WhoAmI"><ReturnType Type="{ALIAS}.WhoAmIResponse" Nullable="false" /></Function>')
    out.append(f'<EntityContainer Name="{CONTAINER}">')
    for table in schema.values():
        out.append(f"<EntitySet Name={quoteattr(table.entity_set)} "
                   f"EntityType={quoteattr(f'{NAMESPACE}.{table.logical_name}')} />")
    out.append(f'<FunctionImport Name="WhoAmI" Function="{NAMESPACE}.WhoAmI" />')
    out.append("</EntityContainer>")
    out.append("</Schema>")
    out.append("</edmx:DataServices>")
    out.append("</edmx:Edmx>")
    return "\n".join(out)


STANDARD_TABLES = frozenset({"annotation", "account", "contact", "product", "salesorder", "salesorderdetail"})
"""Out-of-the-box tables (EntityDefinitions IsCustomEntity false); the rest of the data tables are custom."""

ATTRIBUTE_TYPES = {
    "guid": "Uniqueidentifier", "string": "String", "memo": "Memo", "int": "Integer", "decimal": "Decimal",
    "money": "Money", "float": "Double", "bool": "Boolean", "date": "DateTime", "datetime": "DateTime",
    "choice": "Picklist", "lookup": "Lookup",
}


CHOICE_CASTS = {f"Microsoft.Dynamics.CRM.{kind}AttributeMetadata": kind for kind in ("Picklist", "Status", "State")}
"""The casts an attribute URL may end in to read options, by the AttributeType they apply to."""


def _choice_kind(col: str) -> str:
    # The platform's status pair has attribute types of its own (StateAttributeMetadata, StatusAttributeMetadata).
    return {"statecode": "State", "statuscode": "Status"}.get(col, "Picklist")


class _EntityDefinitions(_State):
    """`EntityDefinitions` reads: tables, attributes, alternate keys and option sets.

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def _entity_metadata(self, schema: TableSchema) -> dict[str, Any]:
        return {"LogicalName": schema.logical_name, "EntitySetName": schema.entity_set,
                "SchemaName": schema.logical_name, "PrimaryIdAttribute": schema.primary_id,
                "PrimaryNameAttribute": schema.primary_name,
                "MetadataId": entity_metadata_id(schema.logical_name),
                "ChangeTrackingEnabled": schema.change_tracking,
                "IsCustomEntity": schema.logical_name not in STANDARD_TABLES and not schema.system}

    def _attribute_metadata(self, schema: TableSchema, col: str) -> dict[str, Any]:
        typ = schema.columns[col]
        attribute_type = ATTRIBUTE_TYPES[typ]
        if typ == "choice":
            attribute_type = _choice_kind(col)
        elif typ == "lookup" and col == "ownerid":
            attribute_type = "Owner"
        elif typ == "lookup" and sorted(schema.lookups[col].navs.values()) == ["accounts", "contacts"]:
            attribute_type = "Customer"  # parentcustomerid, customerid: the platform's Customer type
        out: dict[str, Any] = {
            "LogicalName": col, "SchemaName": col, "AttributeType": attribute_type,
            "AttributeTypeName": {"Value": f"{attribute_type}Type"},
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"attr:{schema.logical_name}.{col}")),
            "IsPrimaryId": col == schema.primary_id,
            "RequiredLevel": {"Value": "ApplicationRequired" if col in schema.required else "None"},
        }
        if typ == "string":
            out["AutoNumberFormat"] = schema.autonumber.get(col)
            if col in schema.max_length:
                out["MaxLength"] = schema.max_length[col]
        if typ in ("date", "datetime"):
            out["Format"] = "DateOnly" if typ == "date" else "DateAndTime"
            out["DateTimeBehavior"] = {"Value": "DateOnly" if typ == "date" else "UserLocal"}
        if typ == "lookup":
            out["Targets"] = [self.schema[t].logical_name if t in self.schema else t[:-1]
                              for t in schema.lookups[col].navs.values()]
        return out

    def _keys_metadata(self, req: _ApiRequest, schema: TableSchema, key_text: str | None) -> _ApiResponse:
        """`EntityDefinitions(...)/Keys` (the table's alternate keys) and `.../Keys(<MetadataId>)`."""
        context = f"{req.base}{API_PREFIX}$metadata#EntityDefinitions({entity_metadata_id(schema.logical_name)})/Keys"
        keys = [key_metadata(schema, cols) for cols in schema.alternate_keys]
        if key_text is None:
            return self._json(200, {"@odata.context": context, "value": keys})
        wanted = _parse_key_predicate(key_text)
        found = next((k for k in keys if (isinstance(wanted, str) and k["MetadataId"] == wanted)
                      or (isinstance(wanted, dict) and k["LogicalName"] == wanted.get("LogicalName"))), None)
        if found is None:
            raise ODataError(404, "0x80040217", f"Could not find key '{key_text}' on entity "
                             f"'{schema.logical_name}'.")
        return self._json(200, {"@odata.context": f"{context}/$entity", **found})

    def _picklist_metadata(self, schema: TableSchema, col: str) -> dict[str, Any]:
        choice = schema.choices[col]

        def label(text: str, value: int) -> dict[str, Any]:
            lid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"label:{schema.logical_name}.{col}.{value}"))
            loc = {"Label": text, "LanguageCode": 1033, "IsManaged": False, "MetadataId": lid, "HasChanged": None}
            return {"LocalizedLabels": [loc], "UserLocalizedLabel": loc}

        options: list[dict[str, Any]] = [{"Value": v, "Label": label(t, v), "Description": {"LocalizedLabels": [],
                                                                       "UserLocalizedLabel": None},
                    "Color": None, "IsManaged": False, "MetadataId": None, "HasChanged": None}
                   for v, t in sorted(choice.options.items())]
        option_set: dict[str, Any] = {
            "Options": options, "IsGlobal": choice.is_global,
            "Name": choice.option_set_name if choice.is_global else f"{schema.logical_name}_{col}",
            "OptionSetType": _choice_kind(col),
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"gos:{choice.option_set_name}" if choice.is_global
                                         else f"os:{schema.logical_name}.{col}"))}
        return {
            "@odata.context": "$metadata#EntityDefinitions('" + schema.logical_name + "')/Attributes/"
                              f"Microsoft.Dynamics.CRM.{_choice_kind(col)}AttributeMetadata"
                              "(LogicalName,OptionSet,GlobalOptionSet)/$entity",
            "LogicalName": col,
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"attr:{schema.logical_name}.{col}")),
            # A column using a global choice shows the global set under both navigation properties.
            "OptionSet": option_set,
            "GlobalOptionSet": option_set if choice.is_global else None,
        }

    def _metadata(self, req: _ApiRequest, key_text: str | None, rest: list[str]) -> _ApiResponse:
        if req.method != "GET":
            raise ODataError(405, "0x80060888", "Only GET is supported on metadata by the simulator.")
        by_logical = {s.logical_name: s for s in self.schema.values()}
        if key_text is None:
            if rest:
                raise ODataError(400, "0x80060888", "Bad metadata URL.")
            entities = [self._entity_metadata(s) for s in self.schema.values()]
            if "$filter" in req.query:
                types = {"LogicalName": "string", "EntitySetName": "string", "SchemaName": "string",
                         "PrimaryIdAttribute": "string", "PrimaryNameAttribute": "string",
                         "MetadataId": "guid", "ChangeTrackingEnabled": "bool", "IsCustomEntity": "bool"}
                ast = parse_filter(req.query["$filter"], types, "Microsoft.Dynamics.CRM.EntityMetadata")
                entities = [e for e in entities if _evaluate(ast, e, types)]
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#EntityDefinitions",
                                    "value": entities})
        key = _parse_key_predicate(key_text)
        if isinstance(key, str):
            # EntityDefinitions(<MetadataId>): the primary key of the metadata entity set.
            schema = next((s for s in self.schema.values() if entity_metadata_id(s.logical_name) == key), None)
            if schema is None:
                raise ODataError(404, "0x80040217", f"Could not find entity with id '{key}'.")
        else:
            name = key.get("LogicalName")
            if set(key) != {"LogicalName"}:
                raise ODataError(400, "0x80060888", "The key in the request URI is not valid for resource "
                                 "'Microsoft.Dynamics.CRM.EntityMetadata'.")
            schema = by_logical.get(str(name))
            if schema is None:
                raise ODataError(404, "0x80040217", f"Could not find entity with name '{name}'.")
        if not rest:
            return self._json(200, {"@odata.context": f"{req.base}{API_PREFIX}$metadata#EntityDefinitions/$entity",
                                    **self._entity_metadata(schema)})
        keys = _SEGMENT_RE.match(rest[0])
        if keys is not None and keys.group("name") == "Keys" and len(rest) == 1:
            return self._keys_metadata(req, schema, keys.group("key"))
        attr = _SEGMENT_RE.match(rest[0])
        if attr is None or attr.group("name") != "Attributes":
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{rest[0]}'.")
        cast = rest[1] if len(rest) > 1 else None
        if (cast is not None and cast not in CHOICE_CASTS) or len(rest) > 2:
            raise ODataError(404, "0x8006088a", f"Resource not found for the segment '{cast}'.")
        kind = CHOICE_CASTS.get(cast or "")
        if attr.group("key") is None:
            cols = [c for c in schema.columns
                    if cast is None or (schema.columns[c] == "choice" and _choice_kind(c) == kind)]
            render = self._picklist_metadata if cast else self._attribute_metadata
            return self._json(200, {"value": [render(schema, c) for c in cols]})
        akey = _parse_key_predicate(attr.group("key"))
        col = akey.get("LogicalName") if isinstance(akey, dict) else None
        if not isinstance(col, str) or col not in schema.columns:
            raise ODataError(404, "0x80040217", f"Could not find attribute with name '{col}' on entity "
                             f"'{schema.logical_name}'.")
        if cast is None:
            return self._json(200, self._attribute_metadata(schema, col))
        actual = _choice_kind(col) if schema.columns[col] == "choice" else ATTRIBUTE_TYPES[schema.columns[col]]
        if actual != kind:
            raise ODataError(400, "0x80060888", f"The attribute '{col}' is of type "
                             f"'{actual}AttributeMetadata' and cannot be cast to '{kind}AttributeMetadata'.")
        return self._json(200, self._picklist_metadata(schema, col))

    def _global_option_set(self, req: _ApiRequest, key_text: str | None, rest: list[str]) -> _ApiResponse:
        """`GlobalOptionSetDefinitions(Name='x')`: a global choice (an `OptionSetMetadata`) by name."""
        if req.method != "GET":
            raise ODataError(405, "0x80060888", "Only GET is supported on metadata by the simulator.")
        key = _parse_key_predicate(key_text) if key_text is not None else None
        if not isinstance(key, dict) or set(key) != {"Name"} or rest:
            raise ODataError(400, "0x80060888", "The simulator serves global option sets by Name only: "
                             "GlobalOptionSetDefinitions(Name='x').")
        name = str(key["Name"])
        options = self.global_option_sets.get(name)
        if options is None:
            raise ODataError(404, "0x80040217", f"Could not find optionset with name '{name}'.")

        def label(text: str) -> dict[str, Any]:
            loc = {"Label": text, "LanguageCode": 1033, "IsManaged": False, "MetadataId": None, "HasChanged": None}
            return {"LocalizedLabels": [loc], "UserLocalizedLabel": loc}

        return self._json(200, {
            "@odata.context": f"{req.base}{API_PREFIX}$metadata#GlobalOptionSetDefinitions/$entity",
            "@odata.type": "#Microsoft.Dynamics.CRM.OptionSetMetadata", "Name": name, "IsGlobal": True,
            "OptionSetType": "Picklist", "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"gos:{name}")),
            "Options": [{"Value": v, "Label": label(t), "Description": {"LocalizedLabels": [],
                                                                         "UserLocalizedLabel": None},
                         "Color": None, "IsManaged": False, "MetadataId": None, "HasChanged": None}
                        for v, t in sorted(options.items())]})

    # ------------------------------------------------------------------------ drift (as an admin would cause it)

    def _choice_column(self, entity_set: str, column: str) -> TableSchema:
        table = self.schema.get(entity_set)
        if table is None or column not in table.choices:
            raise KeyError(f"{entity_set}.{column} is not a choice column of the simulator")
        return table

    def set_choice_option(self, entity_set: str, column: str, value: int, label: str) -> None:
        """Add an option to a choice column, or relabel one (what a maker does in the portal, then publishes).
        Writes accept the value from now on; the metadata endpoints show it. A global choice changes for every
        column using it."""
        with self._lock:
            table = self._choice_column(entity_set, column)
            choice = table.choices[column]
            if choice.is_global:
                choice.options[int(value)] = label
                return
            table.choices[column] = ChoiceColumn({**choice.options, int(value): label}, choice.option_set_name)

    def remove_choice_option(self, entity_set: str, column: str, value: int) -> None:
        """Delete an option from a choice column (records keeping the value keep it, as in Dataverse)."""
        with self._lock:
            table = self._choice_column(entity_set, column)
            choice = table.choices[column]
            if int(value) not in choice.options:
                raise KeyError(f"{entity_set}.{column} has no option {value}")
            if choice.is_global:
                del choice.options[int(value)]
                return
            table.choices[column] = ChoiceColumn({v: t for v, t in choice.options.items() if v != int(value)},
                                                 choice.option_set_name)

    def use_global_option_set(self, entity_set: str, column: str, name: str) -> None:
        """Make a choice column use global choice `name`, created from the column's options if it is new (what a
        maker does choosing "Sync with global choice")."""
        with self._lock:
            table = self._choice_column(entity_set, column)
            shared = self.global_option_sets.setdefault(name, dict(table.choices[column].options))
            table.choices[column] = ChoiceColumn(shared, name, is_global=True)
