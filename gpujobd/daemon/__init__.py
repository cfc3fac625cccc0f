"""The daemon: the composition root (main), the core (manager, store, spawner, …) and its adapters."""
