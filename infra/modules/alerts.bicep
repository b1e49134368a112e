// Alerts to an existing action group: dead letters, the controller missing or failing a cycle, function failures,
// reconciliation drift, a circuit breaker opening, choice-domain drift.
// docs/operations.md ("Alerts") says what each one means and where to look first.

@description('Azure region of the log alerts (metric alerts are global).')
param location string

@description('Prefix of the alert rule names.')
param namePrefix string

@description('Resource id of the action group that receives every alert.')
param actionGroupId string

@description('Application Insights component of the Function App.')
param appInsightsName string

@description('Service Bus namespace of the inbound queue.')
param serviceBusNamespaceName string

@description('The inbound queue (the dead-letter alert watches its dead-letter sub-queue).')
param queueName string

@description('Name of the controller timer function.')
param controllerFunctionName string = 'sync_controller'

@description('Alert when no controller cycle succeeded for this many minutes (two missed 15-minute cycles + slack).')
@minValue(10)
@maxValue(1440)
param controllerSilenceMinutes int = 35

param tags object = {}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' existing = {
  name: serviceBusNamespaceName
}

// ---- Dead-letter depth above zero (platform metric, per queue) ------------------------------------------------

resource deadLetters 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-dead-letters'
  location: 'global'
  tags: tags
  properties: {
    description: 'Messages are in the dead-letter sub-queue of ${queueName}. Run `syncline dlq list` (or Service Bus Explorer), read DeadLetterReason, follow its runbook entry in docs/operations.md, then replay.'
    severity: 2
    enabled: true
    scopes: [
      namespace.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'DeadletteredMessages'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                queueName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Maximum'
        }
      ]
    }
    autoMitigate: true
    actions: [
      {
        actionGroupId: actionGroupId
      }
    ]
  }
}

// ---- Controller: no successful cycle in `controllerSilenceMinutes` ---------------------------------------------

// A success is the timer invocation succeeding (requests) or the controller's own "controller cycle ok" log line
// (traces), whichever arrives; `summarize` over nothing still yields one row with 0, which fires the alert.
var controllerSilentQuery = '''
let silence = {SILENCE}m;
union
  (requests | where operation_Name == '{FUNCTION}' and success == true | project timestamp),
  (traces | where message startswith 'controller cycle ok' | project timestamp)
| where timestamp > ago(silence)
| summarize succeeded = count()
| where succeeded == 0
'''

resource controllerSilent 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-controller-missing'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: sync controller has not completed a cycle in ${controllerSilenceMinutes} minutes'
    description: 'No successful ${controllerFunctionName} run in ${controllerSilenceMinutes} minutes: the timer is not firing (app stopped, deployment broken, SYNCLINE_SCHEDULE wrong) or every cycle fails.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: replace(replace(controllerSilentQuery, '{SILENCE}', string(controllerSilenceMinutes)), '{FUNCTION}', controllerFunctionName)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

// ---- Controller: any failed cycle ----------------------------------------------------------------------------

var controllerFailedQuery = '''
union
  (requests | where operation_Name == '{FUNCTION}' and success == false | project timestamp, detail = resultCode),
  (traces | where message startswith 'controller cycle failed' | project timestamp, detail = message)
'''

resource controllerFailed 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-controller-failed'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: sync controller cycle failed'
    description: 'A ${controllerFunctionName} invocation failed or logged "controller cycle failed". The exception / trace text names the reason.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: replace(controllerFailedQuery, '{FUNCTION}', controllerFunctionName)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

// ---- Any other function failing (webhooks, health) -----------------------------------------------------------

var functionFailuresQuery = '''
requests
| where success == false
| where operation_Name != '{FUNCTION}'
| project timestamp, operation_Name, resultCode
'''

resource functionFailures 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-function-failures'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: function invocations failing'
    description: 'Invocations of dataverse_webhook, arcgis_webhook or health failed (HTTP 5xx or an unhandled exception), per function. The controller has its own alerts.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: replace(functionFailuresQuery, '{FUNCTION}', controllerFunctionName)
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'operation_Name'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

// ---- Reconciliation found drift (issue 17 item 2) ----------------------------------------------------------------

// The reconcile timer records each flow's drift as the gauge syncline.reconcile_drift and the log line
// "reconciliation drift <n> in flow <flow>" (shared/runtime/telemetry.py); the latest figure per flow counts, so
// a later clean run (drift 0) resolves the alert. Either source suffices (traces may be sampled).
var reconcileDriftQuery = '''
union
  (customMetrics | where name == 'syncline.reconcile_drift'
    | project timestamp, flow = tostring(customDimensions['flow']), drift = toint(value)),
  (traces | where message startswith 'reconciliation drift '
    | parse message with 'reconciliation drift ' drift:int ' in flow ' flow:string
    | project timestamp, flow, drift)
| summarize arg_max(timestamp, drift) by flow
| where drift > 0
'''

resource reconcileDrift 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-reconcile-drift'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: reconciliation found drift'
    description: 'The last reconciliation of a flow found records missing, drifted or with a half-applied cascade (dead-lettered records excluded). Run `syncline reconcile --flow <flow>` to see the keys, then `--repair`; docs/operations.md ("Reconciliation drift").'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'P1D'
    criteria: {
      allOf: [
        {
          query: reconcileDriftQuery
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'flow'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

// ---- A circuit breaker opened (issue 17 item 3) ---------------------------------------------------------------
// The breakers log "circuit breaker of <system> opened until <time>: <cause>" (shared/core/controller/breakers.py)
// on every opening, from the controller and the webhook functions alike; one alert per system.

var breakerOpenedQuery = '''
traces
| where message startswith 'circuit breaker of ' and message has ' opened until '
| parse message with 'circuit breaker of ' system ' opened until ' probe_at ': ' cause
| project timestamp, system, probe_at, cause
'''

resource breakerOpened 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-breaker-opened'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: a circuit breaker opened'
    description: 'A connected system failed repeatedly (outage, 5xx, timeouts) or spent its API allocation; Syncline stopped calling it and its changes wait on the queue, scheduled for the probe. See docs/operations.md "Circuit breakers".'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: breakerOpenedQuery
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'system'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

// ---- Choice-domain drift (issue 17 item 4): the daily check found a value that would fail ---------------------

@description('Name of the choice-domain drift check timer function.')
param checkFunctionName string = 'choice_check'

// The check logs one "choice drift: ..." line per error (a value without a mapping, a mapping to a value that is
// gone); it runs daily, so an hourly look at the last hour sees each run once.
var choiceDriftQuery = '''
traces
| where operation_Name == '{FUNCTION}' and message startswith 'choice drift:'
| project timestamp, message
'''

resource choiceDrift 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-choice-drift'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: a choice value would fail a sync'
    description: 'The ${checkFunctionName} check found an option, coded value, picklist value or enum member without a mapping, or a mapping to a value that no longer exists. Run `syncline check` and follow docs/operations.md (Choice-domain drift).'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: replace(choiceDriftQuery, '{FUNCTION}', checkFunctionName)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroupId
      ]
    }
  }
}

output alertIds array = [
  deadLetters.id
  controllerSilent.id
  controllerFailed.id
  functionFailures.id
  reconcileDrift.id
  breakerOpened.id
  choiceDrift.id
]
