"""Feature store: user profiles, offline Parquet snapshots, the online store and segments."""
