// Syncline on Azure: Function App (Flex Consumption, Python 3.11, system-assigned identity), storage for the host
// and the state tables, Service Bus with the session-enabled inbound queue, Key Vault for the connector secrets,
// Log Analytics + Application Insights, role assignments, alerts and the operations workbook.
//
//   az deployment group create -g <rg> --template-file infra/main.bicep --parameters infra/main.bicepparam
//
// Defaults of the Syncline parameters equal the defaults in shared/settings.py (tests/infra checks it).
targetScope = 'resourceGroup'

// ---- Naming and placement -----------------------------------------------------------------------------------

@description('Azure region; it must offer the Flex Consumption plan.')
param location string = resourceGroup().location

@description('Short lowercase name (letters and digits) used in every resource name.')
@minLength(2)
@maxLength(10)
param appName string = 'syncline'

@description('Environment name, e.g. dev, test, prod.')
@minLength(2)
@maxLength(8)
param environmentName string

@description('Tags for every resource.')
param tags object = {}

// ---- Operations -------------------------------------------------------------------------------------------------

@description('Resource id of an existing action group that receives every alert.')
param actionGroupId string

@description('Optional object id of an operator user or group: may set Key Vault secrets and run `syncline dlq` / `syncline status` against Azure.')
param operatorPrincipalId string = ''

@description('Type of operatorPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'Group'

@description('Alert when no controller cycle succeeded for this many minutes.')
param controllerSilenceMinutes int = 35

@description('Days of log retention.')
param logRetentionInDays int = 30

@description('Key Vault purge protection (irreversible once on).')
param enablePurgeProtection bool = true

@description('Upper bound of Flex Consumption instances.')
param maximumInstanceCount int = 100

// ---- Syncline runtime (shared/settings.py) ----------------------------------------------------------------------

@description('SYNCLINE_SCHEDULE: NCRONTAB schedule of the sync_controller timer.')
param syncSchedule string = '0 */15 * * * *'

@description('SYNCLINE_RECONCILE_SCHEDULE: NCRONTAB schedule of the reconcile timer (daily at 02:00 UTC).')
param reconcileSchedule string = '0 0 2 * * *'

@description('SYNCLINE_RECONCILE_DAILY_ALLOWANCE: daily API allowance of a system (requests per 24 h); one reconciliation spends at most SYNCLINE_RECONCILE_API_SHARE of it.')
@minValue(1)
param reconcileDailyAllowance int = 100000
@description('SYNCLINE_CHECK_SCHEDULE: NCRONTAB schedule of the choice_check timer (daily drift check).')
param checkSchedule string = '0 30 5 * * *'

@description('SYNCLINE_BATCH_SIZE: messages the controller receives per batch.')
@minValue(1)
@maxValue(5000)
param batchSize int = 500

@description('SYNCLINE_MAX_DELIVERY_COUNT (failed attempts per change); the queue\'s maxDeliveryCount is 10 times it.')
@minValue(1)
@maxValue(2000)
param maxDeliveryCount int = 10

@description('SYNCLINE_LOCK_SECONDS and the queue\'s lock duration (at most 300 seconds on Service Bus).')
@minValue(5)
@maxValue(300)
param lockSeconds int = 60

@description('SYNCLINE_SESSION_BUCKETS: Service Bus sessions the records are hashed into (0: one per record); see docs/sessions.md.')
@minValue(0)
@maxValue(4096)
param sessionBuckets int = 64

@description('SYNCLINE_MAX_CONCURRENT_SESSIONS: Service Bus sessions a controller reads at once.')
@minValue(1)
@maxValue(64)
param maxConcurrentSessions int = 8

@description('SYNCLINE_LEASE_PARTITIONS: Table Storage partitions of the record leases (fewer: fewer requests per batch). Every instance must use the same value: change it only with every instance stopped; see docs/state-tables.md.')
@minValue(1)
@maxValue(100)
param leasePartitions int = 16

@description('SYNCLINE_INLINE_RETRIES: short retries of a direct write before it goes to the queue.')
@minValue(0)
@maxValue(5)
param inlineRetries int = 2

@description('SYNCLINE_INBOUND_QUEUE: name of the inbound queue.')
param inboundQueueName string = 'syncline-inbound'

@description('Time to live of a queued change; expired messages go to the dead-letter sub-queue.')
param messageTimeToLive string = 'P14D'

@description('SYNCLINE_TABLES__tablePrefix: prefix of the state tables (letters and digits).')
param tablePrefix string = 'syncline'

// ---- Dynamics 365 / Dataverse -------------------------------------------------------------------------------------

@description('DATAVERSE__URL, e.g. https://contoso.crm.dynamics.com.')
param dataverseUrl string

@description('DATAVERSE__TENANT_ID: the Entra tenant of the Dataverse environment.')
param dataverseTenantId string = tenant().tenantId

@description('clientSecret: an app registration whose secret is in Key Vault; managedIdentity: the Function App\'s identity (register it as an application user in Dataverse).')
@allowed([
  'clientSecret'
  'managedIdentity'
])
param dataverseAuth string = 'clientSecret'

@description('DATAVERSE__CLIENT_ID: the app registration (clientSecret mode).')
param dataverseClientId string = ''

@description('DATAVERSE__BATCH_SIZE.')
@minValue(1)
@maxValue(1000)
param dataverseBatchSize int = 500

@description('DATAVERSE__MAX_CONCURRENCY.')
@minValue(1)
@maxValue(52)
param dataverseMaxConcurrency int = 4

// ---- ArcGIS Online ------------------------------------------------------------------------------------------------

@description('ARCGIS__SERVICE_URL: the hosted FeatureServer URL.')
param arcgisServiceUrl string

@description('ARCGIS__TOKEN_URL.')
param arcgisTokenUrl string = 'https://www.arcgis.com/sharing/rest/oauth2/token'

@description('appCredentials: client id + client secret (Key Vault); apiKey: an API key (Key Vault).')
@allowed([
  'appCredentials'
  'apiKey'
])
param arcgisAuth string = 'appCredentials'

@description('ARCGIS__CLIENT_ID (appCredentials mode).')
param arcgisClientId string = ''

@description('ARCGIS__BATCH_SIZE.')
@minValue(1)
@maxValue(2000)
param arcgisBatchSize int = 250

@description('ARCGIS__MAX_CONCURRENCY.')
@minValue(1)
@maxValue(16)
param arcgisMaxConcurrency int = 2

// ---- Salesforce ---------------------------------------------------------------------------------------------------

@description('SALESFORCE__MY_DOMAIN_URL, e.g. https://contoso.my.salesforce.com (empty: Salesforce not configured). When set, the connected app\'s consumer secret must be in Key Vault (client-credentials flow).')
param salesforceMyDomainUrl string = ''

@description('SALESFORCE__CLIENT_ID: the connected app\'s consumer key.')
param salesforceClientId string = ''

@description('SALESFORCE__API_VERSION, e.g. 63.0.')
param salesforceApiVersion string = '63.0'

@description('SALESFORCE__COLLECTION_SIZE: records per sObject Collections call (the API\'s limit is 200).')
@minValue(1)
@maxValue(200)
param salesforceCollectionSize int = 200

@description('SALESFORCE__BULK_THRESHOLD: batches of one object above this size go through Bulk API 2.0.')
@minValue(1)
param salesforceBulkThreshold int = 2000

@description('SALESFORCE__CALL_OPTIONS_CLIENT: the Sforce-Call-Options client id that marks Syncline\'s own writes.')
param salesforceCallOptionsClient string = 'syncline'

// ---- Dynamics 365 Finance & Operations ----------------------------------------------------------------------------

@description('FNO__ENVIRONMENT_URL, e.g. https://contoso.operations.dynamics.com (empty: F&O not configured).')
param fnoEnvironmentUrl string = ''

@description('FNO__TENANT_ID: the Entra tenant of the F&O environment.')
param fnoTenantId string = tenant().tenantId

@description('clientSecret: an app registration whose secret is in Key Vault; managedIdentity: the Function App\'s identity (register it in F&O under Microsoft Entra ID applications).')
@allowed([
  'clientSecret'
  'managedIdentity'
])
param fnoAuth string = 'clientSecret'

@description('FNO__CLIENT_ID: the app registration (clientSecret mode).')
param fnoClientId string = ''

@description('FNO__MAX_CONCURRENCY.')
@minValue(1)
@maxValue(52)
param fnoMaxConcurrency int = 4

// ---- SAP S/4HANA ----------------------------------------------------------------------------------------------------

@description('SAP__BASE_URL: the API host, e.g. https://my300000-api.s4hana.cloud.sap (empty: SAP not configured). When set, the secret of sapAuth must be in Key Vault.')
param sapBaseUrl string = ''

@description('basic: a communication user whose password is in Key Vault; oauth: OAuth client credentials against sapTokenUrl, the client secret in Key Vault.')
@allowed([
  'basic'
  'oauth'
])
param sapAuth string = 'basic'

@description('SAP__USER: the communication user of the communication arrangements (basic mode).')
param sapUser string = ''

@description('SAP__TOKEN_URL: the OAuth token endpoint, e.g. https://<host>/sap/bc/sec/oauth2/token or the XSUAA URL (oauth mode).')
param sapTokenUrl string = ''

@description('SAP__CLIENT_ID: the OAuth client (oauth mode).')
param sapClientId string = ''

@description('SAP__SCOPE: the OAuth scope (oauth mode; empty: none).')
param sapScope string = ''

@description('SAP__SAP_CLIENT: the sap-client of an on-premise system with several clients (empty in S/4HANA Cloud).')
param sapSapClient string = ''

@description('SAP__SYSTEM_TIME_ZONE: the time zone of the system\'s LastChangeDate/Time fields of business partners.')
param sapSystemTimeZone string = 'UTC'

@description('SAP__PAGE_SIZE: records per $top/$skip window of a read.')
@minValue(1)
@maxValue(5000)
param sapPageSize int = 1000

@description('SAP__MAX_CONCURRENCY.')
@minValue(1)
@maxValue(32)
param sapMaxConcurrency int = 4

@description('SAP__BATCH_SIZE: changesets per OData $batch call (1 sends every request alone).')
@minValue(1)
@maxValue(1000)
param sapBatchSize int = 100

// ---- Names ----------------------------------------------------------------------------------------------------------

var token = uniqueString(resourceGroup().id, appName, environmentName)
var baseName = '${appName}-${environmentName}'
var names = {
  functionApp: 'func-${baseName}-${take(token, 6)}'
  plan: 'asp-${baseName}'
  storage: take(toLower('st${appName}${token}'), 24)
  deploymentContainer: 'app-package'
  serviceBus: 'sb-${baseName}-${take(token, 6)}'
  keyVault: take('kv-${appName}-${token}', 24)
  workspace: 'log-${baseName}'
  appInsights: 'appi-${baseName}'
}
var allTags = union(tags, {
  application: 'syncline'
  environment: environmentName
})

// ---- Resources ----------------------------------------------------------------------------------------------------

module monitoring 'modules/monitoring.bicep' = {
  name: 'syncline-monitoring'
  params: {
    location: location
    workspaceName: names.workspace
    appInsightsName: names.appInsights
    retentionInDays: logRetentionInDays
    tags: allTags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'syncline-storage'
  params: {
    location: location
    name: names.storage
    deploymentContainerName: names.deploymentContainer
    tablePrefix: tablePrefix
    tags: allTags
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'syncline-servicebus'
  params: {
    location: location
    name: names.serviceBus
    queueName: inboundQueueName
    maxDeliveryCount: maxDeliveryCount
    lockSeconds: lockSeconds
    messageTimeToLive: messageTimeToLive
    tags: allTags
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'syncline-keyvault'
  params: {
    location: location
    name: names.keyVault
    enablePurgeProtection: enablePurgeProtection
    tags: allTags
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'syncline-functionapp'
  params: {
    location: location
    name: names.functionApp
    planName: names.plan
    storageAccountName: storage.outputs.name
    deploymentContainerName: names.deploymentContainer
    appInsightsName: monitoring.outputs.appInsightsName
    serviceBusFullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
    keyVaultName: keyVault.outputs.name
    maximumInstanceCount: maximumInstanceCount
    syncSchedule: syncSchedule
    reconcileSchedule: reconcileSchedule
    reconcileDailyAllowance: reconcileDailyAllowance
    checkSchedule: checkSchedule
    batchSize: batchSize
    maxDeliveryCount: maxDeliveryCount
    lockSeconds: lockSeconds
    inlineRetries: inlineRetries
    sessionBuckets: sessionBuckets
    maxConcurrentSessions: maxConcurrentSessions
    leasePartitions: leasePartitions
    inboundQueueName: serviceBus.outputs.queueName
    tablePrefix: tablePrefix
    dataverseUrl: dataverseUrl
    dataverseTenantId: dataverseTenantId
    dataverseClientId: dataverseClientId
    dataverseAuth: dataverseAuth
    dataverseBatchSize: dataverseBatchSize
    dataverseMaxConcurrency: dataverseMaxConcurrency
    arcgisServiceUrl: arcgisServiceUrl
    arcgisTokenUrl: arcgisTokenUrl
    arcgisClientId: arcgisClientId
    arcgisAuth: arcgisAuth
    arcgisBatchSize: arcgisBatchSize
    arcgisMaxConcurrency: arcgisMaxConcurrency
    salesforceMyDomainUrl: salesforceMyDomainUrl
    salesforceClientId: salesforceClientId
    salesforceApiVersion: salesforceApiVersion
    salesforceCollectionSize: salesforceCollectionSize
    salesforceBulkThreshold: salesforceBulkThreshold
    salesforceCallOptionsClient: salesforceCallOptionsClient
    fnoEnvironmentUrl: fnoEnvironmentUrl
    fnoTenantId: fnoTenantId
    fnoClientId: fnoClientId
    fnoAuth: fnoAuth
    fnoMaxConcurrency: fnoMaxConcurrency
    sapBaseUrl: sapBaseUrl
    sapAuth: sapAuth
    sapUser: sapUser
    sapTokenUrl: sapTokenUrl
    sapClientId: sapClientId
    sapScope: sapScope
    sapSapClient: sapSapClient
    sapSystemTimeZone: sapSystemTimeZone
    sapPageSize: sapPageSize
    sapMaxConcurrency: sapMaxConcurrency
    sapBatchSize: sapBatchSize
    tags: allTags
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'syncline-rbac'
  params: {
    appPrincipalId: functionApp.outputs.principalId
    operatorPrincipalId: operatorPrincipalId
    operatorPrincipalType: operatorPrincipalType
    storageAccountName: storage.outputs.name
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    queueName: serviceBus.outputs.queueName
    keyVaultName: keyVault.outputs.name
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'syncline-alerts'
  params: {
    location: location
    namePrefix: baseName
    actionGroupId: actionGroupId
    appInsightsName: monitoring.outputs.appInsightsName
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    queueName: serviceBus.outputs.queueName
    controllerSilenceMinutes: controllerSilenceMinutes
    tags: allTags
  }
}

module workbook 'modules/workbook.bicep' = {
  name: 'syncline-workbook'
  params: {
    location: location
    displayName: 'Syncline operations (${environmentName})'
    appInsightsName: monitoring.outputs.appInsightsName
    tags: allTags
  }
}

// ---- Outputs (docs/operations.md uses them) ---------------------------------------------------------------------

output functionAppName string = functionApp.outputs.name
output functionAppUrl string = 'https://${functionApp.outputs.defaultHostName}'
output functionAppPrincipalId string = functionApp.outputs.principalId
output keyVaultName string = keyVault.outputs.name
output keyVaultSecretNames object = functionApp.outputs.secretNames
output serviceBusNamespace string = serviceBus.outputs.fullyQualifiedNamespace
output inboundQueueName string = serviceBus.outputs.queueName
output storageAccountName string = storage.outputs.name
output tableEndpoint string = storage.outputs.tableEndpoint
output appInsightsName string = monitoring.outputs.appInsightsName
output workbookId string = workbook.outputs.id
