"""guestagent-host: the reference host peer.

It applies a guest's hints to that VM's QEMU vCPU threads under host limits,
and publishes per-vCPU capacity back. Pure cores (decide, colocation,
capacity) sit behind thin IO edges (discovery, applier, status, peer). It is
built from protocol, transport, guestagent.linux and guestagent.sched, never
from the guest's observer or agent (tests/test_linux_procfs.py checks).
"""
