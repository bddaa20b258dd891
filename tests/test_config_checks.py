"""Config values of a wrong type or out of range are refused before any model loads or any run
folder is written, naming the key and what is allowed; a setting the baseline ignores is refused."""

from __future__ import annotations

import pytest

from conftest import compose_config, run_cli
from palign.config import ConfigError
from palign.pipeline import run

BAD = [
    ("data.max_length=abc", "data.max_length='abc': must be an integer >= 1"),
    ("training.learning_rate=fast", "training.learning_rate='fast': must be a number > 0"),
    ("data.micro_batch_size=0", "data.micro_batch_size=0: must be an integer >= 1"),
    ("data.micro_batch_size=-2", "data.micro_batch_size=-2: must be an integer >= 1"),
    ("training.effective_batch_size=0", "training.effective_batch_size=0: must be an integer >= 1"),
    ("evaluation.sampling.num_samples=0", "evaluation.sampling.num_samples=0: must be an integer >= 1"),
    ("evaluation.pass_k=4", "evaluation.pass_k=4: must be at most evaluation.sampling.num_samples=3"),
    ("training.warmup_ratio=1.5", "training.warmup_ratio=1.5: must be a number in [0, 1]"),
    ("training.epochs=true", "training.epochs=True: must be an integer >= 1"),
    ("alignment.sampling.top_p=0", "alignment.sampling.top_p=0: must be a number in (0, 1]"),
    ("data.train_limit=0", "data.train_limit=0: must be null or an integer >= 1"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_refused_before_the_run_folder_exists(override, message, tmp_path):
    cfg = compose_config(["student=tiny_random", "logger=none", "evaluation=paper", override], tmp_path)
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    assert message in str(caught.value)
    assert not (tmp_path / "runs").exists()


def test_every_bad_key_is_named_at_once(tmp_path):
    cfg = compose_config(["data.max_length=abc", "training.learning_rate=fast"], tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)data\.max_length.*training\.learning_rate"):
        run(cfg)


def test_the_shipped_configs_pass_the_checks(tmp_path):
    from palign.config import check_config

    for overrides in ([], ["experiment=paper/table1_qwen2_5_7b"], ["experiment=paper/table1_qwen3_8b"], ["debug=fast"],
                      ["teacher=generate"], ["baseline=fixed_ratio"]):
        check_config(compose_config(overrides, tmp_path))


@pytest.mark.slow
def test_the_command_line_refuses_a_bad_value_before_loading_anything(tmp_path):
    proc = run_cli(["student=tiny_random", "logger=none", "data.max_length=abc"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "data.max_length='abc': must be an integer >= 1" in proc.stderr
    assert "Loading weights" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_setting_the_baseline_ignores_is_refused_at_stage_all_as_at_stage_truncate(tmp_path):
    common = ["student=tiny_random", "logger=none", "baseline=sft_long_cot", "search=exhaustive"]
    truncate = run_cli([*common, "stage=truncate"], tmp_path, check=False)
    everything = run_cli(common, tmp_path, check=False)
    assert truncate.returncode != 0 and everything.returncode != 0
    assert "baseline 'sft_long_cot' does not truncate; pick e.g. baseline=prefix_only" in truncate.stderr
    assert "search=exhaustive: this setting would be ignored: baseline 'sft_long_cot' does not truncate; " \
           "pick e.g. baseline=prefix_only" in everything.stderr
    assert not (tmp_path / "runs").exists()
    fixed = run_cli(["student=tiny_random", "logger=none", "baseline=fixed_ratio", "judge.threshold.value=1.0"],
                    tmp_path, check=False)
    assert fixed.returncode != 0 and "judge.threshold.value=1.0: this setting would be ignored: baseline 'fixed_ratio'" in fixed.stderr
