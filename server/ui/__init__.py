"""The dashboard: server-rendered pages under ``/ui/`` with JSON twins, vendored static files."""
