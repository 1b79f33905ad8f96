"""What operators read: metric instruments (and, as they are added, Prometheus exposition, dashboards, reports)."""
