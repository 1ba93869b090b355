"""End-to-end tests in a real guest kernel under QEMU (see docs/testing.md)."""
