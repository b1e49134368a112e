"""Change tracking of the simulated service: `extractChanges` by serverGen, with its asynchronous jobs."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sandbox.arcgis.codecs import _bool, _layer_id_list, _out_wkid
from sandbox.arcgis.errors import RestError
from sandbox.arcgis.store import FeatureStore
from shared.payloads import strict_loads


class SimChanges(FeatureStore):
    """`extractChanges` between serverGens, synchronous or as a job."""

    change_tracking: bool
    _jobs: dict[str, Any]

    def _extract_changes(self, p: Mapping[str, str]) -> dict[str, Any]:
        if not self.change_tracking:
            raise RestError(400, "Unable to complete operation.", ["Change tracking is not enabled on this service."])
        if p.get("dataFormat", "json").lower() != "json":
            raise RestError(400, "Unable to complete operation.", ["Only dataFormat=json is supported here."])
        layer_ids = _layer_id_list(p.get("layers", ""))
        if layer_ids is None:
            layer_ids = sorted(self._layers)
        for lid in layer_ids:
            if lid not in self._layers:
                raise RestError(400, "Unable to complete operation.", [f"Invalid layer id {lid}."])
        gens: dict[int, tuple[int, int]] = {}
        if p.get("layerServerGens"):
            try:
                entries = strict_loads(p["layerServerGens"])
                for item in entries:
                    gens[int(item["id"])] = (int(item["serverGen"]), self._gen)
            except (ValueError, TypeError, KeyError) as exc:
                raise RestError(400, "Unable to complete operation.", ["Invalid layerServerGens."]) from exc
        elif p.get("serverGens"):
            try:
                low, high = (int(v) for v in strict_loads(p["serverGens"]))
            except (ValueError, TypeError) as exc:
                raise RestError(400, "Unable to complete operation.", ["Invalid serverGens."]) from exc
            gens = dict.fromkeys(layer_ids, (low, high))
        else:
            raise RestError(400, "Unable to complete operation.", ["'layerServerGens' or 'serverGens' is required."])
        ids_only = _bool(p, "returnIdsOnly")
        out_wkid = _out_wkid(p)
        edits = []
        for lid in layer_ids:
            lyr = self._layers[lid]
            low, high = gens.get(lid, (self._gen, self._gen))
            adds = [f for f in lyr.features.values() if low < f.created_gen <= high]
            updates = [f for f in lyr.features.values() if f.created_gen <= low < f.updated_gen <= high]
            gone = [t for t in lyr.tombstones if low < t.gen <= high and t.created_gen <= low]
            entry: dict[str, Any] = {"id": lid}
            if ids_only:
                entry["objectIds"] = {
                    "adds": [f.attrs[lyr.oid_field] for f in adds] if _bool(p, "returnInserts", True) else [],
                    "updates": [f.attrs[lyr.oid_field] for f in updates] if _bool(p, "returnUpdates", True) else [],
                    "deletes": [t.oid for t in gone] if _bool(p, "returnDeletes", True) else [],
                }
            else:
                features: dict[str, Any] = {
                    "adds": [self._render(lyr, f, lyr.fields, True, out_wkid) for f in adds]
                    if _bool(p, "returnInserts", True) else [],
                    "updates": [self._render(lyr, f, lyr.fields, True, out_wkid) for f in updates]
                    if _bool(p, "returnUpdates", True) else [],
                    "deleteIds": [t.oid for t in gone] if _bool(p, "returnDeletes", True) else [],
                }
                if _bool(p, "returnDeletedFeatures") and _bool(p, "returnDeletes", True):
                    features["deletes"] = [{"attributes": {f.name: self._value_out(f, t.attrs.get(f.name))
                                                           for f in lyr.fields}} for t in gone]
                entry["features"] = features
            if _bool(p, "returnAttachments") and lyr.d.has_attachments:
                entry["attachments"] = {
                    "adds": [self._attachment_info(lyr, f, a) for f in lyr.features.values()
                             for a in f.attachments.values() if low < a.gen <= high],
                    "updates": [],
                    "deleteIds": [aid for aid, _, gen in lyr.attachment_tombstones if low < gen <= high],
                }
            edits.append(entry)
        result = {
            "layerServerGens": [{"id": lid, "serverGen": gens.get(lid, (0, self._gen))[1]} for lid in layer_ids],
            "transportType": p.get("transportType", "esriTransportTypeUrl"),
            "responseType": "esriDataChangesResponseTypeEdits",
            "edits": edits,
        }
        if _bool(p, "async"):
            job = uuid.uuid4().hex
            self._jobs[job] = result
            return {"statusUrl": f"{self._public_base()}{self.service_path}/jobs/{job}"}
        return result

    def _job(self, job: str, *, result: bool) -> Any:
        if job not in self._jobs:
            raise RestError(404, "Unable to complete operation.", ["Job not found."])
        if result:
            return self._jobs[job]
        return {"status": "Completed", "responseType": "esriDataChangesResponseTypeEdits",
                "resultUrl": f"{self._public_base()}{self.service_path}/jobs/{job}/result"}
