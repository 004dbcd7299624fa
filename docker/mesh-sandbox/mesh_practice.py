"""A simulated GP practice on MESH (compose `parties` profile): reads its
mailbox with NHS England's `mesh-client` every few seconds and acknowledges
each message, logging only headers (workflow id, local id, size), never the
document. The gateway then marks the delivery DELIVERED."""

import argparse
import json
import sys
import time

import mesh_client


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--url", "--mailbox", "--cert", "--key", "--ca", "--password-file", "--shared-key-file"):
        p.add_argument(name, required=True)
    p.add_argument("--every", type=float, default=5.0)
    args = p.parse_args()
    password = open(args.password_file, encoding="utf-8").read().strip()
    shared_key = open(args.shared_key_file, encoding="utf-8").read().strip().encode()
    while True:
        try:
            with mesh_client.MeshClient(
                args.url, args.mailbox, password, shared_key=shared_key,
                cert=(args.cert, args.key), verify=args.ca,
            ) as client:
                for message_id in client.list_messages():
                    message = client.retrieve_message(message_id)
                    headers = {k.lower().removeprefix("mex-"): v for k, v in message.mex_headers()}
                    size = len(message.read())
                    message.acknowledge()
                    print(json.dumps({
                        "event": "acknowledged", "message_id": message_id,
                        "workflow_id": headers.get("workflowid"), "local_id": headers.get("localid"),
                        "bytes": size,
                    }), flush=True)
        except Exception as e:  # a sandbox not up yet, or restarting: try again
            print(json.dumps({"event": "retry", "error": type(e).__name__}), file=sys.stderr, flush=True)
        time.sleep(args.every)


if __name__ == "__main__":
    main()
