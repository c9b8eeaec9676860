"""Model conversion: export, quantise, evaluate, fit to targets, build signed bundles."""
