"""The services demo's client: N TCP connections (or UDP requests) to HOST:PORT, then a count of
the answers ("web-1 saw 10.244.1.2": which backend, and which source address it saw)."""
import collections
import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proto = sys.argv[4] if len(sys.argv) > 4 else "tcp"
seen = collections.Counter()
for _ in range(n):
    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=2) as s:
                s.sendall(b"hello\n")
                seen[s.recv(1024).decode().strip()] += 1
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.connect((host, port))
                s.send(b"hello")
                seen[s.recv(2048).decode().strip() + f" (reply from {host})"] += 1
    except OSError as e:
        seen[f"error: {e.__class__.__name__}"] += 1
for answer, count in sorted(seen.items()):
    print(f"  {count:3d} x {answer}")
