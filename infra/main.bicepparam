// Example parameters for one environment. Copy it (e.g. prod.bicepparam), replace the <...> values, then:
//   az deployment group create -g <rg> --template-file infra/main.bicep --parameters infra/main.bicepparam
// No secret goes here: connector secrets are set in Key Vault after the deployment (docs/operations.md).
using 'main.bicep'

param environmentName = 'prod'

param actionGroupId = '/subscriptions/<subscription-id>/resourceGroups/<rg>/providers/microsoft.insights/actionGroups/<action-group>'

// Object id of the ops group (may set secrets, run `syncline dlq ...`); '' to grant nobody.
param operatorPrincipalId = ''

param dataverseUrl = 'https://<org>.crm.dynamics.com'
param dataverseAuth = 'clientSecret'
param dataverseClientId = '<app registration client id>'

param arcgisServiceUrl = 'https://services<n>.arcgis.com/<org>/arcgis/rest/services/<service>/FeatureServer'
param arcgisAuth = 'appCredentials'
param arcgisClientId = '<ArcGIS app client id>'

// Optional connectors: leave the URL '' to not configure one.
param salesforceMyDomainUrl = ''
param salesforceClientId = ''

param fnoEnvironmentUrl = ''
param fnoAuth = 'clientSecret'
param fnoClientId = ''

param sapBaseUrl = ''
param sapAuth = 'basic'
param sapUser = ''

// Syncline defaults, spelled out for visibility (they equal shared/settings.py).
param syncSchedule = '0 */15 * * * *'
param reconcileSchedule = '0 0 2 * * *'
param maxDeliveryCount = 10
param lockSeconds = 60
param inboundQueueName = 'syncline-inbound'
param tablePrefix = 'syncline'
