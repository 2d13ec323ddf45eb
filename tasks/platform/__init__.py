"""What every stage stands on: settings, the logger, errors, MLflow tracking and registry, datasets,
task runners, the team stack, Kubernetes export.
"""
