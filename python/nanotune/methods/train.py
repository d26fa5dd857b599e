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
        ctx.state.session = Session(device=ctx.state.device)  # load_model's default: the sidecar's device
    return ctx.state.session


@method("load_model")
def load_model(ctx: Context, p: wire.LoadModelParams):
    return session(ctx).load_model(p)


@method("load_dataset")
def load_dataset(ctx: Context, p: wire.LoadDatasetParams):
    return session(ctx).load_dataset(p)


@method("create_optimizer")
def create_optimizer(ctx: Context, p: wire.CreateOptimizerParams):
    return session(ctx).create_optimizer(p)


@method("train_step")
def train_step(ctx: Context, p: wire.TrainStepParams):
    ctx.check_cancelled()
    return session(ctx).train_step(p)


@method("set_mask_policy")
def set_mask_policy(ctx: Context, p: wire.SetMaskPolicyParams):
    return session(ctx).set_mask_policy(p)


@method("refresh_mask")
def refresh_mask(ctx: Context, p: wire.RefreshMaskParams):
    return session(ctx).refresh_mask(p)


@method("get_masks")
def get_masks(ctx: Context, p: wire.GetMasksParams):
    return session(ctx).get_masks(p)


@method("evaluate")
def evaluate(ctx: Context, p: wire.EvaluateParams):
    return session(ctx).evaluate(p)


@method("generate")
def generate(ctx: Context, p: wire.GenerateParams):
    return session(ctx).generate(p)


@method("save_checkpoint")
def save_checkpoint(ctx: Context, p: wire.SaveCheckpointParams):
    return session(ctx).save_checkpoint(p)


@method("load_checkpoint")
def load_checkpoint(ctx: Context, p: wire.LoadCheckpointParams):
    return session(ctx).load_checkpoint(p)
