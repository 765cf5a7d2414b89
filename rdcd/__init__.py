"""rdcd: image near-duplicate detection with compact descriptors distilled from SSCD (RDCD)."""

__version__ = "0.1.0"
