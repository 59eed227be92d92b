from tests.integration.conversion_env import fraud_service, world, world_without_fraud

__all__ = ["fraud_service", "world", "world_without_fraud"]
