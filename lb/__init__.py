"""The mesh load balancer: an HTTP/1.1 proxy with consistent hashing, health checks and outlier ejection.

Pure cores (``endpoints``, ``ring``, ``hashing``, ``outlier``, ``health``, ``retry``, ``http1``)
do no I/O; the shells (``proxy``, ``pool``, ``admin``, ``server``) move bytes and call them.
This package imports nothing from the rest of mesh: it has its own :class:`Endpoint` type.
"""
