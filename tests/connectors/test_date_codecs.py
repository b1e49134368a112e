"""Every connector's date/time codec: an out-of-range or malformed value is None, kept raw, or a clear error.

Never an unhandled ValueError / OverflowError: one bad row must not fail its page, a webhook or a batch.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from sandbox.sap import SapSimulator
from shared.connectors import dataverse, fno, sap
from shared.connectors.arcgis import codecs as arcgis
from shared.connectors.dataverse import changes as dataverse_changes
from shared.connectors.dataverse import codecs as dataverse_codecs
from shared.connectors.fno import changes as fno_changes
from shared.connectors.fno import codecs as fno_codecs
from shared.connectors.salesforce import codecs as salesforce_codecs
from shared.connectors.sap import codecs as sap_codecs
from shared.core.errors import EnvelopeError, MappingError
from tests.connectors.test_dataverse_webhook import doc_sample
from tests.connectors.test_fno import HEXALITH_EVENT
from tests.connectors.test_sap import Factory, factory, sap_env, sap_sim  # noqa: F401 - fixtures of this module
from tests.unit.test_dates import _anything

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OUT_OF_RANGE_WCF = ["/Date(99999999999999999)/", "/Date(-99999999999999999)/", "/Date(99999999999999999+0000)/"]
OUT_OF_RANGE_ISO = ["0000-01-01T00:00:00Z", "99999-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00",
                    "9999-12-31T23:30:00-01:00", "2026-13-01T00:00:00Z", "not a date", "\ud800"]


def _utc_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, datetime) and value.tzinfo is not None
                             and value.utcoffset() is not None and value.utcoffset().total_seconds() == 0)


# ---------------------------------------------------------------------------------------------- F&O


@pytest.mark.parametrize("value", OUT_OF_RANGE_WCF + OUT_OF_RANGE_ISO)
def test_fno_dates_out_of_range_read_as_none(value: str) -> None:
    assert fno_changes._wcf_date(value) is None  # ValueError "year 3170843 is out of range" before
    assert fno_codecs._parse_datetime(value) is None  # an aware year-1 +01:00 value before (OverflowError later)


def test_fno_business_event_with_an_out_of_range_time_is_an_envelope_error() -> None:
    event = {**HEXALITH_EVENT, "EventTime": "/Date(99999999999999999)/", "EventTimeIso8601": "99999-01-01"}
    with pytest.raises(EnvelopeError, match="EventTime"):
        fno.parse_business_events(json.dumps(event))
    # a present but unreadable EventTime refuses the event even when the ISO copy is readable (they must agree)
    with pytest.raises(EnvelopeError, match="EventTime"):
        fno.parse_business_events(json.dumps({**event, "EventTimeIso8601": "2023-10-16T15:42:46.3440655Z"}))
    # without EventTime, the ISO-8601 copy is enough
    no_wcf = {k: v for k, v in event.items() if k != "EventTime"}
    fallback = fno.parse_business_events(json.dumps({**no_wcf, "EventTimeIso8601": "2023-10-16T15:42:46.3440655Z"}))
    assert fallback[0].event_time == datetime(2023, 10, 16, 15, 42, 46, 344065, tzinfo=UTC)


def test_fno_record_with_an_unreadable_modified_time_keeps_its_row() -> None:
    client = fno.FinOpsClient.__new__(fno.FinOpsClient)  # _record needs no connection
    record = client._record("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": "US-1",
                                            "ModifiedDateTime": "0001-01-01T00:00:00+01:00"})
    assert record.modified is None
    assert record.values["ModifiedDateTime"] == "0001-01-01T00:00:00+01:00"


# ------------------------------------------------------------------------------------------ Dataverse


@pytest.mark.parametrize("value", OUT_OF_RANGE_WCF)
def test_dataverse_webhook_attribute_out_of_range_is_kept_raw_for_the_record_to_fail_alone(value: str) -> None:
    body = doc_sample()
    body["InputParameters"][0]["value"]["Attributes"][3]["value"] = value  # modifiedon
    change = dataverse.parse_remote_execution_context(body)  # ValueError before
    assert change.record.values["modifiedon"] == value
    assert change.record.modified is None


def test_dataverse_webhook_operation_time_out_of_range_is_an_envelope_error() -> None:
    body = doc_sample()
    body["OperationCreatedOn"] = "/Date(99999999999999999)/"
    with pytest.raises(EnvelopeError, match="OperationCreatedOn"):
        dataverse.parse_remote_execution_context(body)


@pytest.mark.parametrize("value", OUT_OF_RANGE_ISO)
def test_dataverse_modifiedon_out_of_range_reads_as_none(value: str) -> None:
    assert dataverse_codecs.parse_datetime(value) is None


# ----------------------------------------------------------------------------------------------- SAP


@pytest.mark.parametrize("value", OUT_OF_RANGE_WCF + OUT_OF_RANGE_ISO)
def test_sap_datetimes_out_of_range_read_as_none(value: str) -> None:
    assert sap_codecs._parse_sap_datetime(value) is None


@pytest.mark.parametrize("value", [*OUT_OF_RANGE_WCF, "PT99H00M00S", "PT12H99M00S", "PT123456789H"])
def test_sap_values_out_of_range_are_kept_raw(value: str) -> None:
    assert sap.plain_value(value) == value  # ValueError before
    assert sap.plain_value({"d": value}) == {"d": value}


def test_sap_times() -> None:
    assert sap_codecs._parse_sap_time("PT12H30M00S") == time(12, 30)
    assert sap_codecs._parse_sap_time("PT25H00M00S") is None  # ValueError "hour must be in 0..23" before
    assert sap.plain_value("PT12H30M00S") == "12:30:00"


@pytest.mark.parametrize("value", ["0000-01-01", "99999-01-01", "2026-13-01", "0001-01-01T00:00:00+01:00"])
def test_sap_wire_value_refuses_a_date_out_of_range_with_a_mapping_error(value: str) -> None:
    with pytest.raises(MappingError, match="RequestedDeliveryDate"):
        sap.wire_value("RequestedDeliveryDate", value)
    assert not sap.same_value("RequestedDeliveryDate", "/Date(99999999999999999)/", "2026-01-05")


def test_sap_wire_value_of_a_datetime_that_leaves_the_range_in_utc() -> None:
    from datetime import timedelta, timezone

    with pytest.raises(MappingError, match="out of range"):
        sap.wire_value("LastChangeDateTime", datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))


# ---------------------------------------------------------------------------------- Salesforce, ArcGIS


@pytest.mark.parametrize("value", [*OUT_OF_RANGE_ISO, 1e30, -1e30, float("nan"), float("inf"), 99999999999999999])
def test_salesforce_datetimes_out_of_range_read_as_none(value: Any) -> None:
    assert salesforce_codecs.parse_sf_datetime(value) is None  # OverflowError / ValueError before for the numbers


def test_salesforce_record_with_an_unreadable_modstamp_keeps_its_row() -> None:
    record = salesforce_codecs.to_record({"Id": "001A", "SystemModstamp": "0001-01-01T00:00:00.000+0100", "Name": "x"})
    assert record.modified is None
    assert record.values["Name"] == "x"
    assert salesforce_codecs.parse_sf_datetime("2026-01-01T00:00:00.000+0000") == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("value", [99999999999999999, -99999999999999999, 10**30])
def test_arcgis_epoch_out_of_range_reads_as_none(value: int) -> None:
    assert arcgis.epoch_ms_to_datetime(value) is None  # OverflowError before
    with pytest.raises(MappingError, match="not a date in range"):
        arcgis._timestamp_literal(value)


# -------------------------------------------------------------------------------------------- property


@PROPERTY
@given(_anything)
def test_every_connector_codec_gives_utc_in_range_none_or_the_raw_value(value: Any) -> None:
    assert _utc_or_none(fno_codecs._parse_datetime(value))
    assert _utc_or_none(fno_changes._wcf_date(value))
    assert _utc_or_none(dataverse_codecs.parse_datetime(value))
    assert _utc_or_none(sap_codecs._parse_sap_datetime(value))
    assert sap_codecs._parse_sap_time(value) is None or isinstance(sap_codecs._parse_sap_time(value), time)
    assert _utc_or_none(salesforce_codecs.parse_sf_datetime(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        assert _utc_or_none(arcgis.epoch_ms_to_datetime(value))
    if isinstance(value, str):
        plain = sap.plain_value(value)
        assert isinstance(plain, str)
        with contextlib.suppress(MappingError):
            sap.wire_value("RequestedDeliveryDate", value)
        with contextlib.suppress(EnvelopeError):
            dataverse_changes._canonical("col", value, "Target", ())


# ----------------------------------------------------------------------------- against the SAP simulator


async def test_a_sap_row_with_a_bad_date_does_not_fail_its_page(
        factory: Factory, sap_sim: SapSimulator) -> None:  # noqa: F811 - fixtures imported above  # noqa: F811
    order = sap_sim.all("A_SalesOrder")[0]
    bad_order = sap_sim.insert("A_SalesOrder", {**order, "SalesOrder": "4999001", "to_Item": []})
    bad_order["RequestedDeliveryDate"] = "/Date(99999999999999999)/"  # raw, as a broken backend could serve it
    partner = sap_sim.all("A_BusinessPartner")[0]
    bad_partner = sap_sim.insert("A_BusinessPartner", {**partner, "BusinessPartner": "17199001"})
    bad_partner["LastChangeTime"] = "PT99H00M00S"
    bad_partner["CreationTime"] = "PT99H00M00S"
    client = factory.client()

    orders = {r.key: r for b, _ in [x async for x in client.changes_since("A_SalesOrder", None)] for r in b}
    partners = {r.key: r for b, _ in [x async for x in client.changes_since("A_BusinessPartner", None)] for r in b}

    assert orders["4999001"].values["RequestedDeliveryDate"] == "/Date(99999999999999999)/"
    assert orders["4999001"].modified is not None
    assert len(orders) > 1
    assert all(isinstance(r.values["RequestedDeliveryDate"], str | None) for r in orders.values())
    assert partners["17199001"].values["LastChangeTime"] == "PT99H00M00S"
    assert len(partners) > 1
