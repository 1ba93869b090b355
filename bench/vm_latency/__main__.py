import sys

from bench.vm_latency.run import main

sys.exit(main())
