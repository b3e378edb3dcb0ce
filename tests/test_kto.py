"""KTO (trainer "kto"): the unpaired loader (KL rows from a fixed partner, labels follow their
rows, resumable), the loss in the training layout against a numpy reference, policy ==
reference at init, and a short run raising held-out reward accuracy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import data as ftdata
from ftjax import models
from ftjax.align import kto
from ftjax.align.reference import pair_logps, strip_adapters
from ftjax.peft import get_method

TOK = ftdata.CharTokenizer()
SEQ = 24


def _examples(n=24):
    return [{"prompt": f"{i}+{i}=", "completion": str(2 * i) if i % 3 else str(2 * i + 1),
             "label": bool(i % 3)} for i in range(n)]


def _decode(row_ids, seg):
    return TOK.decode([t for t in row_ids[seg > 0].tolist() if t not in (TOK.bos_id, TOK.eos_id)])


def test_loader_pairs_each_prompt_with_another_completion_and_keeps_labels():
    ex = _examples()
    ld = kto.KTOLoader(ex, TOK, 8, SEQ, seed=3)
    by_prompt = {e["prompt"]: e for e in ex}
    partner = kto.kl_partners(len(ex), 0)
    assert (partner != np.arange(len(ex))).all() and sorted(partner) == list(range(len(ex)))
    for step in range(4):
        b = ld.batch_at(step)
        for i in range(8):
            p, c = _decode(b["chosen_inputs"][i], b["chosen_segment_ids"][i]).split("\n")
            kp, kc = _decode(b["rejected_inputs"][i], b["rejected_segment_ids"][i]).split("\n")
            assert by_prompt[p]["completion"] == c and kp == p
            assert b["label"][i, 0] == int(by_prompt[p]["label"])
            j = [e["prompt"] for e in ex].index(p)
            assert kc == ex[partner[j]]["completion"]   # fixed per example, across epochs
    again = kto.KTOLoader(ex, TOK, 8, SEQ, seed=3)
    next(again)
    state = again.get_state()
    resumed = kto.KTOLoader(ex, TOK, 8, SEQ, seed=3)
    resumed.set_state(state)
    for k, v in next(resumed).items():
        np.testing.assert_array_equal(v, ld.batch_at(1)[k])


def test_bad_unpaired_data_is_refused():
    with pytest.raises(ValueError, match="lacks"):
        kto.check_examples([{"prompt": "a", "label": True}, {"prompt": "b", "label": False}])
    with pytest.raises(ValueError, match="needs both labels"):
        kto.check_examples([{"prompt": "a", "completion": "x", "label": True}] * 3)
    with pytest.raises(ValueError, match="true"):
        kto.check_examples([{"prompt": "a", "completion": "x", "label": "maybe"}] * 2)


def _policy(peft="lora"):
    import ml_collections
    cfg = models.ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=48,
                             num_layers=2, num_heads=4, num_kv_heads=2)
    base = models.init(cfg, jax.random.PRNGKey(0))
    m = get_method(ml_collections.ConfigDict({"method": peft, "rank": 4, "alpha": 8.0}),
                   apply_fn=models.apply)
    params = m.transform(base, jax.random.PRNGKey(1)) if m.transform else base
    return cfg, m, params


def _np_kto(pol, ref, klp, klr, lab, beta, wd, wu):
    z0 = max(np.mean(klp - klr), 0.0)
    r = pol - ref
    sig = lambda x: 1 / (1 + np.exp(-x))
    return np.where(lab, wd * (1 - sig(beta * (r - z0))), wu * (1 - sig(beta * (z0 - r)))), z0


def test_loss_in_training_layout_equals_numpy_reference():
    """With a perturbed LoRA (policy != reference), the loop's loss equals the formula applied
    to the log-probs of the example rows and the KL rows."""
    cfg, m, params = _policy()
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.PRNGKey(7)
    leaves = [x + 0.05 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
              if jnp.issubdtype(x.dtype, jnp.floating) else x for i, x in enumerate(leaves)]
    params = jax.tree.unflatten(treedef, leaves)
    batch = {k: jnp.asarray(v) for k, v in kto.KTOLoader(_examples(), TOK, 8, SEQ, 0)
             .batch_at(0).items()}
    s = kto.Settings(beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
    total, stats = kto.kto_loss(cfg, s, m.apply_fn)(params, batch, None)
    pol = pair_logps(params, cfg, batch, m.apply_fn)
    ref = pair_logps(strip_adapters(params), cfg, batch)
    want, z0 = _np_kto(*(np.asarray(x, np.float64) for x in (pol["chosen"], ref["chosen"],
                                                            pol["rejected"], ref["rejected"])),
                       np.asarray(batch["label"][:, 0]) > 0, 0.5, 1.3, 0.7)
    assert float(stats["tokens"]) == 8
    np.testing.assert_allclose(float(total) / 8, want.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["kl"]) / 8, z0, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(pol["chosen"]) - np.asarray(ref["chosen"])).max() > 1e-3


@pytest.mark.parametrize("peft", ["lora", "dora"])
def test_policy_equal_to_reference_gives_half_weights(peft):
    """Adapters start as a no-op: r = 0 and z0 = 0, so each example's loss is w·(1 - σ(0))."""
    cfg, m, params = _policy(peft)
    batch = {k: jnp.asarray(v) for k, v in kto.KTOLoader(_examples(), TOK, 8, SEQ, 0)
             .batch_at(0).items()}
    s = kto.Settings(beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    total, stats = kto.kto_loss(cfg, s, m.apply_fn)(params, batch, None)
    lab = np.asarray(batch["label"][:, 0]) > 0
    np.testing.assert_allclose(float(total), np.sum(np.where(lab, 0.5, 1.0)), rtol=1e-5)
    assert abs(float(stats["kl"])) < 1e-5
    g = jax.grad(lambda p: kto.kto_loss(cfg, s, m.apply_fn)(p, batch, None)[0])(params)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) > 0


def test_kto_run_raises_heldout_reward_accuracy(tmp_path):
    from ftjax.main import main
    s = main(["--config", "configs/kto_synthetic.py:steps=40", "--workdir", str(tmp_path),
              "--config.data.n_per_task=400", "--config.train.eval_every=40",
              "--config.train.progress=False", "--config.train.tensorboard=False"])
    assert s["reference"] == "strip"
    assert s["before"]["eval_accuracy"] == 0          # policy == reference: every pair ties
    assert s["after"]["eval_accuracy"] >= 0.55, s["after"]
    assert s["after"]["eval_margin"] > 0


def test_kl_layout_pairs_prompts_with_the_next_rows_completion():
    """On the data pipeline's row layout (`packing.rows_from_bins`, one document per row)."""
    from ftjax.data.packing import rows_from_bins
    ex = _examples(5)

    def doc(prompt, completion):
        p = [TOK.bos_id] + list(TOK.encode(prompt + "\n"))
        c = list(TOK.encode(completion)) + [TOK.eos_id]
        return {"tokens": np.array(p + c), "loss_mask": np.array([0] * len(p) + [1] * len(c))}

    docs = [doc(e["prompt"], e["completion"]) for e in ex]
    batch = rows_from_bins(docs, [[i] for i in range(5)] + [[]], SEQ, TOK.pad_id)
    batch["label"] = np.array([int(e["label"]) for e in ex] + [0])
    out = kto.kl_layout(batch, TOK.pad_id)
    np.testing.assert_array_equal(out["chosen_inputs"], batch["inputs"])
    for i in range(5):
        j = (i + 1) % 5
        want = rows_from_bins([doc(ex[i]["prompt"], ex[j]["completion"])], [[0]], SEQ,
                              TOK.pad_id)
        for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(out[f"rejected_{k}"][i], want[k][0], err_msg=k)
    assert out["rejected_segment_ids"][5].sum() == 0          # padding rows stay empty
    assert out["label"][:, 0].tolist() == batch["label"].tolist()


def test_kto_on_an_unpaired_file(tmp_path):
    """configs/kto_file.py on the shipped unpaired sample (data pipeline, LoRA, reference =
    stripped adapters): the loss falls from w/2 and undesirable completions lose implicit
    reward against desirable ones; precompute is refused (KL rows are per batch)."""
    from ftjax.main import main
    args = ["--config", "configs/kto_file.py:steps=20", "--workdir", str(tmp_path),
            "--config.train.eval_every=20", "--config.train.progress=False",
            "--config.train.tensorboard=False"]
    s = main(args)
    assert s["data"]["source"] == "files" and s["reference"] == "strip"
    assert s["before"]["eval_loss"] == pytest.approx(0.5, abs=1e-5)
    assert s["after"]["eval_loss"] < 0.45 and s["after"]["eval_reward_gap"] > 0.2, s["after"]
    with pytest.raises(ValueError, match="precompute"):
        main(args + ["--config.kto.reference=precompute"])
