"""jmoe.train.run_config: YAML presets, key.path=value overrides, errors that name the key."""

import dataclasses
import glob
import os

import pytest
import yaml

import jmoe
from jmoe.lm.config import ModelConfig
from jmoe.lm.mla import MLAConfig
from jmoe.lm.rope import YarnScaling
from jmoe.train.config import Config, DataConfig, TrainConfig
from jmoe.train.run_config import config_diff, config_to_dict, load_config, save_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
PRESETS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))


def test_defaults_are_the_tiny_preset():
    assert load_config() == Config()
    assert load_config(os.path.join(os.path.dirname(PRESETS[0]), "tiny.yaml")) == Config()


def test_overrides_parse_yaml_values_at_nested_paths():
    cfg = load_config(
        None,
        [
            "model.moe.router=top_p",
            "model.moe.router.max_k=3",
            "train.learning_rate=1e-3",  # YAML 1.1 reads this as text: parsed as a float
            "train.grad_clip=null",
            "model.qk_norm=true",
            "data.source=/tmp/corpus.txt",
        ],
    )
    assert cfg.model.moe.router == jmoe.TopP(max_k=3)
    assert cfg.train.learning_rate == 1e-3 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.grad_clip is None and cfg.model.qk_norm is True
    assert cfg.data.source == "/tmp/corpus.txt"
    assert cfg.model.moe.d_model == cfg.model.d_model
    # text that is not YAML (a glob starting with "*" reads as an alias) is taken as it is
    assert load_config(None, ["data.source=*.txt"]).data.source == "*.txt"


def test_file_then_overrides_later_wins(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "model:\n  d_model: 64\n  moe:\n    router: {kind: top_k, k: 1}\ntrain:\n  steps: 7\n"
    )
    cfg = load_config(path, ["train.steps=9"])
    assert (cfg.model.d_model, cfg.model.moe.router.k, cfg.train.steps) == (64, 1, 9)
    assert cfg.model.n_layers == ModelConfig().n_layers  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "override,named,closest",
    [
        ("model.moe.rooter=top_k", "model.moe.rooter", "model.moe.router"),
        ("model.d_modle=64", "model.d_modle", "model.d_model"),
        ("trian.steps=3", "trian", "train"),
        ("data.seq_length=64", "data.seq_length", "data.seq_len"),
    ],
)
def test_unknown_key_names_key_allowed_and_closest(override, named, closest):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert repr(named) in msg and repr(closest) in msg and "allowed keys" in msg, msg


@pytest.mark.parametrize(
    "text,where,problem",
    [
        ("model:\n  d_model: 64\n  moe: {d_ff: 1\ntrain:\n  steps: 3\n", ":4:6:", "expected ','"),
        ("model:\n  d_model: 64\n\tsteps: 3\n", ":3:1:", "found character '\\t'"),
        ("train: [1, 2\n", ":2:1:", "expected ',' or ']'"),
    ],
    ids=["flow-mapping", "tab", "unclosed-list"],
)
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, text, where, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}{where} YAML syntax error"), message
    assert problem in message and "\n" not in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  step: 3\n")
    with pytest.raises(ValueError, match=r"'train.step'.*did you mean 'train.steps'"):
        load_config(path)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.steps=abc", "'train.steps'='abc'"),
        ("train.steps=2.5", "'train.steps'=2.5"),
        ("model.qk_norm=3", "'model.qk_norm'=3"),
        ("train.learning_rate=true", "'train.learning_rate'=True"),
        ("model=3", "model must be a mapping"),
        ("model.moe.router.k=0", "model.moe.router: TopK.k=0"),
        ("model.moe.router=hash", "model.moe.router.kind='hash'"),
        ("model.moe.router.p=0.5", "'model.moe.router.p'"),
        ("model.moe.router={kind: top_p, p: 2}", "model.moe.router: TopP.p=2"),
        ("model.n_kv_heads=3", "model: ModelConfig.n_kv_heads=3"),
        ("data.eval_fraction=1.5", "data: DataConfig.eval_fraction=1.5"),
        ("train.warmup_steps=-1", "train: TrainConfig.warmup_steps=-1"),
        ("data.seq_len=4096", "Config.data.seq_len=4096"),
        ("steps", "not of the form key.path=value"),
        ("train.steps=null", "'train.steps'=None"),
    ],
)
def test_bad_values_name_full_key_path(override, fragment):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    assert fragment in str(info.value), str(info.value)


def test_choice_error_lists_allowed_values():
    with pytest.raises(ValueError) as info:
        load_config(None, ["model.moe.router=hash"])
    assert all(r in str(info.value) for r in ("top_k", "null_experts", "top_p", "expert_choice"))


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(
        None, ["model.moe.router=null_experts", "model.moe.router.num_null=4", "train.steps=5"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, want",
    [
        (["model.moe.router=top_p", "model.moe.router.p=0.3"], jmoe.TopP(p=0.3)),
        (["model.moe.router={kind: top_p, p: 0.3, max_k: 2}"], jmoe.TopP(p=0.3, max_k=2)),
        (
            ["model.moe.router.k=4", "model.moe.router.score=sigmoid"],
            jmoe.TopK(k=4, score="sigmoid"),
        ),
        (["model.moe.router.k=4", "model.moe.router=top_k"], jmoe.TopK(k=4)),  # same kind: kept
        (["model.moe.router.k=4", "model.moe.router=top_p"], jmoe.TopP()),  # new kind: defaults
        (
            [
                "model.moe.router=null_experts",
                "model.moe.router.num_null=8",
                "model.moe.router.k=4",
            ],
            jmoe.NullExperts(num_null=8, k=4),
        ),
    ],
)
def test_router_overrides(overrides, want):
    assert load_config(None, overrides).model.moe.router == want


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.moe.top_k=4"], "'model.moe.top_k' has moved: use model.moe.router.k"),
        (["model.moe.top_p=0.4"], "use model.moe.router.p (router: {kind: top_p"),
        (["model.moe.num_null=8"], "use model.moe.router.num_null"),
        (["model.moe.router=null"], "kind 'null_experts'"),
        (["model.moe.router=null_experts"], "'null_experts' needs 'num_null'"),
        (["model.moe.router=top_p", "model.moe.router.k=2"], "allowed keys are ['boundary'"),
        (["model.moe.router.kk=2"], "did you mean 'model.moe.router.k'"),
        (["model.moe.router=[1, 2]"], "must be a router kind"),
    ],
)
def test_router_override_errors_name_the_new_spelling(overrides, fragment):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value), str(info.value)


def test_old_flat_router_keys_in_a_yaml_file_name_the_new_spelling(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  moe:\n    router: top_p\n    top_p: 0.4\n")
    with pytest.raises(ValueError, match=r"'model.moe.top_p' has moved: use model.moe.router.p"):
        load_config(path)


def test_config_diff_lists_dotted_keys():
    a = config_to_dict(Config())
    b = config_to_dict(
        dataclasses.replace(
            Config(),
            train=TrainConfig(steps=3),
            data=DataConfig(seq_len=64),
        )
    )
    assert config_diff(a, b) == ["data.seq_len", "train.steps"]
    assert config_diff(a, a) == []


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_preset_routing_features():
    def preset(name):
        return load_config(os.path.join(os.path.dirname(PRESETS[0]), name)).model

    ds = preset("deepseek_v3_style.yaml")
    assert ds.mla == MLAConfig(512, 128, 64, 128)
    assert (
        ds.moe.router.score,
        ds.moe.router.n_groups,
        ds.moe.router.top_groups,
        ds.moe.num_shared,
    ) == (
        "sigmoid",
        8,
        4,
        1,
    )
    assert ds.moe.router.bias_update_rate > 0 and ds.first_dense_layers == 3
    assert preset("adamoe.yaml").moe.router.kind == "null_experts"
    assert preset("adamoe.yaml").moe.router.target_active_experts == 2.0
    assert preset("top_p.yaml").moe.router.kind == "top_p"
    assert preset("chain_of_experts.yaml").moe.chain_steps == 2
    mixtral = preset("mixtral_8x7b.yaml")
    assert (mixtral.d_model, mixtral.n_layers, mixtral.moe.num_experts, mixtral.moe.d_ff) == (
        4096,
        32,
        8,
        14336,
    )
    qwen = preset("qwen3_moe_30b_a3b.yaml")
    assert (qwen.n_layers, qwen.moe.num_experts, qwen.moe.router.k, qwen.moe.d_ff) == (
        48,
        128,
        8,
        768,
    )
    olmoe = preset("olmoe_1b_7b.yaml")
    assert (olmoe.moe.num_experts, olmoe.moe.router.k, olmoe.moe.router.normalize) == (64, 8, False)


MLA_OVERRIDES = [
    "model.mla.kv_lora_rank=8",
    "model.mla.qk_nope_head_dim=4",
    "model.mla.qk_rope_head_dim=2",
    "model.mla.v_head_dim=6",
]


def test_optional_sections_mla_and_rope_scaling(tmp_path):
    """`model.mla` / `model.rope_scaling` are off (None) until a key turns them on; the required
    fields must then all be given, the others keep their defaults, and null turns them off."""
    scaling = "model.rope_scaling={factor: 4, original_max_position_embeddings: 64}"
    cfg = load_config(None, [*MLA_OVERRIDES, scaling, "model.rope_scaling.truncate=false"])
    assert cfg.model.mla == MLAConfig(8, 4, 2, 6)
    assert cfg.model.rope_scaling == YarnScaling(4.0, 64, truncate=False)
    assert isinstance(cfg.model.rope_scaling.factor, float)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    path = tmp_path / "x.yaml"
    path.write_text(
        "model:\n  mla: {kv_lora_rank: 8, qk_nope_head_dim: 4, qk_rope_head_dim: 2,"
        " v_head_dim: 6, q_lora_rank: 12}\n"
    )
    assert load_config(path).model.mla == MLAConfig(8, 4, 2, 6, q_lora_rank=12)
    assert load_config(path, ["model.mla=null"]).model.mla is None
    assert load_config().model.mla is None and load_config().model.rope_scaling is None


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["model.mla.kv_lora_rank=8"],
            "'model.mla' is incomplete: set model.mla.qk_nope_head_dim, "
            "model.mla.qk_rope_head_dim, model.mla.v_head_dim (or model.mla=null",
        ),
        (
            [*MLA_OVERRIDES, "model.mla.qk_rope_head_dim=3"],
            "model.mla: MLAConfig.qk_rope_head_dim=3 is invalid: must be an even integer",
        ),
        (["model.rope_scaling.factr=2"], "did you mean 'model.rope_scaling.factor'"),
        (["model.rope_scaling=4"], "model.rope_scaling must be a mapping"),
        (
            ["model.rope_scaling={factor: 4, original_max_position_embeddings: 0}"],
            "model.rope_scaling: YarnScaling.original_max_position_embeddings=0",
        ),
    ],
)
def test_optional_section_errors_name_the_key(overrides, fragment):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value), str(info.value)
