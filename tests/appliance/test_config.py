"""The appliance config refuses values that would silently do the wrong thing on the line."""
from pathlib import Path

import pytest
import yaml

from appliance.config import config_from_dict, load_config
from models.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "appliance.example.yaml"


@pytest.mark.parametrize("text,words", [
    ("thresholds: {p_best: 75}", "p_best must be a number between 0 and 1"),
    ("thresholds: {p_defect: -1}", "p_defect must be a number between 0 and 1"),
    ("thresholds: {p_best: high}", "p_best must be a number"),
    ("thresholds: {ood_distance: -2}", "ood_distance must be a number 0 or more"),
    ("operator_pins: {bob: 04711}", 'PIN of bob must be quoted, e.g. bob: "0427"'),
    ("operator_pins: {alice: 4242}", "PIN of alice must be quoted"),
    ("operator_pins: [alice]", "operator_pins must be a mapping"),
    ("thresholds: 0.5", "thresholds must be a mapping"),
    ('save_frames: "no"', "save_frames must be true or false"),
    ("retention_days: -5", "retention_days must be a positive number"),
    ("frame_budget_mb: 0", "frame_budget_mb must be a positive number"),
    ("threads: -2", "threads must be a whole number of at least 1"),
    ("threads: 1.5", "threads must be a whole number"),
    ("max_fps: fast", "max_fps must be a positive number"),
    ("providers: cpu", r"providers must be a list, e.g. providers: \[cpu\]"),
    ("trusted_keys: keys/hq.pub", "trusted_keys must be a list"),
    ("source: 'elpv:tset'", "ELPV replay splits are elpv:train, elpv:val, elpv:test"),
    ("{hq_url: 'http://hq', commit_after_inspections: 100, max_fps: 1, commit_timeout_s: 60}",
     "raise commit_timeout_s"),                             # 100 frames at 1 fps take 100 s > 60 s
    ("thresholds: {p_best: null}", "remove the line to use the bundle's value"),
    ("flag_budget: 0.33", "flag_budget is the share of parts the operator can review, one of 0.1, 0.15"),
    ("flag_budget: 25%", "flag_budget is the share"),
    ("{flag_budget: 0.25, thresholds: {p_defect: 0.2}}", "remove p_defect from thresholds, or remove flag_budget"),
])
def test_bad_values_are_refused_with_the_fix(text, words):
    with pytest.raises(ConfigError, match=words):
        config_from_dict(yaml.safe_load(text), "appliance.yaml")


def test_good_values_pass_and_null_turns_the_possible_defect_check_off():
    cfg = config_from_dict(yaml.safe_load(
        'thresholds: {p_best: 0.6, p_defect: null, ood_distance: 4}\n'
        'operator_pins: {bob: "04711"}\nthreads: 2\nsource: "elpv:val"\nproviders: [cuda, cpu]'))
    assert cfg.operator_pins == {"bob": "04711"} and cfg.providers == ("cuda", "cpu")
    assert cfg.thresholds["p_defect"] is None
    budget = config_from_dict(yaml.safe_load("flag_budget: 0.25\nthresholds: {ood_distance: 4}"))
    assert budget.flag_budget == 0.25 and cfg.flag_budget is None


def test_commit_timing_matters_only_with_in_process_sync():
    assert config_from_dict({"max_fps": 0.3}).max_fps == 0.3          # e.g. linejudge demo --max-fps 0.3


def test_the_shipped_example_config_loads():
    assert load_config(EXAMPLE).line


def test_the_sync_command_refuses_while_the_service_syncs_by_itself(tmp_path, capsys):
    from linejudge_cli import main
    config = tmp_path / "appliance.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nhq_url: http://hq.invalid\nsync_interval_s: 300\n")
    assert main(["sync", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "syncs with HQ itself" in err and "sync_interval_s: 0" in err
    assert not (tmp_path / "state").exists()           # nothing opened, nothing sent
