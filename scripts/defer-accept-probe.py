#!/usr/bin/env python3
"""What Linux does when TCP_DEFER_ACCEPT ends: when a connect-only socket is
handed to the process, and what its first read returns. Loopback only.
   python3 scripts/defer-accept-probe.py"""
import socket, time, select
for d in (2,5):
    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, d)
    s.bind(("127.0.0.1",0)); s.listen(16)
    c=socket.create_connection(s.getsockname())
    t0=time.time()
    r,_,_=select.select([s],[],[],30)
    t=time.time()-t0
    if r:
        a,_=s.accept(); a.setblocking(False)
        try: data=a.recv(10)
        except BlockingIOError: data="EAGAIN"
        print(f"defer_accept={d}s: silent socket handed over after {t:.1f}s; first read: {data}")
    else: print(f"defer_accept={d}s: not handed over in 30s")
    c.close(); s.close()
