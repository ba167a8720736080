"""Writes the first 1024 bytes of this interpreter's _PyRuntime (its _Py_DebugOffsets comes
first) to stdout: the fixtures of bpf/src/debug_offsets.rs (see testdata/README.md)."""
import ctypes
import sys

runtime = (ctypes.c_char * 1024).in_dll(ctypes.pythonapi, "_PyRuntime")
sys.stdout.buffer.write(bytes(runtime))
