"""The attack table of BENCHMARKS.md ("The event loop for waiting sockets").

    python3 benches/attack.py STAPS_BINARY SOCKETS ADDRESSES silent|trickle

Starts STAPS_BINARY as shipped (its defaults, on 127.0.0.1), then opens
SOCKETS sockets spread over ADDRESSES loopback addresses (127.0.2.2 and on,
bound before connecting), silent or trickling a request head ("GET /", then
a byte a second), and reopens each as staps closes it. From 4 s on, a client
from 127.0.0.1 makes 30 websocket handshakes one after another (5 s deadline
each). Prints how many succeeded, the slowest and the median, and staps'
threads. Loopback only; bounded: it stops after SECONDS. Needs prlimit
(util-linux) and an open files limit of 20 000.
"""
import os, re, resource, selectors, socket, subprocess, sys, tempfile, time
binary, total, addrs, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
SECONDS = 12
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
tmp = tempfile.mkdtemp()
conf = os.path.join(tmp, "staps.conf")
open(conf, "w").write(f"[staps]\nlisten = 127.0.0.1:0\nsecret_file = {tmp}/secret\n")
p = subprocess.Popen(["prlimit", "--nofile=20000:20000", binary, "-c", conf], stderr=subprocess.PIPE, text=True)
port = None
for line in p.stderr:
    m = re.search(r"listening on 127.0.0.1:(\d+)", line)
    if m: port = int(m.group(1))
    if "ready" in line: break
sel = selectors.DefaultSelector()
def opener(i):
    s = socket.socket(); s.setblocking(False)
    s.bind((f"127.0.{2 + i // 250}.{2 + i % 250}", 0))
    try: s.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    return s
per = total // addrs
socks = {}
for a in range(addrs):
    for k in range(per):
        s = opener(a)
        socks[s] = a
        sel.register(s, selectors.EVENT_READ)
time.sleep(0.5)
if mode == "trickle":
    for s in list(socks):
        try: s.send(b"GET /")
        except OSError: pass
def legit():
    t = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            b = s.recv(1024)
            if not b: break
            head += b
        ok = head.startswith(b"HTTP/1.1 101")
        s.close()
        return ok, time.monotonic() - t
    except OSError:
        return False, time.monotonic() - t
results = []
start = time.monotonic(); last_trickle = start
while time.monotonic() - start < SECONDS:
    for key, _ in sel.select(timeout=0.1):
        s = key.fileobj
        try: data = s.recv(4096)
        except OSError: data = b""
        if not data:
            a = socks.pop(s); sel.unregister(s); s.close()
            n = opener(a); socks[n] = a; sel.register(n, selectors.EVENT_READ)
            if mode == "trickle":
                try: n.send(b"GET /")
                except OSError: pass
    if mode == "trickle" and time.monotonic() - last_trickle > 1:
        last_trickle = time.monotonic()
        for s in list(socks):
            try: s.send(b"a")
            except OSError: pass
    if time.monotonic() - start > 4 and len(results) < 30:
        results.append(legit())
ok = [r for r in results if r[0]]
lat = sorted(r[1] for r in ok)
threads = len(os.listdir(f"/proc/{p.pid}/task"))
print(f"{binary}: {total} {mode} sockets over {addrs} addresses: "
      f"{len(ok)} of {len(results)} handshakes, max {max(lat)*1000 if lat else 0:.0f} ms, median {lat[len(lat)//2]*1000 if lat else 0:.0f} ms; server threads {threads}")
p.kill()
