"""`python -m nanotune.sidecar [--endpoint ipc:///tmp/x/sock] [--device auto] [--parent-pid N] [--keys-from-stdin]`

Binds a ROUTER at the endpoint, prints one JSON line `{"ready": <bound endpoint>,
"pid": N}` on stdout, then serves until `shutdown`, SIGTERM, or the parent's death.
Logs go to stderr (NANOTUNE_LOG=DEBUG for every rejected request).

Without --endpoint it binds ipc in a fresh private (0700) temp dir. tcp is always
ZeroMQ CURVE: with --keys-from-stdin the first line on stdin is
`{"curve": {"serverPublicKey", "serverSecretKey", "clientPublicKey"}}` (Z85), the
server's keypair and the one client key it lets in; keys never travel in argv, which
every local user can read. Without keys a tcp endpoint is refused, and a failed ipc
bind has no tcp fallback (docs/protocol.md "Sockets and transports").

Launched by torchrun (`python -m torch.distributed.run ... -m nanotune.sidecar`),
every rank joins the group (nanotune.distributed): rank 0 binds, reads the keys and
prints the ready line; the other ranks follow rank 0 and print nothing on stdout."""
import argparse
import functools
import os
import shutil
import sys
import tempfile

from ..distributed import from_env as join_group
from ..distributed import launched_by_torchrun
from .follower import follow
from .runtime import HANDLER_MODULES, main, method_modules
from .transport import CurveKeys

ap = argparse.ArgumentParser(prog="python -m nanotune.sidecar", description=__doc__.split("\n\n")[0])
ap.add_argument("--endpoint", default=None, help="ZeroMQ endpoint to bind (ipc://PATH, or tcp://HOST:PORT with "
                "--keys-from-stdin); default: ipc in a new private temp dir")
ap.add_argument("--device", default="auto", help="auto (cuda if torch sees a GPU, else cpu), cpu, cuda or cuda:N; "
                "load_model's default device")
ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
ap.add_argument("--keys-from-stdin", action="store_true", help="read the CURVE keys line from stdin (see above)")
ap.add_argument("--backend", default=None, help="under torchrun: the process group's backend (default: nccl on CUDA, "
                "else gloo)")
args = ap.parse_args()

group = None
if launched_by_torchrun():
    try:
        group = join_group(args.device, args.backend)
    except Exception as e:  # noqa: BLE001  one line, not a traceback, for the client's SIDECAR_CRASHED
        sys.exit(f"nanotune.sidecar (rank {os.environ.get('RANK')}): could not join the torchrun group: {e}")
    if group.rank != 0:
        follow(group, args.parent_pid, [*HANDLER_MODULES, *method_modules()])
        sys.stderr.flush()
        os._exit(0)

keys = None
if args.keys_from_stdin:
    try:
        keys = CurveKeys.from_json(sys.stdin.readline())
    except ValueError as e:
        sys.exit(f"nanotune.sidecar: {e}")
endpoint, on_exit = args.endpoint, None
if endpoint is None:
    tmp = tempfile.mkdtemp(prefix="nanotune-")  # mode 0700
    endpoint, on_exit = f"ipc://{os.path.join(tmp, 'sidecar.sock')}", functools.partial(shutil.rmtree, tmp, True)
main(endpoint, args.device if group is None else group.device, args.parent_pid, keys, on_exit, group)
