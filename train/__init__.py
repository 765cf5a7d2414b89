"""RDCD distillation on Ray Train."""
