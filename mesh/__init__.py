"""mesh: a service-mesh sidecar and L7 load balancer on asyncio."""

__version__ = "0.1.0"
