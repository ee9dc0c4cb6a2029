"""Serve a trained policy over openpi's websocket protocol.

    python -m experiments.serve --checkpoint=runs/flow --port=8000
    VLAX_API_KEY=s3cret python -m experiments.serve --checkpoint=runs/flow --host=0.0.0.0   # LAN, with a key
    python -m experiments.serve --checkpoint=runs/flow --rtc --delay_steps=2                # real-time chunking

Binds 127.0.0.1 unless --host says otherwise. The port opens only after every batch size has compiled.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir or checkpoints directory")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "interface to bind (0.0.0.0 for every interface)")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port (0: any free port)")
_API_KEY = flags.DEFINE_string("api_key", None, "refuse connections without 'Authorization: Api-Key <key>' "
                               "(default: $VLAX_API_KEY)")
_SEED = flags.DEFINE_integer("seed", 0, "the policy's noise: request n samples with fold_in(key(seed), n)")
_RTC = flags.DEFINE_boolean("rtc", False, "accept real-time chunking requests (flow and diffusion heads)")
_DELAY = flags.DEFINE_integer("delay_steps", 0, "inference delay in control steps when a request names none")
_MAX_GUIDANCE = flags.DEFINE_float("max_guidance", 5.0, "real-time chunking's guidance clip (beta)")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 1, "micro-batch up to this many concurrent requests (1: off)")
_WINDOW = flags.DEFINE_float("batch_window_ms", 2.0, "how long a micro-batch waits for more requests")
_WORKERS = flags.DEFINE_integer("workers", 2, "inference threads (concurrent sampling calls)")
_PROMPT = flags.DEFINE_string("default_prompt", None, "instruction used when a request has no 'prompt'")
_RESIZE = flags.DEFINE_enum("resize_backend", "tf", ["tf", "jax"], "frame resize: the training pipeline's (tf) "
                            "or JAX's equivalent")
_MAX_MB = flags.DEFINE_float("max_message_mb", 16.0, "largest request accepted (MiB)")
_MAX_CONN = flags.DEFINE_integer("max_connections", 32, "connections served at once")
_PLAN_EVERY = flags.DEFINE_integer("plan_every", None, "a dual-rate policy (Helix): requests between its slow plan "
                                   "steps (default: the policy's own period)")
_PLAN_SYNC = flags.DEFINE_boolean("plan_sync", False, "run a dual-rate policy's plan step before the request that "
                                  "needs it instead of on a background thread")


def build_server():
    """The :class:`PolicyServer` the flags describe (loads and jits the policy; does not warm up)."""
    from vlax.inference import PolicyRunner
    from vlax.serve import PolicyServer, ServedPolicy

    runner = PolicyRunner.from_checkpoint(_CHECKPOINT.value, step=_STEP.value, seed=_SEED.value,
                                          resize_backend=_RESIZE.value)
    policy = ServedPolicy(runner, rtc=_RTC.value, delay_steps=_DELAY.value, max_guidance=_MAX_GUIDANCE.value,
                          max_batch=_MAX_BATCH.value, default_prompt=_PROMPT.value, plan_every=_PLAN_EVERY.value,
                          plan_async=not _PLAN_SYNC.value)
    api_key = _API_KEY.value or os.environ.get("VLAX_API_KEY") or None
    return PolicyServer(policy, host=_HOST.value, port=_PORT.value, api_key=api_key, workers=_WORKERS.value,
                        batch_window_ms=_WINDOW.value, max_message_bytes=int(_MAX_MB.value * (1 << 20)),
                        max_connections=_MAX_CONN.value)


def main(argv):
    del argv
    import logging as std_logging

    std_logging.basicConfig(level=std_logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = build_server()
    meta = server.metadata
    logging.info("policy: %s head, cameras %s, state %d, actions %d x %d, rtc=%s, api key %s", meta["head"],
                 meta["cameras"], meta["state_dim"], meta["action_horizon"], meta["action_dim"], meta["rtc"],
                 "required" if server.api_key else "not required")
    if server.host not in ("127.0.0.1", "localhost", "::1") and not server.api_key:
        logging.warning("serving on %s without an API key: anyone who can reach this port can drive the policy",
                        server.host)
    server.run()


if __name__ == "__main__":
    flags.mark_flag_as_required("checkpoint")
    app.run(main)
