"""Every SQL statement of the attribution service, one module per area.

Functions take an asyncpg connection (or a pool where they open their own
transaction) and return domain records from ``services.attribution.models``.
"""
