"""Envoy's external processing service (``envoy.service.ext_proc.v3.ExternalProcessor``): runs the
mesh's Python processors (``xdsd.processing``) for Envoy, off the event loop."""
