// Azure Monitor workbook over the app's `syncline.*` custom metrics and controller traces. The workbook content
// lives in workbook.json (edit it in the portal's Advanced Editor, paste it back there).

@description('Azure region.')
param location string

@description('Display name shown in Azure Monitor > Workbooks.')
param displayName string

@description('Application Insights component the queries run against.')
param appInsightsName string

param tags object = {}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource workbook 'Microsoft.Insights/workbooks@2022-04-01' = {
  // A workbook's resource name must be a GUID; this one is stable per component and display name.
  name: guid(appInsights.id, displayName)
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    version: 'Notebook/1.0'
    sourceId: appInsights.id
    serializedData: loadTextContent('workbook.json')
  }
}

output id string = workbook.id
