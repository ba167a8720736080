"""The standard library's threading HTTP server (one thread per connection) with a handler
that spends about 1.5 ms of CPU in `Handler.do_GET` → `render`; and a client that loads it.

  http_server.py serve PORTFILE      serves on 127.0.0.1 (a free port, written to PORTFILE),
                                      prints "ready" (flushed), runs until killed
  http_server.py load PORT N SECONDS  N GET requests, one connection each (so one server
                                      thread each), stopping after SECONDS at the latest;
                                      prints "done COUNT"
"""
import http.client
import http.server
import sys
import time


def render(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"%d\n" % render(25000)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(portfile):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    import os

    os.rename(portfile + ".tmp", portfile)
    print("ready", flush=True)
    srv.serve_forever()


def load(port, n, seconds):
    end = time.monotonic() + seconds
    done = 0
    while done < n and time.monotonic() < end:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/")
        c.getresponse().read()
        c.close()
        done += 1
    print("done", done, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        load(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
