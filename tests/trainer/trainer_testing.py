"""Helpers shared by the trainer tests (a unique module name: test files import it directly)."""
import copy
import json


def merge(base: dict, over: dict) -> dict:
    """Nested override; a map with another `kind` replaces the component whole (as sweeps do)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        same_kind = isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("kind", out[k].get("kind")) == out[k].get("kind")
        out[k] = merge(out[k], v) if same_kind else v
    return out


def logged_losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "log.jsonl").read_text().splitlines()]


def crash_at(step: int):
    """A context in which `Trainer.train_step` raises KeyboardInterrupt at `step`: the job is killed mid-run."""
    import contextlib

    from trainer.train import Trainer

    @contextlib.contextmanager
    def patched():
        real_step = Trainer.train_step

        def crashing(self, s, batch):
            if s == step:
                raise KeyboardInterrupt
            return real_step(self, s, batch)

        Trainer.train_step = crashing
        try:
            yield
        finally:
            Trainer.train_step = real_step

    return patched()
