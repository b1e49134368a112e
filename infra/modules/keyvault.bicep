// Key Vault (Azure RBAC authorization) for the connector secrets. The secrets themselves are not deployed:
// operators set them with `az keyvault secret set` (docs/operations.md), so no secret value ever passes through
// a deployment or its history. The Function App reads them through Key Vault references.

@description('Azure region.')
param location string

@description('Vault name (3-24 characters).')
@minLength(3)
@maxLength(24)
param name string

@description('Purge protection cannot be turned off again once on; leave it on outside throw-away environments.')
param enablePurgeProtection bool = true

param tags object = {}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: enablePurgeProtection ? true : null
    publicNetworkAccess: 'Enabled'
  }
}

output name string = vault.name
output id string = vault.id
output uri string = vault.properties.vaultUri
