from tests.e2e.world import live

__all__ = ["live"]
