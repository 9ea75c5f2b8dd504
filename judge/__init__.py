"""Judges that score whole rollouts from their trace, judge jobs, and pattern mining."""
