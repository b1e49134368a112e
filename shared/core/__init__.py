"""The pure core: change envelopes, the error tree, ports, the engine and the controller (no I/O, no SDK)."""
