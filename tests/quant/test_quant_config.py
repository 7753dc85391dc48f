"""quant_config: the design's form, rules, resolution, and errors that name the entry and the fix."""

import json

import pytest
import torch

from q3n_compile.config import Q3NConfig, Q3NConfigError
from q3n_compile.quant.config import (AUTO_GROUP, AUTO_ROTATION, PER_CHANNEL, LayerFormat,
                                      parse_quant_config, validate_quant_config)

DESIGN = {"ffn_layers": {"weight_bits": 4, "activation_bits": 8},
          "attn_layers": {"weight_bits": 6, "activation_bits": 12},
          "norm_layers": {"dtype": "float16"}}


def test_design_form_is_accepted_as_is():
    qc = parse_quant_config(DESIGN)
    assert qc.classes["ffn"] == LayerFormat(4, 8, AUTO_GROUP, False, "auto",
                                            rotation=AUTO_ROTATION)
    assert qc.classes["attn"] == LayerFormat(6, 12, AUTO_GROUP, False, "int12")
    assert qc.norm_layers == {"dtype": "float16"}
    assert qc.calibration.method == "gptq" and qc.calibration.smoothquant == "auto"
    config = Q3NConfig.from_options({"quant_config": DESIGN}, environ={})
    assert config.quant_config == DESIGN
    env = Q3NConfig.from_options(None, environ={"Q3N_QUANT_CONFIG": json.dumps(DESIGN)})
    assert env.quant_config == DESIGN


def test_defaults_and_automatic_group_size():
    fmt = parse_quant_config({"ffn_layers": {"weight_bits": 8}}).classes["ffn"]
    assert fmt.symmetric and fmt.activation_bits == 16 and fmt.activation_format == "none"
    assert fmt.for_k(4096).group_size == 128
    assert fmt.for_k(96).group_size == 32
    assert fmt.for_k(64).group_size == 64
    assert fmt.for_k(83).group_size == PER_CHANNEL
    explicit = parse_quant_config({"ffn_layers": {"weight_bits": 4, "group_size": 32}}).classes["ffn"]
    assert explicit.for_k(4096).group_size == 32
    channel = parse_quant_config({"ffn_layers": {"weight_bits": 4, "group_size": "channel"}})
    assert channel.classes["ffn"].group_size == PER_CHANNEL
    assert LayerFormat(4, 8, 128, False, "int8").name == "W4A8 g128 asym int8"


@pytest.mark.parametrize("entry,k,fp8,want", [
    ({"activation_bits": 8}, 4096, False, 32),  # int8 ("auto" without fp8): rotated by default
    ({"activation_bits": 8}, 4096, True, 0),  # fp8: not by default
    ({"activation_bits": 8, "activation_format": "int8"}, 4096, True, 32),
    ({"activation_bits": 8}, 4004, False, 0),  # K not a multiple of 32: not by default
    ({"activation_bits": 8, "rotation": 0}, 4096, False, 0),
    ({"activation_bits": 8, "rotation": 128}, 4096, True, 128),  # asked for: fp8 too
    ({"activation_bits": 12}, 4096, False, 0),
    ({"activation_bits": 12, "rotation": 64}, 4096, False, 64),
    ({}, 4096, False, 0),  # weight-only
])
def test_automatic_rotation(entry, k, fp8, want):
    fmt = parse_quant_config({"ffn_layers": {"weight_bits": 4, **entry}}).classes["ffn"]
    assert fmt.rotation == (AUTO_ROTATION if "rotation" not in entry and entry.get(
        "activation_bits") == 8 else entry.get("rotation", 0))
    got = fmt.resolved(k, fp8)
    assert got.rotation == want and got.activation_format != "auto"
    assert got.name.endswith(f" rot{want}") == bool(want)
    if fmt.rotation == AUTO_ROTATION:
        with pytest.raises(ValueError, match="automatic rotation is not resolved"):
            from q3n_compile.quant.algorithms import quantize_layer
            quantize_layer(torch.zeros(8, k), None, fmt, parse_quant_config({}).calibration)


def test_rules_first_match_wins_and_heads_need_naming():
    qc = parse_quant_config({
        "ffn_layers": {"weight_bits": 4},
        "rules": [
            {"match": "layers.0.*", "skip": True},
            {"match": ["*.down_proj", "lm_head"], "weight_bits": 8, "activation_bits": 8},
            {"match": "*", "weight_bits": 3},
        ],
    })
    assert qc.resolve("layers.0.mlp.down_proj", "ffn") == (None, "rules[0] says skip")
    fmt, why = qc.resolve("layers.1.mlp.down_proj", "ffn")
    assert why == "rules[1]" and fmt.weight_bits == 8 and fmt.activation_format == "auto"
    fmt, why = qc.resolve("layers.1.self_attn.q_proj", "attn")
    assert why == "rules[2]" and fmt.weight_bits == 3  # the catch-all beats the class entry
    fmt, why = qc.resolve("lm_head", "head")
    assert why == "rules[1]" and fmt.weight_bits == 8  # named explicitly
    only_star = parse_quant_config({"rules": [{"match": "*", "weight_bits": 4}]})
    fmt, why = only_star.resolve("lm_head", "head")
    assert fmt is None and "unless a rule names them" in why
    fmt, why = only_star.resolve("layers.0.mlp.gate", "router")
    assert fmt is None and "router" in why
    classes = parse_quant_config(DESIGN)
    assert classes.resolve("lm_head", "head")[0] is None
    assert classes.resolve("layers.3.mlp.up_proj", "ffn")[1] == "ffn_layers"
    assert classes.resolve("x.y", None)[0] is None
    keep = parse_quant_config({"ffn_layers": {"weight_bits": 16}})
    assert keep.resolve("mlp.fc1", "ffn") == (None, "ffn_layers has weight_bits 16: kept in high precision")
    assert keep.resolve("attn.q", "attn") == (None, "no attn_layers entry")


@pytest.mark.parametrize("value,where,fix", [
    ({"fnn_layers": {}}, "quant_config['fnn_layers']", "use one of ffn_layers"),
    ({"ffn_layers": {"weight_bits": 9}}, "['ffn_layers']['weight_bits']", "from 2 to 8"),
    ({"ffn_layers": {"weight_bits": True}}, "['weight_bits']", "from 2 to 8"),
    ({"ffn_layers": {"activation_bits": 8}}, "missing 'weight_bits'", "add 'weight_bits'"),
    ({"attn_layers": {"weight_bits": 6, "activation_bits": 4}}, "['activation_bits']", "16 (weight-only)"),
    ({"ffn_layers": {"weight_bits": 4, "group_size": 48}}, "['group_size']", "32, 64, 128"),
    ({"ffn_layers": {"weight_bits": 4, "group_size": 0}}, "['group_size']", "32, 64, 128"),
    ({"ffn_layers": {"weight_bits": 4, "activation_bits": 12, "activation_format": "fp8"}},
     "['activation_format']", "'int12'"),
    ({"ffn_layers": {"weight_bits": 8, "activation_bits": 8, "symmetric": False}},
     "quant_config['ffn_layers']", "'symmetric': true"),
    ({"ffn_layers": {"weight_bits": 4, "symmetric": "yes"}}, "['symmetric']", "true or false"),
    ({"rules": {"match": "*"}}, "['rules']", "a list"),
    ({"rules": [{"weight_bits": 4}]}, "['rules'][0]['match']", "module-path glob"),
    ({"rules": [{"match": "*", "skip": True, "weight_bits": 4}]}, "['rules'][0]", "drop"),
    ({"rules": [{"match": "*", "weight_bits": 4, "bits": 4}]}, "['rules'][0]['bits']", "match"),
    ({"calibration": {"method": "awq"}}, "['calibration']['method']", "'gptq' or 'rtn'"),
    ({"calibration": {"damp": 2}}, "['calibration']['damp']", "(0, 1]"),
    ({"calibration": {"act_order": "yes"}}, "['calibration']['act_order']", "true or false"),
    ({"calibration": {"example_inputs": 1}}, "['calibration']['example_inputs']", "calibrate()"),
    ({"calibration": {"alpha": 1.5}}, "['calibration']['alpha']", "[0, 1]"),
    ({"calibration": {"share_smoothing_within": -0.1}},
     "['calibration']['share_smoothing_within']", "group's smoothing vector"),
    ({"calibration": {"share_smoothing_within": True}},
     "['calibration']['share_smoothing_within']", "a number in [0, 1]"),
    ({"norm_layers": {"dtype": "int8"}}, "['norm_layers']['dtype']", "float16"),
    ({"merge_siblings": "yes"}, "quant_config['merge_siblings']", "'shared_smoothing'"),
    ({"merge_siblings": 1}, "quant_config['merge_siblings']", "use true"),
    ({"ffn_layers": {"weight_bits": 8, "activation_bits": 8, "activation_group_size": 48}},
     "['ffn_layers']['activation_group_size']", "32, 64 or 128"),
    ({"ffn_layers": {"weight_bits": 8, "activation_bits": 8, "activation_group_size": 0}},
     "['activation_group_size']", "-1 / 'token'"),
    ({"rules": [{"match": "*", "weight_bits": 4, "activation_group_size": 128}]},
     "['rules'][0]['activation_group_size']", "set 'activation_bits' to 8 or 12"),
    ({"rules": [{"match": "*", "skip": True, "activation_group_size": 128}]}, "['rules'][0]",
     "drop the format keys"),
])
def test_errors_name_the_entry_and_the_fix(value, where, fix):
    with pytest.raises(Q3NConfigError) as info:
        validate_quant_config(value)
    msg = str(info.value)
    assert where in msg and "Fix:" in msg and fix in msg, msg
    # The option goes through the same validator.
    with pytest.raises(Q3NConfigError, match="Fix:"):
        Q3NConfig.from_options({"quant_config": value}, environ={})


def test_activation_group_size():
    from q3n_compile.quant.config import PER_TOKEN

    qc = parse_quant_config({
        "ffn_layers": {"weight_bits": 8, "activation_bits": 8, "group_size": 128,
                       "activation_group_size": 128},
        "attn_layers": {"weight_bits": 6, "activation_bits": 12, "activation_group_size": "token"},
        "rules": [{"match": "*.o", "weight_bits": 4, "activation_bits": 8, "group_size": -1,
                   "activation_group_size": 32}]})
    ffn, attn, rule = qc.classes["ffn"], qc.classes["attn"], qc.rules[0].fmt
    assert ffn.activation_group_size == 128 and ffn.name == "W8A8 g128 sym auto act-g128"
    assert attn.activation_group_size == PER_TOKEN and "act-g" not in attn.name  # as before
    assert rule.activation_group_size == 32 and rule.name == "W4A8 channel asym auto act-g32"
    assert ffn.as_dict()["activation_group_size"] == 128  # what the report's entries carry
    # The default is per token; weight groups and K are not constrained by it.
    assert parse_quant_config({"ffn_layers": {"weight_bits": 8, "activation_bits": 8}}).classes[
        "ffn"].activation_group_size == PER_TOKEN
    # An automatic weight group resolves per K and keeps the activation group, which need not
    # divide K (83 = 64 + 19: the last group is partial).
    auto = parse_quant_config({"ffn_layers": {"weight_bits": 8, "activation_bits": 8,
                                              "activation_group_size": 64}}).classes["ffn"]
    assert auto.for_k(83).group_size == -1 and auto.for_k(83).activation_group_size == 64


def test_none_and_empty_are_valid():
    assert validate_quant_config(None) is None
    qc = parse_quant_config({})
    assert qc.classes == {} and qc.rules == ()


def test_which_configs_keep_the_example_inputs_for_calibration():
    from q3n_compile.quant.config import wants_example_inputs

    assert wants_example_inputs({"ffn_layers": {"weight_bits": 4}})
    assert wants_example_inputs({"rules": [{"match": "*", "weight_bits": 6}]})
    assert not wants_example_inputs(None) and not wants_example_inputs({})
    assert not wants_example_inputs({"ffn_layers": {"weight_bits": 16}})  # quantizes nothing
    assert not wants_example_inputs({"rules": [{"match": "*", "skip": True}]})
    assert not wants_example_inputs({"ffn_layers": {"weight_bits": 4},
                                     "calibration": {"example_inputs": False}})
