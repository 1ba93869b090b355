"""guestagent: tells the hypervisor host what the guest's scheduler knows.

``agent`` is the guest daemon and ``observe`` its view of the guest's
scheduler; ``host`` is the reference host peer. Both sides share ``protocol``
(sans-IO codecs), ``transport`` (the IO that moves its bytes), ``linux``
(plumbing) and ``sched`` (the scheduling vocabulary); ``cli`` holds the commands.
"""

__version__ = "0.1.0"
