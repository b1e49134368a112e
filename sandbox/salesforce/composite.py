"""sObject Collections (per-record results, allOrNone) and `POST /composite` (ordered subrequests, `@{ref}`)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import sandbox.salesforce.schema as schema
from sandbox.salesforce.model import (
    API_PREFIX,
    COLLECTION_LIMIT,
    COMPOSITE_LIMIT,
    COMPOSITE_QUERY_LIMIT,
    VERSION_NUMBERS,
    SalesforceFault,
    sobject_of,
)
from sandbox.salesforce.store import SalesforceStore

_REF_ID_RE = re.compile(r"[A-Za-z0-9_]{1,80}")
_SUB_URL_RE = re.compile(r"/services/data/v([0-9.]+)/(.*)")
_REF_RE = re.compile(r"@\{([A-Za-z0-9_]+)((?:\.[A-Za-z0-9_]+|\[\d+\])*)\}")


class Composite(SalesforceStore):
    """Multi-record calls; a composite subrequest goes through the simulator's `_route` like a single call."""

    _route: Callable[[str, str, Mapping[str, str], Any, bytes, str, str | None], tuple[int, Any]]
    """The simulator's router (app.py), where every REST call is dispatched."""

    def _collections(self, method: str, rest: list[str], data: Any, params: Mapping[str, str], origin: str,
                     user: str) -> list[dict[str, Any]]:
        """sObject Collections; with allOrNone=true every record is rolled back when one fails (still HTTP 200)."""
        if method == "DELETE":
            ids = [i for i in params.get("ids", "").split(",") if i]
            if not ids or len(ids) > COLLECTION_LIMIT:
                raise SalesforceFault(400, "EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 "
                                      "records into this call")
            all_or_none = params.get("allOrNone", "false").lower() == "true"
            records: list[Any] = [{"Id": rid} for rid in ids]
        else:
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise SalesforceFault(400, "JSON_PARSER_ERROR", "Expected a request body with records")
            records = data["records"]
            if len(records) > COLLECTION_LIMIT:
                raise SalesforceFault(400, "EXCEEDED_ID_LIMIT",
                                      "record limit reached. cannot submit more than 200 records into this call")
            if not isinstance(data.get("allOrNone", False), bool):
                raise SalesforceFault(400, "JSON_PARSER_ERROR", "allOrNone must be a boolean")
            all_or_none = bool(data.get("allOrNone"))
        snap = self._snapshot() if all_or_none else None
        results = [self._collection_record(method, rest, raw, origin, user) for raw in records]
        if snap is not None and not all(r["success"] for r in results):
            self._restore(snap)
            rolled = {"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                      "message": "Record rolled back because not all records were valid and the request was using "
                                 "AllOrNone header", "fields": []}
            for i, result in enumerate(results):
                if result["success"]:
                    given = records[i].get("Id") if isinstance(records[i], dict) else None
                    results[i] = {**({"id": given} if given else {}), "success": False, "errors": [rolled]}
        return results

    def _collection_record(self, method: str, rest: list[str], raw: Any, origin: str, user: str) -> dict[str, Any]:
        if method == "DELETE":
            rid = str(raw["Id"])
            try:
                self._delete(rid, origin=origin, user=user)
                return {"id": rid, "success": True, "errors": []}
            except SalesforceFault as fault:
                return {"id": rid, "success": False, "errors": [fault.record_error()]}
        rec = dict(raw) if isinstance(raw, dict) else {}
        attributes = rec.pop("attributes", None)
        kind = attributes.get("type") if isinstance(attributes, dict) else None
        found = schema.sobject(kind) if isinstance(kind, str) else None
        try:
            if found is None:
                raise SalesforceFault(400, "INVALID_TYPE", f"sObject type '{kind}' is not supported.")
            sobject = found.name
            if method == "POST" and not rest:
                rid = self._create(sobject, rec, origin=origin, user=user)
                return {"id": rid, "success": True, "errors": []}
            if method == "PATCH" and not rest:
                rid = str(next((v for k, v in rec.items() if k.lower() == "id"), "") or "")
                if not rid:
                    raise SalesforceFault(400, "MISSING_ARGUMENT", "Id not specified in an update call", ["Id"])
                self._update(sobject, rid, {k: v for k, v in rec.items() if k.lower() != "id"}, origin=origin,
                             user=user)
                return {"id": rid, "success": True, "errors": []}
            if method == "PATCH" and len(rest) == 2:
                target = schema.sobject(rest[0])
                if target is None or sobject != target.name:
                    raise SalesforceFault(400, "INVALID_TYPE", f"record type {sobject} does not match {rest[0]}")
                ext = next((v for k, v in rec.items() if k.lower() == rest[1].lower()), None)
                if ext in (None, ""):
                    raise SalesforceFault(400, "MISSING_ARGUMENT", f"{rest[1]} not specified in an upsert call",
                                          [rest[1]])
                rid, created = self._upsert(sobject, rest[1], str(ext), rec, origin=origin, user=user)
                return {"id": rid, "success": True, "errors": [], "created": created}
            raise SalesforceFault(405, "METHOD_NOT_ALLOWED", "HTTP Method not allowed")
        except SalesforceFault as fault:
            if fault.status == 405:
                raise
            if fault.status == 300:
                matches = ", ".join(url.rsplit("/", 1)[-1] for url in fault.fields)
                fault = SalesforceFault(400, "DUPLICATE_EXTERNAL_ID",
                                        f"{rest[-1]}: more than one record found for external id field: [{matches}]",
                                        [rest[-1]])
            if fault.status == 404 and fault.code == "NOT_FOUND" and len(rest) == 2:
                raise  # unknown external id field: the whole call fails
            return {"success": False, "errors": [fault.record_error()]}

    def _composite(self, data: Any, origin: str, client: str | None) -> dict[str, Any]:
        """`POST /composite`: up to 25 subrequests run in order, `@{ref.path}` references resolved from earlier
        answers; allOrNone=true rolls every subrequest back when one fails (REST API Developer Guide, "Composite")."""
        if not isinstance(data, dict) or not isinstance(data.get("compositeRequest"), list):
            raise SalesforceFault(400, "JSON_PARSER_ERROR", "The request body needs a compositeRequest array")
        subrequests = data["compositeRequest"]
        if not subrequests or len(subrequests) > COMPOSITE_LIMIT:
            raise SalesforceFault(400, "INVALID_API_INPUT",
                                  f"The composite request can have from 1 to {COMPOSITE_LIMIT} subrequests")
        if not isinstance(data.get("allOrNone", False), bool):
            raise SalesforceFault(400, "JSON_PARSER_ERROR", "allOrNone must be a boolean")
        # the whole body is checked before any subrequest runs: a bad one fails the call with 400
        seen: set[str] = set()
        queries = 0
        for sub in subrequests:
            if not isinstance(sub, dict) or not all(isinstance(sub.get(k), str) and sub.get(k)
                                                    for k in ("method", "url", "referenceId")):
                raise SalesforceFault(400, "INVALID_API_INPUT",
                                      "Each subrequest needs a method, a url and a referenceId")
            ref = sub["referenceId"]
            if not _REF_ID_RE.fullmatch(ref) or ref in seen:
                raise SalesforceFault(400, "INVALID_API_INPUT", f"Invalid or duplicate referenceId: {ref}")
            seen.add(ref)
            if sub["method"].upper() not in ("GET", "POST", "PATCH", "PUT", "DELETE"):
                raise SalesforceFault(400, "INVALID_API_INPUT", f"Unsupported method {sub['method']}")
            queries += "/query" in sub["url"]
        if queries > COMPOSITE_QUERY_LIMIT:
            raise SalesforceFault(400, "INVALID_API_INPUT",
                                  f"A composite request can have at most {COMPOSITE_QUERY_LIMIT} query subrequests")
        all_or_none = bool(data.get("allOrNone"))
        snap = self._snapshot() if all_or_none else None
        answers: dict[str, Any] = {}
        failed: set[str] = set()
        out: list[dict[str, Any]] = []
        for sub in subrequests:
            ref = sub["referenceId"]
            try:
                url = str(_substitute(sub["url"], answers, failed))
                body = _substitute(sub.get("body"), answers, failed)
                method = sub["method"].upper()
                path, _, query = url.partition("?")
                match = _SUB_URL_RE.fullmatch(path)
                if match is None or match.group(1) not in VERSION_NUMBERS:
                    raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
                if match.group(2).split("/")[0] in ("composite", "jobs"):
                    raise SalesforceFault(400, "INVALID_API_INPUT", f"{path} is not supported in a composite request")
                params = dict(urllib.parse.parse_qsl(query))
                status, content = self._route(method, match.group(2).strip("/"), params, body, b"", origin, client)
            except SalesforceFault as fault:
                status, content = fault.answer()
                failed.add(ref)
            headers: dict[str, str] = {}
            if status == 201 and isinstance(content, dict) and content.get("id"):
                headers["Location"] = f"{API_PREFIX}sobjects/{sobject_of(str(content['id']))}/{content['id']}"
            answers[ref] = content
            out.append({"body": content, "httpHeaders": headers, "httpStatusCode": status, "referenceId": ref})
        if snap is not None and failed:
            self._restore(snap)
            halted = [{"errorCode": "PROCESSING_HALTED", "message": "The transaction was rolled back since another "
                       "operation in the same transaction failed."}]
            for item in out:
                if item["referenceId"] not in failed:
                    item.update(body=halted, httpHeaders={}, httpStatusCode=400)
        return {"compositeResponse": out}


def _substitute(value: Any, answers: Mapping[str, Any], failed: set[str]) -> Any:
    """Composite references `@{refId.path}` (dots and `[n]`) replaced by values of earlier answers."""
    def lookup(match: re.Match[str]) -> Any:
        ref, path = match.group(1), match.group(2)
        current = answers.get(ref)
        if ref in failed or ref not in answers:
            current = None
        for name, index in re.findall(r"\.([A-Za-z0-9_]+)|\[(\d+)\]", path):
            if index and isinstance(current, list) and int(index) < len(current):
                current = current[int(index)]
            elif name and isinstance(current, dict):
                current = current.get(name)
            else:
                current = None
        if current is None:
            raise SalesforceFault(400, "PROCESSING_HALTED", f"Invalid reference specified. No value for "
                                  f"{ref}{path} found in {ref}. Provided referenceId ('{ref}') must be an earlier "
                                  "subrequest that succeeded.")
        return current

    if isinstance(value, str):
        whole = _REF_RE.fullmatch(value)
        if whole is not None:
            return lookup(whole)
        return _REF_RE.sub(lambda m: str(lookup(m)), value)
    if isinstance(value, dict):
        return {k: _substitute(v, answers, failed) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, answers, failed) for v in value]
    return value

