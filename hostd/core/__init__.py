"""The pure core: formats, validation and decisions. No I/O, no clock, no randomness."""
