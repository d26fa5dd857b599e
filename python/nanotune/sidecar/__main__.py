"""`python -m nanotune.sidecar --endpoint ipc:///tmp/x/sock [--device auto] [--parent-pid N]`

Binds a ROUTER at the endpoint (tcp://127.0.0.1:* if ipc is unavailable), prints one
JSON line `{"ready": <bound endpoint>, "pid": N}` on stdout, then serves until
`shutdown`, SIGTERM, or the parent's death. Logs go to stderr (NANOTUNE_LOG=DEBUG
for every rejected request)."""
import argparse

from .runtime import main

ap = argparse.ArgumentParser(prog="python -m nanotune.sidecar", description=__doc__.split("\n\n")[0])
ap.add_argument("--endpoint", default="tcp://127.0.0.1:*", help="ZeroMQ endpoint to bind (ipc://PATH or tcp://HOST:PORT)")
ap.add_argument("--device", default="auto", help="auto (cuda if torch sees a GPU, else cpu), cpu, cuda or cuda:N; "
                "load_model's default device")
ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
args = ap.parse_args()
main(args.endpoint, args.device, args.parent_pid)
