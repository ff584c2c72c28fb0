"""An HTTP proxy in front of a real server that injects the faults of a hostile environment: an
error answer (a `Fault`) or a dropped connection.

Which requests: every Nth (`fail_every`, `reset_every`), the way a throttled or overloaded S3
store answers 503 SlowDown or drops a connection; or, in turn, the first ones as a `script`
says: "fail" answers the fault, "lose" forwards the request and answers the fault in place of
the server's reply (the server acted, the client was told it failed). `only` (method, path)
confines faults and counting to those requests; the rest, and all others, pass through.
`delay` seconds are waited before forwarding every `delay_every`-th request (every one by
default; only those `only` names, when given): a store that answers slowly.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Fault:
    status: int
    content_type: str
    body: bytes


SLOW_DOWN = Fault(503, "application/xml", b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                                          b"<Message>Please reduce your request rate.</Message></Error>")
# A Ray head's answer to a job submission until its job agent has registered (Ray 2.60, as captured)
NO_AGENT = Fault(500, "text/plain; charset=utf-8", b"No available agent to submit job, please try again later.")


class FlakyProxy:
    def __init__(self, upstream: str, fail_every: int | None = None, reset_every: int | None = None,
                 fault: Fault = SLOW_DOWN, script: tuple[str, ...] = (), only: tuple[str, str] | None = None,
                 delay: float = 0.0, delay_every: int = 1):
        host, port = upstream.removeprefix("http://").split(":")
        counter, every, lock = itertools.count(1), itertools.count(1), threading.Lock()
        self.seen = self.failed = self.reset = 0
        proxy = self

        def action(n: int) -> str:
            if n <= len(script):
                return script[n - 1]
            if reset_every and n % reset_every == 0:
                return "reset"
            return "fail" if fail_every and n % fail_every == 0 else "pass"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    n_all = next(every)
                todo = "pass"
                if only is None or (self.command, self.path) == only:
                    with lock:
                        n = next(counter)
                        proxy.seen += 1
                    todo = action(n)
                if todo == "reset":
                    proxy.reset += 1
                    self.close_connection = True
                    self.connection.close()  # no answer at all: a dropped connection
                    return
                if todo == "fail":
                    proxy.failed += 1
                    return self._answer(fault.status, [("Content-Type", fault.content_type)], fault.body)
                if delay and n_all % delay_every == 0 and (only is None or (self.command, self.path) == only):
                    time.sleep(delay)
                answer = self._upstream(body)
                if todo == "lose":
                    proxy.failed += 1
                    return self._answer(fault.status, [("Content-Type", fault.content_type)], fault.body)
                self._answer(*answer)

            def _upstream(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                headers = [(key, value) for key, value in response.getheaders()
                           if key.lower() not in ("transfer-encoding", "connection", "content-length")]
                return response.status, headers + [("Content-Length", length or str(len(data)))], data

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                if not any(key.lower() == "content-length" for key, _ in headers):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()

    def __enter__(self) -> "FlakyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
