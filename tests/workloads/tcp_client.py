"""Connects to PORT on loopback and plays ping-pong with a counter forever."""

import socket
import sys
import time

sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
n = 0
while True:
    sock.sendall(f"{n}\n".encode())
    reply = sock.recv(64).decode().strip()
    print(f"sent {n} got {reply}", flush=True)
    n += 1
    time.sleep(0.1)
