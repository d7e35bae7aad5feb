"""Data: formatting, prompt masking, packing, disjoint splits (T13), local files, truncated-JSON recovery."""
import json

import pytest
import torch

from lola_train.data import (ALPACA_NO_INPUT, IGNORE_INDEX, ByteTokenizer, build_splits, pack, prepare_data,
                             recover_json_prefix, source_records, split_records, tokenize_record)
from lola_train.modeling.attention_config import ConfigError
from lola_train.recipe import DataSection, DataSource


def test_prompt_tokens_are_masked_and_response_plus_eos_supervised():
    tok = ByteTokenizer()
    ids, labels = tokenize_record({"prompt": "ab", "response": "cd"}, tok, "alpaca", mask_prompt=True)
    assert ids == [0, 97, 98, 99, 100, 0]
    assert labels == [IGNORE_INDEX] * 3 + [99, 100, 0]
    ids, labels = tokenize_record({"prompt": "ab", "response": "cd"}, tok, "alpaca", mask_prompt=False)
    assert labels == ids
    ids, labels = tokenize_record({"text": "xy"}, tok, "alpaca", mask_prompt=True)
    assert labels == ids == [0, 120, 121, 0]


def test_pack_concatenates_and_drops_the_tail():
    ids, labels = pack([([1, 2, 3], [-100, 2, 3]), ([4, 5, 6, 7], [4, 5, 6, 7])], seq_len=3)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 6]] and labels.tolist() == [[-100, 2, 3], [4, 5, 6]]


def test_splits_are_disjoint_and_ordered():
    records = [{"text": str(i)} for i in range(10)]
    parts = split_records(records, DataSection(val_records=2, test_records=3), seed=0)
    assert [r["text"] for r in parts["val"]] == ["0", "1"]
    assert [r["text"] for r in parts["test"]] == ["2", "3", "4"]
    assert len(parts["train"]) == 5
    with pytest.raises(ConfigError, match="data.val_records=6"):
        split_records(records, DataSection(val_records=6, test_records=4), seed=0)


def test_local_alpaca_jsonl_and_text_file(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "" if i % 2 else "ctx", "output": f"{i}"} for i in range(6)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = source_records(DataSource(kind="instruction", path=str(path)), seed=0)
    assert recs[1]["prompt"] == ALPACA_NO_INPUT.format(instruction="say 1") and recs[1]["response"] == "1"
    assert "### Input:\nctx" in recs[0]["prompt"]
    txt = tmp_path / "corpus.txt"
    txt.write_text("line one\n\nline two\n")
    assert source_records(DataSource(kind="text", path=str(txt)), seed=0) == [{"text": "line one"},
                                                                               {"text": "line two"}]
    with pytest.raises(ConfigError, match="text_field='body'"):
        source_records(DataSource(kind="text", path=str(path), text_field="body"), seed=0)


def test_truncated_json_array_recovers_complete_records():
    text = json.dumps([{"id": 1}, {"id": 2}, {"id": 3, "x": "long"}])[:-12]
    assert recover_json_prefix(text) == [{"id": 1}, {"id": 2}]


def test_build_and_cache_splits(tmp_path):
    cfg = DataSection(sources=[DataSource(kind="synthetic", max_records=300)], tokenizer="bytes", seq_len=32,
                      val_records=30, test_records=20)
    packed, records = build_splits(cfg, ByteTokenizer(), seed=0, progress=False)
    assert packed["train"].input_ids.shape[1] == 32 and len(records["test"]) == 20
    assert (packed["train"].labels == IGNORE_INDEX).any() and (packed["train"].labels != IGNORE_INDEX).any()
    loaded = prepare_data(cfg, ByteTokenizer(), 0, tmp_path)
    assert torch.equal(loaded["val"].input_ids, packed["val"].input_ids)
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 20
    stamp = (tmp_path / "fingerprint").read_text()
    cfg.seq_len = 16  # a changed data section rebuilds
    assert prepare_data(cfg, ByteTokenizer(), 0, tmp_path)["train"].input_ids.shape[1] == 16
    assert (tmp_path / "fingerprint").read_text() != stamp
    cfg.seq_len = 100000
    with pytest.raises(ConfigError, match="data.seq_len=100000"):
        build_splits(cfg, ByteTokenizer(), seed=0, progress=False)
