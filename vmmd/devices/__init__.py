"""Emulated devices and the buses they sit on."""
