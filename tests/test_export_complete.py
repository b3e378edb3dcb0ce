"""Every export is complete and is the trained model (issue 11, items 3, 4, 5, 11).

- The built-in CharTokenizer as Hugging Face files: transformers' AutoTokenizer and ftjax's
  HFTokenizer give exactly CharTokenizer's ids, and the "plain" chat template renders exactly
  the ids the synthetic tasks train on.
- One short quickstart LoRA run (module fixture, the shipped base copied to tmp) exported by
  `export.hf_dir`, `scripts/export_peft.py --workdir <quickstart workdir>` (adapter + merged)
  and loaded with transformers / peft: same logits as ftjax's trained params, same chat ids,
  scripts/generate.py reproduces ftjax's generation with the recorded template.
- The base fingerprint: a base file changed after training makes export and resume refuse.
"""
import importlib.util
import json
import os
import pathlib
import shutil

import numpy as np
import peft
import pytest
import torch
import transformers as tf

from ftjax.data.batching import encode_example
from ftjax.data.chat import BUILTIN_TEMPLATES, apply_chat_template
from ftjax.data.hf_tokenizer import HFTokenizer
from ftjax.data.tokenizer import CharTokenizer
from ftjax.io.hf import write_chat_template

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "experiments" / "quickstart_base" / "model.safetensors"
PROMPT = "dmy2iso 18/05/1971"
TEXTS = ["", " ", "a", "  two  spaces  ", "Hello, World!", PROMPT, "x\ny\n\n", "\n",
         "".join(chr(c) for c in range(32, 127)), "~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/", "0123456789"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"ftjax_script_{name}",
                                                  ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ids(out):
    """transformers 5's apply_chat_template returns a BatchEncoding; 4 returned a list."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_char_tokenizer_files_give_the_same_ids(tmp_path):
    char = CharTokenizer()
    files = char.save_pretrained(tmp_path)
    write_chat_template(tmp_path, BUILTIN_TEMPLATES["plain"])
    assert set(files) <= set(os.listdir(tmp_path))
    theirs = tf.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = HFTokenizer.from_dir(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 0, 99)
    for text in TEXTS:
        want = char.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == want, text
        assert theirs(text)["input_ids"] == [1] + want, text  # bos, as training rows start
        assert ours.encode(text) == want, text
        assert theirs.decode([1] + want + [2], skip_special_tokens=True) == text
        assert ours.decode(want + [2, 5]) == char.decode(want) == text
    with pytest.raises(Exception, match="UNK"):  # no silent unknown ids
        theirs("café")

    # The chat template renders exactly the synthetic layout the run trained on.
    ex = {"prompt": PROMPT, "answer": "1971-05-18"}
    row = encode_example(char, ex, 48)["tokens"]
    trained = [int(t) for t in row[:row.tolist().index(char.eos_id) + 1]]
    conv = [{"role": "user", "content": ex["prompt"]}]
    prompt_ids = [1] + char.encode(ex["prompt"] + "\n")
    assert _ids(theirs.apply_chat_template(conv, add_generation_prompt=True)) == prompt_ids
    assert apply_chat_template(ours, conv, add_generation_prompt=True) == prompt_ids
    full = conv + [{"role": "assistant", "content": ex["answer"]}]
    assert _ids(theirs.apply_chat_template(full)) == trained
    assert apply_chat_template(ours, full) == trained == apply_chat_template(
        char, full, template="plain")


# ---------------------------------------------------------------------------------------------
# One short quickstart LoRA run, exported every way


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    from ftjax import main as ftmain
    tmp = tmp_path_factory.mktemp("qs")
    base = tmp / "base.safetensors"  # a copy, so the changed-base test can change it
    shutil.copyfile(SHIPPED, base)
    args = ["--config", f"{ROOT}/configs/quickstart.py:peft=lora,steps=2,eval_examples=4",
            "--workdir", str(tmp / "wd"), f"--config.base.path={base}",
            f"--config.export.hf_dir={tmp / 'hf_dir'}", "--config.train.progress=false",
            "--config.train.tensorboard=false", "--config.data.other_tasks=()",
            "--config.optimizer.warmup_steps=0", "--config.optimizer.learning_rate=0.02",
            "--config.train.eval_every=0", "--config.data.replay_frac=0.0",
            "--config.data.eval_batch_size=4"]
    summary = ftmain.main(args)
    export = _script("export_peft")
    export.main(["--workdir", str(tmp / "wd"), "--out", str(tmp / "adapter")])
    export.main(["--workdir", str(tmp / "wd"), "--out", str(tmp / "merged"),
                 "--format", "merged"])
    cfg, trained, _, untrained, _, step, _ = export.restore_peft_run(str(tmp / "wd" / "finetune"))
    return dict(tmp=tmp, base=base, args=args, summary=summary, cfg=cfg, trained=trained,
                untrained=untrained, step=step, export=export)


def _char_batch():
    char = CharTokenizer()
    rows = [[1] + char.encode(t) for t in (PROMPT + "\n1971-05-18", "reverse abc\ncba")]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def _close(ours, ref, mask, what):
    real = mask.astype(bool)
    err, scale = float(np.abs(ours - ref)[real].max()), float(np.abs(ref[real]).max())
    assert scale > 0.1 and err <= 1e-4 * scale, (what, err, scale)


def test_quickstart_exports_are_complete_and_reproduce_the_model(qs):
    from ftjax import models
    tmp, cfg, trained = qs["tmp"], qs["cfg"], qs["trained"]
    assert qs["step"] == 2 and qs["summary"]["exported_hf_dir"] == str(tmp / "hf_dir")
    run_cfg = json.loads((tmp / "wd" / "finetune" / "config.json").read_text())
    assert run_cfg["model"]["init_from"] == str(qs["base"])  # the sub-run's own config

    ids, mask = _char_batch()
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    ours = np.asarray(models.apply(trained, cfg, ids, positions=pos, segment_ids=mask)[0])
    base_logits = np.asarray(models.apply(qs["untrained"], cfg, ids, positions=pos,
                                          segment_ids=mask)[0])
    assert np.abs(ours - base_logits)[mask.astype(bool)].max() > 1e-2  # the adapter trained

    def hf_logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(pos)).logits.numpy()

    conf = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    base_dir = conf["base_model_name_or_path"]
    assert base_dir == str(tmp / "adapter" / "base") and os.path.isdir(base_dir)
    adapter = peft.PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_pretrained(base_dir), str(tmp / "adapter")).eval()
    _close(ours, hf_logits(adapter), mask, "adapter over the exported base")
    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp / "merged")).eval()
    _close(ours, hf_logits(model), mask, "merged")
    tok = tf.AutoTokenizer.from_pretrained(str(tmp / "merged"))
    conv = [{"role": "user", "content": PROMPT}]
    assert _ids(tok.apply_chat_template(conv, add_generation_prompt=True)) == list(
        ids[0, :len(PROMPT) + 2])  # [bos] prompt "\n": the trained layout
    # export.hf_dir (written by the quickstart from its in-memory params) is the same model.
    assert _tensors(tmp / "hf_dir") == _tensors(tmp / "merged")
    for d in ("merged", "hf_dir", "adapter", "adapter/base"):
        files = set(os.listdir(tmp / d))
        assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files, d
        assert (tmp / d / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["plain"]
        if d != "adapter":
            assert {"config.json", "model.safetensors"} <= files, d


def _tensors(d):
    from safetensors.numpy import load_file
    return {k: v.tobytes() for k, v in load_file(str(d / "model.safetensors")).items()}


def test_generate_uses_the_recorded_template(qs, capsys):
    gen = _script("generate")
    # The quickstart's own greedy generation after fine-tuning (16 new tokens) is what
    # scripts/generate.py --chat gives on the exported directory, with no --template.
    sample = qs["summary"]["samples"][0]
    capsys.readouterr()
    assert gen.main(["--model", str(qs["tmp"] / "merged"), "--chat", sample["prompt"],
                     "--max-new-tokens", "16"]) == [sample["after"]]
    assert "warning" not in capsys.readouterr().err
    args = gen.parse_args(["--model", str(qs["tmp"] / "merged"), "--chat", PROMPT,
                           "--template", "alpaca"])
    tok = HFTokenizer.from_dir(qs["tmp"] / "merged")
    assert gen.chat_template_for(args, tok) == BUILTIN_TEMPLATES["alpaca"]
    err = capsys.readouterr().err
    assert "warning: --template 'alpaca' is not the template the model was trained with" in err
    assert len(err.strip().splitlines()) == 1
    args.template = "plain"  # the recorded one: no warning
    assert gen.chat_template_for(args, tok) == BUILTIN_TEMPLATES["plain"]
    assert capsys.readouterr().err == ""

    # A params file: its recorded template, else "plain" (the shipped base records none).
    from ftjax.io.params_file import load_params, save_params
    char = CharTokenizer()
    assert gen.recorded_template(str(SHIPPED), char)[1] == BUILTIN_TEMPLATES["plain"]
    cfg, params = load_params(str(SHIPPED))
    path = str(qs["tmp"] / "recorded.safetensors")
    save_params(path, cfg, params, chat_template={"name": "alpaca",
                                                  "source": BUILTIN_TEMPLATES["alpaca"]})
    assert gen.recorded_template(path, char) == (
        f"template 'alpaca' recorded in {path}", BUILTIN_TEMPLATES["alpaca"])


def test_changed_base_is_refused_by_export_and_resume(qs):
    from ftjax import main as ftmain
    from ftjax.io.params_file import load_params, save_params
    tmp, base = qs["tmp"], qs["base"]
    original = base.read_bytes()
    cfg, params = load_params(str(base))
    emb = params["embed"]["embedding"]
    noise = np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32)
    save_params(str(base), cfg, {**params, "embed": {"embedding": emb + 0.05 * noise}})
    try:
        with pytest.raises(ValueError, match=r"not the base the run trained on .*embed/"
                                             r"embedding: values differ"):
            qs["export"].main(["--workdir", str(tmp / "wd"), "--out", str(tmp / "refused")])
        assert not (tmp / "refused").exists()
        args = [a.replace("steps=2", "steps=3") for a in qs["args"]]
        with pytest.raises(ValueError, match="the base rebuilt to resume step 2 .* is not "
                                             "the base the run trained on"):
            ftmain.main(args)
    finally:
        base.write_bytes(original)  # untouched, the exports of the fixture went through


def test_fingerprint_tolerates_the_mesh_and_names_a_changed_leaf():
    """A random init rebuilt on one device matches its fingerprint taken under jit on 8
    sharded devices (as the loop records it); a perturbed leaf is named."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ftjax.io import fingerprint as fp

    def init():  # the ops a model init uses: normal draws, scaled, and constants
        k = jax.random.split(jax.random.PRNGKey(3), 3)
        return {"embed": {"embedding": jax.random.normal(k[0], (99, 64)) * 0.02},
                "layers": {"up": {"kernel": jax.random.truncated_normal(
                    k[1], -2, 2, (2, 64, 128)) / 8.0}, "norm": {"scale": jnp.ones((2, 64))}},
                "lm_head": {"kernel": jax.random.uniform(k[2], (64, 99), minval=-0.1)}}

    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    shard = jax.tree.map(lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "fsdp")
                                                 if x.shape[-1] % 8 == 0 else P()),
                         jax.eval_shape(init))

    def sharded():
        base = init()
        return base, fp.summaries(base)
    params, sums = jax.jit(sharded, out_shardings=(shard, NamedSharding(mesh, P())))()
    recorded = fp.fingerprint(params, sums)
    single = jax.device_get(jax.jit(init)())  # one device, no sharding
    again = fp.fingerprint(single)
    assert fp.compare(recorded, again) == [] and recorded["digest"] == again["digest"]
    changed = jax.tree.map(np.array, single)
    changed["layers"]["up"]["kernel"] *= 1.01
    problems = fp.compare(recorded, fp.fingerprint(changed))
    assert len(problems) == 1 and problems[0].startswith("layers/up/kernel: values differ")
    with pytest.raises(ValueError, match="1 of 4 leaves differ, e.g. layers/up/kernel"):
        fp.check(recorded, fp.fingerprint(changed), "the base")
    fp.check(None, again, "the base")  # nothing recorded: nothing to check


def test_find_run_names_what_is_missing(tmp_path):
    from ftjax.io.restore import find_run
    with pytest.raises(FileNotFoundError, match="no checkpoints under"):
        find_run(tmp_path)
    (tmp_path / "finetune" / "checkpoints" / "7").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no config.json of its own"):
        find_run(tmp_path)
    (tmp_path / "finetune" / "config.json").write_text("{}")
    assert find_run(tmp_path) == (str(tmp_path / "finetune"), f"{tmp_path} has no checkpoints "
                                  f"of its own; using the training run in {tmp_path}/finetune")
    (tmp_path / "pretrain" / "checkpoints" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"several sub-runs .*'finetune', 'pretrain'"):
        find_run(tmp_path)


@pytest.mark.parametrize("method", ["prompt_tuning", "adapter"])
def test_quickstart_refuses_an_export_it_cannot_write_before_any_work(tmp_path, method):
    from ftjax import main as ftmain
    with pytest.raises(ValueError, match=f"export.hf_dir: peft.method='{method}' .*unset "
                                         "export.hf_dir"):
        ftmain.main(["--config", f"{ROOT}/configs/quickstart.py:peft={method}", "--workdir",
                     str(tmp_path), f"--config.export.hf_dir={tmp_path / 'hf'}",
                     "--config.base.path=no/such/base.safetensors"])  # never read


def test_eval_any_model_form_gives_the_same_logliks(qs):
    """The evaluation stage loads the run three ways — its workdir (LoRA unmerged, from the
    checkpoint), the merged HF export, and the exported base + PEFT adapter — and scores the
    same log-likelihoods on a multiple-choice task; the workdir's results carry its step and
    TensorBoard scalars."""
    from ftjax.evaluate import main as eval_main
    tmp = qs["tmp"]
    task = f"{ROOT}/experiments/data_samples/eval/dmy2iso_mc.jsonl:limit=12"
    lls = {}
    for name, args in [("workdir", ["--model", str(tmp / "wd")]),
                       ("merged", ["--model", str(tmp / "merged")]),
                       ("adapter", ["--model", str(tmp / "adapter" / "base"),
                                    "--adapter", str(tmp / "adapter")])]:
        out = tmp / f"eval_{name}"
        payload = eval_main(args + ["--tasks", task, "--out", str(out)])
        rows = [json.loads(l) for l in (out / "samples_dmy2iso_mc.jsonl").read_text().splitlines()]
        lls[name] = np.array([r["lls"] for r in rows])
        if name == "workdir":
            assert payload["model"]["peft"] == "lora" and payload["model"]["step"] == qs["step"]
            assert (out / "tb").is_dir()
        if name == "adapter":
            assert payload["model"]["adapter"] == str(tmp / "adapter")
    np.testing.assert_allclose(lls["merged"], lls["workdir"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lls["adapter"], lls["workdir"], rtol=1e-4, atol=1e-4)
