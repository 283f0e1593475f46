"""Bad rule files, each with the message it must produce (rule index, line, what to change) and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from configs import SMALL_DEEPSEEK  # noqa: E402

from tandem.cli import main  # noqa: E402
from tandem.rules import RuleError, load_rules  # noqa: E402

EXPERTS = 'name: "^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$"'


def rule(match: str, cls: str = "default", kwargs: str = "", extra: str = "") -> str:
    kw = f"\n    kwargs: {{{kwargs}}}" if kwargs else ""
    return f"- match:\n    {match}\n  replace:\n    class: {cls}{kw}\n{extra}"


MODEL_OP = "ktransformers.operators.models.KDeepseekV2Model"
CATCH_ALL = rule('name: ".*"', kwargs='generate_device: "cpu"')

BAD = [  # (id, rule file text, devices, expected message part)
    ("yaml", "- match:\n    name: [unclosed\n", "cpu", "rules.yaml:3:1: invalid YAML"),
    ("not-a-list", "match: {name: x}\n", "cpu", "rules.yaml:1: a rule file is a YAML list of rules"),
    ("empty", "", "cpu", "no rules (the file is empty)"),
    ("unknown-rule-key", rule('name: "x"', extra="  recursve: false\n"), "cpu",
     "rule 0 (line 5): unknown key 'recursve'; a rule has match, replace, recursive"),
    ("unknown-match-key", rule('name: "x"\n    clas: torch.nn.Linear'), "cpu",
     "rule 0 (line 3): unknown key match.clas"),
    ("no-match", "- replace: {class: default}\n", "cpu", "rule 0 (line 1): match needs at least one of name, class"),
    ("regex", rule('name: "^model\\\\.layers\\\\.("'), "cpu",
     "rule 0 (line 2): invalid regular expression '^model\\\\.layers\\\\.(': missing ), unterminated subpattern"),
    ("kt-op-missing", rule('name: "x"', "ktransformers.operators.flashinfer.KFlashAttention"), "cpu",
     "rule 0 (line 4): replace.class ktransformers.operators.flashinfer.KFlashAttention has no tandem equivalent yet"),
    ("unknown-op", rule('name: "x"', "mypkg.FastThing"), "cpu",
     "replace.class mypkg.FastThing is not a known operator"),
    ("kt-class-missing", rule('class: ktransformers.models.modeling_gemma.GemmaMLP'), "cpu",
     "rule 0 (line 2): match.class ktransformers.models.modeling_gemma.GemmaMLP has no tandem equivalent yet"),
    ("unknown-kwarg", rule(EXPERTS, "KTransformersExperts", 'generate_devce: "cpu"'), "cpu",
     "rule 0 (line 5): unknown kwarg 'generate_devce' for experts; it takes generate_device"),
    ("bad-device", rule(EXPERTS, "KTransformersExperts", 'generate_device: "gpu0"'), "cpu",
     "rule 0 (line 5): generate_device: 'gpu0' is not a device; write cpu, cuda or cuda:N"),
    ("absent-device", rule(EXPERTS, "KTransformersExperts", 'generate_device: "cuda:3"') + CATCH_ALL, "cpu,cuda:0",
     "rule 0 (line 5): generate_device cuda:3 is not a device here (devices: cpu, cuda:0)"),
    ("kernel-of-other-op", rule(EXPERTS, "KTransformersExperts", 'generate_op: "KLinearMarlin"'), "cpu",
     "rule 0 (line 5): generate_op: KLinearMarlin is a kernel of another operator; experts runs: experts.cpu"),
    ("kernel-wrong-device", rule(EXPERTS, "KTransformersExperts",
                                 'generate_device: "cpu", generate_op: "KExpertsMarlin"') + CATCH_ALL,
     "cpu", "rule 0 (line 5): experts.marlin cannot run on cpu (it runs on cuda)"),
    ("op-wrong-module", rule('name: "^model\\\\.layers\\\\.1\\\\.mlp$"', "KTransformersExperts") + CATCH_ALL, "cpu",
     "rule 0 (line 4): KTransformersExperts replaces routed experts (an Experts list), but it matched "
     "model.layers.1.mlp (SparseMoE); narrow match.name or add match.class"),
    ("out-device", rule(EXPERTS, "KTransformersExperts", 'generate_device: "cpu", out_device: "cuda:0"')
     + rule('name: ".*"', kwargs='generate_device: "cpu"'), "cpu,cuda:0",
     "rule 0 (line 5): out_device cuda:0, but model.layers.1.mlp adds the result on cpu"),
    ("layer-off-route", rule('name: "^model$"', MODEL_OP, 'transfer_map: {30: "cuda:1"}') + rule(
        'name: ".*"', kwargs='generate_device: "cuda:0"'), "cpu,cuda:0,cuda:1",
     "rule 1 (line 10): model.layers.30.self_attn.q_a_proj runs on cuda:0, but layer 30's hidden state is on cuda:1 "
     "(transfer_map)"),
    ("transfer-map-layer", rule('name: "^model$"', MODEL_OP, 'transfer_map: {99: "cuda:1"}') + CATCH_ALL,
     "cpu,cuda:1", "rule 0 (line 5): transfer_map layer 99 does not exist (the model has 40 layers)"),
    ("recursive", rule('name: "x"', extra="  recursive: 3\n"), "cpu",
     "rule 0 (line 5): recursive must be true or false"),
    ("phases", rule('name: "self_attn$"', "KDeepseekV2Attention", 'generate_device: "cpu", prefill_device: "cuda:0"')
     + CATCH_ALL, "cpu,cuda:0", "mla runs prefill and generate on one device"),
    ("layers-spec", rule('layers: "3-5"'), "cpu", "layers '3-5' must be a slice like"),
]


@pytest.mark.parametrize("text,devices,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_rule_file(capsys, tmp_path, text, devices, message):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_DEEPSEEK))
    (tmp_path / "rules.yaml").write_text(text)
    rc = main(["rules", "explain", str(tmp_path), "--rules", str(tmp_path / "rules.yaml"), "--devices", devices])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert "Traceback" not in err


def test_rule_matching_nothing_is_a_warning(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_DEEPSEEK))
    (tmp_path / "rules.yaml").write_text(rule('name: "^model\\\\.vision_tower$"') + CATCH_ALL)
    rc = main(["rules", "explain", str(tmp_path), "--rules", str(tmp_path / "rules.yaml"), "--devices", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "warning: " in out and "rule 0 (line 1): matches no module of this model" in out


def test_auto_names_issue_f_and_unknown_preset():
    with pytest.raises(NotImplementedError, match=r"\[F\]"):
        load_rules("auto")
    with pytest.raises(RuleError, match="not a preset"):
        load_rules("deepseek-v3/9gpu")
