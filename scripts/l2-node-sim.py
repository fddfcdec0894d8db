#!/usr/bin/env python3
"""A small L2 node for the gateway's proof data API (docs/gateway-api.md). Standard library only.

  serve  plays the node for `proofmesh-gateway --mode client`: answers POST /proof_generation_data
         with the batch files of --batches, one per call (then {"data": null}), and stores what
         the gateway posts to /submit_proof/N in --out.
  push   plays the node for `proofmesh-gateway --mode server`: pushes the batch files of
         --batches to POST /submit_request_for_proofs, polls POST /poll_generated_proofs until
         each is proven or failed, and writes the results to --out.

Results in --out, for batch N (six digits): batch_N.proof (the proof) and batch_N.json (its
summary) when proven, batch_N.error when failed, batch_N.rejected when the gateway refused it;
plus results.jsonl, one line per result or refusal as received (proofs left out).

Every step is printed on stdout, one line each. Exit status: 0 when every batch file of
--batches ended proven; 1 when one failed or was refused; 2 on timeout; 3 on a usage error.

  scripts/l2-node-sim.py serve --listen 127.0.0.1:3320 --batches samples --out proofs --exit-when-done
  scripts/l2-node-sim.py push --gateway http://127.0.0.1:3320 --batches samples --out proofs
"""

import argparse
import base64
import http.server
import json
import os
import socketserver
import struct
import sys
import threading
import time
import urllib.error
import urllib.request

# Batch file layout (core/src/batch.rs): magic "PMBT", format version u16, protocol version
# minor u16 and patch u16, batch number u32, state tree depth u8, reserved u8, prev state root
# 4 x u64; little-endian.
MAGIC = b"PMBT"
PREV_ROOT_OFFSET = 16


def say(*parts):
    print("l2-node-sim:", *parts, flush=True)


def batch_header(data):
    """(batch_number, "0.MINOR.PATCH") read from a batch file's header; ValueError if it is not one."""
    if len(data) < 16 or data[:4] != MAGIC:
        raise ValueError("not a batch file (no PMBT header)")
    minor, patch, number = struct.unpack_from("<HHI", data, 6)
    return number, "0.%d.%d" % (minor, patch)


def load_batches(directory):
    """[(file name, bytes, batch number, protocol version)] of the batch files in a directory, by name."""
    batches = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            number, version = batch_header(data)
        except ValueError as e:
            say("skipping %s: %s" % (name, e))
            continue
        batches.append((name, data, number, version))
    return batches


def request_body(data, number, version):
    return {"batch_number": number, "protocol_version": version, "batch_file": base64.b64encode(data).decode()}


class Results:
    """What arrived, in --out, and whether every expected batch has ended."""

    def __init__(self, out, expected):
        self.out = out
        self.expected = set(expected)
        # Numbers whose rejection is expected from an extra copy (--conflict): it does not end
        # the original batch.
        self.extra_refusals = set()
        # Numbers of extras (--conflict, --malformed) whose rejection has not arrived yet.
        self.awaited_refusals = set()
        self.ended = {}  # batch number -> "proven" | "failed" | "rejected"
        self.lock = threading.Lock()
        self.done = threading.Event()
        os.makedirs(out, exist_ok=True)

    def write(self, name, data):
        tmp = os.path.join(self.out, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.out, name))

    def record(self, number, result):
        """Files one result (a ProofResult, or {"status": "rejected", "error": ...})."""
        status = result.get("status")
        stem = "batch_%06d" % number
        if status == "proven":
            self.write(stem + ".proof", base64.b64decode(result["proof"]))
            self.write(stem + ".json", (json.dumps(result.get("summary"), indent=2) + "\n").encode())
        elif status == "failed":
            self.write(stem + ".error", (str(result.get("error")) + "\n").encode())
        elif status == "rejected":
            self.write(stem + ".rejected", (str(result.get("error")) + "\n").encode())
        line = dict((k, v) for k, v in result.items() if k != "proof")
        line.setdefault("batch_number", number)
        with self.lock:
            with open(os.path.join(self.out, "results.jsonl"), "a") as f:
                f.write(json.dumps(line, sort_keys=True) + "\n")
            if number in self.expected and (status in ("proven", "failed") or
                                            (status == "rejected" and number not in self.extra_refusals)):
                self.ended[number] = status
            if status == "rejected":
                self.awaited_refusals.discard(number)
            if self.expected <= set(self.ended) and not self.awaited_refusals:
                self.done.set()

    def exit_code(self):
        if any(self.ended.get(n) != "proven" for n in self.expected):
            return 1
        return 0


# ------------------------------------------------------------------------------------------ serve


def serve(args):
    batches = load_batches(args.batches)
    queue = [request_body(data, number, version) for (_, data, number, version) in batches]
    if batches and args.duplicate:
        # The first batch again, same bytes: the gateway must not prove it twice.
        queue.insert(1, dict(queue[0]))
    if batches and args.conflict:
        # The first batch's number with other bytes (another previous state root): refused.
        data = bytearray(batches[0][1])
        data[PREV_ROOT_OFFSET] ^= 1
        queue.insert(2 if args.duplicate else 1, request_body(bytes(data), batches[0][2], batches[0][3]))
    if args.malformed:
        # Not a batch file at all, under a number of its own: the gateway posts it back rejected.
        queue.append({"batch_number": args.malformed_number, "protocol_version": "0.1.0",
                      "batch_file": base64.b64encode(b"this is not a batch file").decode()})
    results = Results(args.out, [b[2] for b in batches])
    if batches and args.conflict:
        results.extra_refusals.add(batches[0][2])
        results.awaited_refusals.add(batches[0][2])
    if args.malformed:
        results.awaited_refusals.add(args.malformed_number)
    if not batches and not results.awaited_refusals:
        results.done.set()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"{}")
            except ValueError as e:
                return self.answer(400, {"error": "not JSON: %s" % e})
            if self.path == "/proof_generation_data":
                with lock:
                    data = queue.pop(0) if queue else None
                if data is not None:
                    say("handed out batch %d (%d bytes of base64)" % (data["batch_number"], len(data["batch_file"])))
                return self.answer(200, {"data": data})
            if self.path.startswith("/submit_proof/"):
                try:
                    number = int(self.path[len("/submit_proof/"):])
                except ValueError:
                    return self.answer(404, {"error": "no such batch"})
                status = body.get("status")
                if body.get("batch_number") != number:
                    return self.answer(400, {"error": "batch_number %r does not match the path" % body.get("batch_number")})
                if status == "proven":
                    say("received the proof of batch %d (%d bytes)" % (number, len(base64.b64decode(body.get("proof", "")))))
                else:
                    say("received batch %d %s: %s" % (number, status, body.get("error")))
                results.record(number, body)
                return self.answer(200, {"status": "ok"})
            return self.answer(404, {"error": "no such endpoint"})

    host, port = args.listen.rsplit(":", 1)
    server = socketserver.ThreadingTCPServer((host, int(port)), Handler)
    server.daemon_threads = True
    say("listening on http://%s:%d" % server.server_address[:2])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = time.time() + args.timeout_secs
    try:
        while True:
            if args.exit_when_done and results.done.is_set() and not queue:
                time.sleep(0.2)  # late duplicates' answers
                break
            if time.time() > deadline:
                say("timed out after %d s" % args.timeout_secs)
                return 2
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    code = results.exit_code()
    say("done: %s" % ", ".join("batch %d %s" % (n, results.ended.get(n, "pending")) for n in sorted(results.expected)))
    return code


# ------------------------------------------------------------------------------------------- push


def post(url, body, timeout=60):
    """(HTTP status, JSON answer) of a POST; (None, {"error": ...}) if the gateway cannot be reached."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}
    except (urllib.error.URLError, OSError) as e:
        return None, {"error": str(e)}


def push(args):
    base = args.gateway.rstrip("/")
    batches = load_batches(args.batches)
    results = Results(args.out, [b[2] for b in batches])
    deadline = time.time() + args.timeout_secs
    waiting = {}
    code = 0
    for name, data, number, version in batches:
        while True:
            status, answer = post(base + "/submit_request_for_proofs", request_body(data, number, version))
            if status is not None and status != 503:
                break
            if time.time() > deadline:
                say("timed out pushing %s: %s" % (name, answer.get("error")))
                return 2
            say("gateway not ready for %s (%s): retrying" % (name, answer.get("error")))
            time.sleep(1)
        if status in (200, 202):
            say("pushed %s (batch %d): %d %s, state %s" % (name, number, status, answer.get("status"), answer.get("state")))
            waiting[number] = name
        else:
            say("refused %s (batch %d): %d %s" % (name, number, status, answer.get("error")))
            results.record(number, {"batch_number": number, "status": "rejected", "http_status": status, "error": answer.get("error")})
            code = 1
    while waiting:
        for number in sorted(waiting):
            status, answer = post(base + "/poll_generated_proofs", {"batch_number": number})
            state = answer.get("status")
            if status == 200 and state == "proven":
                say("batch %d proven: %d bytes of proof" % (number, len(base64.b64decode(answer["proof"]))))
            elif status == 200 and state == "failed":
                say("batch %d failed: %s" % (number, answer.get("error")))
                code = 1
            elif status == 200 or status is None or status == 503:
                continue
            else:
                say("poll of batch %d refused: %s %s" % (number, status, answer.get("error")))
                answer = {"batch_number": number, "status": "failed", "error": "poll: %s %s" % (status, answer.get("error"))}
                code = 1
            results.record(number, answer)
            del waiting[number]
        if waiting:
            if time.time() > deadline:
                say("timed out after %d s waiting for batch(es) %s" % (args.timeout_secs, ", ".join(map(str, sorted(waiting)))))
                return 2
            time.sleep(args.poll_interval_ms / 1000.0)
    say("done: %s" % ", ".join("batch %d %s" % (n, results.ended.get(n, "pending")) for n in sorted(results.expected)))
    return code if code else results.exit_code()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="play the node for --mode client")
    s.add_argument("--listen", default="127.0.0.1:3320", help="HOST:PORT; port 0 picks a free one (printed)")
    s.add_argument("--batches", required=True, help="directory of batch files, handed out by name")
    s.add_argument("--out", required=True, help="directory the results are written to")
    s.add_argument("--duplicate", action="store_true", help="hand out the first batch twice (same bytes)")
    s.add_argument("--conflict", action="store_true", help="hand out the first batch's number with other bytes")
    s.add_argument("--malformed", action="store_true", help="hand out bytes that are not a batch file")
    s.add_argument("--malformed-number", type=int, default=999999, help="the batch number of --malformed")
    s.add_argument("--exit-when-done", action="store_true", help="exit once every batch has a result")
    s.add_argument("--timeout-secs", type=int, default=3600)
    p = sub.add_parser("push", help="play the node for --mode server")
    p.add_argument("--gateway", default="http://127.0.0.1:3320", help="the gateway's URL")
    p.add_argument("--batches", required=True, help="directory of batch files, pushed by name")
    p.add_argument("--out", required=True, help="directory the results are written to")
    p.add_argument("--poll-interval-ms", type=int, default=500)
    p.add_argument("--timeout-secs", type=int, default=3600)
    args = parser.parse_args()
    if not os.path.isdir(args.batches):
        say("--batches %s is not a directory" % args.batches)
        return 3
    return serve(args) if args.command == "serve" else push(args)


if __name__ == "__main__":
    sys.exit(main())
