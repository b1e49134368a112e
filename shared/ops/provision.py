"""ArcGIS provisioning: plan the coded-value domains and fields the flows need, apply them with Esri's `arcgis` package.

The plan is pure (`desired_fields` from the specs, `plan` against the layers' current `fields`); reading and applying
go through Esri's `arcgis` package, which is the `admin` extra (`pip install 'syncline[admin]'`) and never part of
the deployed function app: it is imported inside `connect`, never at module load.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from shared.mapping.spec import FlowSet, FlowSpec, Scalar
from shared.settings import Settings

ADMIN_EXTRA_MISSING = "syncline arcgis provision needs the admin extra: pip install 'syncline[admin]'"
ARCGIS = "arcgis"
TOKEN_SUFFIX = "/sharing/rest/oauth2/token"  # noqa: S105 - a URL path, not a secret

STRING = "esriFieldTypeString"
INTEGER = "esriFieldTypeInteger"
SMALLINT = "esriFieldTypeSmallInteger"
DOUBLE = "esriFieldTypeDouble"
SINGLE = "esriFieldTypeSingle"
DATE = "esriFieldTypeDate"
GUID = "esriFieldTypeGUID"
_SYSTEM_TYPES = frozenset({"esriFieldTypeOID", "esriFieldTypeGlobalID"})
_INTEGERS = {SMALLINT: (-32768, 32767), INTEGER: (-(2**31), 2**31 - 1), "esriFieldTypeBigInteger": (-(2**53), 2**53)}
_NUMBERS = frozenset({*_INTEGERS, DOUBLE, SINGLE})
MIN_CODE_LENGTH = 50
"""Length of a new text field holding codes: the longest code, at least this (room for codes added later)."""

# What a transform says about the ArcGIS side's field: the type of the value it writes there (ArcGIS target) or
# reads from there (ArcGIS source). Dates cross as epoch milliseconds (esriFieldTypeDate); measures as doubles.
_BY_TRANSFORM: dict[str, tuple[str, int | None]] = {
    "date_to_epoch_ms": (DATE, None), "datetime_to_epoch_ms": (DATE, None),
    "epoch_ms_to_date": (DATE, None), "epoch_ms_to_datetime": (DATE, None),
    "round": (DOUBLE, None), "feet_to_meters": (DOUBLE, None), "meters_to_feet": (DOUBLE, None),
    "integer": (INTEGER, None),
    "upper": (STRING, 255), "lower": (STRING, 255), "strip": (STRING, 255), "copy": (STRING, 255),
}

Action = Literal["add field", "create domain", "add values", "remove values", "keep values"]
CHANGES: tuple[Action, ...] = ("add field", "create domain", "add values", "remove values")
"""The actions that change a layer; "keep values" only reports codes outside the flow maps that stay."""


class ProvisionError(Exception):
    """Provisioning cannot go on (admin extra missing, ArcGIS unreachable or refusing): one line for the operator."""


# ============================================================================================ what the flows need


@dataclass(frozen=True)
class DesiredField:
    """A field of an ArcGIS layer as the flows need it: its type (and why), and the coded values of its value maps."""

    layer: str
    name: str
    type: str
    length: int | None
    why: str
    """How the type was chosen (the transform, the value map's codes, a lookup, the link)."""
    values: tuple[tuple[Scalar, str], ...] = ()
    """(code, label) of every value map the flows map this field through, in spec order; empty: no domain."""
    value_maps: tuple[str, ...] = ()
    flows: tuple[str, ...] = ()


def _arcgis_side(flow: FlowSpec) -> Literal["source", "target"] | None:
    if flow.target.system == ARCGIS:
        return "target"
    if flow.source.system == ARCGIS:
        return "source"
    return None


def _code_type(codes: Sequence[Scalar]) -> tuple[str, int | None, str]:
    if codes and all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        return INTEGER, None, "integer codes"
    if codes and all(isinstance(c, int | float) and not isinstance(c, bool) for c in codes):
        return DOUBLE, None, "numeric codes"
    longest = max((len(str(c)) for c in codes), default=0)
    return STRING, max(longest, MIN_CODE_LENGTH), f"text codes (longest {longest})"


def _domain_name(value_map: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in value_map.split("_") if part)


def desired_fields(flowset: FlowSet) -> dict[str, dict[str, DesiredField]]:
    """{layer: {field: DesiredField}} for every field the flows read from or write to an ArcGIS layer.

    Types: a value-mapped field takes its codes' type (integers -> Integer, text -> String as long as the longest
    code, at least 50); a lookup holds the parent's GlobalID (GUID); the link field holds the other side's key
    (String 38 for a Dataverse GUID, else 255); otherwise the transform decides (dates -> Date, measures -> Double,
    `integer` -> Integer, `truncate` -> String of its length, text transforms and `copy` -> String 255).
    """
    out: dict[str, dict[str, DesiredField]] = {}

    def need(layer: str, name: str, kind: str, length: int | None, why: str, flow: str,
             value_map: str | None = None) -> None:
        fields = out.setdefault(layer, {})
        values: tuple[tuple[Scalar, str], ...] = ()
        if value_map is not None:
            values = tuple((e[ARCGIS], str(e.get("label", e[ARCGIS]))) for e in flowset.value_maps[value_map]
                           if ARCGIS in e)
        current = fields.get(name.lower())
        if current is None:
            if values:
                kind, length, why_codes = _code_type([c for c, _ in values])
                why = f"{value_map}: {why_codes}"
            fields[name.lower()] = DesiredField(layer, name, kind, length, why, values,
                                                (value_map,) if value_map else (), (flow,))
            return
        # Another flow maps the same field (typically the other direction): the union of their value maps' codes.
        known = {c for c, _ in current.values}
        merged = current.values + tuple(v for v in values if v[0] not in known)
        maps = current.value_maps + ((value_map,) if value_map and value_map not in current.value_maps else ())
        flows = current.flows + ((flow,) if flow not in current.flows else ())
        kind_now, length_now, why_now = current.type, current.length, current.why
        if values and not current.values:  # the value map decides the type over a transform's guess
            kind_now, length_now, why_c = _code_type([c for c, _ in merged])
            why_now = f"{value_map}: {why_c}"
        elif merged != current.values:
            kind_now, length_now, why_c = _code_type([c for c, _ in merged])
            why_now = f"{', '.join(maps)}: {why_c}"
        fields[name.lower()] = DesiredField(layer, current.name, kind_now, length_now, why_now, merged, maps, flows)

    for flow in flowset.flows:
        side_name = _arcgis_side(flow)
        if side_name is None:
            continue
        side, other = (flow.target, flow.source) if side_name == "target" else (flow.source, flow.target)
        system = {side.key_field.lower(), *([side.modified_field.lower()] if side.modified_field else [])}
        layer = side.table
        for fm in flow.fields:
            name = fm.target if side_name == "target" else fm.source
            if name.lower() in system:
                continue
            if fm.value_map is not None:
                # The codes decide the type; a map without ArcGIS codes leaves text.
                need(layer, name, STRING, 255, f"value map {fm.value_map} (no arcgis codes)", flow.name, fm.value_map)
            elif fm.transform == "truncate":
                cut = int(fm.args.get("length", 255))
                need(layer, name, STRING, cut, f"truncate to {cut}", flow.name)
            else:
                kind, size = _BY_TRANSFORM.get(fm.transform, (STRING, 255))
                need(layer, name, kind, size, f"transform {fm.transform}", flow.name)
        for lk in flow.lookups:
            name = lk.target if side_name == "target" else lk.source
            need(layer, name, GUID, 38, f"lookup of {lk.parent_flow} (GlobalID)", flow.name)
        link_field = flow.link.target_field if side_name == "target" else flow.link.write_back
        if link_field and link_field.lower() not in system:
            need(layer, link_field, STRING, 38 if other.system == "dataverse" else 255,
                 f"link: the {other.system} key", flow.name)
    return out


# ============================================================================================ the plan


@dataclass(frozen=True)
class Step:
    """One row of the plan: what happens to one field of one layer."""

    layer: str
    layer_id: int
    field: str
    action: Action
    values: tuple[tuple[Scalar, str], ...]
    detail: str
    definition: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    """The field JSON sent: to addToDefinition ("add field") or updateDefinition (the domain actions)."""

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "layer_id": self.layer_id, "field": self.field, "action": self.action,
                "values": [{"code": c, "label": n} for c, n in self.values], "detail": self.detail}


@dataclass
class Plan:
    """The steps, and what cannot be provisioned (a missing layer, a field whose type cannot hold the codes)."""

    steps: list[Step] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.action in CHANGES]

    def to_json(self) -> dict[str, Any]:
        return {"steps": [s.to_json() for s in self.steps], "changes": len(self.changes), "problems": self.problems}


@dataclass(frozen=True)
class LayerInfo:
    """A layer (or table) of the service as its resource describes it: id, name and `fields` JSON."""

    id: int
    name: str
    fields: tuple[Mapping[str, Any], ...]


def _fits(kind: str, length: int | None, code: Scalar) -> bool:
    if kind == STRING:
        return isinstance(code, str) and (length is None or len(code) <= length)
    if kind in _INTEGERS:
        low, high = _INTEGERS[kind]
        return isinstance(code, int) and not isinstance(code, bool) and low <= code <= high
    if kind in _NUMBERS:
        return isinstance(code, int | float) and not isinstance(code, bool)
    return False


def _fmt(values: Iterable[tuple[Scalar, str]]) -> str:
    return ", ".join(str(c) for c, _ in values)


def plan(flowset: FlowSet, layers: Sequence[LayerInfo], *, prune: bool = False) -> Plan:
    """What to change so every layer has the fields the flows need and their value maps' codes in its domains.

    Codes in a domain but in no value map are kept ("keep values": records may hold them) unless `prune`, which
    removes them ("remove values"). Labels of codes a domain already has are left as the layer has them.
    """
    result = Plan()
    by_name = {lyr.name.lower(): lyr for lyr in layers}
    for layer_name, wanted in desired_fields(flowset).items():
        lyr = by_name.get(layer_name.lower())
        if lyr is None:
            flows = sorted({f for d in wanted.values() for f in d.flows})
            result.problems.append(f"layer {layer_name!r} (flows {', '.join(flows)}) is not in the feature "
                                   "service: provisioning adds fields and domains, it does not create layers")
            continue
        current = {str(f.get("name", "")).lower(): f for f in lyr.fields}
        for want in wanted.values():
            have = current.get(want.name.lower())
            if have is None:
                definition: dict[str, Any] = {"name": want.name, "type": want.type, "alias": want.name,
                                              "nullable": True, "editable": True}
                if want.length is not None and want.type == STRING:
                    definition["length"] = want.length
                kind = want.type.removeprefix("esriFieldType") + (f"({want.length})" if want.type == STRING else "")
                result.steps.append(Step(lyr.name, lyr.id, want.name, "add field", (),
                                         f"{kind}: {want.why}", definition))
                if want.values:
                    result.steps.append(_domain_step(lyr, want.name, "create domain", want.values, want,
                                                     None, f"value map {', '.join(want.value_maps)}"))
                continue
            if not want.values:
                continue
            kind, length = str(have.get("type", "")), have.get("length")
            misfits = [c for c, _ in want.values if not _fits(kind, length, c)]
            if kind in _SYSTEM_TYPES or misfits:
                result.problems.append(
                    f"{lyr.name}.{have.get('name')}: a {kind.removeprefix('esriFieldType')}"
                    f"{f'({length})' if length else ''} field cannot hold the codes {_fmt((c, '') for c in misfits)}"
                    f" of {', '.join(want.value_maps)}: fix the field or the value map")
                continue
            domain = have.get("domain") or None
            if domain is None or domain.get("type") != "codedValue":
                replaced = " (replaces a range domain)" if domain else ""
                result.steps.append(_domain_step(lyr, str(have["name"]), "create domain", want.values, want, None,
                                                 f"value map {', '.join(want.value_maps)}{replaced}"))
                continue
            existing = [(cv.get("code"), str(cv.get("name", ""))) for cv in domain.get("codedValues") or []]
            codes = {c for c, _ in existing}
            wanted_codes = {c for c, _ in want.values}
            missing = tuple(v for v in want.values if v[0] not in codes)
            extra = tuple(v for v in existing if v[0] not in wanted_codes)
            kept = [v for v in existing if prune is False or v[0] in wanted_codes]
            final = tuple(kept) + missing
            if missing:
                result.steps.append(_domain_step(lyr, str(have["name"]), "add values", missing, want, domain,
                                                 f"to domain {domain.get('name')}", final))
            if extra and prune:
                result.steps.append(_domain_step(lyr, str(have["name"]), "remove values", extra, want, domain,
                                                 f"from domain {domain.get('name')} (--prune)", final))
            elif extra:
                result.steps.append(Step(lyr.name, lyr.id, str(have["name"]), "keep values", extra,
                                         f"in domain {domain.get('name')}, in no value map: kept, records may hold "
                                         "them (--prune removes them)"))
    return result


def _domain_step(lyr: LayerInfo, name: str, action: Action, shown: tuple[tuple[Scalar, str], ...],
                 want: DesiredField, domain: Mapping[str, Any] | None, detail: str,
                 final: tuple[tuple[Scalar, str], ...] | None = None) -> Step:
    coded = {"type": "codedValue",
             "name": str(domain.get("name")) if domain else _domain_name(want.value_maps[0]),
             "codedValues": [{"name": n, "code": c} for c, n in (final if final is not None else shown)]}
    for policy in ("mergePolicy", "splitPolicy"):
        if domain and domain.get(policy):
            coded[policy] = domain[policy]
    return Step(lyr.name, lyr.id, name, action, shown, detail, {"name": name, "domain": coded})


def updates(steps: Iterable[Step]) -> dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Per layer id: (fields for addToDefinition, fields for updateDefinition), one domain update per field."""
    out: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for step in steps:
        adds, domains = out.setdefault(step.layer_id, ([], []))
        if step.action == "add field":
            adds.append(step.definition)
        # "add values" and "remove values" of one field carry the same final domain: it is sent once.
        elif step.action in CHANGES and not any(d["name"] == step.definition["name"] for d in domains):
            domains.append(step.definition)
    return out


# ============================================================================================ Esri's `arcgis` package


def _plain(value: Any) -> Any:
    """The package's PropertyMap (a Mapping, not a dict) as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _import_arcgis() -> tuple[Any, Any, Any]:
    try:
        from arcgis.features import FeatureLayer
        from arcgis.gis import GIS, Layer
    except ImportError:
        raise ProvisionError(ADMIN_EXTRA_MISSING) from None
    return GIS, Layer, FeatureLayer


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


@contextmanager
def _quiet_tls(ca_bundle: str) -> Iterator[None]:
    # The package's sign-in probes the portal with plain `requests`, which trusts REQUESTS_CA_BUNDLE only; with
    # a private CA (the sandbox's) it is set for the call and restored, so nothing leaks into the process after.
    if not ca_bundle:
        yield
        return
    before = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = ca_bundle
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = before


class ArcGISAdmin:
    """The feature service through Esri's `arcgis` package: read the layers, add fields, update domains."""

    def __init__(self, settings: Settings) -> None:
        conf = settings.arcgis
        if not conf.service_url:
            raise ProvisionError("ArcGIS is not configured (ARCGIS__SERVICE_URL is empty)")
        if not conf.token_url.endswith(TOKEN_SUFFIX):
            raise ProvisionError(f"ARCGIS__TOKEN_URL must end with {TOKEN_SUFFIX} (the portal's token endpoint)")
        gis_class, self._layer, self._feature_layer = _import_arcgis()
        self.service_url = conf.service_url.rstrip("/")
        self.portal_url = conf.token_url[: -len(TOKEN_SUFFIX)]
        self._ca = settings.syncline_ca_bundle
        credentials: dict[str, Any] = {"api_key": conf.api_key.get_secret_value()} if conf.api_key.get_secret_value() \
            else {"client_id": conf.client_id, "client_secret": conf.client_secret.get_secret_value()}
        with self._call("sign in to"):
            self.gis = gis_class(self.portal_url, set_active=False, ca_bundles=self._ca or None, **credentials)

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        with _quiet_tls(self._ca):
            try:
                yield
            except ProvisionError:
                raise
            except Exception as exc:  # the package raises bare Exceptions, requests' errors and its own
                raise ProvisionError(f"ArcGIS: could not {what} {self.portal_url}: {_one_line(exc)}") from None

    def layers(self) -> list[LayerInfo]:
        """Every layer and table of the service with its current fields."""
        with self._call("read the feature service at"):
            service = _plain(self._layer(self.service_url, self.gis).properties)
            out = []
            for entry in [*(service.get("layers") or []), *(service.get("tables") or [])]:
                props = _plain(self._feature_layer(f"{self.service_url}/{entry['id']}", self.gis).properties)
                out.append(LayerInfo(int(entry["id"]), str(props.get("name", entry.get("name"))),
                                     tuple(props.get("fields") or [])))
        return out

    def apply(self, layer_id: int, adds: list[dict[str, Any]], domains: list[dict[str, Any]]) -> None:
        """addToDefinition with the new fields, then updateDefinition with the domains (the layer's admin API)."""
        with self._call(f"change layer {layer_id} of"):
            manager = self._feature_layer(f"{self.service_url}/{layer_id}", self.gis).manager
            for op, fields in (("add_to_definition", adds), ("update_definition", domains)):
                if not fields:
                    continue
                answer = _plain(getattr(manager, op)({"fields": fields}))
                if not isinstance(answer, Mapping) or answer.get("success") is not True:
                    raise ProvisionError(f"ArcGIS refused {op} on layer {layer_id}: {answer}")

    def close(self) -> None:
        session = getattr(getattr(self.gis, "_con", None), "_session", None)
        if session is not None:  # the package keeps its connections alive
            session.close()


def provision_plan(flowset: FlowSet, admin: ArcGISAdmin, *, prune: bool) -> Plan:
    """The plan against the service's current layers."""
    return plan(flowset, admin.layers(), prune=prune)


def apply_plan(admin: ArcGISAdmin, steps: Sequence[Step], *,
               progress: Callable[[str], None] | None = None) -> list[int]:
    """Apply the steps layer by layer; returns the layer ids changed. A refused layer stops the run (ProvisionError)."""
    done: list[int] = []
    for layer_id, (adds, domains) in updates(steps).items():
        admin.apply(layer_id, adds, domains)
        done.append(layer_id)
        if progress is not None:
            progress(next(s.layer for s in steps if s.layer_id == layer_id))
    return done


@contextmanager
def provisioning(flows: str | None, *, prune: bool,
                 settings: Settings | None = None) -> Iterator[tuple[ArcGISAdmin, Plan]]:
    """The flows (`flows`, default SYNCLINE_FLOWS), the signed-in service and its plan; closed after.

    The admin extra is checked first, so a missing package is the one thing reported whatever else is wrong.
    `settings` default: read from the environment.
    """
    from shared.bootstrap import load_flows

    _import_arcgis()
    settings = settings or Settings()
    flowset = load_flows(flows or settings.syncline_flows)
    admin = ArcGISAdmin(settings)
    try:
        yield admin, provision_plan(flowset, admin, prune=prune)
    finally:
        admin.close()
