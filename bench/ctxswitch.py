"""A context-switch-heavy pair for bench.py's `offcpu` section.

server SOCKET        echo server over a Unix socket: one request (16 bytes) in, the same out;
                     blocks in recv between requests (a context switch per request). Prints
                     "ready" once listening.
client SOCKET RATE SECONDS
                     sends RATE requests per second for SECONDS (paced, one round trip each),
                     then prints "sent N rate R p50_us P p99_us Q".
"""
import socket
import sys
import time


def server(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        while True:
            b = c.recv(64)
            if not b:
                break
            c.sendall(b)
        c.close()


def client(path, rate, seconds):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    n = int(rate * seconds)
    lat = []
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        now = time.perf_counter()
        if due > now + 0.0002:
            time.sleep(due - now)
        t = time.perf_counter()
        c.sendall(b"x" * 16)
        c.recv(64)
        lat.append(time.perf_counter() - t)
    took = time.perf_counter() - start
    lat.sort()
    print("sent %d rate %.0f p50_us %.1f p99_us %.1f" % (
        n, n / took, lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        client(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
