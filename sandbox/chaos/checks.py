"""Record-by-record checks after a run: lost changes, duplicates, half-applied cascades."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sandbox import demo
from sandbox.chaos.options import FLOW_SETS, ROOT


def flow_set_of(flowset: Any) -> dict[str, str]:
    """flow name -> flow set name (by the spec file each flow came from)."""
    import yaml

    out: dict[str, str] = {}
    for set_name, file in FLOW_SETS.items():
        spec = yaml.safe_load((ROOT / "flows" / file).read_text())
        for flow in spec.get("flows", []):
            out[str(flow["name"])] = set_name
    return out


async def lost_changes(services: Any, exclude: Mapping[str, set[str]]) -> list[dict[str, Any]]:
    """Every flow, both directions: each in-scope source record has its linked target, and every field the
    source masters (or shares) holds the source's value there. A difference is a change that never arrived."""
    from shared.core.engine import in_scope
    from shared.core.errors import SyncError
    from shared.mapping.engine import Mapper, same

    mapper = Mapper(services.flowset)
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    async def rows(system: str, table: str) -> dict[str, Any]:
        if (system, table) not in cache:
            out: dict[str, Any] = {}
            async for page in services.sources[system].scan(table):
                out.update({r.key: r for r in page})
            cache[(system, table)] = out
        return cache[(system, table)]

    lost: list[dict[str, Any]] = []
    for flow in services.flowset.flows:
        src, tgt = flow.source, flow.target
        if src.system not in services.sources or tgt.system not in services.sources:
            continue
        sources_rows = await rows(src.system, src.table)
        target_rows = await rows(tgt.system, tgt.table)
        links = await services.state.get_links(flow.entity, src.system, list(sources_rows), tgt.system)
        excluded = exclude.get(flow.entity, set())
        for key, record in sources_rows.items():
            if key in excluded or record.deleted or not all(in_scope(c, record.values) for c in flow.when):
                continue
            tkey = links.get(key)
            if tkey is None or tkey not in target_rows:
                if "create" in flow.operations:
                    lost.append({"flow": flow.name, "source": f"{src.system}:{src.table}:{key}",
                                 "what": "no linked target record"})
                continue
            try:
                mapped = mapper.map_values(flow, record.values, is_create=False, target_newer=False)
            except SyncError as exc:
                lost.append({"flow": flow.name, "source": f"{src.system}:{src.table}:{key}",
                             "what": f"unmappable: {exc.reason}"})
                continue
            differing = [f"{name}: {src.system} has {value!r}, {tgt.system} has {target_rows[tkey].values.get(name)!r}"
                         for name, value in mapped.values.items()
                         if not name.startswith("@") and not same(value, target_rows[tkey].values.get(name))]
            if differing:
                lost.append({"flow": flow.name, "source": f"{src.system}:{src.table}:{key}",
                             "target": f"{tgt.system}:{tgt.table}:{tkey}", "what": "; ".join(differing[:4])})
    return lost


def _sim_rows(box: demo.Sandbox, system: str, table: str) -> list[dict[str, Any]]:
    if system == "dataverse":
        return box.dv.all(table)
    if system == "arcgis":
        return box.ag.all(table)
    if system == "fno" and box.fno is not None:
        return box.fno.all(table)
    if system == "salesforce" and box.sf is not None:
        return box.sf.find(table)
    if system == "sap" and box.sap is not None:
        return box.sap.all(table)
    return []


def duplicates(box: demo.Sandbox, flowset: Any) -> list[dict[str, Any]]:
    """Read from the simulators: two target records holding one source record's link value (twins), or two
    source records pointing at one target through the write-back field."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str, str]] = set()
    for flow in flowset.flows:
        for system, table, column, key_field in (
                (flow.target.system, flow.target.table, flow.link.target_field, flow.target.key_field),
                (flow.source.system, flow.source.table, flow.link.write_back, flow.source.key_field)):
            if not column or (system, table, column, "") in seen:
                continue
            seen.add((system, table, column, ""))
            groups: dict[str, list[str]] = defaultdict(list)
            for row in _sim_rows(box, system, table):
                value = row.get(column)
                if value not in (None, ""):
                    groups[str(value).lower()].append(str(row.get(key_field)))
            for value, keys in groups.items():
                if len(keys) > 1:
                    out.append({"flow": flow.name, "where": f"{system}:{table}.{column}", "value": value,
                                "records": keys[:10]})
    return out


def half_applied_cascades(box: demo.Sandbox) -> list[dict[str, Any]]:
    """Closed work orders whose tasks are not closed on one side (the cascade stopped part-way)."""
    out: list[dict[str, Any]] = []
    closed_dv = {w["dot_workorderid"] for w in box.dv.all("dot_workorders") if w.get("dot_status") in
                 (100000002, 100000003)}
    closed_ag = {w["GlobalID"].lower() for w in box.ag.all("WorkOrders") if w.get("STATUS") in ("COMPLETED", "CLOSED")}
    for task in box.dv.all("dot_workordertasks"):
        wo = task.get("_dot_workorderid_value") or task.get("dot_workorderid")
        if wo in closed_dv and task.get("dot_status") not in (100000001, 100000002, 100000003):
            out.append({"side": "dataverse", "task": task["dot_workordertaskid"], "work_order": wo,
                        "status": task.get("dot_status")})
    for task in box.ag.all("WorkOrderTasks"):
        wo = str(task.get("WO_GUID") or "").lower()
        if wo in closed_ag and task.get("STATUS") not in ("DONE", "CANCELLED", "CLOSED"):
            out.append({"side": "arcgis", "task": task["GlobalID"], "work_order": wo, "status": task.get("STATUS")})
    return out
