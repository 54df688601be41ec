"""A stand-in for ``python -m sglang.launch_server`` speaking the routes bench_serving and the harness use.

Only for CPU tests of bench/serve.py: /health, /v1/models, /model_info, /server_info,
/flush_cache, /start_profile and streaming /generate (SSE, cumulative text as SGLang
sends it). It prints the log lines the harness parses (pool sizes).
    python fake_sglang_server.py --model-path DIR --port N [--tpot-ms X] [anything else ignored]
"""

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--model-path")
ap.add_argument("--port", type=int)
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--tpot-ms", type=float, default=1.0)
a, _ = ap.parse_known_args()
print(f"max_total_num_tokens=1234, chunked_prefill_size=8192, max_prefill_tokens=16384, max_running_requests=77, "
      f"context_len=10240, available_gpu_mem=1.00 GB", flush=True)


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, obj, code=200):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def do_GET(self):
        if self.path == "/health":
            self._json({})
        elif self.path == "/v1/models":
            self._json({"data": [{"id": a.model_path}]})
        elif self.path == "/model_info":
            self._json({"model_path": a.model_path, "tokenizer_path": a.model_path, "is_generation": True})
        elif self.path == "/server_info":
            self._json({"internal_states": [{"avg_spec_accept_length": None}]})
        else:
            self._json({"error": self.path}, 404)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        if self.path == "/flush_cache":
            self._json({})
            return
        if self.path == "/start_profile":  # a trace as SGLang's profiler writes it: gzipped chrome JSON
            import gzip
            import os

            ev = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in
                  [("nvjet_gemm", 0.0, 30.0), ("_fwd_kernel", 40.0, 10.0), ("rmsnorm_kernel", 45.0, 10.0)]]
            os.makedirs(body["output_dir"], exist_ok=True)
            with gzip.open(os.path.join(body["output_dir"], f"fake-{a.port}.trace.json.gz"), "wt") as f:
                json.dump({"traceEvents": ev}, f)
            self._json({})
            return
        if self.path != "/generate":
            self._json({"error": self.path}, 404)
            return
        out = int(body["sampling_params"]["max_new_tokens"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes):
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        # like a dummy-weight model: every token is a special one (<pad>), so the text stays empty
        # unless the request keeps special tokens (bench_serving only times chunks with text)
        keep = body["sampling_params"].get("skip_special_tokens", True) is False
        text = ""
        for i in range(out):
            time.sleep(a.tpot_ms / 1000)
            text += "<pad>" if keep else ""
            d = {"text": text, "meta_info": {"completion_tokens": i + 1, "prompt_tokens": len(body["input_ids"])}}
            chunk(b"data: " + json.dumps(d).encode() + b"\n\n")
        chunk(b"data: [DONE]\n\n")
        chunk(b"")


ThreadingHTTPServer((a.host, a.port), H).serve_forever()
