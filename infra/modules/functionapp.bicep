// The Function App on a Flex Consumption plan (Linux, Python 3.11) with a system-assigned identity, and its
// app settings: every setting shared/settings.py reads in Azure plus the host's own identity-based storage
// settings. tests/infra/test_bicep.py keeps the `appsettings` object below equal to the settings model.

@description('Azure region (one that offers Flex Consumption).')
param location string

@description('Function App name (also the default host name).')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Storage account of the host and of the Syncline tables.')
param storageAccountName string

@description('Blob container holding the deployment package.')
param deploymentContainerName string

@description('Application Insights component (APPLICATIONINSIGHTS_CONNECTION_STRING).')
param appInsightsName string

@description('Fully qualified Service Bus namespace, e.g. contoso-sync.servicebus.windows.net.')
param serviceBusFullyQualifiedNamespace string

@description('Key Vault holding the connector secrets.')
param keyVaultName string

@description('Upper bound of Flex Consumption instances.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Memory per instance (MB).')
@allowed([
  2048
  4096
])
param instanceMemoryMB int = 2048

// ---- Syncline behaviour (defaults equal shared/settings.py) -------------------------------------------------

@description('NCRONTAB schedule of the sync_controller timer (SYNCLINE_SCHEDULE).')
param syncSchedule string

@description('NCRONTAB schedule of the reconcile timer (SYNCLINE_RECONCILE_SCHEDULE).')
param reconcileSchedule string

@description('SYNCLINE_RECONCILE_DAILY_ALLOWANCE.')
param reconcileDailyAllowance int
@description('NCRONTAB schedule of the choice_check timer (SYNCLINE_CHECK_SCHEDULE).')
param checkSchedule string

@description('SYNCLINE_BATCH_SIZE.')
param batchSize int

@description('SYNCLINE_MAX_DELIVERY_COUNT: failed attempts per change; the queue\'s maxDeliveryCount is 10 times it.')
param maxDeliveryCount int

@description('SYNCLINE_LOCK_SECONDS: must equal the queue\'s lock duration.')
param lockSeconds int

@description('SYNCLINE_INLINE_RETRIES.')
param inlineRetries int

@description('SYNCLINE_SESSION_BUCKETS.')
param sessionBuckets int

@description('SYNCLINE_LEASE_PARTITIONS.')
param leasePartitions int

@description('SYNCLINE_MAX_CONCURRENT_SESSIONS.')
param maxConcurrentSessions int

@description('SYNCLINE_INBOUND_QUEUE.')
param inboundQueueName string

@description('SYNCLINE_TABLES__tablePrefix.')
param tablePrefix string

// ---- Connectors -----------------------------------------------------------------------------------------------

@description('DATAVERSE__URL, e.g. https://contoso.crm.dynamics.com (empty: Dataverse not configured).')
param dataverseUrl string

@description('DATAVERSE__TENANT_ID.')
param dataverseTenantId string

@description('DATAVERSE__CLIENT_ID of the app registration (clientSecret mode only).')
param dataverseClientId string

@description('clientSecret: app registration + secret from Key Vault; managedIdentity: the app\'s own identity.')
@allowed([
  'clientSecret'
  'managedIdentity'
])
param dataverseAuth string

@description('DATAVERSE__BATCH_SIZE.')
param dataverseBatchSize int

@description('DATAVERSE__MAX_CONCURRENCY.')
param dataverseMaxConcurrency int

@description('ARCGIS__SERVICE_URL: the FeatureServer URL (empty: ArcGIS not configured).')
param arcgisServiceUrl string

@description('ARCGIS__TOKEN_URL.')
param arcgisTokenUrl string

@description('ARCGIS__CLIENT_ID (appCredentials mode).')
param arcgisClientId string

@description('appCredentials: client id + secret from Key Vault; apiKey: an API key from Key Vault.')
@allowed([
  'appCredentials'
  'apiKey'
])
param arcgisAuth string

@description('ARCGIS__BATCH_SIZE.')
param arcgisBatchSize int

@description('ARCGIS__MAX_CONCURRENCY.')
param arcgisMaxConcurrency int

@description('SALESFORCE__MY_DOMAIN_URL, e.g. https://contoso.my.salesforce.com (empty: Salesforce not configured).')
param salesforceMyDomainUrl string

@description('SALESFORCE__CLIENT_ID: the connected app\'s consumer key.')
param salesforceClientId string

@description('SALESFORCE__API_VERSION.')
param salesforceApiVersion string

@description('SALESFORCE__COLLECTION_SIZE.')
param salesforceCollectionSize int

@description('SALESFORCE__BULK_THRESHOLD.')
param salesforceBulkThreshold int

@description('SALESFORCE__CALL_OPTIONS_CLIENT.')
param salesforceCallOptionsClient string

@description('FNO__ENVIRONMENT_URL, e.g. https://contoso.operations.dynamics.com (empty: F&O not configured).')
param fnoEnvironmentUrl string

@description('FNO__TENANT_ID.')
param fnoTenantId string

@description('FNO__CLIENT_ID of the app registration (clientSecret mode only).')
param fnoClientId string

@description('clientSecret: app registration + secret from Key Vault; managedIdentity: the app\'s own identity.')
@allowed([
  'clientSecret'
  'managedIdentity'
])
param fnoAuth string

@description('FNO__MAX_CONCURRENCY.')
param fnoMaxConcurrency int

@description('SAP__BASE_URL: the S/4HANA API host, e.g. https://my300000-api.s4hana.cloud.sap (empty: SAP not configured).')
param sapBaseUrl string

@description('basic: a communication user whose password is in Key Vault; oauth: client credentials, the client secret in Key Vault.')
@allowed([
  'basic'
  'oauth'
])
param sapAuth string

@description('SAP__USER: the communication user (basic mode).')
param sapUser string

@description('SAP__TOKEN_URL: the OAuth token endpoint (oauth mode).')
param sapTokenUrl string

@description('SAP__CLIENT_ID: the OAuth client (oauth mode).')
param sapClientId string

@description('SAP__SCOPE: the OAuth scope (oauth mode; empty: none).')
param sapScope string

@description('SAP__SAP_CLIENT: the sap-client of an on-premise system (empty in S/4HANA Cloud).')
param sapSapClient string

@description('SAP__SYSTEM_TIME_ZONE.')
param sapSystemTimeZone string

@description('SAP__PAGE_SIZE.')
param sapPageSize int

@description('SAP__MAX_CONCURRENCY.')
param sapMaxConcurrency int

@description('SAP__BATCH_SIZE.')
param sapBatchSize int

param tags object = {}

// Key Vault secret holding each secret setting (docs/operations.md, "Put the secrets in Key Vault").
var secretNames = {
  webhookSecret: 'syncline-webhook-secret'
  dataverseClientSecret: 'dataverse-client-secret'
  arcgisClientSecret: 'arcgis-client-secret'
  arcgisApiKey: 'arcgis-api-key'
  arcgisWebhookSignatureKey: 'arcgis-webhook-signature-key'
  salesforceClientSecret: 'salesforce-client-secret'
  fnoClientSecret: 'fno-client-secret'
  sapPassword: 'sap-password'
  sapClientSecret: 'sap-client-secret'
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// Versionless secret URIs: the platform picks up a rotated secret within a day (or at the next restart).
var secretsUri = '${vault.properties.vaultUri}secrets/'

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'SystemAssignedIdentity'
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// The complete set of app settings (this resource replaces whatever was there). Not set on purpose, because
// they are local-only: SYNCLINE_STATE_DIR, SYNCLINE_CA_BUNDLE, DATAVERSE__AUTHORITY_HOST, FNO__AUTHORITY_HOST
// and the two *__connectionString settings (Azure uses the managed identity); SYNCLINE_FLOWS keeps its default, the
// flows/ folder of the deployed package. FUNCTIONS_WORKER_RUNTIME and FUNCTIONS_EXTENSION_VERSION are not
// allowed on Flex Consumption (functionAppConfig.runtime replaces them).
resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: {
    // Host: identity-based AzureWebJobsStorage (blob for timer locks and the deployment package, queue for
    // the host's internal queues) and telemetry.
    AzureWebJobsStorage__accountName: storage.name
    AzureWebJobsStorage__credential: 'managedidentity'
    APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString

    // Syncline runtime
    SYNCLINE_RUNTIME: 'azure'
    SYNCLINE_SCHEDULE: syncSchedule
    // Reconciliation: its schedule, and the share of each system's daily API allowance one run may spend
    // (per-system allowances as JSON in SYNCLINE_RECONCILE_DAILY_ALLOWANCES, e.g. {"salesforce": 150000}).
    SYNCLINE_RECONCILE_SCHEDULE: reconcileSchedule
    SYNCLINE_RECONCILE_API_SHARE: '0.1'
    SYNCLINE_RECONCILE_DAILY_ALLOWANCE: string(reconcileDailyAllowance)
    SYNCLINE_RECONCILE_DAILY_ALLOWANCES: '{}'
    SYNCLINE_CHECK_SCHEDULE: checkSchedule
    SYNCLINE_WEBHOOK_SECRET: '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.webhookSecret})'
    SYNCLINE_BATCH_SIZE: string(batchSize)
    SYNCLINE_MAX_DELIVERY_COUNT: string(maxDeliveryCount)
    SYNCLINE_LOCK_SECONDS: string(lockSeconds)
    SYNCLINE_INLINE_RETRIES: string(inlineRetries)
    SYNCLINE_SESSION_BUCKETS: string(sessionBuckets)
    SYNCLINE_LEASE_PARTITIONS: string(leasePartitions)
    SYNCLINE_MAX_CONCURRENT_SESSIONS: string(maxConcurrentSessions)
    SYNCLINE_INBOUND_QUEUE: inboundQueueName
    // Circuit breakers (docs/operations.md "Circuit breakers"): the app's defaults, tuned here when needed.
    SYNCLINE_BREAKER_FAILURES: '5'
    SYNCLINE_BREAKER_ERROR_RATE: '0.5'
    SYNCLINE_BREAKER_WINDOW_SECONDS: '60'
    SYNCLINE_BREAKER_MIN_CALLS: '10'
    SYNCLINE_BREAKER_COOLDOWN_SECONDS: '60'
    SYNCLINE_BREAKER_MAX_COOLDOWN_SECONDS: '900'
    SYNCLINE_SERVICEBUS__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace
    SYNCLINE_TABLES__endpoint: storage.properties.primaryEndpoints.table
    SYNCLINE_TABLES__tablePrefix: tablePrefix

    // Dynamics 365 / Dataverse
    DATAVERSE__URL: dataverseUrl
    DATAVERSE__TENANT_ID: dataverseTenantId
    // With the managed identity the client id must stay empty (it would be taken as a user-assigned identity).
    DATAVERSE__CLIENT_ID: dataverseAuth == 'clientSecret' ? dataverseClientId : ''
    DATAVERSE__CLIENT_SECRET: dataverseAuth == 'clientSecret' ? '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.dataverseClientSecret})' : ''
    DATAVERSE__BATCH_SIZE: string(dataverseBatchSize)
    DATAVERSE__MAX_CONCURRENCY: string(dataverseMaxConcurrency)

    // ArcGIS Online. An unresolvable Key Vault reference reaches the app as its literal text, so the secret of
    // the authentication mode not in use is set to '' rather than referenced.
    ARCGIS__SERVICE_URL: arcgisServiceUrl
    ARCGIS__TOKEN_URL: arcgisTokenUrl
    ARCGIS__CLIENT_ID: arcgisClientId
    ARCGIS__CLIENT_SECRET: arcgisAuth == 'appCredentials' ? '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.arcgisClientSecret})' : ''
    ARCGIS__API_KEY: arcgisAuth == 'apiKey' ? '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.arcgisApiKey})' : ''
    ARCGIS__WEBHOOK_SIGNATURE_KEY: '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.arcgisWebhookSignatureKey})'
    ARCGIS__BATCH_SIZE: string(arcgisBatchSize)
    ARCGIS__MAX_CONCURRENCY: string(arcgisMaxConcurrency)

    // Salesforce (client-credentials flow: the consumer secret is required once Salesforce is configured). An
    // empty URL means not configured, and then the secret is '' rather than a reference to a secret nobody set.
    SALESFORCE__MY_DOMAIN_URL: salesforceMyDomainUrl
    SALESFORCE__CLIENT_ID: salesforceClientId
    SALESFORCE__CLIENT_SECRET: empty(salesforceMyDomainUrl) ? '' : '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.salesforceClientSecret})'
    SALESFORCE__API_VERSION: salesforceApiVersion
    SALESFORCE__COLLECTION_SIZE: string(salesforceCollectionSize)
    SALESFORCE__BULK_THRESHOLD: string(salesforceBulkThreshold)
    SALESFORCE__CALL_OPTIONS_CLIENT: salesforceCallOptionsClient

    // Dynamics 365 Finance & Operations (Entra ID like Dataverse; an empty URL means not configured).
    FNO__ENVIRONMENT_URL: fnoEnvironmentUrl
    FNO__TENANT_ID: fnoTenantId
    // With the managed identity the client id must stay empty (it would be taken as a user-assigned identity).
    FNO__CLIENT_ID: fnoAuth == 'clientSecret' ? fnoClientId : ''
    FNO__CLIENT_SECRET: fnoAuth == 'clientSecret' && !empty(fnoEnvironmentUrl) ? '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.fnoClientSecret})' : ''
    FNO__MAX_CONCURRENCY: string(fnoMaxConcurrency)

    // SAP S/4HANA (OData v2). An empty URL means not configured; otherwise only the secret of the authentication
    // mode in use is referenced (the other one is '', not a reference to a secret nobody set).
    SAP__BASE_URL: sapBaseUrl
    SAP__AUTH: sapAuth
    SAP__USER: sapUser
    SAP__PASSWORD: sapAuth == 'basic' && !empty(sapBaseUrl) ? '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.sapPassword})' : ''
    SAP__TOKEN_URL: sapTokenUrl
    SAP__CLIENT_ID: sapClientId
    SAP__CLIENT_SECRET: sapAuth == 'oauth' && !empty(sapBaseUrl) ? '@Microsoft.KeyVault(SecretUri=${secretsUri}${secretNames.sapClientSecret})' : ''
    SAP__SCOPE: sapScope
    SAP__SAP_CLIENT: sapSapClient
    SAP__SYSTEM_TIME_ZONE: sapSystemTimeZone
    SAP__PAGE_SIZE: string(sapPageSize)
    SAP__MAX_CONCURRENCY: string(sapMaxConcurrency)
    SAP__BATCH_SIZE: string(sapBatchSize)
  }
}

output name string = site.name
output id string = site.id
output principalId string = site.identity.principalId
output defaultHostName string = site.properties.defaultHostName
output secretNames object = secretNames
