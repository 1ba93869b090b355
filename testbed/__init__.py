"""Real machines for tests and benchmarks: QEMU guests, guest images, host daemons.

Not part of the product and not installed: the test suite and ``bench/`` both
import it from the repository root, so neither imports the other.
"""
