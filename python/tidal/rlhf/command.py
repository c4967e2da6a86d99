"""``tidal rlhf sft|rm|ppo|grpo --config FILE``: one role's run from a JSON config.

The config::

    {"model": "DIR",                  # the Hugging Face model to start from
     "out": "DIR",                    # checkpoints (OUT/checkpoints, sharded) and the final export (OUT/model)
     "data": "FILE.jsonl",            # sft: prompt/completion, messages or text rows; rm: prompt?/chosen/rejected;
                                      # ppo, grpo: rows with a "prompt"
     "reward": "module:function",     # ppo, grpo: one or a list of importable reward functions
     "steps": 100,                    # train to this optimizer step (sft, rm: at most; the epochs may end first)
     "save_interval": 50,             # a checkpoint every N steps (and always at the end); a run started
                                      # again with the same OUT resumes from the latest one
     "args": {...}}                   # the role's config (SFTConfig, RewardConfig, PPOConfig, GRPOConfig fields),
                                      # with "train": the DeepSpeed-style config of its training engine

A progress bar on a terminal (a log line per step otherwise), then the model in Hugging Face format
in ``OUT/model`` (a reward model as transformers' sequence classifier).
"""

import importlib
import json
import os
import sys
from pathlib import Path

ROLES = ("sft", "rm", "ppo", "grpo")


def load_config(path: str) -> dict:
    from tidal.train_job import load_config as read_json_object

    config = read_json_object(path)
    for key in ("model", "out", "data"):
        if not isinstance(config.get(key), str):
            raise ValueError(f"config {path!r} needs {key!r} (a path)")
    unknown = set(config) - {"model", "out", "data", "reward", "steps", "save_interval", "args"}
    if unknown:
        raise ValueError(f"config {path!r} has unknown keys {sorted(unknown)}")
    return config


def read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"data {path!r} cannot be read: {e.strerror}") from None
    if not rows:
        raise ValueError(f"data {path!r} holds no rows")
    return rows


def reward_functions(spec) -> list:
    """``"module:function"`` (or a list of them) imported; the current directory is importable."""
    specs = [spec] if isinstance(spec, str) else spec
    if not specs or not all(isinstance(s, str) and ":" in s for s in specs):
        raise ValueError(f"reward={spec!r} must be 'module:function' or a list of them")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    funcs = []
    for s in specs:
        module, name = s.split(":", 1)
        try:
            func = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {s!r} cannot be imported: {e}") from None
        funcs.append(func)
    return funcs


class _Progress:
    """A tqdm bar with the step's line as its postfix on a terminal, else a printed line per step."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, line: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("  ", 1)[-1], refresh=False)
            self.bar.update(1)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _copy_tokenizer(src: str, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if Path(src, name).is_file():
            shutil.copy(Path(src, name), dst / name)


def run(role: str, config_path: str) -> dict:
    """Runs ``role`` as ``config_path`` says; returns the last step's metrics."""
    from tidal import rlhf
    from tidal.models.loader import save_model

    if role not in ROLES:
        raise ValueError(f"role={role!r} must be one of {', '.join(ROLES)}")
    config = load_config(config_path)
    data = read_jsonl(config["data"])
    steps = config.get("steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r} must be a positive integer")
    args = dict(config.get("args") or {})
    out = Path(config["out"])
    checkpoints, export = str(out / "checkpoints"), out / "model"
    progress = _Progress(steps or 0)
    try:
        if role in ("sft", "rm"):
            cls, cfg_cls = ((rlhf.SFTTrainer, rlhf.SFTConfig) if role == "sft" else
                            (rlhf.RewardTrainer, rlhf.RewardConfig))
            trainer = cls(config["model"], data, cfg_cls(**args))
            engine, start = trainer.engine, 0
            if os.path.isfile(os.path.join(checkpoints, "latest")):  # a run that stopped: carry on from it
                engine.load_checkpoint(checkpoints)
                start = engine.client_state["step"]
                print(f"tidal rlhf {role}: resumed at step {start}", flush=True)
            interval = config.get("save_interval")

            def save(row: dict) -> None:
                if interval and row["step"] % interval == 0:
                    engine.save_checkpoint(checkpoints, client_state={"step": row["step"]}, keep_last=2)
            history = trainer.train(max_steps=steps, log=progress, start_step=start, after_step=save)
            last = history[-1]["step"] if history else start
            if not history or not interval or last % interval:
                engine.save_checkpoint(checkpoints, client_state={"step": last}, keep_last=2)
            trainer.save_model(str(export))
        else:
            if steps is None:
                raise ValueError(f"{role} needs 'steps' in the config")
            if "reward" not in config:
                raise ValueError(f"{role} needs 'reward' ('module:function') in the config")
            prompts = [row["prompt"] for row in data if "prompt" in row]
            if len(prompts) != len(data):
                raise ValueError(f"every row of {config['data']!r} needs a 'prompt'")
            funcs = reward_functions(config["reward"])
            if role == "grpo":
                trainer = rlhf.GRPOTrainer(config["model"], funcs, rlhf.GRPOConfig(**args))
                engine = trainer.engine
            else:
                trainer = rlhf.PPOTrainer(config["model"], funcs, rlhf.PPOConfig(**args))
                engine = trainer.actor
            critic_checkpoints = str(out / "critic_checkpoints")
            if os.path.isfile(os.path.join(checkpoints, "latest")):  # a run that stopped: carry on from it
                engine.load_checkpoint(checkpoints)
                trainer.step_count = engine.client_state["step"]
                if role == "ppo":
                    trainer.critic.load_checkpoint(critic_checkpoints)
                    trainer.kl_ctl.value = engine.client_state["kl_coef"]
                trainer.served.sync()
                print(f"tidal rlhf {role}: resumed at step {trainer.step_count}", flush=True)
            interval = config.get("save_interval") or steps
            history = []
            while trainer.step_count < steps:
                history += trainer.train(prompts, 1, log=progress)
                if trainer.step_count % interval == 0 or trainer.step_count == steps:
                    state = {"step": trainer.step_count}
                    if role == "ppo":
                        state["kl_coef"] = trainer.kl_ctl.value
                        trainer.critic.save_checkpoint(critic_checkpoints, keep_last=2)
                    engine.save_checkpoint(checkpoints, client_state=state, keep_last=2)
            save_model(engine.module, export)
            _copy_tokenizer(config["model"], export)
    finally:
        progress.close()
    print(f"tidal rlhf {role}: {len(history)} steps; the model is in {export}", flush=True)
    return history[-1] if history else {}
