"""Helpers shared by the test modules: stand-ins, real RT threads, scripted links,
snapshot builders and waits. Test modules import these, never each other."""
