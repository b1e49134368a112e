// Every role assignment of the deployment, by role NAME. `roleIds` is the one place that maps a built-in role's
// name to its definition id (the ids are the same in every tenant); tests/infra/test_bicep.py checks that each
// assignment names a role from this table.

@description('Principal id of the Function App\'s system-assigned identity.')
param appPrincipalId string

@description('Optional: an operator user or group that sets secrets and runs `syncline dlq ...` from a workstation.')
param operatorPrincipalId string = ''

@description('Type of operatorPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'Group'

@description('Storage account of the host and of the Syncline tables.')
param storageAccountName string

@description('Service Bus namespace of the inbound queue.')
param serviceBusNamespaceName string

@description('The inbound queue.')
param queueName string

@description('Key Vault holding the connector secrets.')
param keyVaultName string

@description('Grant the app Manage on the inbound queue (Data Owner, queue scope only): /api/health and the dead-letter depth metric read the queue\'s runtime properties, which needs Manage.')
param grantQueueRuntimeRead bool = true

var roleIds = {
  'Azure Service Bus Data Sender': '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  'Azure Service Bus Data Receiver': '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  'Azure Service Bus Data Owner': '090c5cfd-751d-490a-894a-3ce6f1109419'
  'Storage Table Data Contributor': '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  'Storage Blob Data Owner': 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  'Storage Queue Data Contributor': '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  'Key Vault Secrets User': '4633458b-17de-408a-b874-0445c86b69e6'
  'Key Vault Secrets Officer': 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
}

var hasOperator = !empty(operatorPrincipalId)

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' existing = {
  name: serviceBusNamespaceName

  resource queue 'queues' existing = {
    name: queueName
  }
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// ---- The Function App's identity ------------------------------------------------------------------------------

// Host storage (timer locks, deployment package, host queues) and the Syncline state tables.
resource appStorage 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in [
  'Storage Blob Data Owner'
  'Storage Queue Data Contributor'
  'Storage Table Data Contributor'
]: {
  name: guid(storage.id, appPrincipalId, roleIds[role])
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[role])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

// Send (webhooks, poll, retries) and receive/settle (controller) on the inbound queue only.
resource appQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in [
  'Azure Service Bus Data Sender'
  'Azure Service Bus Data Receiver'
]: {
  name: guid(namespace::queue.id, appPrincipalId, roleIds[role])
  scope: namespace::queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[role])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

resource appQueueRuntime 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (grantQueueRuntimeRead) {
  name: guid(namespace::queue.id, appPrincipalId, roleIds['Azure Service Bus Data Owner'])
  scope: namespace::queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Azure Service Bus Data Owner'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Resolve the Key Vault references in the app settings.
resource appSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, roleIds['Key Vault Secrets User'])
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Key Vault Secrets User'])
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ---- The operator (optional) ----------------------------------------------------------------------------------

resource operatorSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (hasOperator) {
  name: guid(vault.id, operatorPrincipalId, roleIds['Key Vault Secrets Officer'])
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Key Vault Secrets Officer'])
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

// `syncline dlq list|replay` and `syncline status` against Azure: the queue (incl. its dead-letter sub-queue
// and runtime properties) and the state tables.
resource operatorQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (hasOperator) {
  name: guid(namespace::queue.id, operatorPrincipalId, roleIds['Azure Service Bus Data Owner'])
  scope: namespace::queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Azure Service Bus Data Owner'])
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

resource operatorTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (hasOperator) {
  name: guid(storage.id, operatorPrincipalId, roleIds['Storage Table Data Contributor'])
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Storage Table Data Contributor'])
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}
