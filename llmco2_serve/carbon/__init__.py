"""Carbon: operational intensity (gCO2e/kWh) and the embodied share of the hardware (footprint.py)."""
