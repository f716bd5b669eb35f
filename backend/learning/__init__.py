"""Continuous learning: durable training jobs, triggers, snapshots, gated promotion of trained
heads."""
