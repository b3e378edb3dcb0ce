"""The on-policy trainers (GRPO, RLOO, PPO) on the rollout producer (`trainers/_rollout.py`):
rollout batches hold the policy's own samples with the advantages their rewards give, the
losses in the training layout equal closed forms, bad reward functions and long prompts are
named, 8 devices equal 1, a resumed run equals an uninterrupted one, and short runs learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import config_utils
from ftjax.align import pg, rl
from ftjax.train.run import Run
from ftjax.trainers import resolve_config
from ftjax.trainers._rollout import RewardError
from ftjax.trainers.grpo import GRPORollouts, synthetic_examples
from ftjax.trainers.rloo import RLOORollouts

_CALLS = {"n": 0, "crash_at": None, "exc": KeyboardInterrupt}


def bad_reward(prompt, completion, example):
    raise ZeroDivisionError("boom")


def nan_reward(prompt, completion, example):
    return float("nan")


def crash_reward(prompt, completion, example):
    """Counts rollouts (calls / samples) and interrupts the run at one of them."""
    _CALLS["n"] += 1
    if _CALLS["crash_at"] is not None and _CALLS["n"] > _CALLS["crash_at"]:
        raise _CALLS["exc"]("interrupted by the test")
    return float(completion.strip() == example["answer"].strip())


def _cfg(trainer="grpo", steps=4, extra=()):
    path = {"grpo": "configs/grpo_synthetic.py", "rloo": "configs/rloo_synthetic.py"}[trainer]
    over = [(f"{trainer}.prompts_per_step", "4"), (f"{trainer}.group_size", "4"),
            ("train.batch_size", "16"), ("train.steps", str(steps)),
            ("train.progress", "False"), ("train.tensorboard", "False"),
            ("train.checkpoint_every", "2"), ("data.n_per_task", "200"),
            ("data.eval_examples", "16"), (f"{trainer}.max_new_tokens", "8")] + list(extra)
    return resolve_config(config_utils.load_config(path), over)


def _decode(tok, ids):
    return tok.decode([t for t in ids if t not in (tok.bos_id, tok.eos_id)])


def test_grpo_rollout_batch_is_the_policys_samples_with_group_advantages(tmp_path):
    cfg = _cfg()
    r = Run.build(cfg, str(tmp_path), name="grpo")
    train, _ = synthetic_examples(cfg)
    prod = GRPORollouts(r, train, cfg.grpo, name="grpo", old_logps=False)
    params = r.starting_params()
    b = prod.next_batch(0, params)
    tok = r.tokenizer
    answers = {e["prompt"]: e["answer"] for e in train}
    rewards = []
    for i in range(16):
        m = b["loss_mask"][i] > 0
        prompt_text = _decode(tok, b["inputs"][i][:np.argmax(m) + 1].tolist())
        prompt = prompt_text.rstrip("\n")
        completion = _decode(tok, b["targets"][i][m].tolist())
        assert prompt in answers
        # the reward the advantages came from, re-derived: exact + 0.2 * format
        ex = {"answer": answers[prompt]}
        from ftjax.trainers._rollout import answer_format, exact_answer
        rewards.append(exact_answer(prompt, completion, ex)
                       + 0.2 * answer_format(prompt, completion, ex))
    rewards = np.asarray(rewards).reshape(4, 4)
    std = rewards.std(1, ddof=1, keepdims=True)
    want = (rewards - rewards.mean(1, keepdims=True)) / (std + 1e-4)
    np.testing.assert_allclose(b["advantages"].reshape(4, 4), want, rtol=1e-4, atol=1e-4)
    # the same step draws the same samples (resumable), and a step inside a cycle reuses it
    again = GRPORollouts(r, train, cfg.grpo, name="grpo", old_logps=False).next_batch(0, params)
    np.testing.assert_array_equal(again["inputs"], b["inputs"])
    prod.iters = 2
    np.testing.assert_array_equal(prod.next_batch(1, params)["inputs"], b["inputs"])


def test_grpo_loss_on_policy_is_minus_mean_advantage_and_has_gradient(tmp_path):
    cfg = _cfg()
    r = Run.build(cfg, str(tmp_path), name="grpo")
    train, _ = synthetic_examples(cfg)
    b = GRPORollouts(r, train, cfg.grpo, name="grpo", old_logps=False).next_batch(
        0, r.starting_params())
    b = {k: jnp.asarray(v) for k, v in b.items()}
    b["advantages"] = jnp.asarray(np.linspace(-1.5, 2.0, 16, dtype=np.float32))[:, None]
    params = jax.device_get(r.starting_params())
    for loss_type in rl.GRPO_LOSS_TYPES:
        s = pg.GRPOSettings(loss_type=loss_type, max_completion_length=8)
        obj, st = pg.grpo_loss(r.model_cfg, s)(params, b, None)
        mask = np.asarray(b["loss_mask"])
        n_i = mask.sum(1)
        adv = np.asarray(b["advantages"])[:, 0]
        want = {"grpo": -np.mean(adv * (n_i > 0)),
                "bnpo": -np.sum(adv * n_i) / n_i.sum(), "dapo": -np.sum(adv * n_i) / n_i.sum(),
                "dr_grpo": -np.sum(adv * n_i) / (16 * 8)}[loss_type]
        np.testing.assert_allclose(float(obj) / float(st["tokens"]), want, rtol=1e-5,
                                   atol=1e-6, err_msg=loss_type)
    g = jax.grad(lambda p: pg.grpo_loss(r.model_cfg, s)(p, b, None)[0])(params)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) > 0


def test_rloo_advantages_are_leave_one_out_of_kl_penalised_rewards(tmp_path):
    cfg = _cfg("rloo", extra=[("rloo.beta", "0.1"), ("peft.method", "lora")])
    r = Run.build(cfg, str(tmp_path), name="rloo")
    train, _ = synthetic_examples(cfg)
    prod = RLOORollouts(r, train, cfg.rloo, name="rloo", reference="strip", old_logps=True)
    params = r.starting_params()
    b = prod.next_batch(0, params)
    # LoRA starts as a no-op: old == ref log-probs, the KL term is 0
    np.testing.assert_allclose(b["old_logps"] * b["loss_mask"], b["ref_logps"] * b["loss_mask"],
                               atol=1e-5)
    adv = b["advantages"].reshape(4, 4)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-5)   # leave-one-out sums to 0
    h = prod.history[-1]
    assert h["reward_with_kl"] == pytest.approx(h["reward"], abs=1e-4)
    # the KL to the start is 0 at the start, and positive once the adapters move
    assert prod.kl_to_start(params, train[:8])["kl_per_token"] == pytest.approx(0, abs=1e-5)
    import dataclasses
    moved = jax.device_get(params)
    for name in ("q_proj", "v_proj"):
        w = moved["layers"]["attn"][name]["kernel"]
        moved["layers"]["attn"][name]["kernel"] = dataclasses.replace(w, b=w.b + 0.3)
    assert prod.kl_to_start(moved, train[:8])["kl_per_token"] > 1e-3


def test_bad_reward_functions_and_long_prompts_are_named(tmp_path):
    cfg = _cfg(extra=[("grpo.reward_funcs", "('tests.test_rl_trainers:bad_reward',)"),
                      ("grpo.reward_weights", "(1.0,)")])
    r = Run.build(cfg, str(tmp_path), name="grpo")
    train, _ = synthetic_examples(cfg)
    with pytest.raises(RewardError, match="bad_reward.*ZeroDivisionError"):
        GRPORollouts(r, train, cfg.grpo, name="grpo", old_logps=False).next_batch(
            0, r.starting_params())
    cfg.grpo.reward_funcs = ("tests.test_rl_trainers:nan_reward",)
    with pytest.raises(RewardError, match="nan_reward.*nan"):
        GRPORollouts(r, train, cfg.grpo, name="grpo", old_logps=False).next_batch(
            0, r.starting_params())
    cfg.grpo.reward_funcs = ("no_such_reward",)
    with pytest.raises(ValueError, match="not known"):
        GRPORollouts(r, train, cfg.grpo, name="grpo")
    cfg.grpo.reward_funcs = ("exact",)
    cfg.grpo.reward_weights = (1.0,)
    long = train + [{"prompt": "x" * 60, "answer": "y"}]
    with pytest.raises(ValueError, match="longer than the rollout budget.*long_prompts=truncate"):
        GRPORollouts(r, long, cfg.grpo, name="grpo")
    cfg.grpo.long_prompts = "truncate"
    prod = GRPORollouts(r, long, cfg.grpo, name="grpo")
    assert len(prod.prompts[-1]) == 48 - 8 - 1
    cfg.grpo.prompts_per_step = 3
    with pytest.raises(ValueError, match="train.batch_size"):
        GRPORollouts(r, train, cfg.grpo, name="grpo")


def test_rollouts_on_eight_devices_equal_one(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    batches = []
    for devices, mesh in ((jax.devices()[:1], "1"), (None, "8")):
        cfg = _cfg(extra=[("mesh.data", mesh)] if mesh == "8" else [("mesh.data", "1")])
        r = Run.build(cfg, str(tmp_path / mesh), name="grpo", devices=devices)
        train, _ = synthetic_examples(cfg)
        prod = GRPORollouts(r, train, cfg.grpo, name="grpo", reference="strip",
                            old_logps=True)
        batches.append(prod.next_batch(0, r.starting_params()))
    one, eight = batches
    np.testing.assert_array_equal(one["inputs"], eight["inputs"])
    np.testing.assert_allclose(one["advantages"], eight["advantages"], atol=1e-6)
    np.testing.assert_allclose(one["old_logps"], eight["old_logps"], atol=2e-5)


def test_grpo_resume_equals_uninterrupted_and_a_failing_reward_keeps_checkpoints(tmp_path):
    import importlib
    from ftjax.trainers import grpo
    # the module the config's "module:function" imports (pytest may load this file under
    # another name): its counter is the one the reward function reads
    _CALLS = importlib.import_module("tests.test_rl_trainers")._CALLS
    extra = [("grpo.reward_funcs", "('tests.test_rl_trainers:crash_reward',)"),
             ("grpo.reward_weights", "(1.0,)"), ("grpo.num_iterations", "2"),
             ("peft.method", "full"), ("train.log_every", "1")]
    _CALLS.update(n=0, crash_at=None)
    full = grpo.run(_cfg(steps=6, extra=extra), str(tmp_path / "a"))
    _CALLS.update(n=0, crash_at=16 * 2)       # the third rollout (step 4) interrupts
    with pytest.raises(KeyboardInterrupt):
        grpo.run(_cfg(steps=6, extra=extra), str(tmp_path / "b"))
    _CALLS.update(n=0, crash_at=None)
    resumed = grpo.run(_cfg(steps=6, extra=extra), str(tmp_path / "b"))
    assert resumed["resumed_from"] in (2, 4)     # a rollout boundary before the crash
    assert [h["step"] for h in resumed["rollouts"]] == [0, 2, 4]
    for a, b in zip(full["rollouts"], resumed["rollouts"]):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5, abs=1e-7)
    assert resumed["exact_match_after"] == full["exact_match_after"]
    # a reward function that raises stops the run by name; the checkpoints written stay
    _CALLS.update(n=0, crash_at=16 * 2, exc=ValueError)
    with pytest.raises(RewardError, match="crash_reward.*ValueError"):
        grpo.run(_cfg(steps=6, extra=extra), str(tmp_path / "c"))
    _CALLS.update(exc=KeyboardInterrupt, crash_at=None)
    from ftjax.io.checkpoint import Checkpointer
    steps = Checkpointer(str(tmp_path / "c")).all_steps()
    assert steps and max(steps) in (2, 4), steps


def _reward_model_dir(tmp_path, run):
    """A reward model over the run's base (random score head), as the reward trainer exports."""
    from ftjax.models import heads
    from ftjax.train.export import save_reward_model
    params = jax.device_get(run.starting_params())
    params = {k: v for k, v in params.items() if k not in ("value",)}
    from ftjax.peft.core import merge
    params = merge(params)
    params["score"] = heads.init_score(jax.random.PRNGKey(5), run.model_cfg.hidden_size, 0.3)
    out = str(tmp_path / "rm")
    save_reward_model(out, run.model_cfg, params, run.tokenizer, "")
    return out


def test_ppo_rollout_rewards_gae_and_loss(tmp_path):
    from ftjax.models.heads import value_head
    from ftjax.train.reward_model import RewardModel
    from ftjax.train.run import model_config
    from ftjax.trainers.ppo import PPORollouts
    cfg = resolve_config(config_utils.load_config("configs/ppo_synthetic.py"),
                         [("ppo.prompts_per_step", "8"), ("train.batch_size", "8"),
                          ("ppo.max_new_tokens", "8"), ("data.n_per_task", "100"),
                          ("ppo.kl_coef", "0.3"), ("ppo.whiten_rewards", "False"),
                          ("train.checkpoint_every", "0")])
    mcfg = model_config(cfg.model)
    r = Run.build(cfg, str(tmp_path / "w"), name="ppo", model_cfg=mcfg,
                  add_params=value_head(mcfg.hidden_size, 0.5))
    rm = RewardModel.from_pretrained(_reward_model_dir(tmp_path, r))
    train, _ = synthetic_examples(cfg)
    prod = PPORollouts(r, train, cfg.ppo, rm, reference="strip", old_logps=True)
    import dataclasses
    params = jax.device_get(r.starting_params())
    # move the LoRA factors so that the policy differs from the reference (KL != 0)
    for name in ("q_proj", "v_proj"):
        w = params["layers"]["attn"][name]["kernel"]
        params["layers"]["attn"][name]["kernel"] = dataclasses.replace(w, b=w.b + 0.05)
    b = prod.next_batch(0, params)
    assert np.abs((b["old_logps"] - b["ref_logps"]) * b["loss_mask"]).max() > 1e-3
    mask = b["loss_mask"]
    tok = r.tokenizer
    texts, prompts, finished = [], [], []
    for i in range(8):
        m = mask[i] > 0
        ids = b["targets"][i][m].tolist()
        finished.append(ids[-1] == tok.eos_id)
        texts.append(tok.decode([t for t in ids if t != tok.eos_id]))
        prompts.append(_decode(tok, b["inputs"][i][:np.argmax(m) + 1].tolist()).rstrip("\n"))
    score = rm.score(list(zip(prompts, texts))) - 1.0 * (~np.asarray(finished))
    kl = (b["old_logps"] - b["ref_logps"]) * mask
    rew = -0.3 * kl
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
    rew[np.arange(8), last] += score
    v = b["old_values"] * mask               # V = 0 outside the completion
    rew = rew * mask
    adv = np.zeros_like(rew)
    for i in range(8):                       # GAE as the paper writes it, gamma 1, lam 0.95
        a = 0.0
        for t in range(mask.shape[1] - 1, -1, -1):
            nv = v[i, t + 1] if t + 1 < mask.shape[1] else 0.0
            a = rew[i, t] + nv - v[i, t] + 0.95 * a
            adv[i, t] = a
    adv = adv * mask
    np.testing.assert_allclose(b["returns"], (adv + v) * mask, rtol=1e-4, atol=1e-4)
    m = mask > 0
    white = (adv - adv[m].mean()) / np.sqrt(adv[m].var(ddof=1) + 1e-8)
    np.testing.assert_allclose(b["advantages"][m], white[m], rtol=1e-4, atol=1e-4)
    # the loss at the sampling policy: ratio 1, so pg = -mean(A) over the completion tokens,
    # and V = V_old, so vf = 0.5 * mean((V - R)^2)
    s = pg.PPOSettings()
    jb = {k: jnp.asarray(x) for k, x in b.items()}
    obj, st = pg.ppo_loss(r.model_cfg, s, r.method.apply_fn)(params, jb, None)
    n = float(mask.sum())
    pg_want = -b["advantages"][m].mean()
    vf_want = 0.5 * np.mean((b["old_values"][m] - b["returns"][m]) ** 2)
    np.testing.assert_allclose(float(st["policy_loss"]) / n, pg_want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(float(st["value_loss"]) / n, vf_want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(float(obj) / n, pg_want + 0.1 * vf_want, rtol=1e-3, atol=1e-4)
    # the value loss trains the value head only (hidden states detached)
    g = jax.grad(lambda p: pg.ppo_loss(r.model_cfg, pg.PPOSettings(vf_coef=1.0))(
        p, {**jb, "advantages": jnp.zeros_like(jb["advantages"])}, None)[0])(params)
    assert float(jnp.abs(g["value"]["kernel"]).max()) > 0
    others = [x for k, sub in g.items() if k != "value" for x in jax.tree.leaves(sub)]
    assert max(float(jnp.abs(x).max()) for x in others) == 0.0


def test_minibatches_visit_each_generated_row_once_per_epoch(tmp_path):
    cfg = _cfg(extra=[("train.batch_size", "8"), ("grpo.num_mini_batches", "2"),
                      ("grpo.num_iterations", "2")])
    r = Run.build(cfg, str(tmp_path), name="grpo")
    train, _ = synthetic_examples(cfg)
    prod = GRPORollouts(r, train, cfg.grpo, name="grpo", old_logps=True)
    assert prod.iters == 4 and prod.total == 16
    params = r.starting_params()
    steps = [prod.next_batch(s, params) for s in range(4)]
    gen = prod.cache[1]
    key = lambda b, i: (b["inputs"][i].tobytes(), float(b["advantages"][i, 0]))
    everything = sorted(key(gen, i) for i in range(16))
    for epoch in (0, 1):
        seen = sorted(key(b, i) for b in steps[2 * epoch:2 * epoch + 2] for i in range(8))
        assert seen == everything
    assert [key(steps[0], i) for i in range(8)] != [key(steps[2], i) for i in range(8)]
    with pytest.raises(ValueError, match="num_mini_batches"):
        cfg.grpo.num_mini_batches = 3
        GRPORollouts(r, train, cfg.grpo, name="grpo")
