import dataclasses
import json

import pytest

from slim_kernels import SlimConfig

EXPECTED_FIELDS = {
    "num_lora_experts": 8, "num_identity_experts": 2, "rank": 16, "alpha": 32.0,
    "use_rslora": False, "top_k": 2, "lora_dropout": 0.0, "num_clusters": 16,
    "yield_strength": 2.0, "distance_reduce": "rms", "distance_scale": "none",
    "cluster_momentum": 0.1,
    "cluster_eps": 1e-5, "merge_drop": 0.0, "merge_rescale": False, "merge_at_eval": False,
    "l1_coef": 0.0, "balance_coef": 0.0,
    "target_modules": None,  # the model type's projections (q_proj ... down_proj on a Llama)
    "backend": "auto",
}


def test_exact_fields_and_defaults():
    c = SlimConfig()
    names = [f.name for f in dataclasses.fields(SlimConfig)]
    assert names == list(EXPECTED_FIELDS)
    for k, v in EXPECTED_FIELDS.items():
        assert getattr(c, k) == v, k
    assert c.num_experts == 10
    assert c.scaling == 2.0
    assert SlimConfig(use_rslora=True).scaling == pytest.approx(32.0 / 4.0)


def test_json_round_trip(tmp_path):
    c = SlimConfig(num_lora_experts=3, rank=5, distance_reduce="max", merge_drop=0.25,
                   target_modules=("q_proj", "down_proj"), backend="torch",
                   distance_scale="spread")
    text = c.to_json()
    assert json.loads(text)["target_modules"] == ["q_proj", "down_proj"]
    assert json.loads(text)["distance_scale"] == "spread"
    assert SlimConfig.from_dict(c.to_dict()) == c
    assert SlimConfig.from_json(text) == c
    p = tmp_path / "c.json"
    c.to_json(str(p))
    assert SlimConfig.from_json(str(p)) == c
    with pytest.raises(ValueError, match="unknown field"):
        SlimConfig.from_dict({"rank": 4, "bogus": 1})


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=11), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(rank=0), "rank"),
    (dict(num_lora_experts=0), "num_lora_experts"),
    (dict(num_identity_experts=-1), "num_identity_experts"),
    (dict(alpha=0.0), "alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(num_clusters=-1), "num_clusters"),
    (dict(yield_strength=-0.5), "yield_strength"),
    (dict(distance_reduce="median"), "distance_reduce"),
    (dict(distance_scale="std"), "distance_scale"),
    (dict(distance_scale=None), "distance_scale"),
    (dict(distance_scale=["spread"]), "distance_scale"),
    (dict(cluster_momentum=0.0), "cluster_momentum"),
    (dict(cluster_momentum=1.5), "cluster_momentum"),
    (dict(cluster_eps=0.0), "cluster_eps"),
    (dict(merge_drop=1.0), "merge_drop"),
    (dict(merge_drop=-0.1), "merge_drop"),
    (dict(l1_coef=-1.0), "l1_coef"),
    (dict(balance_coef=-1.0), "balance_coef"),
    (dict(backend="cublas"), "backend"),
    (dict(target_modules=()), "target_modules"),
    (dict(rank=2.5), "rank"),
    (dict(use_rslora="yes"), "use_rslora"),
    (dict(alpha=float("nan")), "alpha"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SlimConfig\.{field}="):
        SlimConfig(**kwargs)


def test_switches_off():
    assert not SlimConfig(num_clusters=0).yielding_enabled
    assert not SlimConfig(yield_strength=0.0).yielding_enabled
    assert not SlimConfig(num_identity_experts=0).yielding_enabled
    assert SlimConfig(num_identity_experts=0, top_k=8).num_experts == 8


def test_numpy_scalars_are_accepted_as_python_numbers():
    np = pytest.importorskip("numpy")
    c = SlimConfig(rank=np.int64(4), num_lora_experts=np.int32(3), alpha=np.float32(8.0),
                   cluster_eps=np.float64(1e-4), yield_strength=np.int64(2),
                   use_rslora=np.bool_(True))
    assert c == SlimConfig(rank=4, num_lora_experts=3, alpha=8.0, cluster_eps=1e-4,
                           yield_strength=2, use_rslora=True)
    assert type(c.rank) is int and type(c.alpha) is float and type(c.use_rslora) is bool
    assert SlimConfig.from_json(c.to_json()) == c  # stored as Python numbers: JSON works
    for bad in (dict(rank=np.float64(4.0)), dict(rank=np.bool_(True)), dict(alpha=np.float32("nan"))):
        with pytest.raises(ValueError, match=rf"SlimConfig\.{next(iter(bad))}="):
            SlimConfig(**bad)
    with pytest.raises(ValueError, match=r"SlimConfig\.alpha="):
        SlimConfig(alpha=10 ** 400)  # an int too large for a float


def test_from_dict_and_from_json_need_an_object(tmp_path):
    with pytest.raises(TypeError, match="from_dict expects a dict of field values, got list"):
        SlimConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="holds a JSON list, expected an object"):
        SlimConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="is not valid JSON"):
        SlimConfig.from_json('{"rank": ')
    with pytest.raises(TypeError, match="JSON text or a file path"):
        SlimConfig.from_json(3)
    p = tmp_path / "c.json"
    p.write_text("[]")
    with pytest.raises(ValueError, match=r"c\.json holds a JSON list"):
        SlimConfig.from_json(p)  # a pathlib.Path works as a path
    SlimConfig(rank=3).to_json(p)
    assert SlimConfig.from_json(p) == SlimConfig(rank=3)


def test_distance_scale_values():
    assert SlimConfig().distance_scale == "none"
    for v in ("none", "spread"):
        assert SlimConfig(distance_scale=v).distance_scale == v
        assert SlimConfig.from_json(SlimConfig(distance_scale=v).to_json()).distance_scale == v
    with pytest.raises(ValueError, match=r"SlimConfig\.distance_scale='std' is invalid: "
                                         r"expected one of none, spread"):
        SlimConfig(distance_scale="std")
