"""The training methods of the sidecar (protocol/training.ts): one-line wire wrappers
around nanotune.session.Session, one per sidecar process (ctx.state.session), whose
methods take and return the same generated wire Structs (nanotune.wire).

The schema's constraints (enums, ranges, required fields) are checked when a call
is decoded. Bad input found later (a missing file, a bad row, a call out of order)
raises one of our errors (a NanotuneError, code INVALID_PARAMS) whose message and
data name the field, file or line; the runtime replies with it, and the session
keeps what it had before the failed call.
"""

from __future__ import annotations

from .. import wire
from ..session import Session
from ..sidecar.dispatch import Context, method


def session(ctx: Context) -> Session:
    if ctx.state.session is None:
        # load_model's default: the sidecar's device; in a group, this rank's
        ctx.state.session = Session(device=ctx.state.device, group=ctx.state.group)
    return ctx.state.session


# Each training method of the schema is the Session method of the same name: it takes
# the method's params Struct and returns its result Struct.
SESSION_METHODS = ("load_model", "load_dataset", "create_optimizer", "train_step", "set_mask_policy",
                   "refresh_mask", "get_masks", "sample_weights", "evaluate", "generate", "save_checkpoint", "load_checkpoint")


def _on_session(name: str):
    def handler(ctx: Context, p: wire.Model) -> wire.Model:
        return getattr(session(ctx), name)(p)

    handler.__name__ = handler.__qualname__ = name
    return handler


def _generate(ctx: Context, p: wire.GenerateParams) -> wire.GenerateResult:
    # The one method with more than params: with p.stream, each new piece of text goes to
    # the caller at once as a generate:token event carrying the call's id (so a client
    # tells its calls' streams apart), numbered from 0; the pieces concatenate to the
    # result's text. In a group the other ranks generate too (lockstep), but only rank 0
    # talks to the client: their ctx.emit sends nothing.
    index = 0

    def on_text(text: str) -> None:
        nonlocal index
        ctx.emit("generate:token", wire.GenerateToken(id=ctx.id, index=index, text=text))
        index += 1

    return session(ctx).generate(p, on_text=on_text, check=ctx.check_cancelled)


_SPECIAL = {"generate": _generate}

# In a sidecar group every rank runs them (Note [lockstep calls] in nanotune.distributed).
for _name in SESSION_METHODS:
    method(_name, lockstep=True)(_SPECIAL.get(_name) or _on_session(_name))
