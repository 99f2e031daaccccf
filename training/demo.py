"""`make demo`: the whole study on the embedded world, on a CPU (lands with the embedded-world issue)."""
import sys

if __name__ == "__main__":
    print("make demo: not yet - the embedded world and the sequential loop are still being built.")
    sys.exit(0)
