"""GLUE readers on the real official-layout files, MNLI/QQP on small files in the same layout,
custom tasks, the glue config and presets, and the bad-input errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cramming.config import CONFIG_DIR, to_dataclass
from cramming.errors import ConfigError, DataError
from cramming.glue import CustomTaskConfig, GlueConfig
from cramming.glue import tasks as T

GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
LABELLED = GLUE_DIR.parent / "labelled"


@pytest.fixture
def glue_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "glue"


# ---------------------------------------------------------------------------------------------
# Real files (counts and label distributions from shared/data/glue/SOURCES.md)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "n_train", "n_dev", "dev_counts"),
    [
        ("cola", 8551, 1043, {1: 721, 0: 322}),
        ("sst2", 67349, 872, {1: 444, 0: 428}),
        ("mrpc", 3668, 408, {1: 279, 0: 129}),
        ("stsb", 5749, 1500, None),
        ("rte", 2490, 277, {0: 146, 1: 131}),  # 0 = entailment
    ],
)
def test_official_files_parse_with_right_counts(glue_dir, task, n_train, n_dev, dev_counts):
    data = T.load_task(task, glue_dir)
    assert len(data.train) == n_train and len(data.dev["dev"]) == n_dev
    if dev_counts is None:  # STS-B: scores in [0, 5]
        labels = data.train.labels + data.dev["dev"].labels
        assert min(labels) == 0.0 and max(labels) == 5.0
        assert all(isinstance(v, float) for v in labels)
    else:
        assert Counter(data.dev["dev"].labels) == dev_counts
        assert set(data.train.labels) == set(range(len(data.spec.labels)))
    pair = data.spec.name in ("mrpc", "stsb", "rte")
    assert (data.train.texts_b is not None) == pair
    assert all(t.strip() for t in data.train.texts_a)


def test_quirks_cola_no_header_mrpc_bom_and_quotes(glue_dir):
    cola = T.load_task("cola", glue_dir)
    # No header: the very first line of train.tsv is data.
    first = (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")
    assert cola.train.texts_a[0] == first[3].strip() and cola.train.labels[0] == int(first[1])
    mrpc = T.load_task("mrpc", glue_dir)
    # The BOM header was understood, and a quote that starts a field is kept as text (quoting off).
    assert mrpc.dev["dev"].texts_b[0].startswith('" The foodservice pie business')
    rte = T.load_task("rte", glue_dir)
    assert any('"' in t for t in rte.train.texts_a)


def test_qnli_dev_and_missing_train_named(glue_dir):
    dev = T.read_official_split(T.TASK_SPECS["qnli"], glue_dir / "QNLI" / "dev.tsv")
    assert len(dev) == 5463 and Counter(dev.labels) == {0: 2702, 1: 2761}
    with pytest.raises(DataError, match=r"lacks QNLI/train\.tsv"):
        T.load_task("qnli", glue_dir)


# ---------------------------------------------------------------------------------------------
# MNLI and QQP on small files in the official layout
# ---------------------------------------------------------------------------------------------

MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                     "sentence2_parse sentence1 sentence2 label1 gold_label").split()
MNLI_DEV_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                   "sentence2_parse sentence1 sentence2 label1 label2 label3 label4 label5 gold_label").split()


def _mnli_row(i: int, header: list[str], s1: str, s2: str, label: str) -> str:
    values = {"index": str(i), "promptID": str(100 + i), "pairID": f"{100 + i}e", "genre": "fiction",
              "sentence1": s1, "sentence2": s2, "gold_label": label}
    return "\t".join(values.get(col, "( x )" if "parse" in col else label) for col in header)


def _write_mnli(root: Path, dev_label: str = "neutral") -> None:
    folder = root / "MNLI"
    folder.mkdir(parents=True)
    rows = [("The cat sat.", "A cat is sitting.", "entailment"), ("He left early.", "He stayed all night.", "contradiction"),
            ('She said "hi".', "She spoke.", "neutral")]
    (folder / "train.tsv").write_text("\n".join(["\t".join(MNLI_TRAIN_HEADER)] + [
        _mnli_row(i, MNLI_TRAIN_HEADER, *r) for i, r in enumerate(rows)]) + "\n")
    for name, label in (("dev_matched.tsv", "entailment"), ("dev_mismatched.tsv", dev_label)):
        (folder / name).write_text("\n".join(["\t".join(MNLI_DEV_HEADER)] + [
            _mnli_row(0, MNLI_DEV_HEADER, "Dogs bark.", "Animals make noise.", label),
            _mnli_row(1, MNLI_DEV_HEADER, "It rains.", "It is dry.", "contradiction")]) + "\n")


def test_mnli_layout_matched_and_mismatched(tmp_path):
    _write_mnli(tmp_path)
    data = T.load_task("MNLI", tmp_path)
    assert data.train.labels == [0, 2, 1]  # entailment, contradiction, neutral in the hub's order
    assert data.train.texts_b == ["A cat is sitting.", "He stayed all night.", "She spoke."]
    assert data.train.texts_a[2] == 'She said "hi".'
    assert set(data.dev) == {"matched", "mismatched"}
    assert data.dev["matched"].labels == [0, 2] and data.dev["mismatched"].labels == [1, 2]
    assert data.spec.headline_keys() == ["matched_accuracy", "mismatched_accuracy"]


def test_mnli_unknown_label_names_file_and_line(tmp_path):
    _write_mnli(tmp_path, dev_label="-")
    with pytest.raises(DataError, match=r"dev_mismatched\.tsv:2: \[mnli\] label '-' is not one of"):
        T.load_task("mnli", tmp_path)
    data = T.load_task("mnli", tmp_path, on_bad_row="skip")
    assert len(data.dev["mismatched"]) == 1 and data.dev["mismatched"].skipped == 1


def test_qqp_layout(tmp_path):
    (tmp_path / "QQP").mkdir()
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    train = header + "0\t1\t2\tHow do I cook rice?\tWhat is the way to cook rice?\t1\n1\t3\t4\tWhy is the sky blue?\tWho won?\t0\n"
    (tmp_path / "QQP" / "train.tsv").write_text(train)
    (tmp_path / "QQP" / "dev.tsv").write_text(header + "7\t9\t10\tIs it \"safe\"?\tIs it safe?\t1\n")
    data = T.load_task("qqp", tmp_path)
    assert data.train.labels == [1, 0] and data.train.texts_a[1] == "Why is the sky blue?"
    assert data.dev["dev"].texts_a == ['Is it "safe"?'] and data.spec.headline == "f1"
    # A truncated row (too few fields) is an error naming the line
    (tmp_path / "QQP" / "dev.tsv").write_text(header + "7\t9\t10\tonly one question\n")
    with pytest.raises(DataError, match=r"QQP/dev\.tsv:2: row has too few fields"):
        T.load_task("qqp", tmp_path)


def test_empty_text_and_bad_score_are_errors(tmp_path):
    (tmp_path / "STS-B").mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    good = "0\tg\tf\ty\t0\tn\tn\tA man.\tA person.\t4.0\n"
    (tmp_path / "STS-B" / "dev.tsv").write_text(header + good)
    (tmp_path / "STS-B" / "train.tsv").write_text(header + good + "1\tg\tf\ty\t0\tn\tn\t  \tA person.\t3.0\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: empty text"):
        T.load_task("stsb", tmp_path)
    (tmp_path / "STS-B" / "train.tsv").write_text(header + good + "1\tg\tf\ty\t0\tn\tn\tA.\tB.\thigh\n")
    with pytest.raises(DataError, match=r"score 'high' is not a finite number"):
        T.load_task("stsb", tmp_path)


def test_missing_data_dir_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        T.load_task("rte", tmp_path / "nope")
    with pytest.raises(DataError, match=r"lacks RTE/train\.tsv \(needed for task rte\)"):
        T.load_task("rte", tmp_path)


# ---------------------------------------------------------------------------------------------
# Task names, hub, custom tasks
# ---------------------------------------------------------------------------------------------


def test_task_names_are_validated():
    assert T.validate_task_names(["SST-2", "STS-B", "rte", "RTE"]) == ["sst2", "stsb", "rte"]
    with pytest.raises(ConfigError, match="unknown task 'squad'.*cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte"):
        T.validate_task_names(["squad"])
    with pytest.raises(ConfigError, match="WNLI is excluded"):
        T.validate_task_names(["wnli"])


def test_hub_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(T, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match=r"no network: pass glue\.data_dir=<folder in the official GLUE layout>"):
        T.load_task("rte", None)


def _uci_subset(tmp_path: Path, n: int, skip: int = 0) -> Path:
    if not LABELLED.is_dir():
        pytest.skip(f"{LABELLED} is absent")
    lines = (LABELLED / "uci_sentences.tsv").read_text().splitlines()
    # amazon/imdb/yelp blocks: take rows from across the file so both labels appear
    body = lines[1 + skip:: 3000 // n][:n]
    path = tmp_path / f"uci_{skip}.tsv"
    path.write_text("\n".join([lines[0], *body]) + "\n")
    return path


def test_custom_tsv_csv_jsonl(tmp_path):
    train = _uci_subset(tmp_path, 40)
    dev = _uci_subset(tmp_path, 20, skip=1)
    task = CustomTaskConfig(name="uci", train_file=str(train), dev_file=str(dev), text_columns=["sentence"],
                            label_column="label")
    data = T.load_custom_task(task)
    assert data.spec.labels == ("0", "1") and len(data.train) == 40 and len(data.dev["dev"]) == 20
    assert data.spec.metrics[0] == "accuracy" and set(data.spec.metrics) == {"accuracy", "f1", "mcc"}

    (tmp_path / "t.csv").write_text('a,b,y\n"x, with comma","pair",2.5\nfoo,bar,1\n')
    reg = CustomTaskConfig(name="reg", train_file=str(tmp_path / "t.csv"), dev_file=str(tmp_path / "t.csv"),
                           text_columns=["a", "b"], label_column="y", kind="regression", metric="spearman")
    data = T.load_custom_task(reg)
    assert data.train.texts_a == ["x, with comma", "foo"] and data.train.labels == [2.5, 1.0]

    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    js = CustomTaskConfig(name="js", train_file=str(tmp_path / "t.jsonl"), dev_file=str(tmp_path / "t.jsonl"),
                          text_columns=["text"], label_column="label", labels=["neg", "pos"], metric="f1")
    data = T.load_custom_task(js)
    assert data.train.labels == [1, 0] and data.spec.headline == "f1"


def test_custom_task_bad_inputs(tmp_path):
    good = tmp_path / "g.tsv"
    good.write_text("s\ty\nfine\t0\nalso fine\t1\n")
    bad = tmp_path / "b.tsv"
    bad.write_text("s\ty\nok\t0\nodd\t7\n")
    task = CustomTaskConfig(name="c", train_file=str(good), dev_file=str(bad), text_columns=["s"], label_column="y")
    with pytest.raises(DataError, match=r"b\.tsv:3: \[c\] label '7' is not one of the task's labels \['0', '1'\]"):
        T.load_custom_task(task)
    missing = CustomTaskConfig(name="c", train_file=str(good), dev_file=str(tmp_path / "x.tsv"), text_columns=["s"],
                               label_column="y")
    with pytest.raises(DataError, match=r"missing dev_file .*x\.tsv"):
        T.load_custom_task(missing)
    wrong_col = CustomTaskConfig(name="c", train_file=str(good), dev_file=str(good), text_columns=["text"],
                                 label_column="y")
    with pytest.raises(DataError, match="no column 'text'"):
        T.load_custom_task(wrong_col)
    with pytest.raises(ConfigError, match="GLUE task name"):
        CustomTaskConfig(name="rte", train_file="a", dev_file="b", text_columns=["s"], label_column="y")
    with pytest.raises(ConfigError, match="does not fit kind=regression"):
        CustomTaskConfig(name="r", train_file="a", dev_file="b", text_columns=["s"], label_column="y",
                         kind="regression", metric="accuracy")


# ---------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_presets_compose_into_glue_config():
    cram = to_dataclass(GlueConfig, _compose().glue, "glue")
    assert (cram.name, cram.batch_size, cram.lr, cram.schedule, cram.epochs, cram.trials, cram.dropout) == (
        "cramming", 16, 4e-5, "cosine", 5, 5, 0.1)
    assert cram.tasks == list(T.GLUE_TASKS) and cram.max_seq_len == 128
    orig = to_dataclass(GlueConfig, _compose("glue=bert-original").glue, "glue")
    assert (orig.name, orig.batch_size, orig.lr, orig.epochs, orig.trials) == ("bert-original", 32, 2e-5, 5, 5)
    custom = _compose("+glue.custom_tasks=[{name: s, train_file: a.tsv, dev_file: b.tsv, text_columns: [t], label_column: y}]")
    parsed = to_dataclass(GlueConfig, custom.glue, "glue")
    assert isinstance(parsed.custom_tasks[0], CustomTaskConfig) and parsed.custom_tasks[0].name == "s"


def test_glue_config_validation():
    with pytest.raises(ConfigError, match="unknown key.*glue.learning_rate"):
        to_dataclass(GlueConfig, OmegaConf.create({"learning_rate": 1.0}), "glue")
    with pytest.raises(ConfigError, match="unknown task 'foo'"):
        GlueConfig(tasks=["foo"])
    with pytest.raises(ConfigError, match="glue.seeds has 2 entries"):
        GlueConfig(trials=3, seeds=[1, 2])
    with pytest.raises(ConfigError, match="warmup_fraction"):
        GlueConfig(warmup_fraction=1.5)
    assert GlueConfig(tasks="RTE").tasks == ["rte"]
    assert GlueConfig(trials=3).trial_seeds(10) == [10, 11, 12]
    assert GlueConfig(trials=2, seeds=[7, 3]).trial_seeds(10) == [7, 3]
