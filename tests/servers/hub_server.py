#!/usr/bin/env python3
"""A Hugging Face Hub-like HTTP server for modelconv's remote-input tests and benchmark.

Standard library only. It serves local directories as model repositories the way the
Hub does, on loopback only:

* ``GET /api/models/ORG/NAME/revision/REV``: ``{"id", "sha", "siblings"}``; REV is
  ``main`` or the commit (a sha1 of the repository's listing).
* ``GET /api/models/ORG/NAME/tree/REV?recursive=true``: every file with its size, git
  oid and, for LFS files (weights, and anything over 1 MB), ``lfs.oid`` (sha256).
* ``GET|HEAD /ORG/NAME/resolve/REV/PATH``: a small file is served directly; an LFS file
  is a 302 to the "storage" server on a *second port* (so a client must drop its
  ``Authorization`` header there, as it must for the Hub's CDN), with ``X-Linked-Etag``
  (the sha256), ``X-Linked-Size`` and ``X-Repo-Commit``.
* ``GET|HEAD /storage/SHA256`` (storage port): the bytes, honouring ``Range``, with an
  ``ETag``.
* Plain files: ``GET|HEAD /files/PATH`` on the main port serves the directory given
  with ``--files`` (for ``https://`` URLs without a Hub), honouring ``Range``.

Repositories can require a token (``--private ORG/NAME``: 401 without
``Authorization: Bearer TOKEN``; ``--gated ORG/NAME``: 403 without it).

Faults (``POST /_control`` with a JSON object, or ``--fault JSON`` at start) act on
body-carrying responses of the storage server and of ``/files``:

* ``{"status": 503, "count": K}``: the next K requests answer 503 (any status works).
* ``{"retry_after": S, "count": K}``: the next K requests answer 429 with
  ``Retry-After: S``; ``/_stats`` records how long the client waited after each.
* ``{"reset_after": N, "count": K}``: the next K bodies are cut after N bytes by a TCP
  reset.
* ``{"reset_every": N}``: each time N more body bytes have been served in all, the
  body being sent is cut by a TCP reset (a client resuming from the byte where it
  stopped makes progress).
* ``{"truncate_after": N, "count": K}``: the next K bodies end cleanly after N bytes (a
  short body under a longer ``Content-Length``).
* ``{"slow_first_byte": S, "count": K}``: the next K requests wait S seconds before the
  status line.
* ``{"stall_after": N, "seconds": S, "count": K}``: the next K bodies stop for S
  seconds after N bytes, then go on.
* ``{"replace_after": N, "path": P}``: once N body bytes have been served in all, the
  file P changes (its last byte flipped, a new ETag and sha256); ``{"replace_on_get":
  K, "path": P}``: it changes before the K-th GET of ``/files/P`` is answered.
* ``{"storage_etag": E, "after": K}``: after K more requests to the storage server, it
  answers with ETag E (a storage object replaced under the same URL).
* ``{"expire_after": K}``: after K more requests to the storage server, the locations
  ``resolve`` gave so far expire (their ``?gen=`` is old: 403), as the Hub's signed
  storage URLs do.
* ``{"rate": B}``: every body byte of every response together at most B bytes a second
  (a link of that speed shared by all connections; 1 MiB steps).
* ``{"clear": true}``: no fault.

``GET /_stats`` returns counters: requests per kind, body bytes served, the
``Authorization`` headers seen by storage, the waits after 429s, the ranges asked.

It prints the two ports on stdout (``PORT STORAGE_PORT``) once listening, and exits
when its standard input closes (so a test that dies takes its server with it).
"""

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_EXT = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
CHUNK = 1 << 20


class Repo:
    """A directory served as a repository: files, their hashes, a commit."""

    def __init__(self, name, root):
        self.name = name
        self.root = root
        self.files = {}
        self.refresh()

    def refresh(self):
        files = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for f in sorted(filenames):
                full = os.path.join(dirpath, f)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if rel.startswith(".") or "/." in rel:
                    continue
                files[rel] = self.describe(full, rel)
        self.files = files
        listing = json.dumps([[k, v["sha256"]] for k, v in sorted(files.items())])
        self.commit = hashlib.sha1(listing.encode()).hexdigest()

    @staticmethod
    def describe(full, rel):
        size = os.path.getsize(full)
        sha = hashlib.sha256()
        blob = hashlib.sha1(b"blob %d\0" % size)
        with open(full, "rb") as fh:
            while True:
                b = fh.read(CHUNK)
                if not b:
                    break
                sha.update(b)
                blob.update(b)
        lfs = rel.endswith(LFS_EXT) or size > 1_000_000
        return {"full": full, "size": size, "sha256": sha.hexdigest(), "oid": blob.hexdigest(), "lfs": lfs}


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.faults = []
        self.reset_every = None
        self.replace = None
        self.rate = None
        self.rate_next = 0.0
        self.new_etag = None
        self.gen = 0
        self.expire_at = None
        self.served = 0
        self.stats = {
            "requests": {},
            "body_bytes": 0,
            "storage_auth": [],
            "retry_after_waits": [],
            "ranges": [],
        }
        self.last_429 = None
        self.repos = {}
        self.by_sha = {}
        self.private = set()
        self.gated = set()
        self.token = None
        self.files_root = None
        self.storage_port = None

    def index(self):
        self.by_sha = {}
        for repo in self.repos.values():
            for rel, d in repo.files.items():
                self.by_sha[d["sha256"]] = d

    def count(self, kind):
        with self.lock:
            self.stats["requests"][kind] = self.stats["requests"].get(kind, 0) + 1

    def take_fault(self, n):
        """The fault for a response of `n` body bytes, if any (a counted one is used up).
        A fault that acts after some bytes only takes a body longer than that."""
        with self.lock:
            for f in self.faults:
                mark = f.get("reset_after", f.get("truncate_after", f.get("stall_after")))
                if mark is not None and n <= int(mark):
                    continue
                if f.get("count", 1) > 0:
                    f["count"] = f.get("count", 1) - 1
                    return dict(f)
            return None

    def add_fault(self, f):
        with self.lock:
            if f.get("clear"):
                self.faults, self.reset_every, self.replace, self.rate = [], None, None, None
                self.new_etag, self.expire_at = None, None
            elif "storage_etag" in f:
                self.new_etag = (str(f["storage_etag"]), int(f.get("after", 0)))
            elif "expire_after" in f:
                self.expire_at = self.stats["requests"].get("storage", 0) + int(f["expire_after"])
            elif "rate" in f:
                self.rate = float(f["rate"])
                self.rate_next = time.monotonic()
            elif "reset_every" in f:
                self.reset_every = int(f["reset_every"])
            elif "replace_after" in f or "replace_on_get" in f:
                self.replace = dict(f)
            else:
                f.setdefault("count", 1)
                self.faults.append(f)

    def storage_etag(self, etag):
        """The ETag a storage response carries: `etag`, or the one a `storage_etag`
        fault gives once its GETs are counted down."""
        with self.lock:
            if self.new_etag is None:
                return etag
            new, after = self.new_etag
            if after > 0:
                self.new_etag = (new, after - 1)
                return etag
            return new

    def pace(self, n):
        """Waits for the slot of `n` more body bytes on the shared link of `rate`."""
        with self.lock:
            if not self.rate:
                return
            now = time.monotonic()
            start = max(now, self.rate_next)
            self.rate_next = start + n / self.rate
        if start > now:
            time.sleep(start - now)

    def served_bytes(self, n):
        """Counts `n` body bytes served; True when a `reset_every` mark was crossed."""
        replace = None
        crossed = False
        with self.lock:
            every = self.reset_every
            if every:
                crossed = (self.served + n) // every > self.served // every
            self.served += n
            self.stats["body_bytes"] += n
            if self.replace and self.served >= self.replace.get("replace_after", float("inf")):
                replace, self.replace = self.replace, None
        if replace:
            self.replace_file(replace["path"])
        return crossed

    def file_get(self, rel):
        """Counts a GET of `rel` under /files; the one a `replace_on_get` names changes
        the file before it is answered."""
        replace = None
        with self.lock:
            self.gets = getattr(self, "gets", {})
            self.gets[rel] = self.gets.get(rel, 0) + 1
            r = self.replace
            if r and "replace_on_get" in r and r["path"] == rel and self.gets[rel] >= r["replace_on_get"]:
                replace, self.replace = r, None
        if replace:
            self.replace_file(rel)

    def replace_file(self, rel):
        if self.files_root and os.path.isfile(os.path.join(self.files_root, rel)):
            full = os.path.join(self.files_root, rel)
            size = os.path.getsize(full)
            with open(full, "r+b") as fh:
                fh.seek(size - 1)
                b = fh.read(1)
                fh.seek(size - 1)
                fh.write(bytes([b[0] ^ 0xFF]))
            return
        for repo in self.repos.values():
            d = repo.files.get(rel)
            if d is None:
                continue
            with open(d["full"], "r+b") as fh:
                fh.seek(d["size"] - 1)
                b = fh.read(1)
                fh.seek(d["size"] - 1)
                fh.write(bytes([b[0] ^ 0xFF]))
            repo.refresh()
            with self.lock:
                old = d["sha256"]
                self.by_sha.pop(old, None)
                self.index()


STATE = State()


def parse_range(header, size):
    """(start, end) inclusive of a single `bytes=` range, None without one, or 'bad'."""
    if not header:
        return None
    if not header.startswith("bytes=") or "," in header:
        return "bad"
    a, _, b = header[6:].partition("-")
    try:
        if a == "":
            n = int(b)
            if n == 0:
                return "bad"
            return (max(0, size - n), size - 1)
        start = int(a)
        end = int(b) if b else size - 1
    except ValueError:
        return "bad"
    if start >= size or end < start:
        return "bad"
    return (start, min(end, size - 1))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-test"

    def log_message(self, fmt, *args):  # quiet
        pass

    # -- helpers ---------------------------------------------------------------

    def send_json(self, code, obj, extra=None):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, code, message, code_name=None):
        extra = {"X-Error-Message": message}
        if code_name:
            extra["X-Error-Code"] = code_name
        self.send_json(code, {"error": message}, extra)

    def authorised(self, repo):
        """None when the request may read `repo`, else the error sent."""
        name = repo.name
        if name not in STATE.private and name not in STATE.gated:
            return True
        auth = self.headers.get("Authorization")
        if auth == f"Bearer {STATE.token}":
            return True
        if name in STATE.gated:
            self.error(403, f"Access to model {name} is restricted. You must have access to it and be authenticated to access it. Please log in.", "GatedRepo")
        else:
            self.error(401, "Invalid username or password.", "RepoNotFound")
        return False

    def repo_and_rev(self, org, name, rev):
        repo = STATE.repos.get(f"{org}/{name}")
        if repo is None:
            self.error(401 if STATE.token else 404, "Repository Not Found", "RepoNotFound")
            return None
        if not self.authorised(repo):
            return None
        if rev not in ("main", repo.commit):
            self.error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return repo

    def send_file(self, d, etag, extra=None):
        """Sends file `d` (or a range of it) with the fault of the moment, if any."""
        size = d["size"]
        rng = parse_range(self.headers.get("Range"), size)
        if rng == "bad":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = (0, size - 1) if rng is None else rng
        n = end - start + 1 if size else 0
        fault = None if self.command == "HEAD" else STATE.take_fault(n)
        if fault and "slow_first_byte" in fault:
            time.sleep(float(fault["slow_first_byte"]))
            fault = None
        if fault and ("status" in fault or "retry_after" in fault):
            code = int(fault.get("status", 429))
            self.send_response(code)
            if "retry_after" in fault:
                self.send_header("Retry-After", str(fault["retry_after"]))
                with STATE.lock:
                    STATE.last_429 = (time.monotonic(), float(fault["retry_after"]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with STATE.lock:
            if STATE.last_429 is not None:
                at, asked = STATE.last_429
                STATE.stats["retry_after_waits"].append([time.monotonic() - at, asked])
                STATE.last_429 = None
        with STATE.lock:
            STATE.stats["ranges"].append([start, n])
        self.send_response(200 if rng is None else 206)
        self.send_header("Content-Length", str(n))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        if rng is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD" or n == 0:
            return
        self.wfile.flush()
        self.body(d["full"], start, n, fault)

    def body(self, full, start, n, fault):
        sock = self.connection
        limit = n
        reset_at = None
        stall = None
        if fault and "reset_after" in fault:
            reset_at = int(fault["reset_after"])
        if fault and "truncate_after" in fault:
            limit = min(n, int(fault["truncate_after"]))
        if fault and "stall_after" in fault:
            stall = (int(fault["stall_after"]), float(fault.get("seconds", 5)))
        every = STATE.reset_every
        paced = STATE.rate is not None
        sent = 0
        with open(full, "rb") as fh:
            while sent < limit:
                step = limit - sent
                for mark in (reset_at, stall and stall[0]):
                    if mark is not None and mark > sent:
                        step = min(step, mark - sent)
                if reset_at is None and stall is None and fault is None:
                    # The plain path: the kernel copies the file into the socket (in
                    # 1 MiB steps when resets are counted).
                    step = min(step, CHUNK if every or paced else 64 << 20)
                    STATE.pace(step)
                    k = os.sendfile(sock.fileno(), fh.fileno(), start + sent, step)
                    if k == 0:
                        break
                else:
                    fh.seek(start + sent)
                    buf = fh.read(min(step, CHUNK))
                    sock.sendall(buf)
                    k = len(buf)
                sent += k
                crossed = STATE.served_bytes(k)
                if (reset_at is not None and sent >= reset_at) or (crossed and sent < n):
                    self.reset()
                    return
                if stall and sent == stall[0]:
                    time.sleep(stall[1])
                    stall = None
        if limit < n:
            # A clean end under the announced length.
            self.close_connection = True
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def reset(self):
        """Ends the connection with a TCP reset."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    # -- routes ------------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        if self.path == "/_control":
            n = int(self.headers.get("Content-Length", "0"))
            STATE.add_fault(json.loads(self.rfile.read(n) or b"{}"))
            self.send_json(200, {"ok": True})
        else:
            self.error(404, "not found")

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
        storage = self.server.server_address[1] == STATE.storage_port
        if storage:
            STATE.count("storage")
            with STATE.lock:
                if self.headers.get("Authorization"):
                    STATE.stats["storage_auth"].append(self.headers.get("Authorization"))
                if STATE.expire_at is not None and STATE.stats["requests"]["storage"] > STATE.expire_at:
                    STATE.gen += 1
                    STATE.expire_at = None
                gen = urllib.parse.parse_qs(url.query).get("gen", ["0"])[0]
                expired = gen != str(STATE.gen)
            if expired:
                STATE.count("expired")
                return self.error(403, "Request has expired")
            if len(parts) == 2 and parts[0] == "storage" and parts[1] in STATE.by_sha:
                d = STATE.by_sha[parts[1]]
                return self.send_file(d, STATE.storage_etag(d["sha256"][:32] + "-storage"))
            return self.error(404, "no such object")
        if url.path == "/_stats":
            with STATE.lock:
                return self.send_json(200, STATE.stats)
        if parts[:1] == ["files"] and STATE.files_root:
            STATE.count("files")
            rel = "/".join(parts[1:])
            full = os.path.realpath(os.path.join(STATE.files_root, rel))
            if not full.startswith(os.path.realpath(STATE.files_root) + os.sep) or not os.path.isfile(full):
                return self.error(404, "no such file")
            if self.command == "GET":
                STATE.file_get(rel)
            st = os.stat(full)
            d = {"full": full, "size": st.st_size}
            return self.send_file(d, f"{st.st_size:x}-{st.st_mtime_ns:x}")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            STATE.count("api")
            org, name, kind, rev = parts[2], parts[3], parts[4], parts[5]
            repo = self.repo_and_rev(org, name, rev)
            if repo is None:
                return
            if kind == "revision":
                return self.send_json(200, {
                    "id": repo.name,
                    "sha": repo.commit,
                    "siblings": [{"rfilename": k} for k in sorted(repo.files)],
                })
            if kind == "tree":
                out = []
                dirs = set()
                for rel, d in sorted(repo.files.items()):
                    segs = rel.split("/")
                    for i in range(1, len(segs)):
                        dirs.add("/".join(segs[:i]))
                    e = {"type": "file", "oid": d["oid"], "size": d["size"], "path": rel}
                    if d["lfs"]:
                        e["lfs"] = {"oid": d["sha256"], "size": d["size"], "pointerSize": 134}
                    out.append(e)
                out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": p} for p in sorted(dirs)]
                return self.send_json(200, out)
            return self.error(404, "not found")
        if len(parts) >= 5 and parts[2] == "resolve":
            STATE.count("resolve")
            org, name, rev = parts[0], parts[1], parts[3]
            repo = self.repo_and_rev(org, name, rev)
            if repo is None:
                return
            rel = "/".join(parts[4:])
            d = repo.files.get(rel)
            if d is None:
                return self.error(404, f"Entry not found: {rel}", "EntryNotFound")
            common = {"X-Repo-Commit": repo.commit}
            if d["lfs"]:
                location = f"http://127.0.0.1:{STATE.storage_port}/storage/{d['sha256']}?gen={STATE.gen}"
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("X-Linked-Etag", f'"{d["sha256"]}"')
                self.send_header("X-Linked-Size", str(d["size"]))
                self.send_header("ETag", f'"{d["oid"]}"')
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            return self.send_file(d, d["oid"], common)
        self.error(404, "not found")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", action="append", default=[], help="ORG/NAME=DIR")
    ap.add_argument("--files", help="a directory served under /files/")
    ap.add_argument("--token")
    ap.add_argument("--private", action="append", default=[])
    ap.add_argument("--gated", action="append", default=[])
    ap.add_argument("--fault", action="append", default=[])
    args = ap.parse_args()
    for spec in args.repo:
        name, _, root = spec.partition("=")
        STATE.repos[name] = Repo(name, root)
    STATE.index()
    STATE.private, STATE.gated, STATE.token = set(args.private), set(args.gated), args.token
    STATE.files_root = args.files
    for f in args.fault:
        STATE.add_fault(json.loads(f))
    main_srv = Server(("127.0.0.1", 0), Handler)
    storage_srv = Server(("127.0.0.1", 0), Handler)
    STATE.storage_port = storage_srv.server_address[1]
    for s in (main_srv, storage_srv):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(main_srv.server_address[1], STATE.storage_port, flush=True)
    # Until the parent goes away.
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
