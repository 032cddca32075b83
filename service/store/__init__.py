"""Snapshot stores: where validated ERP snapshots are published and read back.

The backend is chosen by URL (``UPSELL_REDIS_URL``): Redis when set (``redis+cluster://`` for
Redis Cluster), else the in-process store, optionally persisted to a local directory so that
the CLI and the server share it. Between snapshots, inventory deltas (``deltas``) change the
current version's stock in place; every stock figure carries its ``as_of``.
"""
