"""The machine: configuration, loaders, platforms and the vCPU run loop."""
