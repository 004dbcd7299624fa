"""Runs NHS England's MESH sandbox (PyPI `mesh-sandbox`) on 127.0.0.1 for the
MESH tests: mutual TLS (client certificates required, signed by --ca),
full `NHSMESH` authentication with --shared-key, and a file store under
--store so that messages survive a restart (the fault tests stop and start
it). The sandbox's canned mailboxes X26ABC1, X26ABC2 and X26ABC3 (password
"password") are the gateway's, a practice's and a prison's.

It stops itself: when its standard input closes (the test that started it
ended, however it ended) and after --lifetime seconds at most. With
--service (the compose `parties` profile, docker/compose.yaml) it runs until
it is stopped, on --host.
"""

import argparse
import os
import sys
import threading


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--shared-key", default="TestKey")
    p.add_argument("--shared-key-file", help="read the shared key from this file instead")
    p.add_argument("--lifetime", type=float, default=900.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--service", action="store_true", help="run until stopped (no stdin watch, no lifetime)")
    args = p.parse_args()
    if args.shared_key_file:
        with open(args.shared_key_file, encoding="utf-8") as f:
            args.shared_key = f.read().strip()

    os.environ["AUTH_MODE"] = "full"
    os.environ["SHARED_KEY"] = args.shared_key
    os.environ["STORE_MODE"] = "file"
    os.environ["MAILBOXES_DATA_DIR"] = args.store

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(1):
                pass
        finally:
            os._exit(0)

    if not args.service:
        threading.Thread(target=watch_stdin, daemon=True).start()
        threading.Timer(args.lifetime, lambda: os._exit(0)).start()

    import ssl

    import uvicorn

    uvicorn.run(
        "mesh_sandbox.api:app",
        host=args.host,
        port=args.port,
        workers=1,
        log_level="warning",
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        ssl_ca_certs=args.ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )


if __name__ == "__main__":
    main()
