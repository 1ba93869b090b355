"""guestagent: tells the hypervisor host what the guest's scheduler knows."""

__version__ = "0.1.0"
