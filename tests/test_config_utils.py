"""Tests for ftjax.config_utils: typed args, overrides, CLI parsing, hashing, recording."""

import json
import logging
import textwrap

import ml_collections
import pytest
from ml_collections import config_dict

from ftjax import config_utils as cu


def _cfg() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100
    c.name = "run"
    c.use_lora = False
    c.maybe = None
    c.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 1e-3, "betas": (0.9, 0.95), "schedule": "cosine", "clip": 1.0}
    )
    c.lora = ml_collections.ConfigDict({"rank": 8, "targets": ("q_proj", "v_proj"),
                                        "layers": [0, 1]})
    return c


# ---------------------------------------------------------------------------- parse_arg


def test_parse_arg_types_and_defaults():
    arg = cu.parse_arg("model=llama,rank=16,lora=True,lr=3", model="gemma", rank=8,
                       lora=False, lr=1e-3, tag="x", extra=None)
    assert arg.model == "llama"
    assert arg.rank == 16 and type(arg.rank) is int
    assert arg.lora is True
    assert arg.lr == 3.0 and type(arg.lr) is float
    assert arg.tag == "x"  # default kept
    assert arg.extra is None


@pytest.mark.parametrize("text,expected", [("1", True), ("0", False), ("false", False),
                                           ("TRUE", True), ("yes", True), ("no", False)])
def test_parse_arg_bool_forms(text, expected):
    assert cu.parse_arg(f"flag={text}", flag=not expected).flag is expected


def test_parse_arg_bare_bool_and_none_default():
    assert cu.parse_arg("lora", lora=False).lora is True
    assert cu.parse_arg("x=3.5", x=None).x == 3.5
    assert cu.parse_arg("x=None", x=None).x is None
    assert cu.parse_arg("x=hello", x=None).x == "hello"
    assert cu.parse_arg(None, a=1).a == 1
    assert cu.parse_arg("", a=1).a == 1


def test_parse_arg_unknown_key_names_key_and_allowed():
    with pytest.raises(ValueError, match=r"'rnak'.*allowed keys: \['model', 'rank'\]"):
        cu.parse_arg("rnak=4", model="llama", rank=8)


@pytest.mark.parametrize("arg,pattern", [
    ("rank=abc", r"'rank'.*'abc'.*int"),
    ("rank=1.5", r"'rank'.*'1.5'.*int"),
    ("lr=fast", r"'lr'.*'fast'.*float"),
    ("lora=maybe", r"'lora'.*'maybe'.*bool"),
])
def test_parse_arg_wrong_type(arg, pattern):
    with pytest.raises(ValueError, match=pattern):
        cu.parse_arg(arg, rank=8, lr=1e-3, lora=False)


def test_parse_arg_bare_non_bool_and_duplicate_rejected():
    with pytest.raises(ValueError, match="needs a value"):
        cu.parse_arg("rank", rank=8)
    with pytest.raises(ValueError, match="twice"):
        cu.parse_arg("rank=1,rank=2", rank=8)


def test_configs_common_reexports_parse_arg():
    from configs import common

    assert common.parse_arg is cu.parse_arg
    assert common.pack_arg(rank=4, model="llama") == "rank=4,model=llama"


# ---------------------------------------------------------------------------- overrides


def test_overrides_every_type():
    c = _cfg()
    out = cu.apply_overrides(c, [
        ("seed", "7"),
        ("total_steps", "1e4"),
        ("name", "exp 1"),
        ("use_lora", "yes"),
        ("maybe", "[1, 2]"),
        ("optimizer.learning_rate", "2e-4"),
        ("optimizer.clip", "3"),  # int into a float field
        ("optimizer.betas", "(0.8, 0.99)"),
        ("lora.targets", "q_proj,k_proj,o_proj"),  # unquoted comma list of names
        ("lora.layers", "[2, 3, 4]"),
    ])
    assert out.seed == 7 and type(out.seed) is int
    assert out.total_steps == 10000 and type(out.total_steps) is int
    assert out.name == "exp 1"
    assert out.use_lora is True
    assert out.maybe == [1, 2]
    assert out.optimizer.learning_rate == pytest.approx(2e-4)
    assert out.optimizer.clip == 3.0 and type(out.optimizer.clip) is float
    assert out.optimizer.betas == (0.8, 0.99)
    assert out.lora.targets == ("q_proj", "k_proj", "o_proj")
    assert out.lora.layers == [2, 3, 4]
    assert c.seed == 0, "the input config must not be modified"


@pytest.mark.parametrize("text,expected", [("true", True), ("False", False), ("1", True),
                                           ("0", False), ("yes", True), ("no", False)])
def test_override_bool_forms(text, expected):
    assert cu.apply_overrides(_cfg(), [("use_lora", text)]).use_lora is expected


def test_override_none_field_accepts_literals_and_strings():
    assert cu.apply_overrides(_cfg(), [("maybe", "3")]).maybe == 3
    assert cu.apply_overrides(_cfg(), [("maybe", "abc")]).maybe == "abc"
    assert cu.apply_overrides(_cfg(), [("maybe", "None")]).maybe is None


def test_override_accepts_mapping_and_later_wins():
    out = cu.apply_overrides(_cfg(), [("seed", "1"), ("seed", "2")])
    assert out.seed == 2
    assert cu.apply_overrides(_cfg(), {"lora.rank": "4"}).lora.rank == 4


def test_override_works_on_locked_config():
    c = _cfg()
    c.lock()
    assert cu.apply_overrides(c, [("lora.rank", "32")]).lora.rank == 32


def test_override_unknown_key_lists_nearest_keys():
    with pytest.raises(ValueError) as e:
        cu.apply_overrides(_cfg(), [("optimizer.learning_rat", "1")])
    msg = str(e.value)
    assert "unknown config key 'optimizer.learning_rat'" in msg
    assert "'optimizer' has keys:" in msg and "'learning_rate'" in msg
    assert "did you mean 'optimizer.learning_rate'" in msg


def test_override_unknown_top_level_and_group():
    with pytest.raises(ValueError, match=r"unknown config key 'sed'.*top level.*'seed'"):
        cu.apply_overrides(_cfg(), [("sed", "1")])
    with pytest.raises(ValueError, match=r"unknown config key 'optimzer.lr'.*'optimizer'"):
        cu.apply_overrides(_cfg(), [("optimzer.lr", "1")])
    with pytest.raises(ValueError, match=r"'seed' is a int, not a config group"):
        cu.apply_overrides(_cfg(), [("seed.x", "1")])


@pytest.mark.parametrize("key,value,expected", [
    ("seed", "abc", "int"),
    ("seed", "1.5", "int"),
    ("seed", "None", "int"),
    ("optimizer.learning_rate", "fast", "float"),
    ("use_lora", "2", "bool"),
    ("name", "None", "str"),
    ("optimizer.betas", "5", "tuple"),
    ("optimizer.betas", "(0.9, 'x')", "tuple of float"),
    ("lora.layers", "[1, 'a']", "list of int"),
])
def test_override_wrong_type_names_key_value_and_type(key, value, expected):
    with pytest.raises(ValueError) as e:
        cu.apply_overrides(_cfg(), [(key, value)])
    msg = str(e.value)
    assert repr(key) in msg and repr(value) in msg and expected in msg


def test_override_group_itself_is_rejected():
    with pytest.raises(ValueError, match="config group"):
        cu.apply_overrides(_cfg(), [("optimizer", "1")])


def test_override_placeholder_and_field_reference():
    c = ml_collections.ConfigDict()
    c.width = 4
    c.mlp = c.get_ref("width") * 4
    c.steps = config_dict.placeholder(int)
    out = cu.apply_overrides(c, [("width", "8"), ("steps", "12")])
    assert out.mlp == 32  # the reference follows the override
    assert out.steps == 12
    with pytest.raises(ValueError, match=r"'steps'.*'x'.*int"):
        cu.apply_overrides(c, [("steps", "x")])
    assert cu.apply_overrides(c, [("steps", "None")]).steps is None


# ---------------------------------------------------------------------------- parse_cli


def test_parse_cli_all_forms():
    spec, wd, ov, extra = cu.parse_cli([
        "--config", "configs/x.py:rank=4", "--workdir=/tmp/w",
        "--config.a.b=1", "--config.c", "-3", "--config.d=x=y",
    ])
    assert spec == "configs/x.py:rank=4"
    assert wd == "/tmp/w"
    assert ov == [("a.b", "1"), ("c", "-3"), ("d", "x=y")]
    assert extra == {}
    spec, wd, ov, _ = cu.parse_cli(["--config=configs/y.py", "--workdir", "w"])
    assert (spec, wd, ov) == ("configs/y.py", "w", [])


def test_parse_cli_extra_flags():
    _, _, _, extra = cu.parse_cli(["--config=c.py", "--eval_only", "--resume=latest"],
                                  extra_flags=("eval_only", "resume"))
    assert extra == {"eval_only": "true", "resume": "latest"}


def test_parse_cli_errors():
    with pytest.raises(ValueError, match=r"unknown flag '--lr'.*--config.*--workdir"):
        cu.parse_cli(["--config=c.py", "--lr=1"])
    with pytest.raises(ValueError, match="unexpected argument 'stray'"):
        cu.parse_cli(["--config=c.py", "stray"])
    with pytest.raises(ValueError, match="needs a value"):
        cu.parse_cli(["--config=c.py", "--config.a.b"])
    with pytest.raises(ValueError, match="missing --config"):
        cu.parse_cli(["--workdir=w"])
    with pytest.raises(ValueError, match="twice"):
        cu.parse_cli(["--config=a.py", "--config=b.py"])


# ---------------------------------------------------------------------------- load_config


def test_load_config_with_and_without_arg(tmp_path):
    f = tmp_path / "exp.py"
    f.write_text(textwrap.dedent("""
        import ml_collections
        from ftjax.config_utils import parse_arg

        def get_config(arg=None):
            arg = parse_arg(arg, model="llama", rank=8)
            c = ml_collections.ConfigDict()
            c.model = arg.model
            c.rank = arg.rank
            return c
    """))
    assert cu.load_config(str(f)).to_dict() == {"model": "llama", "rank": 8}
    assert cu.load_config(f"{f}:model=gemma,rank=2").to_dict() == {"model": "gemma", "rank": 2}
    with pytest.raises(ValueError, match="'rnk'"):
        cu.load_config(f"{f}:rnk=2")


def test_load_config_required_arg_and_no_arg(tmp_path):
    f = tmp_path / "req.py"
    f.write_text("import ml_collections\n"
                 "def get_config(arg):\n"
                 "    return ml_collections.ConfigDict({'arg': arg})\n")
    assert cu.load_config(str(f)).arg is None
    g = tmp_path / "noarg.py"
    g.write_text("import ml_collections\n"
                 "def get_config():\n"
                 "    return ml_collections.ConfigDict({'a': 1})\n")
    assert cu.load_config(str(g)).a == 1
    with pytest.raises(ValueError, match="takes no argument"):
        cu.load_config(f"{g}:x=1")


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        cu.load_config(str(tmp_path / "nope.py"))
    f = tmp_path / "empty.py"
    f.write_text("x = 1\n")
    with pytest.raises(ValueError, match="does not define get_config"):
        cu.load_config(str(f))
    g = tmp_path / "wrong.py"
    g.write_text("def get_config(arg=None):\n    return {'a': 1}\n")
    with pytest.raises(ValueError, match="returned dict"):
        cu.load_config(str(g))


# ---------------------------------------------------------------------------- hashing


def test_config_hash_stable_under_key_order_and_sensitive_to_values():
    a = ml_collections.ConfigDict({"x": 1, "y": {"p": (1, 2), "q": "s"}})
    b = ml_collections.ConfigDict({"y": {"q": "s", "p": (1, 2)}, "x": 1})
    h = cu.config_hash(a)
    assert len(h) == 12 and all(ch in "0123456789abcdef" for ch in h)
    assert cu.config_hash(b) == h
    assert cu.config_hash(cu.apply_overrides(a, [("y.q", "t")])) != h
    assert cu.config_hash(cu.apply_overrides(a, [("x", "2")])) != h
    # tuples hash as lists (canonical JSON), so a JSON round trip keeps the hash.
    assert cu.config_hash(json.loads(json.dumps(cu.to_jsonable(a)))) == h


def test_to_jsonable_rejects_opaque_objects():
    c = ml_collections.ConfigDict({"a": 1})
    c.obj = object()
    with pytest.raises(TypeError, match="'obj'"):
        cu.to_jsonable(c)
    assert cu.to_jsonable({"f": len, "t": (1, (2, 3))}) == {"f": "builtins.len",
                                                            "t": [1, [2, 3]]}


def test_write_resolved_config_writes_and_backs_up(tmp_path, caplog):
    wd = tmp_path / "run"
    c = _cfg()
    h = cu.write_resolved_config(c, wd)
    saved = json.loads((wd / "config.json").read_text())
    assert saved["_hash"] == h == cu.config_hash(c)
    assert saved["optimizer"]["betas"] == [0.9, 0.95]
    assert (wd / "config_hash.txt").read_text().strip() == h

    # Same config again: nothing backed up.
    assert cu.write_resolved_config(c, wd) == h
    assert sorted(p.name for p in wd.iterdir()) == ["config.json", "config_hash.txt"]

    # Changed config: the old one is kept under its hash, with a warning.
    c2 = cu.apply_overrides(c, [("seed", "1")])
    with caplog.at_level(logging.WARNING, logger="ftjax.config_record"):
        h2 = cu.write_resolved_config(c2, wd)
    assert h2 != h
    backup = wd / f"config.{h}.json"
    assert backup.exists() and json.loads(backup.read_text())["seed"] == 0
    assert json.loads((wd / "config.json").read_text())["_hash"] == h2
    assert (wd / "config_hash.txt").read_text().strip() == h2
    assert any(h in r.getMessage() and h2 in r.getMessage() for r in caplog.records)


def test_hash_is_the_same_on_every_process_of_a_run():
    """Runtime placement (`distributed`) is recorded but does not enter the hash."""
    c = _cfg()
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address=None, num_processes=None,
                                                   process_id=None))
    h = cu.config_hash(c)
    for pid in ("0", "1"):
        other = cu.apply_overrides(c, [("distributed.process_id", pid),
                                       ("distributed.num_processes", "2"),
                                       ("distributed.coordinator_address", "'10.0.0.1:1234'")])
        assert cu.config_hash(other) == h
        assert cu.to_jsonable(other)["distributed"]["process_id"] == int(pid)  # still recorded
    assert cu.config_hash(cu.apply_overrides(c, [("seed", "1")])) != h


def test_write_resolved_config_only_on_process_zero(tmp_path, monkeypatch):
    from ftjax import workdir
    monkeypatch.setattr(workdir, "is_primary", lambda: False)
    h = cu.write_resolved_config(_cfg(), tmp_path / "run")
    assert h == cu.config_hash(_cfg()) and not (tmp_path / "run").exists()
