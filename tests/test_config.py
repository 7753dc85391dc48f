"""Options: one frozen config from options, Q3N_* variables and torch.compile's mode."""

import dataclasses

import pytest
import torch

from q3n_compile.config import Q3NConfig, Q3NConfigError


def test_defaults():
    config = Q3NConfig.from_options(None, environ={})
    assert config.attention == "tiled" and config.executor == "auto"
    assert config.sparse_keep == 0.2 and not config.norm_fusion and config.memory_plan
    assert not config.cuda_graphs and not config.strict and not config.verify
    assert config.quant_config is None and config.dump_dir is None


@pytest.mark.parametrize("options, devices, executor", [
    ({}, {"cuda"}, "inductor"),
    ({}, {"cuda", "cpu"}, "inductor"),  # CPU scalars beside a CUDA graph
    ({}, {"cpu"}, "q3n"),
    ({"cuda_graphs": True}, {"cuda"}, "inductor"),  # Inductor's CUDA graph trees: faster decode
    ({"cuda_graphs": True}, {"cpu"}, "q3n"),
    ({"executor": "q3n"}, {"cuda"}, "q3n"),
    ({"executor": "inductor"}, {"cpu"}, "inductor"),
])
def test_auto_executor_resolves_by_device(options, devices, executor):
    config = Q3NConfig.from_options(options, environ={})
    chosen, why = config.resolve_executor(devices)
    assert chosen == executor
    assert why.startswith("auto:") == ("executor" not in options)


def test_frozen():
    config = Q3NConfig.from_options({}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.attention = "off"


def test_unknown_option_names_itself_and_lists_valid_keys():
    with pytest.raises(Q3NConfigError) as err:
        Q3NConfig.from_options({"atention": "tiled"}, environ={})
    message = str(err.value)
    assert "'atention'" in message
    for key in ("attention", "sparse_keep", "norm_fusion", "quant_config", "memory_plan",
                "cuda_graphs", "executor", "dump_dir", "strict", "verify"):
        assert key in message


@pytest.mark.parametrize(
    "key, value, accepts",
    [
        ("attention", "dense", "'tiled' | 'sparse' | 'off'"),
        ("executor", "tvm", "'auto' | 'q3n' | 'inductor'"),
        ("sparse_keep", 1.5, "a number in (0, 1]"),
        ("sparse_keep", 0, "a number in (0, 1]"),
        ("norm_fusion", "yes", "True or False"),
        ("quant_config", [4, 8], "a dict"),
        ("dump_dir", 3, "a folder path"),
        ("progress", "sometimes", 'True, False or None / "auto"'),
        ("progress", 1, 'True, False or None / "auto"'),
    ],
)
def test_bad_value_names_option_and_what_it_accepts(key, value, accepts):
    with pytest.raises(Q3NConfigError) as err:
        Q3NConfig.from_options({key: value}, environ={})
    assert f"option {key!r}" in str(err.value)
    assert accepts in str(err.value)


def test_environment_variables_and_precedence():
    env = {"Q3N_ATTENTION": "off", "Q3N_VERIFY": "1", "Q3N_DUMP": "/tmp/d", "Q3N_SPARSE_KEEP": "0.3",
           "Q3N_QUANT_CONFIG": '{"ffn_layers": {"weight_bits": 4}}'}
    config = Q3NConfig.from_options({"attention": "sparse"}, environ=env)
    assert config.attention == "sparse"  # options win over the environment
    assert config.verify is True and config.dump_dir == "/tmp/d" and config.sparse_keep == 0.3
    assert config.quant_config == {"ffn_layers": {"weight_bits": 4}}


@pytest.mark.parametrize("given, env, want", [
    ({}, {}, None),  # auto: lines once the work has run 5 s
    ({"progress": "auto"}, {}, None),
    ({"progress": True}, {}, True),
    ({"progress": False}, {"Q3N_PROGRESS": "1"}, False),  # options win
    ({}, {"Q3N_PROGRESS": "on"}, True),
    ({}, {"Q3N_PROGRESS": "0"}, False),
    ({}, {"Q3N_PROGRESS": "AUTO"}, None),
])
def test_progress_option(given, env, want):
    assert Q3NConfig.from_options(given, environ=env).progress is want


def test_bad_environment_value_names_the_variable():
    with pytest.raises(Q3NConfigError, match="Q3N_STRICT"):
        Q3NConfig.from_options({}, environ={"Q3N_STRICT": "maybe"})


def test_unknown_environment_variable_warns():
    with pytest.warns(UserWarning, match="Q3N_ATENTION"):
        Q3NConfig.from_options({}, environ={"Q3N_ATENTION": "off"})


def test_modes():
    assert Q3NConfig.from_options({}, mode="reduce-overhead", environ={}).cuda_graphs is True
    # An explicit option beats what the mode implies.
    assert Q3NConfig.from_options({"cuda_graphs": False}, mode="reduce-overhead", environ={}).cuda_graphs is False
    tuned = Q3NConfig.from_options({}, mode="max-autotune-no-cudagraphs", environ={})
    assert tuned.autotune and not tuned.cuda_graphs
    with pytest.raises(Q3NConfigError, match="unknown torch.compile mode 'fast'"):
        Q3NConfig.from_options({}, mode="fast", environ={})


def test_as_dict_is_json():
    import json

    config = Q3NConfig.from_options({"quant_config": {"ffn_layers": {"weight_bits": 4}}}, environ={})
    assert json.loads(json.dumps(config.as_dict()))["quant_config"]["ffn_layers"]["weight_bits"] == 4


def test_torch_compile_surfaces_option_errors():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="q3n", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown option 'bogus'"):
        compiled(torch.randn(2, 4))


def test_memory_options():
    config = Q3NConfig.from_options({"memory_buckets": [2048, 512, 512]}, environ={"Q3N_MEMORY_PLAN_TIME_S": "0.1"})
    assert config.memory_buckets == (512, 2048) and config.memory_plan_time_s == 0.1
    assert Q3NConfig.from_options({}, environ={"Q3N_MEMORY_BUCKETS": "64,128"}).memory_buckets == (64, 128)
    with pytest.raises(Q3NConfigError, match="option 'memory_buckets' accepts a list of positive lengths"):
        Q3NConfig.from_options({"memory_buckets": [0, 5]}, environ={})
    with pytest.raises(Q3NConfigError, match="option 'memory_plan_time_s'"):
        Q3NConfig.from_options({"memory_plan_time_s": -1}, environ={})
