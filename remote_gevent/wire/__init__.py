"""The wire formats both ends speak: control messages (``protocol``) and the
multiplexed tunnel (``mux``), with their codes. Imported by the agent and the console."""
