"""The chaos suite: a worker fleet under injected faults, checked by an independent observer."""
