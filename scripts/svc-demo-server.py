"""A tiny backend for the services demo: answers each TCP connection on :8080 and each UDP
datagram on :5353 with its name and the peer address it saw (so the demo shows SNAT), then
exits after --seconds. Standard library only."""
import socket
import sys
import threading
import time

name, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 60.0


def tcp():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080))
    s.listen(64)
    while True:
        c, a = s.accept()
        with c:
            c.settimeout(2)
            try:
                c.recv(1024)
                c.sendall(f"{name} saw {a[0]}\n".encode())
            except OSError:
                pass


def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 5353))
    while True:
        d, a = u.recvfrom(2048)
        u.sendto(f"{name} saw {a[0]}".encode(), a)


for f in (tcp, udp):
    threading.Thread(target=f, daemon=True).start()
time.sleep(seconds)
