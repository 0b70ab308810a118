"""The Kubernetes operator: one ``LLMDeployment`` (cleave.dev/v1alpha1) per served model,
reconciled into a ConfigMap plus one Deployment and one Service per role (docs/operator.md).

``spec`` reads a resource's spec (defaults, checks, the replica plan within the budget),
``children`` builds the owned objects, ``handlers`` holds the kopf handlers, ``main`` the
``cleave-operator`` command.
"""
