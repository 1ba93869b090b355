"""The guest daemon: observe → decide → publish → steer.

``policy`` and ``steer`` are pure functions over snapshots and the config;
``config`` holds the schema of guestagent.toml; ``control`` the control socket;
``report`` the status, hints and capacity documents; ``metrics`` the Prometheus
textfile; ``daemon`` wires the real parts together and runs the loop.
"""
