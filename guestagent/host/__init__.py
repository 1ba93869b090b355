"""guestagent-host: the reference host peer.

It applies a guest's hints to that VM's QEMU vCPU threads under host limits,
and publishes per-vCPU capacity back. Pure cores (decide, colocation,
capacity) sit behind thin IO edges (discovery, applier, status, peer).
"""
