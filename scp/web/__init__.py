"""The node's web side: ``/healthz``, ``/metrics`` and the operator's console (routes in
``app.py``, access in ``auth.py``, templates and vendored static files beside them)."""
