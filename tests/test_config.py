import json
import os

import pytest

from proxsparse_hf import ProxSparseConfig, __version__
from proxsparse_hf.constants import CONFIG_NAME


def test_defaults_follow_the_paper():
    c = ProxSparseConfig()
    assert c.lambda_schedule == "constant" and c.lambda_scaling == "none"
    assert c.importance == "magnitude" and c.step_scaling == "none"
    assert (c.n, c.m) == (2, 4) and c.target_modules == "all-linear"
    assert c.proxsparse_version == __version__


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("lambda1", 0.0, "`lambda1`=0.0 is invalid; allowed: a finite number > 0"),
        ("lambda1", -1, "`lambda1`"),
        ("lambda1", float("nan"), "`lambda1`"),
        ("lambda1", float("inf"), "`lambda1`"),
        ("lambda1", "0.5", "`lambda1`"),
        ("lambda2", -0.1, "`lambda2`=-0.1 is invalid; allowed: a finite number >= 0"),
        ("epsilon", 0, "`epsilon`"),
        ("lambda_schedule", "cosine", r"`lambda_schedule`='cosine' is invalid; allowed: one of \('constant'"),
        ("lambda_scaling", "layer", "`lambda_scaling`"),
        ("step_scaling", "adam", r"`step_scaling`='adam' is invalid; allowed: one of \('none', 'weight_rms'\)"),
        ("importance", "wanda", r"`importance`='wanda' is invalid; allowed: one of \('magnitude', 'activation'"),
        ("prox_every_n_steps", 0, "`prox_every_n_steps`"),
        ("prox_every_n_steps", True, "`prox_every_n_steps`"),
        ("target_modules", [], "`target_modules`"),
        ("target_modules", "", "`target_modules`"),
        ("target_modules", ["q_proj", 3], "`target_modules`"),
        ("exclude_modules", 5, "`exclude_modules`"),
        ("solver_backend", "cuda", "`solver_backend`='cuda'"),
        ("solver_max_iter", 0, "`solver_max_iter`"),
        ("solver_tol", 0, "`solver_tol`"),
        ("snapshot_device", "gpu", "`snapshot_device`='gpu'"),
        ("train_non_target_params", "yes", "`train_non_target_params`"),
        ("base_model_name_or_path", 3, "`base_model_name_or_path`"),
    ],
)
def test_validation_names_field_value_and_allowed(field, value, match):
    with pytest.raises(ValueError, match=match):
        ProxSparseConfig(**{field: value})


@pytest.mark.parametrize("n,m", [(1, 4), (2, 8), (4, 8)])
def test_only_2_4(n, m):
    with pytest.raises(ValueError, match=r"only 2:4 semi-structured sparsity is supported"):
        ProxSparseConfig(n=n, m=m)


def test_tuple_target_modules_become_list():
    c = ProxSparseConfig(target_modules=("q_proj", "v_proj"), exclude_modules=("v_proj",))
    assert c.target_modules == ["q_proj", "v_proj"] and c.exclude_modules == ["v_proj"]


def test_dict_round_trip_and_unknown_keys():
    c = ProxSparseConfig(lambda1=2.0, lambda2=1.0, target_modules=["q_proj"], lambda_scaling="weight_scale")
    assert ProxSparseConfig.from_dict(c.to_dict()) == c
    data = c.to_dict() | {"future_knob": 1, "another": 2}
    with pytest.raises(ValueError, match=r"Unknown ProxSparseConfig key\(s\) \['another', 'future_knob'\]"):
        ProxSparseConfig.from_dict(data)
    with pytest.raises(ValueError, match="expects a dict"):
        ProxSparseConfig.from_dict([1])


def test_save_and_load_local(tmp_path):
    c = ProxSparseConfig(
        lambda1=0.25, exclude_modules=r".*down_proj", base_model_name_or_path="org/model", revision="abc"
    )
    path = c.save_pretrained(tmp_path / "out")
    assert path == os.path.join(tmp_path / "out", CONFIG_NAME)
    assert sorted(os.listdir(tmp_path / "out")) == [CONFIG_NAME]  # atomic: no temp file left
    data = json.loads(open(path).read())
    assert data["proxsparse_version"] == __version__ and data["lambda1"] == 0.25
    assert ProxSparseConfig.from_pretrained(tmp_path / "out") == c
    assert ProxSparseConfig.from_pretrained(tmp_path / "out", lambda1=3.0).lambda1 == 3.0
    # subfolder
    c.save_pretrained(tmp_path / "repo" / "sub")
    assert ProxSparseConfig.from_pretrained(tmp_path / "repo", subfolder="sub") == c


def test_load_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no proxsparse_config.json"):
        ProxSparseConfig.from_pretrained(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ProxSparseConfig.from_pretrained(tmp_path / "bad")
    ProxSparseConfig().save_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"Unknown ProxSparseConfig override\(s\) \['lambda3'\]"):
        ProxSparseConfig.from_pretrained(tmp_path / "ok", lambda3=1)
    with pytest.raises(ValueError, match="`lambda1`"):
        ProxSparseConfig.from_pretrained(tmp_path / "ok", lambda1=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ProxSparseConfig().save_pretrained(tmp_path / "file")


def test_hub_round_trip(hub_url):
    c = ProxSparseConfig(lambda1=1.5, target_modules=["q_proj", "k_proj"])
    url = c.push_to_hub("alice/cfg-roundtrip")
    assert "alice/cfg-roundtrip" in url
    assert ProxSparseConfig.from_pretrained("alice/cfg-roundtrip") == c
    # a second version on a branch, read by revision
    from huggingface_hub import HfApi

    HfApi().create_branch("alice/cfg-roundtrip", branch="v2")
    ProxSparseConfig(lambda1=9.0).push_to_hub("alice/cfg-roundtrip", revision="v2")
    assert ProxSparseConfig.from_pretrained("alice/cfg-roundtrip", revision="v2").lambda1 == 9.0
    assert ProxSparseConfig.from_pretrained("alice/cfg-roundtrip").lambda1 == 1.5


def test_hub_missing_repo_is_clear(hub_url):
    with pytest.raises(ValueError, match=r"Can't find proxsparse_config.json at 'alice/does-not-exist'"):
        ProxSparseConfig.from_pretrained("alice/does-not-exist")


def test_config_written_before_step_scaling_loads_with_absolute_steps(tmp_path):
    """A config file from a version without ``step_scaling`` means what it meant then: absolute steps."""
    data = ProxSparseConfig(lambda1=0.03, lambda_scaling="weight_scale", importance="activation").to_dict()
    del data["step_scaling"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    loaded = ProxSparseConfig.from_pretrained(tmp_path)
    assert loaded.step_scaling == "none" and loaded.importance == "activation"


def test_recipes_and_their_learning_rates():
    from proxsparse_hf.config import RECIPES, recipe_learning_rate

    rec = ProxSparseConfig.recommended()
    assert (rec.importance, rec.lambda_scaling, rec.lambda1, rec.step_scaling) == (
        "activation",
        "weight_scale",
        0.03,
        "weight_rms",
    )
    pub = ProxSparseConfig.from_recipe("published")
    assert (pub.importance, pub.lambda_scaling, pub.lambda1, pub.step_scaling) == ("magnitude", "none", 4.0, "none")
    # the default learning rate follows what a learning rate means (relative or absolute), not the importance measure
    assert recipe_learning_rate(rec) == RECIPES["recommended"]["learning_rate"] == 0.016
    assert recipe_learning_rate(pub) == RECIPES["published"]["learning_rate"] == 1e-4
    assert recipe_learning_rate(ProxSparseConfig(importance="activation")) == 1e-4
    assert recipe_learning_rate(ProxSparseConfig(step_scaling="weight_rms")) == 0.016
    assert ProxSparseConfig.recommended(lambda2=1.0).lambda2 == 1.0
    with pytest.raises(ValueError, match="`recipe`='best' is invalid; allowed: one of"):
        ProxSparseConfig.from_recipe("best")
    with pytest.raises(ValueError, match="`lambda1`=-1"):
        ProxSparseConfig.recommended(lambda1=-1)


def test_importance_validation_reads_the_registry():
    from proxsparse_hf.learning.importance import ImportanceMeasure, register_importance, unregister_importance

    with pytest.raises(ValueError, match="`importance`='toy-config'"):
        ProxSparseConfig(importance="toy-config")

    @register_importance("toy-config", label="toy", description="a test measure")
    class Toy(ImportanceMeasure):
        pass

    try:
        assert ProxSparseConfig(importance="toy-config").importance == "toy-config"
    finally:
        unregister_importance("toy-config")
    with pytest.raises(ValueError, match="`importance`='toy-config'"):
        ProxSparseConfig(importance="toy-config")
