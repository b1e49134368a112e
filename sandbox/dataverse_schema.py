"""What the Dataverse simulator publishes about its declarative tables: the CSDL `$metadata`, metadata ids, keys."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

if TYPE_CHECKING:
    from sandbox.dataverse_sim import TableSchema

NAMESPACE = "Microsoft.Dynamics.CRM"
ALIAS = "mscrm"
CONTAINER = "System"
BULK_MESSAGES = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")
"""The bulk operation messages, bound to a collection of `crmbaseentity` (Microsoft's Web API action reference)."""
EDM = {
    "guid": "Edm.Guid", "string": "Edm.String", "memo": "Edm.String", "int": "Edm.Int32",
    "decimal": "Edm.Decimal", "money": "Edm.Decimal", "float": "Edm.Double", "bool": "Edm.Boolean",
    "date": "Edm.Date", "datetime": "Edm.DateTimeOffset", "choice": "Edm.Int32", "lookup": "Edm.Guid",
}


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
