"""The raw baseline for bench/bridge.ts: a pyzmq ROUTER that sends every message
straight back (zero-copy), no msgpack, no threads. Prints its endpoint, like the sidecar."""
import os
import sys

import zmq

sock = zmq.Context.instance().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
print(sock.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
parent = os.getppid()
poller = zmq.Poller()
poller.register(sock, zmq.POLLIN)
while os.getppid() == parent:
    if poller.poll(200):
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
