import json
import subprocess
import sys
import time

import pytest

from prepack_actor.job.config import ConfigError, GenerateConfig
from prepack_actor.job.config_file import load_config, to_dict

from job_helpers import REPO

YAML = REPO / "conf" / "generate.yaml"


def test_default_yaml_matches_schema_and_documents_every_key():
    cfg = load_config(GenerateConfig, [], YAML)
    assert cfg.model.path == "tiny:llama" and cfg.sampling.temperature == 0.0
    assert to_dict(cfg) == to_dict(GenerateConfig())  # the YAML restates the schema defaults
    for line in YAML.read_text().splitlines():
        if line.startswith("  ") and ":" in line:
            assert "#" in line, f"undocumented key: {line}"


def test_overrides_and_config_file(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("sampling:\n  max_new_tokens: 7\noutput:\n  format: jsonl\n")
    cfg = load_config(GenerateConfig, ["--config", str(other), "sampling.top_k=5", "sampling.stop=[a,b]"], YAML)
    assert cfg.sampling.max_new_tokens == 7 and cfg.output.format == "jsonl"
    assert cfg.sampling.top_k == 5 and cfg.sampling.stop == ["a", "b"]
    assert cfg.packing.max_group_tokens == 4096  # untouched keys keep the schema default


@pytest.mark.parametrize("argv, expected", [
    (["sampling.max_tokens=3"], "sampling.max_tokens"),
    (["nope=1"], "nope"),
    (["sampling.max_new_tokens=abc"], "sampling.max_new_tokens"),
    (["sampling.max_new_tokens=0"], "sampling.max_new_tokens: expected an int >= 1"),
    (["output.format=csv"], "output.format: expected one of parquet, jsonl"),
    (["sampling.top_p=2"], "sampling.top_p"),
    (["--config", "/no/such.yaml"], "no such file"),
    (["stray"], "unexpected argument"),
])
def test_bad_config_names_the_key(argv, expected):
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, argv, YAML)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, expected", [
    (["sampling.temprature=0.5"], "config error: sampling.temprature"),
    (["actors.concurrency=two"], "config error: actors.concurrency"),
    (["input.path=/no/such/dir"], "error: input.path '/no/such/dir': no such file or directory"),
    (["model.path=/no/such/model"], "error: model.path '/no/such/model'"),
])
def test_job_fails_fast_with_one_line(argv, expected, tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), *argv,
                        f"output.path={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), p.stderr
    assert "Traceback" not in p.stderr and "ray" not in p.stdout.lower()  # Ray never started
    assert time.time() - t0 < 60


def test_empty_input_fails_fast(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), f"input.path={empty}",
                        f"output.path={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == f"error: input.path '{empty}': input is empty"


def _leaf_keys(d: dict, prefix: str = "") -> set[str]:
    return {k2 for k, v in d.items()
            for k2 in (_leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k})}


@pytest.mark.parametrize("name, schema", [("generate.yaml", "GenerateConfig"), ("score.yaml", "ScoreJobConfig")])
def test_every_schema_key_is_written_in_its_yaml(name, schema):
    """conf/*.yaml lists every key (one commented line each), not only the changed ones."""
    import yaml
    from omegaconf import OmegaConf

    from prepack_actor.job import config
    cls = getattr(config, schema)
    text = (REPO / "conf" / name).read_text()
    assert _leaf_keys(yaml.safe_load(text)) == _leaf_keys(OmegaConf.to_container(OmegaConf.structured(cls)))
    for line in text.splitlines():
        if line.startswith("  ") and ":" in line and not line.strip().startswith("#"):
            assert "#" in line, f"{name}: undocumented key: {line}"


def test_help_is_fast_and_lists_every_key():
    t0 = time.time()
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and time.time() - t0 < 2.0, (p.returncode, time.time() - t0)
    assert p.stdout.startswith("usage:") and "--dry-run" in p.stdout
    for key in ("max_new_tokens:", "max_group_tokens:", "concurrency:", "limit:"):
        assert key in p.stdout


@pytest.mark.parametrize("arg, hint", [("max_new_tokens=8", "did you mean sampling.max_new_tokens?"),
                                       ("temperature=0.5", "did you mean sampling.temperature?")])
def test_bare_key_gets_a_hint(arg, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config(GenerateConfig, [arg], YAML)


def test_dry_run_prints_prepared_rows_and_writes_nothing(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"r{i}", "prompt": "word " * (i + 1)}) for i in range(8))
                   + '\n{"id": "e", "prompt": ""}\n')
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), "--dry-run", f"input.path={src}",
                        f"model.path={tiny_model_dir('llama')}", f"output.path={out}", "input.limit=3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [line.strip() for line in p.stdout.splitlines() if line.startswith("  ")]
    assert [line.split(":")[0] for line in lines] == ["r0", "r1", "r2"]  # input.limit=3
    assert all(line.endswith("tokens") for line in lines)
    assert not out.exists()  # nothing written, not even the job record
