"""The serving runtime: EnergyService (what the hooks call), attribution of counter energy to requests, the
engine-core meter, OpenTelemetry export, settings, start-up preflight, and the retraining pairs file."""
