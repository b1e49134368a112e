// Service Bus namespace (Standard, Entra ID only) with the session-enabled inbound queue.

@description('Azure region.')
param location string

@description('Namespace name (6-50 characters).')
@minLength(6)
@maxLength(50)
param name string

@description('Name of the inbound queue (SYNCLINE_INBOUND_QUEUE).')
param queueName string

@description('Failed attempts before Syncline dead-letters a change (SYNCLINE_MAX_DELIVERY_COUNT); the queue\'s own count is a backstop above it.')
@minValue(1)
@maxValue(2000)
param maxDeliveryCount int

@description('Peek-lock duration in seconds (SYNCLINE_LOCK_SECONDS); Service Bus allows at most 5 minutes.')
@minValue(5)
@maxValue(300)
param lockSeconds int

@description('How long an unprocessed message lives before it expires into the dead-letter sub-queue.')
param messageTimeToLive string = 'P14D'

param tags object = {}

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    // No SAS keys: the app, the CLI and operators authenticate with Entra ID (role assignments in rbac.bicep).
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }

  resource inbound 'queues' = {
    name: queueName
    properties: {
      // One session per record: Service Bus hands a record's changes to one receiver at a time, in order.
      requiresSession: true
      // A backstop, 10 times the attempts (shared/settings.py queue_max_delivery_count): Syncline counts a
      // change's own failed attempts in its state and dead-letters at SYNCLINE_MAX_DELIVERY_COUNT, so locks
      // lost to crashed or killed instances (which Service Bus counts as deliveries) never dead-letter a change.
      maxDeliveryCount: min(maxDeliveryCount * 10, 2000)
      lockDuration: 'PT${lockSeconds}S'
      deadLetteringOnMessageExpiration: true
      defaultMessageTimeToLive: messageTimeToLive
      // Off on purpose: Syncline drops duplicates itself (deterministic message ids + its dedup table), and
      // duplicate detection would silently swallow a dead-letter replay that re-sends the same message id.
      requiresDuplicateDetection: false
      enableBatchedOperations: true
      maxSizeInMegabytes: 1024
    }
  }
}

output namespaceName string = namespace.name
output namespaceId string = namespace.id
output queueName string = namespace::inbound.name
// serviceBusEndpoint is https://<name>.servicebus.windows.net:443/ (cloud-specific suffix included).
output fullyQualifiedNamespace string = replace(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':443/', '')
