"""Ray Serve deployments: OpenAI-compatible ingress, engine replicas, page-aware request router.

Entry point: ``deployments.app:build_app`` (the ``import_path`` of serve_config.yaml).
"""
