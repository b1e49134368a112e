// One storage account, identity-only (no shared keys): the Functions host (AzureWebJobsStorage__accountName),
// the Flex Consumption deployment container, and the Syncline state tables (SYNCLINE_TABLES__endpoint).

@description('Azure region.')
param location string

@description('Storage account name (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param name string

@description('Blob container the Flex Consumption plan deploys the app package to.')
param deploymentContainerName string

@description('Prefix of the Syncline tables (SYNCLINE_TABLES__tablePrefix): letters and digits only.')
param tablePrefix string

param tags object = {}

// The tables TableStateStore uses (docs/state-tables.md). It also creates them on first use; creating them
// here makes them visible from the first deployment on and keeps the names in one reviewed place.
var tableSuffixes = [
  'links'
  'snapshots'
  'checkpoints'
  'dedup'
  'audit'
  'auditkeys'
  'failures'
  'leases'
]

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
  }

  resource blobService 'blobServices' = {
    name: 'default'

    resource deploymentContainer 'containers' = {
      name: deploymentContainerName
      properties: {
        publicAccess: 'None'
      }
    }
  }

  resource tableService 'tableServices' = {
    name: 'default'
  }
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [for suffix in tableSuffixes: {
  parent: account::tableService
  name: '${tablePrefix}${suffix}'
}]

output name string = account.name
output id string = account.id
output blobEndpoint string = account.properties.primaryEndpoints.blob
output tableEndpoint string = account.properties.primaryEndpoints.table
output tableNames array = [for suffix in tableSuffixes: '${tablePrefix}${suffix}']
