"""rdcd: image near-duplicate detection with compact descriptors distilled from SSCD (RDCD)."""

from rdcd.runtime import apply_local_defaults

# Before anything imports ray: keeps an embedded local Ray on 127.0.0.1 and the hub offline.
apply_local_defaults()

__version__ = "0.1.0"
