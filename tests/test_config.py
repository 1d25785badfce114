import pytest
import yaml

from xray_match.config import PRESET_DIR, Config, load_config, preset_names
from xray_match.configfile import ConfigError
from xray_match.recipes.moco import resolve_queue_size

@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert Config.from_dict(cfg.to_dict()) == cfg


def _leaves(d: dict, prefix: str = "") -> list[str]:
    return [k for key, v in d.items() for k in (_leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]


@pytest.mark.parametrize("preset", preset_names())
def test_preset_keys_differ_from_their_defaults(preset):
    """A preset holds only what differs from the dataclass defaults (one place for each fact)."""
    with open(PRESET_DIR / f"{preset}.yaml") as fh:
        keys = _leaves(yaml.safe_load(fh) or {})
    loaded, defaults = load_config(preset).flat(), Config().flat()
    repeated = [f"{k}={loaded[k]!r}" for k in keys if loaded[k] == defaults[k]]
    assert not repeated, f"{preset}.yaml repeats defaults: {', '.join(repeated)}"


def test_overrides_are_typed():
    cfg = load_config("moco_cpu", ["optim.lr=3e-4", "data.batch_size=16", "moco.sampler=queue", "moco.queue_size=64",
                                   "moco.teacher_hidden=[128, 64]", "data.hflip=true"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 16 and cfg.moco.teacher_hidden == [128, 64] and cfg.data.hflip is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'"),
        ("nope.lr=1", "unknown key 'nope'"),
        ("optim.lr=abc", "optim.lr: expected a number"),
        ("data.batch_size=2.5", "data.batch_size: expected an integer"),
        ("data.hflip=yes please", "data.hflip: expected true/false"),
        ("optim.lr=-1", "optim.lr: -1.0 is out of range"),
        ("moco.gaze_prob=1.5", "moco.gaze_prob: 1.5 is out of range"),
        ("moco.sampler=random", "moco.sampler: 'random' is not one of"),
        ("model.name=clip", "model.name: unknown model 'clip'"),
        ("optim.lr", "not of the form key=value"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("moco_cpu", [override])


def test_queue_not_divisible_by_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="moco.queue_size: 100 is not divisible by the global batch 64"):
        load_config("moco_cpu", ["moco.sampler=queue", "moco.queue_size=100", "data.batch_size=32", "ray.num_workers=2"])
    cfg = load_config("moco_cpu", ["moco.sampler=queue", "moco.queue_size=128", "data.batch_size=32", "ray.num_workers=2"])
    assert resolve_queue_size(cfg, 10_000) == 128


def test_queue_fraction_of_the_data_set():
    cfg = load_config("moco_cpu", ["moco.sampler=queue", "moco.queue_fraction=0.3", "data.batch_size=32", "ray.num_workers=2"])
    assert resolve_queue_size(cfg, 1000) == 256  # 300 rounded down to a multiple of 64
    assert resolve_queue_size(cfg, 100) == 64  # at least one global batch


def test_unknown_key_in_a_preset_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 0.1\n  betas: [0.9]\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.betas' in .*bad.yaml"):
        load_config(str(p))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset 'nope' not found"):
        load_config("nope")


def test_a_tune_jobs_command_line_keys_are_fixed_for_every_trial():
    """A key given to a tune job (flag or override) leaves the search space; nothing left is an error."""
    from xray_match.launch import build_parser, command_line_keys
    from xray_match.registry import SPACES
    from xray_match.driver.tuner import hold_fixed

    args = build_parser("tune", "moco_cpu", tune=True).parse_intermixed_args(
        ["moco.sampler=queue", "--epochs", "2", "optim.lr=3e-2"])
    assert sorted(command_line_keys(args)) == ["moco.sampler", "optim.lr", "train.epochs"]
    space = SPACES.get("moco")(load_config("moco_cpu"))
    rest, held = hold_fixed(space, command_line_keys(args), "moco")
    assert sorted(held) == ["moco.sampler", "optim.lr"] and rest == {k: v for k, v in space.items() if k not in held}
    with pytest.raises(ConfigError, match="search space 'moco': every key is fixed on the command line"):
        hold_fixed(space, list(space), "moco")


def test_a_trial_keeps_the_global_batch_and_runs_in_its_own_actor_with_one_worker():
    from xray_match.driver.tuner import runs_in_trial, trial_config

    cfg = load_config("moco_cpu", [])
    trial = trial_config(cfg)  # the preset's study: one worker, 4 x 150 steps, the run's global batch
    assert (trial.ray.num_workers, trial.data.batch_size, trial.train.epochs, trial.data.steps_per_epoch) == (1, 64, 4, 150)
    assert runs_in_trial(trial) and not runs_in_trial(trial.with_overrides(["train.checkpoint_every_steps=10"]))
    assert not runs_in_trial(trial_config(cfg.with_overrides(["tune.trial_workers=0"])))  # ray.num_workers: 2
    with pytest.raises(ConfigError, match=r"tune.trial_workers: 3 does not divide the global batch 64"):
        load_config("moco_cpu", ["tune.trial_workers=3"])
