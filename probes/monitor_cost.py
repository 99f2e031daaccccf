"""`python -m probes.monitor_cost`: what a drift-monitor check costs next to one held-out evaluation
(the command lives in probes.monitor, beside the probe it times)."""
import sys

from .monitor import main

if __name__ == "__main__":
    sys.exit(main())
