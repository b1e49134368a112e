"""Bulk API 2.0 ingest jobs: CSV upload, asynchronous processing over two polls, result CSVs."""

from __future__ import annotations

import csv
import io
import secrets
from typing import Any

from starlette.responses import Response

from sandbox.salesforce.model import API_VERSION, EXTERNAL_IDS, RUN_AS_USER_ID, SCHEMAS, BulkJob, SalesforceFault
from sandbox.salesforce.store import SalesforceStore
from sandbox.salesforce.values import csv_value


class BulkJobs(SalesforceStore):
    """`jobs/ingest`: create, upload, close, poll and read results of a job."""

    def _job_info(self, job: BulkJob) -> dict[str, Any]:
        return {"id": job.id, "operation": job.operation, "object": job.sobject, "state": job.state,
                "externalIdFieldName": job.external_id, "contentType": "CSV", "apiVersion": float(API_VERSION),
                "lineEnding": "LF", "columnDelimiter": "COMMA",
                "numberRecordsProcessed": len(job.success) + len(job.failed),
                "numberRecordsFailed": len(job.failed)}

    def _bulk(self, method: str, rest: list[str], data: Any, body: bytes, origin: str, client: str | None) -> Response:
        if not rest and method == "POST":
            if not isinstance(data, dict) or data.get("object") not in SCHEMAS:
                raise SalesforceFault(400, "INVALIDJOB", "InvalidJob : Invalid object")
            op = data.get("operation")
            if op not in ("insert", "update", "upsert", "delete"):
                raise SalesforceFault(400, "INVALIDJOB", f"InvalidJob : Invalid operation {op}")
            if op == "upsert" and data.get("externalIdFieldName") not in EXTERNAL_IDS[data["object"]]:
                raise SalesforceFault(400, "INVALIDJOB", "InvalidJob : External ID was blank or not an External ID")
            created = BulkJob("750" + secrets.token_hex(8).upper()[:15], data["object"], op,
                           data.get("externalIdFieldName"), client=client)
            self._jobs[created.id] = created
            return self._json(self._job_info(created))
        job = self._jobs.get(rest[0]) if rest else None
        if job is None:
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        if len(rest) == 1 and method == "GET":
            # like the real service, a closed job is processed asynchronously: UploadComplete -> InProgress
            # on the first poll, JobComplete (results available) on the next one
            if job.state == "UploadComplete":
                job.state = "InProgress"
            elif job.state == "InProgress":
                self._run_job(job, job.origin)
                job.state = "JobComplete"
            return self._json(self._job_info(job))
        if len(rest) == 2 and rest[1] == "batches" and method == "PUT":
            if job.state != "Open":
                raise SalesforceFault(400, "INVALIDJOBSTATE", "Job is not open for upload")
            job.csv += body.decode("utf-8")
            return Response(status_code=201, headers=self._limit_header())
        if len(rest) == 1 and method == "PATCH":
            state = (data or {}).get("state")
            if state == "Aborted":
                job.state = "Aborted"
            elif state == "UploadComplete" and job.state == "Open":
                job.state, job.origin = "UploadComplete", origin
            else:
                raise SalesforceFault(400, "INVALIDJOBSTATE", f"Invalid state {state}")
            return self._json(self._job_info(job))
        if len(rest) == 2 and rest[1] in ("successfulResults", "failedResults") and method == "GET":
            rows = job.success if rest[1] == "successfulResults" else job.failed
            extra = ["sf__Id", "sf__Created"] if rest[1] == "successfulResults" else ["sf__Id", "sf__Error"]
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=[*extra, *job.columns], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            return Response(out.getvalue(), media_type="text/csv", headers=self._limit_header())
        raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")

    def _run_job(self, job: BulkJob, origin: str) -> None:
        reader = csv.DictReader(io.StringIO(job.csv))
        job.columns = list(reader.fieldnames or [])
        for row in reader:
            values: dict[str, Any] = {k: (None if v == "#N/A" else csv_value(job.sobject, k, v))
                                      for k, v in row.items() if v != ""}
            try:
                if job.operation == "upsert":
                    assert job.external_id is not None
                    rid, created = self._upsert(job.sobject, job.external_id, str(values.get(job.external_id, "")),
                                                values, origin=origin, user=RUN_AS_USER_ID)
                elif job.operation == "insert":
                    rid, created = self._create(job.sobject, values, origin=origin, user=RUN_AS_USER_ID), True
                elif job.operation == "update":
                    rid, created = str(values.pop("Id", "")), False
                    self._update(job.sobject, rid, values, origin=origin, user=RUN_AS_USER_ID)
                else:
                    rid, created = str(values.get("Id", "")), False
                    self._delete(rid, origin=origin, user=RUN_AS_USER_ID)
                job.success.append({"sf__Id": rid, "sf__Created": str(created).lower(), **row})
            except SalesforceFault as fault:
                job.failed.append({"sf__Id": "", "sf__Error": f"{fault.code}:{fault.message}:"
                                   f"{','.join(fault.fields)} --", **row})
