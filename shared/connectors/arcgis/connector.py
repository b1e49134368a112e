"""The ArcGIS connector: one class joining reads, writes, the change feed and webhook admin of a feature service."""

from __future__ import annotations

from shared.connectors.arcgis.changes import ArcGISChanges
from shared.connectors.arcgis.metadata import ArcGISMetadata
from shared.connectors.arcgis.webhooks import ArcGISWebhookAdmin
from shared.connectors.arcgis.writes import ArcGISWrites


class ArcGISFeatureServiceClient(ArcGISWrites, ArcGISChanges, ArcGISWebhookAdmin, ArcGISMetadata):
    """RecordSink + ChangeSource over one hosted feature service; layers are addressed by name.

    Canonical records: field names as in the layer, dates as epoch milliseconds, GlobalID and GUID fields
    as braced upper-case strings, geometry under `GEOMETRY_KEY` as ArcGIS JSON in the layer's spatial
    reference (None for a null geometry and for tables), key = GlobalID, modified/version = EditDate.

    Change feed checkpoints (opaque strings stored by the controller):
    - `"<serverGen>"`: extractChanges cursor (services with ChangeTracking);
    - `"scan:<serverGen>:<objectId>"`: first read of a change-tracked layer in progress (a keyset scan by
      objectId, then extractChanges from the serverGen read before the scan began);
    - `"editdate:<ms>:<oid,oid,...>"`: editor-tracking fallback. The next read asks `EditDate >= ms`
      (>= so features edited in the same millisecond as the last one seen are not lost) and drops the
      listed objectIds at exactly `ms` (already emitted). Deletes are not visible in this mode.
    """
