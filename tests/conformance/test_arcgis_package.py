"""ArcGIS simulator driven by Esri's `arcgis` Python package (GIS + FeatureLayer), over TLS, with no Syncline code.

What the package sends was read from its requests to the simulator (arcgis 2.4.4), not assumed:
- `GIS(url, client_id=, client_secret=)`: POST `/sharing/rest/oauth2/token` (grant_type=client_credentials, form, a
  new token before each request), GET `/sharing/rest/portals/self?f=json` (twice) and `/sharing/rest/?f=json`, the
  token in `X-Esri-Authorization: Bearer`; with REQUESTS_CA_BUNDLE its pre-flight probe also GETs `/sharing/rest/info`
  (and `/sharing/info`, `/sharing/sharing/rest/info`, `/sharing/rest/services`, reading only `WWW-Authenticate`).
- `FeatureLayer.properties`: POST `{layer}?f=json`. `edit_features`: multipart POST `{layer}/applyEdits`
  (adds/updates/deletes, useGlobalIds, rollbackOnFailure). `query`: GET `{layer}/query`, then `returnCountOnly`;
  past `maxRecordCount` either `resultOffset` pages (with `orderByFields`) or `returnIdsOnly` followed by
  `objectIds` chunks of 200 (without).
Shapes served follow ArcGIS Online: `/sharing/rest/info` as www.arcgis.com answers it (`owningSystemUrl`, `authInfo`
with `tokenServicesUrl` .../generateToken, `isTokenBasedSecurity`), `portals/self` after Esri/arcgis-rest-js
`packages/arcgis-rest-portal/test/mocks/portal/response.ts` with the `appInfo` of an app token (appId, itemId,
appOwner, orgId, appTitle, privileges: "Portal self", developers.arcgis.com/rest/users-groups-and-items/portal-self/).
Values outside a coded-value domain are stored by hosted layers (Esri/arcgis-python-api#818, which used this very
package's `edit_features`; see docs/simulators/arcgis.md).
"""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.arcgis import (
    DEFAULT_API_KEY,
    DEFAULT_API_KEY_USERNAME,
    DEFAULT_APP_USERNAME,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    dot_layers,
)
from tests.conformance import _arcgis_fixtures as fx
from tests.conformance._arcgis_fixtures import Portal

pytestmark = [
    pytest.mark.integration,
    # The package fetches client-credentials tokens with verify=False (arcgis/auth/_auth/_oauth.py) and silences the
    # warning only on the calling thread; query's chunk threads let it through. Every other request is verified (the
    # untrusted-certificate test below fails without the CA).
    pytest.mark.filterwarnings("ignore:Unverified HTTPS request:urllib3.exceptions.InsecureRequestWarning"),
]

portal = fx.portal

SIGNS = 0
POINT = {"x": -93.0936, "y": 44.9537, "spatialReference": {"wkid": 4326}}


def sign(tag: str, **attributes: Any) -> dict[str, Any]:
    return {"attributes": {"ASSET_TAG": tag, **attributes}, "geometry": POINT}


def signs_layer(portal: Portal, gis: Any | None = None) -> Any:
    from arcgis.features import FeatureLayer

    return FeatureLayer(portal.layer_url(SIGNS), gis=gis if gis is not None else portal.gis())


def attributes(feature_set: Any) -> list[dict[str, Any]]:
    """Each feature's attributes, less OBJECTID (the package adds the object-id field to every outFields)."""
    return [{k: v for k, v in f.attributes.items() if k != "OBJECTID"} for f in feature_set.features]


# ------------------------------------------------------------------------------------------- portal and sign-in


def test_gis_signs_in_with_app_credentials_over_verified_tls(portal: Portal) -> None:
    gis = portal.gis()
    props = gis.properties
    assert props["id"] == portal.sim.org_id
    assert (props["isPortal"], props["portalMode"]) == (False, "multitenant")
    assert props["appInfo"]["appId"] == DEFAULT_CLIENT_ID
    assert props["appInfo"]["orgId"] == portal.sim.org_id
    assert portal.sim.request_count["token"] >= 1
    assert portal.sim.request_count["portal.portals/self"] >= 1


def test_portal_info_is_served_as_arcgis_online_answers_it(portal: Portal) -> None:
    gis = portal.gis()
    info = gis._con.get(f"{portal.url}/sharing/rest/info", {"f": "json"})
    assert info == {"owningSystemUrl": portal.url,
                    "authInfo": {"tokenServicesUrl": f"{portal.url}/sharing/rest/generateToken",
                                 "isTokenBasedSecurity": True}}


def test_gis_refuses_a_server_whose_certificate_it_does_not_trust(portal: Portal,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from arcgis.gis import GIS

    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        GIS(portal.url, client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET, set_active=False)


def test_wrong_client_secret_surfaces_the_token_endpoints_error(portal: Portal) -> None:
    with pytest.raises(Exception, match="Invalid client_secret"):
        portal.gis(client_id=DEFAULT_CLIENT_ID, client_secret="not-the-secret")
    assert portal.sim.request_count["portal.portals/self"] == 0


def test_api_key_signs_in_and_edits_are_recorded_for_its_user(portal: Portal) -> None:
    gis = portal.gis(api_key=DEFAULT_API_KEY)
    assert gis.properties["appInfo"]["appOwner"] == DEFAULT_API_KEY_USERNAME
    layer = signs_layer(portal, gis)
    [added] = layer.edit_features(adds=[sign("KEY-1")])["addResults"]
    assert added["success"] is True
    [row] = attributes(layer.query(where="ASSET_TAG = 'KEY-1'", out_fields="Creator,Editor"))
    assert (row["Creator"], row["Editor"]) == (DEFAULT_API_KEY_USERNAME, DEFAULT_API_KEY_USERNAME)


def test_anonymous_gis_gets_the_public_view_and_the_private_layer_asks_for_a_token(portal: Portal) -> None:
    from arcgis.gis import GIS

    gis = GIS(portal.url, ca_bundles=str(portal.ca.ca_path), set_active=False)
    portal.signed_in.append(gis)
    assert "appInfo" not in gis.properties
    assert "id" not in gis.properties
    with pytest.raises(Exception, match=r"Token Required[\s\S]*\(Error Code: 499\)"):
        _ = signs_layer(portal, gis).properties
    assert portal.sim.request_count["token"] == 0


# ------------------------------------------------------------------------------------------- layer resource


def test_sign_layer_properties_fields_and_domains_are_the_declared_schema(portal: Portal) -> None:
    layer = signs_layer(portal)
    props = layer.properties
    declared = dot_layers()[SIGNS]
    assert (props.name, props.type, props.geometryType) == (declared.name, "Feature Layer", "esriGeometryPoint")
    assert (props.objectIdField, props.globalIdField) == ("OBJECTID", "GlobalID")
    assert {"Create", "Update", "Delete", "Query", "Editing", "ChangeTracking"} <= set(props.capabilities.split(","))
    assert props.advancedQueryCapabilities.supportsPagination is True
    assert dict(props.editFieldsInfo) == {"creationDateField": "CreationDate", "creatorField": "Creator",
                                          "editDateField": "EditDate", "editorField": "Editor"}
    served = {f["name"]: f for f in props.fields}
    for f in declared.fields:
        got = served[f.name]
        assert (got["type"], got["nullable"], got["editable"], got.get("length")) == \
            (f.type, f.nullable, f.editable, f.length)
        if f.domain is None:
            assert got["domain"] is None
        else:
            assert got["domain"]["type"] == "codedValue"
            assert [c["code"] for c in got["domain"]["codedValues"]] == f.codes()
    assert [c["code"] for c in served["CONDITION"]["domain"]["codedValues"]] == \
        ["GOOD", "FAIR", "POOR", "DAMAGED", "MISSING"]
    assert served["OBJECTID"]["type"] == "esriFieldTypeOID"
    assert served["GlobalID"]["type"] == "esriFieldTypeGlobalID"


# ------------------------------------------------------------------------------------------- query


def test_query_where_with_a_quoted_quote_and_paging_past_max_record_count(portal: Portal) -> None:
    portal.sim.set_max_record_count(250, SIGNS)
    layer = signs_layer(portal)
    assert layer.properties.maxRecordCount == 250
    # 450 signs: 300 on "O'Brien Rd" (more than one page), 150 on "Main St".
    adds = [sign(f"PG-{i:03d}", ROUTE="Main St" if i % 3 == 0 else "O'Brien Rd") for i in range(450)]
    results = layer.edit_features(adds=adds)["addResults"]
    assert [r["success"] for r in results] == [True] * 450

    # With orderByFields the package pages with resultOffset while exceededTransferLimit is true.
    obrien = attributes(layer.query(where="ROUTE = 'O''Brien Rd'", out_fields="ASSET_TAG,ROUTE",
                                    order_by_fields="OBJECTID ASC"))
    assert [r["ASSET_TAG"] for r in obrien] == [f"PG-{i:03d}" for i in range(450) if i % 3]
    assert {r["ROUTE"] for r in obrien} == {"O'Brien Rd"}

    # Without it, returnIdsOnly (not capped by maxRecordCount), then objectIds chunks.
    everything = attributes(layer.query(where="1=1", out_fields="ASSET_TAG"))
    assert sorted(r["ASSET_TAG"] for r in everything) == [f"PG-{i:03d}" for i in range(450)]
    assert layer.query(where="ROUTE = 'O''Brien Rd'", return_count_only=True) == 300
    assert layer.query(where="ROUTE LIKE 'O''B%'", return_ids_only=True)["objectIds"] == \
        [r["objectId"] for i, r in enumerate(results) if i % 3]


def test_query_on_an_unknown_field_surfaces_the_services_400(portal: Portal) -> None:
    layer = signs_layer(portal)
    with pytest.raises(ValueError, match="'code': 400") as err:
        layer.query(where="NO_SUCH_FIELD = 1")
    assert "Unable to complete operation." in str(err.value)


# ------------------------------------------------------------------------------------------- applyEdits


def test_apply_edits_adds_updates_and_deletes_with_results(portal: Portal) -> None:
    layer = signs_layer(portal)
    adds = layer.edit_features(adds=[sign("S-1", CONDITION="GOOD", ROUTE="MN-36", MILEPOST=12.5),
                                     sign("S-2", CONDITION="FAIR"), sign("S-3")])["addResults"]
    assert [r["success"] for r in adds] == [True, True, True]
    oid1, oid2, oid3 = (r["objectId"] for r in adds)
    assert all(r["globalId"].startswith("{") for r in adds)

    updated = layer.edit_features(updates=[{"attributes": {"OBJECTID": oid1, "CONDITION": "POOR",
                                                           "MILEPOST": 13.0}}])["updateResults"]
    assert updated == [{"objectId": oid1, "uniqueId": oid1, "globalId": adds[0]["globalId"], "success": True}]

    deleted = layer.edit_features(deletes=f"{oid2},{oid3}")["deleteResults"]
    assert [(r["objectId"], r["success"]) for r in deleted] == [(oid2, True), (oid3, True)]

    rows = [dict(f.attributes) for f in layer.query(
        where="1=1", out_fields="ASSET_TAG,CONDITION,MILEPOST,ROUTE,Editor").features]
    assert rows == [{"OBJECTID": oid1, "ASSET_TAG": "S-1", "CONDITION": "POOR", "MILEPOST": 13.0, "ROUTE": "MN-36",
                     "Editor": DEFAULT_APP_USERNAME}]


def test_updates_and_deletes_by_global_id(portal: Portal) -> None:
    layer = signs_layer(portal)
    gid = "{5B6F0C1E-2D3A-4B5C-8D9E-0F1A2B3C4D5E}"
    [added] = layer.edit_features(adds=[{**sign("G-1"), "attributes": {"ASSET_TAG": "G-1", "GlobalID": gid}}],
                                  use_global_ids=True)["addResults"]
    assert (added["success"], added["globalId"]) == (True, gid)
    [updated] = layer.edit_features(updates=[{"attributes": {"GlobalID": gid.lower(), "ROUTE": "I-94"}}],
                                    use_global_ids=True)["updateResults"]
    assert updated["success"] is True
    assert attributes(layer.query(where=f"GlobalID = '{gid}'", out_fields="ROUTE")) == [{"ROUTE": "I-94"}]
    [deleted] = layer.edit_features(deletes=gid, use_global_ids=True)["deleteResults"]
    assert deleted["success"] is True
    assert layer.query(where="1=1", return_count_only=True) == 0


def test_value_outside_a_coded_value_domain_is_stored_as_the_hosted_service_does(portal: Portal) -> None:
    # Esri/arcgis-python-api#818: edit_features on an ArcGIS Online layer stored "test" in a domain of ano/ne.
    layer = signs_layer(portal)
    [added] = layer.edit_features(adds=[sign("D-1", CONDITION="WOBBLY", SIGN_TYPE="XYZ")])["addResults"]
    assert added["success"] is True
    [row] = attributes(layer.query(where="ASSET_TAG = 'D-1'", out_fields="CONDITION,SIGN_TYPE"))
    assert row == {"CONDITION": "WOBBLY", "SIGN_TYPE": "XYZ"}


def test_refused_edit_raises_the_services_error_and_applies_nothing(portal: Portal) -> None:
    layer = signs_layer(portal)
    # rollbackOnFailure=true (the package's default): one bad feature refuses the call, surfaced as an Exception
    # carrying the service's message, details and code.
    with pytest.raises(Exception, match=r"\(Error Code: 400\)") as err:
        layer.edit_features(adds=[sign("R-1"), sign("R-2", NO_SUCH_FIELD="x")])
    assert "Unable to complete operation." in str(err.value)
    assert "NO_SUCH_FIELD" in str(err.value)
    assert layer.query(where="1=1", return_count_only=True) == 0


def test_refused_edits_without_rollback_are_per_feature_error_results(portal: Portal) -> None:
    layer = signs_layer(portal)
    result = layer.edit_features(adds=[{"attributes": {"ASSET_TAG": None}, "geometry": POINT}, sign("OK-1"),
                                       sign("LONG", SIGN_TYPE="TOO-LONG")],
                                 updates=[{"attributes": {"OBJECTID": 9999, "ROUTE": "x"}}],
                                 rollback_on_failure=False)
    failed_null, ok, failed_long = result["addResults"]
    assert (failed_null["success"], failed_null["objectId"], failed_null["error"]["code"]) == (False, -1, 1001)
    assert ok["success"] is True
    assert (failed_long["success"], failed_long["error"]["code"]) == (False, 1016)
    [missing] = result["updateResults"]
    assert (missing["success"], missing["error"]["code"]) == (False, 1019)
    assert set(failed_null["error"]) == {"code", "description"}
    assert attributes(layer.query(where="1=1", out_fields="ASSET_TAG")) == [{"ASSET_TAG": "OK-1"}]
