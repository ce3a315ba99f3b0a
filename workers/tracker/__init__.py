"""The scheduler actor: one named LoadTracker per cluster that holds every replica's load."""
