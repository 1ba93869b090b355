"""Guest and host latency benchmark in a real QEMU guest (see run.py)."""
