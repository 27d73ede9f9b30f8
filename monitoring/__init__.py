"""Monitoring: Evidently drift reports and the retraining trigger."""
