"""gpujobctl: one module per verb, rendering apart. Never imports the daemon."""
