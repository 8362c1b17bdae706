"""``python tests/fault_driver.py FAULT -- TRAIN_ARGS...``: runs ``capsjax-train`` and kills itself with SIGKILL at a
chosen point, for the fault-injection tests.

FAULT is ``none``, ``step:N`` (after the N-th train step of this process), ``save:N:SECONDS`` (SECONDS into the N-th
checkpoint save, i.e. inside it), ``eval:N`` (at the start of the N-th evaluation, e.g. an epoch's validation) or
``sigterm:N`` (sends itself SIGTERM after the N-th step and lets the run stop cleanly).
"""

import os
import signal
import sys
import threading

FAULT, ARGS = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]


def _kill(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)


def _after_calls(owner, name, n, action):
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            return action(original, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def main() -> int:
    import capsjax.train as train
    from capsjax import checkpoint, cli, steps

    kind, *params = FAULT.split(":")
    if kind in ("step", "sigterm"):
        n, sig = int(params[0]), signal.SIGKILL if kind == "step" else signal.SIGTERM
        make = steps.make_steps

        def make_and_wrap(*args, **kwargs):
            compiled = make(*args, **kwargs)
            state = {"n": 0}

            def train_step(*a):
                out = compiled.train(*a)
                state["n"] += 1
                if state["n"] == n:
                    if sig == signal.SIGKILL:
                        import jax

                        jax.block_until_ready(out)
                    _kill(sig)
                return out

            import dataclasses

            return dataclasses.replace(compiled, train=train_step)

        train.make_steps = make_and_wrap
    elif kind == "save":

        def save_and_die(original, *args, **kwargs):
            threading.Timer(float(params[1]), _kill).start()
            original(*args, **kwargs)
            _kill()  # the save finished before the timer: die right after it

        _after_calls(checkpoint.Checkpoints, "save", int(params[0]), save_and_die)
    elif kind == "eval":
        _after_calls(train, "evaluate_arrays", int(params[0]), lambda original, *a, **k: _kill())
    elif kind != "none":
        raise SystemExit(f"unknown fault {FAULT}")
    return cli.train_main(ARGS, prog="capsjax-train")


if __name__ == "__main__":
    sys.exit(main())
