"""Prints "ready", sleeps argv[1] seconds, exits 0. A target that exits mid-recording."""
import sys
import time

print("ready", flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 1)
