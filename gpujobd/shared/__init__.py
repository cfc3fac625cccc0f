"""What the daemon, the client and the CLI agree on: the job model, errors, the D-Bus contract, the
submit options (spec), config, logging.

Imports nothing else of gpujobd (checked in `make lint`)."""
